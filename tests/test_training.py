"""benchmarks/train_small.py: batches, the diffusion loss, a 3-step run end to end, and code-infilling runs (fresh
and resumed) on a small stand-in standard library."""
import json
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from surelock_fx import infill, tasks  # noqa: E402
from surelock_fx.models import load_model  # noqa: E402
from surelock_fx.text import load_tokenizer  # noqa: E402

import train_small  # noqa: E402
from test_code_corpus import HELD_OUT, TRAIN, fake_stdlib  # noqa: E402

TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--mlp-hidden", "48"]


def test_batches_left_pad_prompts_and_pad_answers_with_eos():
    batcher = train_small.TaskData(train_small.parse_args(["--out", "x", "--mix", "add=3,sort=0,reverse=2,word=1",
                                                           "--long-frac", "0.5", "--long-lengths", "64"]))
    tok = batcher.tok
    eos = tok.eos_token_id
    regions = set()
    for _ in range(6):
        batch = batcher()
        assert len(batch) == 3, "tasks with count 0 draw nothing"
        for ids, attn, answer in batch:
            region = int(answer[0].sum())
            regions.add(region)
            assert (answer.sum(1) == region).all() and answer[:, -region:].all()
            assert (ids[attn == 0] == eos).all() and attn[:, -region:].all()
            assert (ids[:, -1] == eos).all(), "answers end in EOS padding"
            if region == 64:
                assert ids.shape[0] == 1, "long regions carry fewer problems"
    assert regions == {tasks.GEN_LENGTH, 64}


def test_diffusion_loss_is_the_weighted_masked_cross_entropy():
    tok = tasks.build_tokenizer()
    model = train_small.make_model(train_small.parse_args(["--out", "x", *TINY]), tok)
    data = train_small.TaskData(train_small.parse_args(["--out", "x", "--mix", "add=2,sort=0,reverse=0,word=0",
                                                        "--long-frac", "0"]))
    ids, attn, answer = data()[0]
    t = torch.tensor([0.3, 0.8])
    mask_id = model.config.mask_token_id
    torch.manual_seed(7)
    loss = train_small.diffusion_loss(model, ids, attn, answer, mask_id, t, total_batch=4)
    torch.manual_seed(7)
    p = (1 - train_small.EPS) * t + train_small.EPS
    masked = (torch.rand(ids.shape) < p[:, None]) & answer
    logits = model(torch.where(masked, mask_id, ids), attention_mask=attn)
    expected = sum(F.cross_entropy(logits[b][masked[b]], ids[b][masked[b]], reduction="sum") / p[b]
                   for b in range(2)) / (tasks.GEN_LENGTH * 4)
    torch.testing.assert_close(loss, expected)


def test_a_short_run_saves_a_loadable_checkpoint_and_its_card(tmp_path):
    out = tmp_path / "run"
    args = ["--out", str(out), "--steps", "3", "--per-task", "1", "--eval-every", "2", "--eval-n", "1",
            "--final-eval-n", "1", "--threads", "1", *TINY]
    assert train_small.main(args) == 0
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == 3 and [e["step"] for e in log["evals"]] == [2, 3]
    assert set(log["final_accuracy"]) == set(tasks.TASKS)
    model = load_model(out)
    assert model.config.d_model == 32 and model.config.mask_token_id == tasks.build_tokenizer().mask_token_id
    card = (out / "TRAINING.md").read_text()
    command = next(line for line in card.splitlines() if line.startswith("python benchmarks/train_small.py"))
    assert vars(train_small.parse_args(shlex.split(command)[2:])) == vars(train_small.parse_args(args))


def code_args(out, stdlib, *extra):
    return ["--out", str(out), "--corpus", "stdlib", "--stdlib", str(stdlib), "--batch-size", "2",
            "--vocab-size", "400", "--eval-n", "1", "--final-eval-n", "1", "--threads", "1", *TINY, *extra]


def test_a_short_code_run_saves_a_checkpoint_its_bpe_tokenizer_and_card(tmp_path):
    stdlib, out = fake_stdlib(tmp_path / "stdlib"), tmp_path / "run"
    args = code_args(out, stdlib, "--steps", "2", "--eval-every", "2")
    assert train_small.main(args) == 0
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == 2 and set(log["final_accuracy"]) == {"line", "lines", "body"}
    assert log["task_batch_counts"] == {"batch_size": 2, "train_files": len(TRAIN) + 1, "held_out_files": len(HELD_OUT)}
    tok = load_tokenizer(out)
    model = load_model(out)
    assert model.config.vocab_size == len(tok) and model.config.mask_token_id == tok.convert_tokens_to_ids("<|mask|>")
    code = "class A:\n    def f(self, x):\n        return {'k': x}  # done\n"
    assert tok.decode(tok.encode(code, add_special_tokens=False)) == code
    hole = tok.convert_tokens_to_ids(infill.HOLE)
    assert hole != tok.unk_token_id
    assert tok.encode(infill.infill_prompt("x = 1\n", "\ny = 2"), add_special_tokens=False).count(hole) == 1
    card = (out / "TRAINING.md").read_text()
    assert card.startswith("# tiny-code:") and "tiny-tasks" not in card
    assert f"{len(TRAIN) + 1} training files, {len(HELD_OUT)} held-out files" in card
    assert "| step | minutes | spans per kind | line | lines | body |" in card
    command = next(line for line in card.splitlines() if line.startswith("python benchmarks/train_small.py"))
    assert vars(train_small.parse_args(shlex.split(command)[2:])) == vars(train_small.parse_args(args))


def test_a_cut_off_code_run_resumes_where_its_snapshot_stood(tmp_path, monkeypatch):
    stdlib, out = fake_stdlib(tmp_path / "stdlib"), tmp_path / "run"
    train_step, calls = train_small.train_step, []

    def counted(*args, **kwargs):
        calls.append(len(calls))
        if crash_at is not None and len(calls) == crash_at:
            raise KeyboardInterrupt("cut off")
        return train_step(*args, **kwargs)

    monkeypatch.setattr(train_small, "train_step", counted)
    crash_at = 2  # step 1 runs, is evaluated and snapshotted; step 2 is cut off
    try:
        train_small.main(code_args(out, stdlib, "--steps", "2", "--eval-every", "1"))
    except KeyboardInterrupt:
        pass
    assert (out / "resume.pt").is_file() and not (out / "TRAINING.md").exists()
    calls.clear()
    crash_at = None
    assert train_small.main(code_args(out, stdlib, "--steps", "3", "--eval-every", "1", "--resume")) == 0
    assert len(calls) == 2, "steps 2 and 3 only: step 1 came from the snapshot"
    log = json.loads((out / "training_log.json").read_text())
    assert log["resumed_at"] == [1] and log["steps"] == 3
    assert [e["step"] for e in log["evals"]] == [1, 2, 3, 3]
    assert not (out / "resume.pt").exists()
