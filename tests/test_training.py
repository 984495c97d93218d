"""benchmarks/train_small.py: batches, the diffusion loss, and a 3-step run end to end."""
import json
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from surelock_fx import tasks  # noqa: E402
from surelock_fx.models import load_model  # noqa: E402

import train_small  # noqa: E402

TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--mlp-hidden", "48"]


def test_batches_left_pad_prompts_and_pad_answers_with_eos():
    tok = tasks.build_tokenizer()
    batcher = train_small.Batcher(tok, seed=0, counts={"add": 3, "sort": 0, "reverse": 2, "word": 1},
                                  long_frac=0.5, long_lengths=(64,))
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
    ids, attn, answer = train_small.Batcher(tok, 0, {"add": 2})()[0]
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
