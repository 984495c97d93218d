"""The Python standard library as a code-infilling corpus: files, the train/held-out split, infill examples.

A module is held out by its top-level name (``json/decoder.py`` belongs to ``json``), so no file of a
held-out package is trained on; the held-out names are listed in
``surelock_fx/assets/infill/heldout_modules.txt`` (one top-level name in ten, chosen once by a hash of
the name: ``hashed_held_out``). An infill example cuts one span out of a file: a single line
(``line``), two to four consecutive lines (``lines``) or the whole body of a short function (``body``);
its prompt is the text before the span, ``<|hole|>``, and the text after it
(``surelock_fx.infill.infill_prompt``), its answer the span.

Only inferable spans are cut (``inferable``): every name in the answer is a keyword, a builtin or a name
the prompt mentions. A span that introduces a name its context never shows can only be recalled from the
module's source, which a held-out module's never was, so exact match on it measures memory, not infilling.
"""
from __future__ import annotations

import ast
import builtins
import hashlib
import keyword
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from surelock_fx.infill import MAX_ANSWER_CHARS, assets_dir, infill_prompt

# not Python source worth learning from: tests, data tables, generated topics, IDLE, demos
EXCLUDED = {"test", "idlelib", "lib2to3", "pydoc_data", "encodings", "turtledemo", "ensurepip", "site-packages",
            "__pycache__", "__phello__"}
HELD_OUT_SHARE = 10  # one top-level name in ten (by hash) is held out
PREFIX_CHARS = 256  # context before the span, cut at a line start
SUFFIX_CHARS = 128  # context after the span, cut at a line end
KINDS = ("line", "lines", "body")
HELD_OUT_FILE = assets_dir() / "infill" / "heldout_modules.txt"
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
KNOWN_NAMES = frozenset(keyword.kwlist + keyword.softkwlist + dir(builtins) + ["self", "cls"])


def stdlib_root() -> Path:
    return Path(os.__file__).resolve().parent


def top_level_name(relative: Path) -> str:
    return relative.parts[0].removesuffix(".py")


def hashed_held_out(name: str) -> bool:
    """How the held-out list was chosen: a pure function of the top-level module name."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELD_OUT_SHARE == 0


def held_out_names() -> set[str]:
    """The top-level modules of the shipped held-out list."""
    lines = HELD_OUT_FILE.read_text(encoding="utf-8").splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def source_paths(root: Path) -> list[Path]:
    """Every ``.py`` file under ``root`` outside ``EXCLUDED``, relative to ``root``, sorted."""
    relative = (path.relative_to(root) for path in sorted(root.rglob("*.py")))
    return [rel for rel in relative if not EXCLUDED & set(rel.parts) and not rel.parts[0].startswith("config-")]


def source_files(root: Path | None = None) -> dict[str, str]:
    """Relative path -> source text of every stdlib ``.py`` file of ``source_paths`` that parses."""
    root = root or stdlib_root()
    files = {}
    for rel in source_paths(root):
        path = root / rel
        try:
            text = path.read_text(encoding="utf-8")
            ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        files[rel.as_posix()] = text.replace("\t", "    ")
    return files


def split(files: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(train, held-out) files, by the top-level module name of each."""
    held = held_out_names()
    train = {k: v for k, v in files.items() if top_level_name(Path(k)) not in held}
    return train, {k: v for k, v in files.items() if k not in train}


@dataclass(frozen=True)
class Infill:
    """One span cut out of a file. ``function`` (body spans only) is the function's source up to its body,
    so that ``function + answer`` is the infilled function for ``ast.parse``."""

    prefix: str
    answer: str
    suffix: str
    kind: str
    source: str
    function: str | None = None

    def record(self) -> dict:
        out = {"prompt": infill_prompt(self.prefix, self.suffix), "answer": self.answer, "kind": self.kind,
               "source": self.source}
        if self.function is not None:
            out["function"] = self.function
        return out


class FileSpans:
    """The candidate spans of one file, by kind, as (first line, end line) half-open line ranges."""

    def __init__(self, name: str, text: str):
        self.name = name
        self.lines = text.split("\n")
        self.functions = []  # (def line index, body start, body end, header text)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start, end = node.body[0].lineno - 1, node.end_lineno
                # a docstring stays in the prompt: the body to infill is the code after it
                if len(node.body) > 1 and _is_docstring(node.body[0]):
                    start = node.body[1].lineno - 1
                header_start = node.lineno - 1
                if start > header_start and self._fits(start, end) and end - start <= 4:
                    self.functions.append((header_start, start, end))
        self.code_lines = [i for i, line in enumerate(self.lines) if self._is_code(line)]

    @staticmethod
    def _is_code(line: str) -> bool:
        stripped = line.strip()
        return bool(stripped) and not stripped.startswith("#") and len(line) <= MAX_ANSWER_CHARS

    def _fits(self, start: int, end: int) -> bool:
        span = self.lines[start:end]
        return bool(span) and all(self._is_code(line) for line in span) and len("\n".join(span)) <= MAX_ANSWER_CHARS

    def sample(self, kind: str, rng: random.Random) -> Infill | None:
        """A random span of ``kind``, or None if the file has none."""
        function = None
        if kind == "body":
            if not self.functions:
                return None
            header, start, end = rng.choice(self.functions)
            function = "\n".join(self.lines[header:start]) + "\n"
        else:
            if not self.code_lines:
                return None
            start = rng.choice(self.code_lines)
            end = start + (1 if kind == "line" else rng.randint(2, 4))
            if not self._fits(start, end):
                return None
        return Infill(self._before(start), "\n".join(self.lines[start:end]), self._after(end), kind, self.name,
                      function)

    def _before(self, start: int) -> str:
        lo, size = start, 0
        while lo > 0 and size + len(self.lines[lo - 1]) + 1 <= PREFIX_CHARS:
            lo -= 1
            size += len(self.lines[lo]) + 1
        return "".join(line + "\n" for line in self.lines[lo:start])

    def _after(self, end: int) -> str:
        hi, size = end, 0
        while hi < len(self.lines) and size + len(self.lines[hi]) + 1 <= SUFFIX_CHARS:
            size += len(self.lines[hi]) + 1
            hi += 1
        return "".join("\n" + line for line in self.lines[end:hi])


def inferable(example: Infill) -> bool:
    """Whether every name in the answer (strings and comments included) is known without the module's
    source: a keyword, a builtin, ``self``/``cls``, or a name in the prompt."""
    context = set(NAME.findall(example.prefix + example.suffix))
    return all(name in context or name in KNOWN_NAMES for name in NAME.findall(example.answer))


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


class InfillSampler:
    """Random inferable infill examples from a set of files, a file drawn in proportion to its size."""

    def __init__(self, files: dict[str, str], seed: int):
        self.rng = random.Random(f"infill:{seed}")
        self.spans = [FileSpans(name, text) for name, text in files.items()]
        self.weights = [len(text) for text in files.values()]

    def __call__(self, kind: str | None = None) -> Infill:
        kind = kind or self.rng.choice(KINDS)
        while True:
            (spans,) = self.rng.choices(self.spans, self.weights)
            example = spans.sample(kind, self.rng)
            if example is not None and inferable(example):
                return example


def train_tokenizer(texts, vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on ``texts`` (the ``tokenizers`` library), as a
    ``transformers.PreTrainedTokenizerFast`` with the special tokens and chat template of tiny-tasks plus
    ``<|hole|>``: ids 0..5 are ``<|eos|>`` (also pad), ``<|bos|>``, ``<|eot|>``, ``<|mask|>``, ``<|unk|>``,
    ``<|hole|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from surelock_fx.infill import HOLE
    from surelock_fx.tasks import BOS, CHAT_TEMPLATE, EOS, EOT, MASK, SPECIAL_TOKENS, UNK

    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    special = [*SPECIAL_TOKENS, HOLE]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=UNK, mask_token=MASK,
        additional_special_tokens=[EOT, HOLE], clean_up_tokenization_spaces=False, model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
