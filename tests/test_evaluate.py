"""surelock eval / demo and the dense-vs-locked comparison they print."""
import json

import pytest
import torch

from surelock_fx import tasks
from surelock_fx.cli import main
from surelock_fx.evaluate import DecodeRun, compare
from surelock_fx.sampler import DecodeStats

from helpers import save_task_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_task_checkpoint(tmp_path_factory.mktemp("ckpt"))


def run(answers, generated, active, locked, flops, wall):
    stats = DecodeStats(active_counts=active, locked_counts=locked, flops_dense=flops[0], flops_locked=flops[1])
    return DecodeRun(answers, [torch.tensor(g) for g in generated], [stats], wall)


def test_compare_computes_each_metric():
    dense = run(["12", "ab"], [[1, 2, 3], [4, 5, 6]], [6, 6], [0, 0], (10.0, 10.0), 2.0)
    locked = run(["12", "ba"], [[1, 2, 3], [4, 6, 5]], [6, 2], [0, 4], (10.0, 4.0), 1.0)
    result = compare(dense, locked, ["12", "ab"])
    assert result["accuracy_dense"] == 1.0
    assert result["accuracy_locked"] == 0.5
    assert result["token_agreement"] == 4 / 6
    assert result["flops_ratio"] == 0.4
    assert result["mean_active_fraction"] == 8 / 12
    assert result["wall_ratio"] == 0.5


def test_eval_writes_json_rows(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(checkpoint), "--task", "add", "--n", "3", "--seed", "1",
                 "--gen-length", "8", "--steps", "8", "--block-length", "8", "--lock-eps", "5e-4", "1.0",
                 "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["lock"]["kl_threshold"] for r in rows] == [5e-4, 1.0]
    for r in rows:
        assert r["task"] == "add" and r["n"] == 3
        assert 0 < r["flops_ratio"] <= 1 and 0 < r["mean_active_fraction"] <= 1
        assert 0 <= r["token_agreement"] <= 1
    assert rows[1]["flops_ratio"] <= rows[0]["flops_ratio"]  # a looser threshold locks at least as much
    assert "acc dense" in capsys.readouterr().out


def test_eval_reports_each_cache_policy_alone_and_locked(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(checkpoint), "--task", "add", "--n", "3", "--gen-length", "8", "--steps", "8",
                 "--block-length", "4", "--lock-eps", "1.0", "--cache", "prefix", "dual", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["cache"], r["lock"] and r["lock"]["kl_threshold"]) for r in rows] == [
        (None, 1.0), ("prefix", None), ("prefix", 1.0), ("dual", None), ("dual", 1.0)]
    ratio = {(r["cache"], r["lock"] is not None): r["flops_ratio"] for r in rows}
    assert ratio["dual", False] < ratio["prefix", False] < 1
    assert ratio["dual", True] <= ratio["dual", False] and ratio["prefix", True] <= ratio["prefix", False]
    assert all(r["tokens_per_s"] > 0 and r["forward_passes"] <= r["forward_passes_dense"] for r in rows)
    assert "dual" in capsys.readouterr().out


def test_eval_reads_a_jsonl_task_file(checkpoint, tmp_path):
    tasks_file = tmp_path / "mine.jsonl"
    tasks_file.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(4)))
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(checkpoint), "--task", str(tasks_file), "--n", "2",
                 "--gen-length", "8", "--steps", "4", "--block-length", "8", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows[0]["task"] == "mine" and rows[0]["n"] == 2


def test_eval_rejects_an_unknown_task(checkpoint, capsys):
    assert main(["eval", "--model", str(checkpoint), "--task", "chess"]) == 2
    assert "neither a built-in task" in capsys.readouterr().err


def test_demo_runs_the_shipped_model_dense_and_locked(capsys):
    assert main(["demo", "--n", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.split()}
    assert set(rows) == set(tasks.TASKS)
    for cells in rows.values():
        acc_dense, acc_locked, flops = float(cells[3]), float(cells[4]), float(cells[6])
        assert acc_dense >= 0.75 and acc_locked >= 0.75, "the shipped model solves its tasks"
        assert flops < 1, "locking skips work"


def test_demo_without_the_shipped_model_says_what_is_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(tasks, "default_model_dir", lambda: tmp_path)
    assert main(["demo", "--n", "1"]) == 2
    assert "shipped model is missing" in capsys.readouterr().err
