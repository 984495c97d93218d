"""benchmarks/quality_sweep.py on a tiny random checkpoint: rows, summary, the bound's points, the docs' table."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import quality_sweep  # noqa: E402
from helpers import save_task_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    ckpt = save_task_checkpoint(tmp_path_factory.mktemp("ckpt"))
    out = tmp_path_factory.mktemp("quality")
    quality_sweep.main(["--model", str(ckpt), "--quick", "--n", "2", "--out", str(out), "--no-docs"])
    return out, json.loads((out / "quality.json").read_text())


def test_rows_cover_the_quick_grid(swept):
    _, result = swept
    rows = result["rows"]
    decodes = quality_sweep.decode_grid(quick=True)
    locks = quality_sweep.lock_grid(full=False)
    assert len(rows) == len(decodes) * len(locks)
    for row in rows:
        assert row["n"] == 2 * len(result["settings"]["tasks"])
        assert 0 < row["flops_ratio"] <= 1 and 0 <= row["token_agreement"] <= 1
        if row["label"] == "never":  # the locked graph with nothing locked is the dense decode
            assert row["flops_ratio"] == 1 and row["token_agreement"] == 1
            assert row["accuracy_locked"] == row["accuracy_dense"]


def test_summary_averages_the_rows(swept):
    _, result = swept
    for entry in quality_sweep.summary(result):
        rows = [r for r in result["rows"] if r["label"] == entry["label"]]
        assert entry["settings"] == len(rows)
        assert entry["flops_ratio"] == pytest.approx(sum(r["flops_ratio"] for r in rows) / len(rows))
        assert entry["worst_change"] == min(r["accuracy_locked"] - r["accuracy_dense"] for r in rows)


def test_bound_points_are_locked_positions_below_their_threshold(swept):
    _, result = swept
    assert result["bound"], "the default-setting decodes record the bound"
    for name, points in result["bound"].items():
        eps = float(name.rsplit("eps ", 1)[1])
        for kl, drift in points:
            assert kl <= eps and drift >= 0


def test_outputs_and_docs_table(swept, tmp_path, monkeypatch):
    out, result = swept
    for name in ("accuracy_vs_flops.png", "active_fraction.png", "lock_timeline.png", "lock_bound.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "quality.md").read_text().count("\n| ") == len(result["rows"]) + 1
    doc = tmp_path / "quality.md"
    begin, end = quality_sweep.MARKERS
    doc.write_text(f"intro\n{begin}\nold table\n{end}\noutro\n")
    monkeypatch.setattr(quality_sweep, "DOC", doc)
    quality_sweep.write_docs_table(result)
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert text.count("\n| eps ") == len(quality_sweep.lock_grid(full=False)) - 1


def test_committed_docs_table_is_what_the_sweep_makes_of_the_committed_json():
    """docs/quality.md's table is generated from benchmarks/figures/quality/quality.json (``summary_table``);
    never edit it by hand."""
    result = json.loads((quality_sweep.common.FIGURES / "quality" / "quality.json").read_text())
    begin, end = quality_sweep.MARKERS
    assert f"{begin}\n{quality_sweep.summary_table(result)}\n{end}" in quality_sweep.DOC.read_text()
