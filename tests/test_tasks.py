"""Synthetic tasks, the character tokenizer and the shipped tiny-tasks checkpoint."""
from __future__ import annotations

import json
import re

import pytest
import torch

from surelock_fx import generate
from surelock_fx.evaluate import decode_problems, task_accuracy
from surelock_fx.models import load_config, load_model
from surelock_fx.tasks import (
    DEFAULT_DECODE,
    GEN_LENGTH,
    MAX_ANSWER_CHARS,
    TASKS,
    build_tokenizer,
    default_model_dir,
    encode_prompt,
    load_jsonl_tasks,
    make_problems,
    special_token_ids,
)
from surelock_fx.text import encode_batch

# ---------------------------------------------------------------------------- independent solvers

def solve(task: str, prompt: str) -> str:
    """Answers recomputed from the prompt text alone, without the generators."""
    if task == "add":
        a, b = re.fullmatch(r"(\d{3})\+(\d{3})=", prompt).groups()
        return str(int(a) + int(b)).zfill(4)
    if task == "sort":
        letters = re.fullmatch(r"sort ([a-p]+)", prompt).group(1)
        assert len(set(letters)) == len(letters), "distinct letters"
        return "".join(c for c in "abcdefghijklmnop" if c in letters)
    if task == "reverse":
        s = re.fullmatch(r"rev ([a-z0-9]+)", prompt).group(1)
        return "".join(s[len(s) - 1 - i] for i in range(len(s)))
    if task == "word":
        name, a, verb, b = re.fullmatch(r"([A-Z][a-z]+) has (\d+) [a-z]+, (gets|loses) (\d+)\.", prompt).groups()
        return str(int(a) + int(b) if verb == "gets" else int(a) - int(b))
    raise AssertionError(task)


@pytest.mark.parametrize("task", TASKS)
def test_generators_deterministic_and_correct(task):
    problems = make_problems(task, 300, seed=11)
    assert problems == make_problems(task, 300, seed=11)
    assert problems != make_problems(task, 300, seed=12)
    assert make_problems(task, 5, seed=11) == problems[:5]
    for prompt, answer in problems:
        assert solve(task, prompt) == answer, (prompt, answer)
        assert 0 < len(answer) <= MAX_ANSWER_CHARS
        assert not answer.startswith("-"), "answers are non-negative"
    assert len({p for p, _ in problems}) > 100, "problems should vary"


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        make_problems("nope", 3, 0)


# -------------------------------------------------------------------------------------- JSONL

def test_load_jsonl_tasks(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": "2+2=", "answer": "4"}, {"prompt": "rev ab", "answer": "ba", "extra": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert load_jsonl_tasks(path) == [("2+2=", "4"), ("rev ab", "ba")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_jsonl_tasks(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        load_jsonl_tasks(bad)


# ---------------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_tokenizer_round_trip(tokenizer):
    ids = special_token_ids(tokenizer)
    assert ids["pad_token_id"] == ids["eos_token_id"] == tokenizer.eos_token_id == tokenizer.pad_token_id
    assert ids["mask_token_id"] == tokenizer.mask_token_id
    assert len(set(ids.values())) == 4
    for task in TASKS:
        for prompt, answer in make_problems(task, 50, seed=3):
            for text in (prompt, answer):
                tokens = tokenizer.encode(text, add_special_tokens=False)
                assert len(tokens) == len(text), "one token per character"
                assert tokenizer.decode(tokens) == text
            full = encode_prompt(tokenizer, prompt)
            assert len(full) + GEN_LENGTH <= 80
            assert full[0] == ids["bos_token_id"] and full[-1] == ids["eot_token_id"]
    text = "Any printable ASCII: ~`{}|\\ \"' and\nnewline"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_chat_template_matches_training_format(tokenizer):
    prompt = "sort qbmfa"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                        add_generation_prompt=True)
    assert tokenizer.encode(ids, add_special_tokens=False) == encode_prompt(tokenizer, prompt)


def test_tokenizer_saves_and_loads_offline(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert special_token_ids(loaded) == special_token_ids(tokenizer)
    text = "a3 x7 m1 ?xm"
    assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)


def test_evaluation_encodes_prompts_as_training_does(tokenizer):
    ids, mask = encode_batch(tokenizer, ["rev ab", "sort hello"])
    assert ids.shape == mask.shape == (2, 12)
    assert mask[0].tolist() == [0] * 4 + [1] * 8 and mask[1].all()
    assert ids[0, 4:].tolist() == encode_prompt(tokenizer, "rev ab")


# ------------------------------------------------------------------------- shipped checkpoint

@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoTokenizer

    path = default_model_dir()
    return load_model(path), AutoTokenizer.from_pretrained(path, local_files_only=True)


def test_shipped_checkpoint_files():
    path = default_model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "TRAINING.md"):
        assert (path / name).is_file(), name
    assert (path / "model.safetensors").stat().st_size <= 25 * 2**20


def test_shipped_config_matches_tokenizer(shipped):
    model, tok = shipped
    config = load_config(default_model_dir())
    for key, value in special_token_ids(tok).items():
        assert getattr(config, key) == value, key
    assert special_token_ids(tok) == special_token_ids(build_tokenizer())
    assert config.vocab_size == len(tok)
    assert model.config == config


def test_shipped_model_left_padding_is_exact(shipped):
    """A left-padded batch decodes each row exactly as that row alone (what evaluate relies on)."""
    model, tok = shipped
    prompts = ["rev k3x9q", "Ann has 7 pens, gets 5, loses 3."]
    batched = decode_problems(model, tok, prompts, batch_size=2, progress=False, **DEFAULT_DECODE)
    for row, prompt in enumerate(prompts):
        alone = torch.tensor([encode_prompt(tok, prompt)])
        single = generate(model, alone, **DEFAULT_DECODE).tokens[0, alone.shape[1]:]
        assert torch.equal(single, batched.generated[row])


def test_shipped_model_solves_fresh_problems(shipped):
    model, tok = shipped
    accuracy = task_accuracy(model, tok, n=32, seed=20260101)
    assert min(accuracy.values()) >= 0.9, f"dense accuracy per task: {accuracy}"
