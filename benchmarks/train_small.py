"""Train a small LLaDA (masked diffusion LM) on the synthetic tasks of ``surelock_fx.tasks``.

    python benchmarks/train_small.py --out DIR [--minutes M] [--steps S] [--seed S]

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
tokenizer files and ``training_log.json``.
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

from surelock_fx.evaluate import task_accuracy  # noqa: E402
from surelock_fx.models import LLaDAConfig, LLaDAModel, save_model  # noqa: E402
from surelock_fx.tasks import (  # noqa: E402
    DEFAULT_DECODE,
    GEN_LENGTH,
    GENERATORS,
    TASKS,
    build_tokenizer,
    encode_prompt,
    special_token_ids,
)

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
    return ap.parse_args(argv)


def make_model(args, tokenizer) -> LLaDAModel:
    config = LLaDAConfig(
        d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
        mlp_hidden_size=args.mlp_hidden, vocab_size=len(tokenizer), rope_theta=10000.0,
        max_sequence_length=512, **special_token_ids(tokenizer),  # prompt + the longest answer region
    )
    # PyTorch's default initialisation (embeddings N(0, 1), Kaiming-uniform linears): in pilots a
    # GPT-style N(0, 0.02) initialisation left this tiny model on its plateau far longer.
    model = LLaDAModel(config)
    return model


class Batcher:
    """A batch of ``per_task`` problems of every task, as one left-padded sub-batch per task.

    Grouping by task keeps padding small (prompt lengths differ a lot between tasks); the
    gradient of a step is that of the whole mixed batch (sub-batch losses are summed).
    """

    def __init__(self, tokenizer, seed: int, counts: dict[str, int], long_frac: float = 0.0,
                 long_lengths: tuple[int, ...] = ()):
        self.tok = tokenizer
        self.rng = random.Random(f"train:{seed}")
        self.counts = counts
        self.long_frac, self.long_lengths = long_frac, long_lengths
        self.eos = tokenizer.convert_tokens_to_ids("<|eos|>")

    def sub_batch(self, task: str, region: int, count: int):
        rows = []
        for _ in range(count):
            prompt, answer = GENERATORS[task](self.rng)
            a = self.tok.encode(answer, add_special_tokens=False)
            assert len(a) < GEN_LENGTH, (prompt, answer)
            rows.append((encode_prompt(self.tok, prompt), a + [self.eos] * (region - len(a))))
        width = max(len(p) for p, _ in rows) + region
        ids = torch.full((len(rows), width), self.eos, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, a) in enumerate(rows):
            seq = torch.tensor(p + a)
            ids[i, width - len(seq):] = seq
            attn[i, width - len(seq):] = 1
        answer_mask = torch.zeros_like(attn, dtype=torch.bool)
        answer_mask[:, width - region:] = True
        return ids, attn, answer_mask

    def __call__(self):
        region, scale = GEN_LENGTH, 1.0
        if self.long_lengths and self.rng.random() < self.long_frac:
            region = self.rng.choice(self.long_lengths)
            scale = (PROMPT_TOKENS + GEN_LENGTH) / (PROMPT_TOKENS + region)
        return [self.sub_batch(task, region, max(1, round(n * scale)))
                for task, n in self.counts.items() if n]


def diffusion_loss(model, ids, attn, answer_mask, mask_id, t, total_batch: int):
    """LLaDA SFT loss of one sub-batch, normalised by the whole batch (sum over sub-batches = mean)."""
    p_mask = ((1 - EPS) * t + EPS)[:, None].expand_as(ids)
    masked = (torch.rand(ids.shape) < p_mask) & answer_mask
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    logits = model(noisy, attention_mask=attn)
    token_loss = F.cross_entropy(logits[masked], ids[masked], reduction="none") / p_mask[masked]
    return token_loss.sum() / (int(answer_mask[0].sum()) * total_batch)


def train_step(model, opt, batch, mask_id) -> float:
    """One optimizer step on a list of sub-batches; t ~ U(0, 1) stratified over the whole batch."""
    total = sum(ids.shape[0] for ids, _, _ in batch)
    t_all = ((torch.rand(1) + torch.arange(total) / total) % 1.0)[torch.randperm(total)]
    opt.zero_grad(set_to_none=True)
    loss_sum, lo = 0.0, 0
    for ids, attn, answer_mask in batch:
        t = t_all[lo:lo + ids.shape[0]]
        lo += ids.shape[0]
        loss = diffusion_loss(model, ids, attn, answer_mask, mask_id, t, total)
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
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in args.items()
                     if k != "out" and v != defaults.get(k) and v is not None)
    return f"python benchmarks/train_small.py --out {args['out']} {flags}".strip()


def training_card(log: dict) -> str:
    """TRAINING.md of a finished run: how to reproduce it, what it took, what it reached."""
    args, machine = log["args"], log.get("machine", {})
    rows = "\n".join(f"| {e['step']} | {e['elapsed_s'] / 60:.1f} | {e['n_per_task']} | "
                      + " | ".join(f"{e['accuracy'].get(t, float('nan')):.3f}" for t in log["tasks"]) + " |"
                      for e in log["evals"])
    return f"""# tiny-tasks: how this checkpoint was trained

Generated by `benchmarks/train_small.py` at the end of the run (from `training_log.json`).

```bash
{command_line(args)}
```

- Model: our `LLaDAModel`, {log['n_params'] / 1e6:.2f}M parameters, {json.dumps(log['config'])}.
- Objective: LLaDA's SFT masked-diffusion loss (one masking ratio per sequence, loss on masked answer
  tokens weighted by 1/ratio); tasks {', '.join(log['tasks'])} with per-step problem counts
  {json.dumps(log['task_batch_counts'])}; answer region {log['decode']['gen_length']} tokens, on a
  {args.get('long_frac', 0):g} share of the steps EOS-padded to one of {args.get('long_lengths', '-')} tokens.
- Ran {log['steps']} optimizer steps in {log['train_wall_s'] / 60:.1f} min of training
  ({log['total_wall_s'] / 60:.1f} min with evaluations) on {machine.get('cpu_model', '?')},
  {args['threads']} torch thread(s), torch {machine.get('torch_version', '?')}.
- Dense accuracy at the default decode settings {json.dumps(log['decode'])}, fresh problems
  (seed {EVAL_SEED}): {json.dumps(log['final_accuracy'])}.

{log.get('note', '')}

| step | minutes | problems per task | {' | '.join(log['tasks'])} |
|---:|---:|---:|{'---:|' * len(log['tasks'])}
{rows}
"""


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    tokenizer = build_tokenizer()
    model = make_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    sizes = {k: getattr(model.config, k) for k in ('d_model', 'n_layers', 'n_heads', 'mlp_hidden_size', 'vocab_size')}
    print(f"model: {n_params / 1e6:.2f}M parameters ({n_params * 4 / 2**20:.1f} MiB fp32); config {json.dumps(sizes)}",
          flush=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    log = {"args": vars(args), "n_params": n_params, "evals": [], "machine": machine_info(),
           "config": {k: getattr(model.config, k) for k in ("d_model", "n_layers", "n_heads", "mlp_hidden_size",
                                                               "vocab_size")}}
    counts = dict.fromkeys(TASKS, args.per_task)
    for item in filter(None, args.mix.split(",")):
        task, _, n = item.partition("=")
        if task not in counts:
            raise SystemExit(f"--mix: unknown task {task!r}; tasks are {', '.join(TASKS)}")
        counts[task] = int(n)
    log["task_batch_counts"] = counts
    log["tasks"] = [t for t in TASKS if counts[t]]
    long_lengths = tuple(int(n) for n in args.long_lengths.split(",") if n)
    batcher = Batcher(tokenizer, args.seed, counts, args.long_frac, long_lengths)
    mask_id = model.config.mask_token_id
    budget = args.minutes * 60

    def run_eval(step, n, seed):
        model.eval()
        t0 = time.perf_counter()
        acc = task_accuracy(model, tokenizer, n=n, seed=seed, task_names=[t for t in TASKS if counts[t]])
        model.train()
        entry = {"step": step, "elapsed_s": round(time.perf_counter() - start, 1), "n_per_task": n,
                 "accuracy": acc, "eval_s": round(time.perf_counter() - t0, 1)}
        log["evals"].append(entry)
        tqdm.write(f"[eval step {step}] " + " ".join(f"{k}={v:.3f}" for k, v in acc.items())
                   + f"  min={min(acc.values()):.3f} ({entry['eval_s']}s)")
        return acc

    start = time.perf_counter()
    bar = tqdm(total=args.steps, desc="train", unit="step", mininterval=5, file=sys.stdout)
    ema, step = None, 0
    model.train()
    while True:
        elapsed = time.perf_counter() - start
        if args.steps is not None and step >= args.steps:
            break
        if elapsed >= budget:
            tqdm.write(f"time budget of {args.minutes} min reached at step {step}")
            break
        progress = step / args.steps if args.steps else elapsed / budget
        lr = lr_at(args, step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = train_step(model, opt, batcher(), mask_id)
        step += 1
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr:.2e}", refresh=False)
        if step % args.eval_every == 0:
            run_eval(step, args.eval_n, EVAL_SEED + step)
            save(model, tokenizer, out, log)  # a snapshot, overwritten at the end
    bar.close()
    train_s = time.perf_counter() - start
    final = run_eval(step, args.final_eval_n, EVAL_SEED)
    total_s = time.perf_counter() - start
    log.update(steps=step, train_wall_s=round(train_s, 1), total_wall_s=round(total_s, 1),
               final_accuracy=final, final_loss_ema=ema, decode=DEFAULT_DECODE)
    save(model, tokenizer, out, log)
    (out / "TRAINING.md").write_text(training_card(log))
    print(f"done: {step} steps, training {train_s / 60:.1f} min, total {total_s / 60:.1f} min; "
          f"final accuracy {json.dumps(final)}; saved to {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
