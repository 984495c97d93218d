"""benchmarks/infill_sweep.py on a random-weight stand-in for tiny-code: rows, drift measures, the commit-time
probabilities, Gen-PPL, the docs' table and summary."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import infill_sweep  # noqa: E402

from surelock_fx import generate, infill  # noqa: E402
from surelock_fx.models import load_model  # noqa: E402
from surelock_fx.text import encode_batch, load_tokenizer  # noqa: E402

from helpers import save_code_checkpoint  # noqa: E402

N = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-weight stand-in for tiny-code (``helpers.save_code_checkpoint``)."""
    return save_code_checkpoint(tmp_path_factory.mktemp("tiny-code"))


@pytest.fixture(scope="module")
def swept(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("infill")
    infill_sweep.main(["--quick", "--n", str(N), "--model", str(checkpoint), "--out", str(out), "--no-docs"])
    return out, json.loads((out / "infill_sweep.json").read_text())


def test_rows_cover_the_quick_grid(swept):
    _, result = swept
    rows = result["rows"]
    assert [r["label"] for r in rows] == [c.label for c in infill_sweep.grid(quick=True)]
    for row in rows:
        assert row["n"] == N and 0 < row["flops_ratio"] <= 1 and 0 <= row["token_agreement"] <= 1
        assert set(row["exact_match_locked"]) <= set(infill_sweep.KINDS) and row["gen_ppl_locked"] > 1
        if row["lock"] is not None:
            assert 0 <= row["locked_fraction"] <= 1
    never = next(r for r in rows if r["label"] == "never")  # the locked graph, nothing locked: the dense decode
    assert never["flops_ratio"] == 1 and never["token_agreement"] == 1
    assert never["accuracy_locked"] == never["accuracy_dense"]
    assert never["exact_match_locked"] == never["exact_match_dense"]
    assert never["gen_ppl_locked"] == never["gen_ppl_dense"]


def test_drift_measures_are_ordered(swept):
    """max-norm >= the committed token's |Δ log p| (one of its terms) and >= the probability-weighted drift (a
    convex combination of its terms); all non-negative; KL at lock below the threshold."""
    _, result = swept
    points = result["bound"]["points"]
    assert result["bound"]["measures"] == ["kl", "max_norm", "committed", "weighted"]
    assert points and any(points.values()), "the bound's settings locked generated positions"
    for label, ps in points.items():
        eps = float(label.rsplit("eps ", 1)[1])
        for kl, max_norm, committed, weighted in ps:
            assert kl <= eps and min(max_norm, committed, weighted) >= 0
            assert max_norm >= committed and max_norm >= weighted * (1 - 1e-5)


def test_spreads_count_every_committed_and_locked_position(swept):
    _, result = swept
    spreads = result["spreads"]
    for label, s in spreads["commit_confidence"].items():
        assert s["count"] == sum(s["histogram"]) and 0 <= s["q10"] <= s["q50"] <= s["q90"] <= 1, label
        if "threshold" not in label:  # LLaDA's steps commit every generated position
            assert s["count"] == N * infill.GEN_LENGTH, label
    for row in result["rows"]:
        if row["lock"] is not None:
            s = spreads["kl_at_lock"][row["label"]]
            assert s["count"] == sum(s["histogram"]) == round(row["locked_fraction"] * N * infill.GEN_LENGTH)


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_commit_confidence_is_the_committed_probability(checkpoint, remasking):
    model, tokenizer = load_model(checkpoint), load_tokenizer(checkpoint)
    ids, mask = encode_batch(tokenizer, ["def f(x):\n<|hole|>\n", "a = 1\n<|hole|>"])
    stats = generate(model, ids, attention_mask=mask, gen_length=8, steps=4, block_length=4,
                     remasking=remasking, generator=torch.Generator().manual_seed(0)).stats
    committed = stats.unmask_step >= 0
    values = stats.commit_confidence
    assert values.shape == committed.shape and values[~committed].isnan().all()
    if remasking == "random":  # its confidence is a random draw, not a probability
        assert values.isnan().all()
    else:
        assert committed[:, ids.shape[1]:].all() and not values[committed].isnan().any()
        assert ((values[committed] >= 0) & (values[committed] <= 1)).all()


def test_gen_ppl_is_infill_gen_ppl(checkpoint):
    model, tokenizer = load_model(checkpoint), load_tokenizer(checkpoint)
    records = infill_sweep.load_jsonl_tasks(infill.eval_file(), records=True)[:N]
    prompts = [r["prompt"] for r in records]
    run = infill_sweep.decode_problems(model, tokenizer, prompts, batch_size=2, progress=False,
                                       **{**infill.DEFAULT_DECODE, "gen_length": 8, "steps": 8, "block_length": 8})
    scorer = infill_sweep.GenPPL(model, tokenizer, prompts, batch_size=2)
    expected = infill.gen_ppl(model, tokenizer, prompts, run.generated, batch_size=2)
    assert scorer(run.generated) == pytest.approx(expected, rel=1e-5)
    assert scorer(run.generated) == pytest.approx(expected, rel=1e-5)  # from what it kept


def test_plots_and_docs(swept, tmp_path, monkeypatch, capsys):
    out, result = swept
    for name in ("exact_match_vs_flops.png", "gen_ppl_vs_flops.png", "lock_bound.png", "kl_at_lock_hist.png",
                 "commit_confidence_hist.png"):
        assert (out / name).stat().st_size > 0, name
    table = infill_sweep.table(result)
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(lines) == len(result["rows"]) + 2  # the header, the separator and one line per row
    assert [line.split(" | ")[0][2:] for line in lines[2:]] == [r["label"] for r in result["rows"]]
    summary = infill_sweep.summary_table(result)
    assert "| dense |" in summary and "| eps 0.005 |" in summary
    doc, readme = tmp_path / "quality.md", tmp_path / "README.md"
    begin, end = infill_sweep.common.readme_markers(infill_sweep.TABLE)
    doc.write_text(f"intro\n{begin}\nold table\n{end}\noutro\n")
    readme.write_text("no markers\n")
    monkeypatch.setattr(infill_sweep, "DOC", doc)
    monkeypatch.setattr(infill_sweep, "README", readme)
    infill_sweep.write_docs(result)
    assert doc.read_text() == f"intro\n{begin}\n{table}\n{end}\noutro\n"
    assert readme.read_text() == "no markers\n" and summary in capsys.readouterr().out  # printed, not written
    begin, end = infill_sweep.common.readme_markers(infill_sweep.SUMMARY)
    readme.write_text(f"{begin}\n{end}\n")
    infill_sweep.write_docs(result)
    assert readme.read_text() == f"{begin}\n{summary}\n{end}\n"


def test_the_docs_have_the_infill_block():
    begin, end = infill_sweep.common.readme_markers(infill_sweep.TABLE)
    text = infill_sweep.DOC.read_text()
    assert begin in text and end in text and text.index(begin) < text.index(end)
