"""The ``surelock`` CLI on a tiny checkpoint with a word-level Hugging Face tokenizer."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from surelock_fx import LockConfig, generate, infill, optimize, tasks  # noqa: E402
from surelock_fx.cli import main  # noqa: E402
from surelock_fx.models import save_model  # noqa: E402
from surelock_fx.text import decode_answer  # noqa: E402

from helpers import save_code_checkpoint, tiny_model  # noqa: E402

SPECIALS = {"<|startoftext|>": 97, "<|eot_id|>": 98, "<|endoftext|>": 99, "<|mdm_mask|>": 100}
WORDS = ["<unk>", "user", "assistant", ":"] + [f"t{i}" for i in range(93)]  # ids 0..96
VOCAB = {**{w: i for i, w in enumerate(WORDS)}, **SPECIALS}
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <|eot_id|> {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
SCHEDULE = ["--gen-length", "12", "--steps", "6", "--block-length", "4"]


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace-split words, ids as in VOCAB; the special tokens sit at the tiny config's ids."""
    backend = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        mask_token="<|mdm_mask|>", additional_special_tokens=["<|eot_id|>"], chat_template=CHAT_TEMPLATE,
    )


@pytest.fixture(scope="module")
def model():
    """A tiny random LLaDA that emits EOS partway through its answer, so the cut at EOS is exercised."""
    model = tiny_model(seed=8)
    with torch.no_grad():
        model.lm_head_weight[100] = 0.0  # never propose the mask token
        model.lm_head_weight[99] *= 1.3  # make EOS likelier (seed and factor chosen so it comes mid-answer)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("tiny-llada")
    save_model(model, path)
    word_level_tokenizer().save_pretrained(path)
    return path


def expected_answer(model, prompt_words, lock=None, cache=None):
    """Greedy decode of the word ids (``lock``, ``cache``: by ``model`` optimized), cut at the first EOS/EOT,
    rendered without special tokens."""
    ids = torch.tensor([[VOCAB[w] for w in prompt_words]])
    decoder = model if lock is None and cache is None else optimize(model)
    out = generate(decoder, ids, gen_length=12, steps=6, block_length=4, lock=lock, cache=cache)
    generated = out.tokens[0, ids.shape[1]:].tolist()
    stop = next(i for i, tok in enumerate(generated) if tok in (98, 99))
    assert 0 < stop < len(generated) - 1, "the fixture should stop at EOS/EOT partway through"
    return " ".join(WORDS[tok] for tok in generated[:stop] if tok < 97)


def test_decode_answer_cuts_at_the_first_stop_token():
    tokenizer = word_level_tokenizer()
    t1, t2, t3 = VOCAB["t1"], VOCAB["t2"], VOCAB["t3"]
    assert decode_answer(tokenizer, [t1, 97, t2, 98, t3, 99], (99, 98)) == "t1 t2"
    assert decode_answer(tokenizer, [t1, t2, 99, t3, 98], (99, None)) == "t1 t2"
    assert decode_answer(tokenizer, [t3, t1], (99, 98)) == "t3 t1"
    assert decode_answer(tokenizer, [99, t1], (99, 98)) == ""


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_generate_prints_the_answer(checkpoint, model, capsys, chat):
    prompt = "t5 t17 t3"
    words = ["user", ":", *prompt.split(), "<|eot_id|>", "assistant", ":"] if chat else prompt.split()
    argv = ["generate", "--model", str(checkpoint), "--prompt", prompt, *SCHEDULE] + (["--chat"] if chat else [])
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.strip() == expected_answer(model, words)
    assert "6/6" in err  # the progress bar ran over the steps


@pytest.mark.parametrize("backend", [[], ["--backend", "eager"]], ids=["default-backend", "eager"])
def test_generate_locked_prints_the_locked_answer_and_its_flops(checkpoint, model, capsys, backend):
    argv = ["generate", "--model", str(checkpoint), "--prompt", "t5 t17 t3", *SCHEDULE,
            "--lock-eps", "0.5", "--confidence-gate", "1.0", *backend]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.strip() == expected_answer(model, ["t5", "t17", "t3"], LockConfig(kl_threshold=0.5, confidence_gate=1.0))
    ratio = float(re.search(r"locked at KL 0.5: FLOPs ratio ([0-9.]+)", err).group(1))
    assert 0 < ratio < 1  # the prompt and early answer tokens locked


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_generate_with_a_cache_policy_prints_its_answer_and_flops(checkpoint, model, capsys, cache):
    argv = ["generate", "--model", str(checkpoint), "--prompt", "t5 t17 t3", *SCHEDULE, "--cache", cache]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.strip() == expected_answer(model, ["t5", "t17", "t3"], cache=cache)
    ratio = float(re.search(rf"{cache} cache: FLOPs ratio ([0-9.]+)", err).group(1))
    assert 0 < ratio < 1


def test_generate_with_a_backend_alone_decodes_densely(checkpoint, model, capsys):
    argv = ["generate", "--model", str(checkpoint), "--prompt", "t5 t17 t3", *SCHEDULE, "--backend", "eager"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.strip() == expected_answer(model, ["t5", "t17", "t3"])
    assert "FLOPs ratio" not in err


def test_console_script(checkpoint, model):
    executable = shutil.which("surelock")
    assert executable, "the surelock console script is not installed (pip install -e .)"
    result = subprocess.run([executable, "generate", "--model", str(checkpoint), "--prompt", "t5 t17 t3",
                             "--dtype", "float32", "--seed", "0", *SCHEDULE],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected_answer(model, ["t5", "t17", "t3"])
    assert "model of type" not in result.stderr  # transformers reading the LLaDA config.json as its own


ERROR_CASES = {
    "missing-directory": (lambda ckpt, tmp: ["--model", str(tmp / "nowhere")], "does not exist"),
    "gen-length-not-multiple": (lambda ckpt, tmp: ["--model", str(ckpt), "--gen-length", "10"],
                                r"gen_length \(10\) must be a multiple of block_length \(4\)"),
    "steps-zero": (lambda ckpt, tmp: ["--model", str(ckpt), "--steps", "0"], "steps must be a positive integer"),
    "negative-lock-eps": (lambda ckpt, tmp: ["--model", str(ckpt), "--lock-eps", "-1"],
                          r"kl_threshold must be >= 0, got -1"),
    "no-tokenizer": (lambda ckpt, tmp: ["--model", str(save_model(tiny_model(), tmp / "bare"))],
                     "bare has no tokenizer"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_one_clean_line(checkpoint, tmp_path, capsys, case):
    make_args, message = ERROR_CASES[case]
    argv = ["generate", "--prompt", "t1 t2", "--block-length", "4", "--gen-length", "8", "--steps", "4"]
    assert main(argv + make_args(checkpoint, tmp_path)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]


@pytest.fixture(scope="module")
def code_checkpoint(tmp_path_factory):
    """A random-weight stand-in for tiny-code (``helpers.save_code_checkpoint``)."""
    return save_code_checkpoint(tmp_path_factory.mktemp("tiny-code"))


def test_eval_infill_prints_and_saves_exact_match_parses_and_gen_ppl(code_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(code_checkpoint), "--task", "infill", "--n", "3", "--lock-eps", "5e-3",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    assert row["task"] == "infill" and row["n"] == 3 and row["decode"] == infill.DEFAULT_DECODE
    for run in ("dense", "locked"):
        assert set(row[f"exact_match_{run}"]) == {"line", "lines", "body"}, "the first 3 records: one per kind"
        assert row[f"parse_rate_{run}"] in (0.0, 1.0)  # one body record
        assert 1 < row[f"gen_ppl_{run}"] < float("inf")
    head, line = printed.splitlines()[-3:-1]  # the infill table, then "wrote ..."
    assert "Gen-PPL d/l" in head and "parses d/l" in head and "exact body d/l" in head
    assert line.split()[:3] == ["infill", "5e-03", "-"]
    assert line.split()[-1] == f"{row['gen_ppl_dense']:.2f}/{row['gen_ppl_locked']:.2f}"


def test_eval_scores_infill_records_only_and_decodes_each_task_at_its_defaults(code_checkpoint, tmp_path):
    mine = tmp_path / "mine.jsonl"
    mine.write_text("\n".join(json.dumps(r) for r in [
        dict(prompt=f"def f(x):\n{infill.HOLE}\n", answer="    return x", kind="body", function="def f(x):\n"),
        dict(prompt=f"a = 1\n{infill.HOLE}", answer="b = 2", kind="line")]))
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(code_checkpoint), "--task", "infill", "--task", "add", "--task", str(mine),
                 "--n", "2", "--lock-eps", "1.0", "--json", str(out)]) == 0
    rows = {r["task"]: r for r in json.loads(out.read_text())}
    assert rows["infill"]["decode"] == rows["mine"]["decode"] == infill.DEFAULT_DECODE
    assert rows["add"]["decode"] == tasks.DEFAULT_DECODE
    assert "gen_ppl_dense" not in rows["add"] and "exact_match_locked" not in rows["add"]
    assert set(rows["mine"]["exact_match_dense"]) == {"body", "line"} and rows["mine"]["gen_ppl_locked"] > 1


def test_eval_of_infill_alone_defaults_to_the_shipped_tiny_code(code_checkpoint, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(infill, "default_model_dir", lambda: code_checkpoint)
    monkeypatch.setattr(tasks, "default_model_dir", lambda: tmp_path)  # no tiny-tasks there
    out = tmp_path / "eval.json"
    assert main(["eval", "--task", "infill", "--n", "1", "--gen-length", "8", "--block-length", "4",
                 "--json", str(out)]) == 0
    assert "Gen-PPL" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    assert row["decode"] == {**infill.DEFAULT_DECODE, "gen_length": 8, "block_length": 4}
    assert main(["eval", "--task", "infill", "--task", "add", "--n", "1"]) == 2
    assert f"shipped model is missing from {tmp_path}" in capsys.readouterr().err
