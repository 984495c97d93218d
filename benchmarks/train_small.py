"""Train a small LLaDA (masked diffusion LM) on the synthetic tasks of ``surelock_fx.tasks`` or on code infilling.

    python benchmarks/train_small.py --out DIR [--corpus tasks|stdlib] [--minutes M] [--steps S] [--resume]

``--corpus stdlib`` trains on infilling the Python standard library's source (``code_corpus.py``: a
byte-level BPE tokenizer trained on the training modules, spans cut out of them as prompts
``prefix <|hole|> suffix`` with the span as answer); the periodic evaluation is exact match on
spans of held-out modules. ``--pretrain-frac`` makes that share of the sequences LLaDA pre-training
rows: their prompt tokens are masked (and learnt) at the same ratio as the answer.

Objective: LLaDA's SFT loss. Each sequence is ``<|bos|> prompt <|eot|>`` followed by an answer
region of ``GEN_LENGTH`` tokens (answer + EOS padding; on a ``--long-frac`` share of the steps a longer
region, with proportionally fewer problems); prompts of a batch are left-padded with
masked-out keys. Per sequence t ~ U(0, 1) (stratified over the batch), p = (1 - eps) t + eps;
each answer-region token (never the prompt) is replaced by the mask token with probability p; the
loss is the cross-entropy on masked positions weighted by 1/p, summed, divided by the answer-region
length and averaged over the batch. AdamW, linear warmup then cosine decay to 10%.

The schedule runs for ``--steps`` optimizer steps, or, without ``--steps``, over the wall-time
budget ``--minutes`` (progress = elapsed / budget, evaluation included). Every ``--eval-every``
steps the dense accuracy per task is measured with ``surelock_fx.generate`` (temperature 0,
low_confidence, the default decode settings of ``surelock_fx.tasks.DEFAULT_DECODE``) on fresh
problems. DIR receives config.json + model.safetensors (``surelock_fx.models.save_model``), the
tokenizer files and ``training_log.json``; with ``--resume`` a run continues from ``DIR/resume.pt`` (written at every
evaluation: weights, optimizer, step, elapsed time, random states), so a cut-off run is not lost.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

# Other processes share this machine's cores: with libgomp's default (spinning) wait policy, two
# threads on an oversubscribed CPU run a step many times slower than one. Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from surelock_fx import infill  # noqa: E402
from surelock_fx.evaluate import accuracy, decode_problems, task_accuracy  # noqa: E402
from surelock_fx.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModel, save_model  # noqa: E402
from surelock_fx.tasks import (  # noqa: E402
    DEFAULT_DECODE,
    GEN_LENGTH,
    GENERATORS,
    TASKS,
    build_tokenizer,
    encode_prompt,
    special_token_ids,
)

import code_corpus  # noqa: E402
from common import machine_info  # noqa: E402

EPS = 1e-3
PROMPT_TOKENS = 20  # a typical prompt length, for scaling the batch of long-region steps
EVAL_SEED = 1_000_003  # fresh problems: training draws from its own random stream


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output checkpoint directory")
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-time budget (also a hard cap with --steps)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: run by the time budget)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=6)
    ap.add_argument("--n-heads", type=int, default=8)
    ap.add_argument("--n-kv-heads", type=int, default=None, help="key/value heads (GQA; default: --n-heads)")
    ap.add_argument("--family", choices=("llada", "dream"), default="llada",
                    help="LLaDA, or Dream (Qwen2 layout; position i predicted from row i - 1)")
    ap.add_argument("--mlp-hidden", type=int, default=768)
    ap.add_argument("--per-task", type=int, default=6, help="problems per task in a batch")
    ap.add_argument("--mix", default="", help="per-task batch counts overriding --per-task, e.g. add=10,sort=4")
    ap.add_argument("--long-frac", type=float, default=0.2,
                    help="share of steps whose answer region is longer than GEN_LENGTH (EOS-padded to one of "
                         "--long-lengths, fewer problems per task to keep the step cost), so that the model "
                         "also decodes at the longer gen_length of the quality sweep")
    ap.add_argument("--long-lengths", default="32,64,128,256")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200, help="warmup steps")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=64, help="fresh problems per task at each periodic eval")
    ap.add_argument("--final-eval-n", type=int, default=256, help="fresh problems per task at the end")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--corpus", choices=("tasks", "stdlib"), default="tasks",
                    help="the built-in tasks, or infilling the Python standard library's source")
    ap.add_argument("--stdlib", default=str(code_corpus.stdlib_root()),
                    help="the standard library's directory, whose source --corpus stdlib trains on (default: this "
                         "Python's)")
    ap.add_argument("--batch-size", type=int, default=24, help="spans per step (--corpus stdlib)")
    ap.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary (--corpus stdlib)")
    ap.add_argument("--pretrain-frac", type=float, default=0.0,
                    help="share of rows whose prompt is masked and learnt too (LLaDA pre-training rows)")
    ap.add_argument("--resume", action="store_true", help="continue from DIR/resume.pt if it exists")
    return ap.parse_args(argv)


def make_model(args, tokenizer) -> LLaDAModel | DreamModel:
    """A fresh model of ``--family``: our LLaDAModel, or a DreamModel (Qwen2 layout, q/k/v biases, GQA with
    ``--n-kv-heads``; trained on shifted targets, ``diffusion_loss``)."""
    special = special_token_ids(tokenizer)
    if args.family == "dream":
        config = DreamConfig(
            hidden_size=args.d_model, num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
            num_key_value_heads=args.n_kv_heads or args.n_heads, intermediate_size=args.mlp_hidden,
            vocab_size=len(tokenizer), rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=512,
            **special,
        )
        return DreamModel(config)
    config = LLaDAConfig(
        d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
        mlp_hidden_size=args.mlp_hidden, vocab_size=len(tokenizer), rope_theta=10000.0,
        max_sequence_length=512, **special,  # prompt + the longest answer region
    )
    # PyTorch's default initialisation (embeddings N(0, 1), Kaiming-uniform linears): in pilots a
    # GPT-style N(0, 0.02) initialisation left this tiny model on its plateau far longer.
    return LLaDAModel(config)


def left_padded(rows: list[tuple[list[int], list[int]]], pad: int):
    """(prompt ids, answer-region ids) rows as one left-padded batch: ids, attention mask, answer-region mask."""
    region = len(rows[0][1])
    width = max(len(p) for p, _ in rows) + region
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        seq = torch.tensor(p + a)
        ids[i, width - len(seq):] = seq
        attn[i, width - len(seq):] = 1
    answer_mask = torch.zeros_like(attn, dtype=torch.bool)
    answer_mask[:, width - region:] = True
    return ids, attn, answer_mask


class TaskData:
    """The built-in tasks: a batch of ``counts[task]`` problems of every task, as one left-padded sub-batch
    per task; accuracy per task.

    Grouping by task keeps padding small (prompt lengths differ a lot between tasks); the
    gradient of a step is that of the whole mixed batch (sub-batch losses are summed).
    """

    decode = DEFAULT_DECODE

    def __init__(self, args):
        self.tok = build_tokenizer()
        self.rng = random.Random(f"train:{args.seed}")
        self.counts = dict.fromkeys(TASKS, args.per_task)
        for item in filter(None, args.mix.split(",")):
            task, _, n = item.partition("=")
            if task not in self.counts:
                raise SystemExit(f"--mix: unknown task {task!r}; tasks are {', '.join(TASKS)}")
            self.counts[task] = int(n)
        self.names = [t for t in TASKS if self.counts[t]]
        self.long_frac = args.long_frac
        self.long_lengths = tuple(int(n) for n in args.long_lengths.split(",") if n)
        self.eos = self.tok.convert_tokens_to_ids("<|eos|>")

    def sub_batch(self, task: str, region: int, count: int):
        rows = []
        for _ in range(count):
            prompt, answer = GENERATORS[task](self.rng)
            a = self.tok.encode(answer, add_special_tokens=False)
            assert len(a) < GEN_LENGTH, (prompt, answer)
            rows.append((encode_prompt(self.tok, prompt), a + [self.eos] * (region - len(a))))
        return left_padded(rows, self.eos)

    def __call__(self):
        region, scale = GEN_LENGTH, 1.0
        if self.long_lengths and self.rng.random() < self.long_frac:
            region = self.rng.choice(self.long_lengths)
            scale = (PROMPT_TOKENS + GEN_LENGTH) / (PROMPT_TOKENS + region)
        return [self.sub_batch(task, region, max(1, round(n * scale)))
                for task, n in self.counts.items() if n]

    def evaluate(self, model, n: int, seed: int) -> dict[str, float]:
        return task_accuracy(model, self.tok, n=n, seed=seed, task_names=self.names)


class CodeData:
    """Infilling the standard library's source (``code_corpus``): ``--batch-size`` spans of random kinds
    from the training modules as one left-padded batch; exact match per span kind on held-out modules."""

    decode = infill.DEFAULT_DECODE
    names = list(code_corpus.KINDS)

    def __init__(self, args):
        train, self.held_out = code_corpus.split(code_corpus.source_files(Path(args.stdlib)))
        self.tok = code_corpus.train_tokenizer(train.values(), args.vocab_size)
        self.sampler = code_corpus.InfillSampler(train, args.seed)
        self.rng = self.sampler.rng
        self.counts = {"batch_size": args.batch_size, "train_files": len(train), "held_out_files": len(self.held_out)}
        self.batch_size = args.batch_size
        self.eos = self.tok.convert_tokens_to_ids("<|eos|>")

    def row(self, sampler, kind=None):
        """(prompt ids, answer ids + EOS padding) of a random span short enough for the answer region."""
        while True:
            example = sampler(kind)
            answer = self.tok.encode(example.answer, add_special_tokens=False)
            if len(answer) < infill.GEN_LENGTH:
                prompt = encode_prompt(self.tok, infill.infill_prompt(example.prefix, example.suffix))
                return example, (prompt, answer + [self.eos] * (infill.GEN_LENGTH - len(answer)))

    def __call__(self):
        return [left_padded([self.row(self.sampler)[1] for _ in range(self.batch_size)], self.eos)]

    def evaluate(self, model, n: int, seed: int) -> dict[str, float]:
        sampler = code_corpus.InfillSampler(self.held_out, seed)
        out = {}
        for kind in self.names:
            examples = [self.row(sampler, kind)[0] for _ in range(n)]
            run = decode_problems(model, self.tok, [infill.infill_prompt(e.prefix, e.suffix) for e in examples],
                                  batch_size=64, progress=False, **self.decode)
            out[kind] = accuracy(run.answers, [e.answer for e in examples])
        return out


def diffusion_loss(model, ids, attn, learnable, mask_id, t, total_batch: int):
    """LLaDA's loss of one sub-batch, normalised by the whole batch (sum over sub-batches = mean): each
    ``learnable`` token is masked with probability p(t), the cross-entropy on masked tokens weighted by
    1/p and divided by the row's learnable count. A model with ``shifted_logits`` (Dream) predicts
    position i from row i-1."""
    p_mask = ((1 - EPS) * t + EPS)[:, None].expand_as(ids)
    masked = (torch.rand(ids.shape) < p_mask) & learnable
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    logits = model(noisy, attention_mask=attn)
    if getattr(model.config, "shifted_logits", False):
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    weight = 1.0 / (p_mask * learnable.sum(1, keepdim=True) * total_batch)
    token_loss = F.cross_entropy(logits[masked], ids[masked], reduction="none") * weight[masked]
    return token_loss.sum()


def train_step(model, opt, batch, mask_id, special_ids: torch.Tensor, pretrain_frac: float) -> float:
    """One optimizer step on a list of sub-batches; t ~ U(0, 1) stratified over the whole batch. A
    ``pretrain_frac`` share of the rows also learns its prompt (special tokens and padding excepted)."""
    total = sum(ids.shape[0] for ids, _, _ in batch)
    t_all = ((torch.rand(1) + torch.arange(total) / total) % 1.0)[torch.randperm(total)]
    opt.zero_grad(set_to_none=True)
    loss_sum, lo = 0.0, 0
    for ids, attn, answer_mask in batch:
        t = t_all[lo:lo + ids.shape[0]]
        lo += ids.shape[0]
        learnable = answer_mask
        if pretrain_frac:
            pretrain = torch.rand(ids.shape[0], 1) < pretrain_frac
            learnable = answer_mask | (pretrain & attn.bool() & ~torch.isin(ids, special_ids))
        loss = diffusion_loss(model, ids, attn, learnable, mask_id, t, total)
        loss.backward()
        loss_sum += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss_sum


def lr_at(args, step: int, progress: float) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * cos)


def save(model, tokenizer, out: Path, log: dict) -> None:
    was_training = model.training
    save_model(model.eval(), out)
    tokenizer.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(log, indent=2))
    model.train(was_training)


def command_line(args: dict) -> str:
    """The command that reproduces a run, from its logged arguments."""
    defaults = vars(parse_args(["--out", args["out"]]))
    flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in args.items()
                     if k != "out" and v != defaults.get(k) and v is not None)
    return f"python benchmarks/train_small.py --out {args['out']} {flags}".strip()


def training_card(log: dict) -> str:
    """TRAINING.md of a finished run: how to reproduce it, what it took, what it reached."""
    args, machine = log["args"], log.get("machine", {})
    code = args.get("corpus") == "stdlib"
    rows = "\n".join(f"| {e['step']} | {e['elapsed_s'] / 60:.1f} | {e['n_per_task']} | "
                      + " | ".join(f"{e['accuracy'].get(t, float('nan')):.3f}" for t in log["tasks"]) + " |"
                      for e in log["evals"])
    counts = log["task_batch_counts"]
    if code:
        name, measure, per = "tiny-code", "Dense exact match per span kind", "spans per kind"
        data = f"""infilling the Python standard library's source (`benchmarks/code_corpus.py`):
  {counts['train_files']} training files, {counts['held_out_files']} held-out files (whole top-level modules,
  `surelock_fx/assets/infill/heldout_modules.txt`); a byte-level BPE tokenizer (`tokenizers`) trained on the
  training files, {log['config']['vocab_size']} tokens with `<|hole|>`; prompts `prefix<|hole|>suffix`, answers
  the span cut out, of kinds {', '.join(log['tasks'])} (one line, 2-4 lines, a short function's body), inferable
  spans only (every name in the answer a keyword, a builtin or a name of the prompt: `code_corpus.inferable`);
  {counts['batch_size']} spans per step, a {args.get('pretrain_frac', 0):g} share of them pre-training rows
  (prompt masked and learnt too); answer region {log['decode']['gen_length']} tokens"""
        fresh = f"spans of held-out modules (seed {EVAL_SEED})"
    else:
        name, measure, per = "tiny-tasks", "Dense accuracy", "problems per task"
        if args.get("family") == "dream":
            name = "tiny-dream"
        data = f"""tasks {', '.join(log['tasks'])} with per-step problem counts
  {json.dumps(counts)}; answer region {log['decode']['gen_length']} tokens, on a
  {args.get('long_frac', 0):g} share of the steps EOS-padded to one of {args.get('long_lengths', '-')} tokens"""
        fresh = f"fresh problems (seed {EVAL_SEED})"
    dream = args.get("family") == "dream"
    family = (f"our `DreamModel` (Qwen2 layout, q/k/v biases, {args.get('n_kv_heads') or args['n_heads']} key/value "
              "heads)") if dream else "our `LLaDAModel`"
    shift = "; targets shifted: position i is predicted from row i - 1, as Dream does" if dream else ""
    return f"""# {name}: how this checkpoint was trained

Generated by `benchmarks/train_small.py` at the end of the run (from `training_log.json`).

```bash
{command_line(args)}
```

- Model: {family}, {log['n_params'] / 1e6:.2f}M parameters, {json.dumps(log['config'])}.
- Objective: LLaDA's SFT masked-diffusion loss (one masking ratio per sequence, loss on masked answer
  tokens weighted by 1/ratio{shift}); {data}.
- Ran {log['steps']} optimizer steps in {log['train_wall_s'] / 60:.1f} min of training
  ({log['total_wall_s'] / 60:.1f} min with evaluations) on {machine.get('cpu_model', '?')},
  {args['threads']} torch thread(s), torch {machine.get('torch_version', '?')}.
- {measure} at the default decode settings {json.dumps(log['decode'])}, {fresh}:
  {json.dumps(log['final_accuracy'])}.

{log.get('note', '')}

| step | minutes | {per} | {' | '.join(log['tasks'])} |
|---:|---:|---:|{'---:|' * len(log['tasks'])}
{rows}
"""


def make_data(args):
    return CodeData(args) if args.corpus == "stdlib" else TaskData(args)


def snapshot(path: Path, model, opt, data, state: dict) -> None:
    """Everything ``--resume`` needs to continue the run where it stood (written atomically)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "data_rng": data.rng.getstate(),
                "torch_rng": torch.get_rng_state(), **state}, tmp)
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(args)
    tokenizer = data.tok
    model = make_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    sizes = {k: getattr(model.config, k)
             for k in ('d_model', 'n_layers', 'n_heads', 'n_kv_heads', 'mlp_hidden_size', 'vocab_size')}
    print(f"model: {n_params / 1e6:.2f}M parameters ({n_params * 4 / 2**20:.1f} MiB fp32); config {json.dumps(sizes)}",
          flush=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    log = {"args": vars(args), "n_params": n_params, "evals": [], "machine": machine_info(),
           "config": sizes, "task_batch_counts": data.counts, "tasks": data.names}
    mask_id = model.config.mask_token_id
    special_ids = torch.tensor(tokenizer.all_special_ids)
    budget = args.minutes * 60
    resume_file = out / "resume.pt"
    ema, step, done_s = None, 0, 0.0
    if args.resume and resume_file.is_file():
        state = torch.load(resume_file, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        data.rng.setstate(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        ema, step, done_s, log = state["ema"], state["step"], state["elapsed_s"], state["log"]
        log.setdefault("resumed_at", []).append(step)
        print(f"resumed from {resume_file} at step {step}, {done_s / 60:.1f} min", flush=True)

    def elapsed() -> float:
        return done_s + time.perf_counter() - start

    def run_eval(step, n, seed):
        model.eval()
        t0 = time.perf_counter()
        acc = data.evaluate(model, n, seed)
        model.train()
        entry = {"step": step, "elapsed_s": round(elapsed(), 1), "n_per_task": n,
                 "accuracy": acc, "eval_s": round(time.perf_counter() - t0, 1)}
        log["evals"].append(entry)
        tqdm.write(f"[eval step {step}] " + " ".join(f"{k}={v:.3f}" for k, v in acc.items())
                   + f"  min={min(acc.values()):.3f} ({entry['eval_s']}s)")
        return acc

    start = time.perf_counter()
    bar = tqdm(total=args.steps, initial=step, desc="train", unit="step", mininterval=5, file=sys.stdout)
    model.train()
    while True:
        if args.steps is not None and step >= args.steps:
            break
        if elapsed() >= budget:
            tqdm.write(f"time budget of {args.minutes} min reached at step {step}")
            break
        progress = step / args.steps if args.steps else elapsed() / budget
        lr = lr_at(args, step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = train_step(model, opt, data(), mask_id, special_ids, args.pretrain_frac)
        step += 1
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr:.2e}", refresh=False)
        if step % args.eval_every == 0:
            run_eval(step, args.eval_n, EVAL_SEED + step)
            save(model, tokenizer, out, log)  # a snapshot, overwritten at the end
            snapshot(resume_file, model, opt, data, {"ema": ema, "step": step, "elapsed_s": elapsed(), "log": log})
    bar.close()
    train_s = elapsed()
    final = run_eval(step, args.final_eval_n, EVAL_SEED)
    total_s = elapsed()
    log.update(steps=step, train_wall_s=round(train_s, 1), total_wall_s=round(total_s, 1),
               final_accuracy=final, final_loss_ema=ema, decode=data.decode)
    save(model, tokenizer, out, log)
    resume_file.unlink(missing_ok=True)
    (out / "TRAINING.md").write_text(training_card(log))
    print(f"done: {step} steps, training {train_s / 60:.1f} min, total {total_s / 60:.1f} min; "
          f"final accuracy {json.dumps(final)}; saved to {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
