"""Synthetic tasks with exact answers and a character-level tokenizer, for the shipped trained model.

These exist so that locking (skipping converged tokens) can be judged for *quality* on a real,
trained masked-diffusion model that ships with the package (``default_model_dir()``), without
downloading LLaDA-8B. Every task is ``prompt -> answer`` with an exactly checkable answer:

===========  ==================================  ==========
task         example prompt                      answer
===========  ==================================  ==========
``add``      ``"482+077="``                      ``"0559"``
``sort``     ``"sort jbmfa"``                    ``"abfjm"``
``reverse``  ``"rev k3x9q"``                     ``"q9x3k"``
``word``     ``"Ann has 7 pens, loses 3."``       ``"4"``
===========  ==================================  ==========

Sequence format (training and decoding alike, see ``encode_prompt``)::

    <|bos|> prompt characters <|eot|>  |  answer characters <|eos|> <|eos|> ... (GEN_LENGTH tokens)

The answer region is ``GEN_LENGTH`` tokens: the answer followed by EOS padding, as in LLaDA's SFT
(training also pads a share of its steps to longer regions, so that longer gen_lengths decode).
The tokenizer's chat template produces the same prompt ids, so ``surelock_fx.evaluate`` (which
encodes prompts with the chat template) decodes exactly what training saw.

Default decode settings of the shipped model (``DEFAULT_DECODE``): ``gen_length=16, steps=16,
block_length=16`` (one block, one token per step: the setting the SureLock paper uses),
``temperature=0``, ``remasking="low_confidence"``.
"""
from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Callable

TASKS = ("add", "sort", "reverse", "word")

GEN_LENGTH = 16
MAX_ANSWER_CHARS = 12
DEFAULT_DECODE = dict(gen_length=GEN_LENGTH, steps=GEN_LENGTH, block_length=GEN_LENGTH, temperature=0.0,
                      remasking="low_confidence")

MASK, EOS, EOT, BOS, UNK = "<|mask|>", "<|eos|>", "<|eot|>", "<|bos|>", "<|unk|>"
SPECIAL_TOKENS = (EOS, BOS, EOT, MASK, UNK)  # ids 0..4, in this order
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # newline and printable ASCII: ids 5..100
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}<|eot|>{% endfor %}"
)


def default_model_dir(family: str = "llada") -> Path:
    """The trained tiny model of the tasks shipped with the package (config.json, model.safetensors,
    tokenizer): our LLaDA (tiny-tasks), or with ``family="dream"`` a Dream (tiny-dream)."""
    return Path(__file__).resolve().parent / "assets" / ("tiny-dream" if family == "dream" else "tiny-tasks")


# ----------------------------------------------------------------------------------------------
# problem generators
# ----------------------------------------------------------------------------------------------

_NAMES = ("Ann", "Bob", "Tom", "Eve", "Max", "Sue", "Kim", "Joe")
_ITEMS = ("pens", "cats", "cups", "eggs", "hats", "toys", "cars", "keys")
_SORT_ALPHABET = "abcdefghijklmnop"


def _add(rng: random.Random) -> tuple[str, str]:
    """Zero-padded 3-digit addition: digits align, the carry chain is the reasoning."""
    a, b = rng.randrange(1000), rng.randrange(1000)
    return f"{a:03d}+{b:03d}=", f"{a + b:04d}"


def _sort(rng: random.Random) -> tuple[str, str]:
    """Sort 3-7 distinct letters from a-p."""
    s = "".join(rng.sample(_SORT_ALPHABET, rng.randint(3, 7)))
    return f"sort {s}", "".join(sorted(s))


def _reverse(rng: random.Random) -> tuple[str, str]:
    """Reverse 3-8 letters and digits (repeats allowed)."""
    alphabet = string.ascii_lowercase + string.digits
    s = "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 8)))
    return f"rev {s}", s[::-1]


def _word(rng: random.Random) -> tuple[str, str]:
    """One-step word problems: a count that grows or shrinks."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a = rng.randint(1, 9)
    if rng.random() < 0.5:
        b = rng.randint(1, 9)
        return f"{name} has {a} {item}, gets {b}.", str(a + b)
    b = rng.randint(0, a)
    return f"{name} has {a} {item}, loses {b}.", str(a - b)


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add, "sort": _sort, "reverse": _reverse, "word": _word,
}


def make_problems(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs of ``task``, a pure function of ``(task, n, seed)``."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{seed}")
    return [GENERATORS[task](rng) for _ in range(n)]


def load_jsonl_tasks(path: str | Path, records: bool = False) -> list[tuple[str, str]] | list[dict]:
    """(prompt, answer) pairs from a JSON-lines file of ``{"prompt": ..., "answer": ...}`` objects, or with
    ``records`` the objects themselves (other fields kept: the infill evaluation's ``kind``, ``function``).

    Blank lines are skipped; a line that is not such an object raises ValueError naming the line.
    """
    path = Path(path)
    problems = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) \
                or not isinstance(obj.get("answer"), str):
            raise ValueError(f'{path}:{lineno}: expected {{"prompt": str, "answer": str}}, got {line.strip()[:80]}')
        problems.append(obj if records else (obj["prompt"], obj["answer"]))
    return problems


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------

def build_tokenizer():
    """The character-level tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    Ids 0..4 are ``<|eos|>`` (also pad), ``<|bos|>``, ``<|eot|>``, ``<|mask|>``, ``<|unk|>``; then
    newline and the 95 printable ASCII characters, one token each. Nothing is added automatically
    when encoding; ``encode_prompt`` / the chat template add BOS and EOT.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(CHARS)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=UNK,
        mask_token=MASK, additional_special_tokens=[EOT], clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def special_token_ids(tokenizer) -> dict[str, int]:
    """The config keys ``LLaDAConfig`` needs, read from the tokenizer."""
    return dict(
        mask_token_id=tokenizer.convert_tokens_to_ids(MASK),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eot_token_id=tokenizer.convert_tokens_to_ids(EOT),
    )


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """``[<|bos|>] + chars(prompt) + [<|eot|>]``: the same ids as the chat template of one user turn."""
    ids = tokenizer.convert_tokens_to_ids
    return [ids(BOS)] + tokenizer.encode(prompt, add_special_tokens=False) + [ids(EOT)]
