"""benchmarks/code_corpus.py: the standard-library files, the held-out split and the infill spans cut from them."""
import ast
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from surelock_fx.infill import HOLE, MAX_ANSWER_CHARS  # noqa: E402

import code_corpus  # noqa: E402

MODULE = '''"""Module {name}."""
import os

LIMIT = {i}


def add_{i}(x, y=1):
    """Add y to x."""
    x = x + y * {i}
    return x


def scale_{i}(values):
    return [v * LIMIT for v in values]


class Box{i}:
    def __init__(self, size):
        self.size = size

    def grow(self, by):
        if by > {i}:
            return self.size + by
        return self.size

    async def fetch(self):
        return await self.grow(self.size)
'''
HELD_OUT = ("enum.py", "email/__init__.py", "email/utils.py")  # top-level names in heldout_modules.txt
TRAIN = ("alpha.py", "beta/__init__.py", "beta/gamma.py", "delta/sub/deep.py")
EXCLUDED = ("test/test_alpha.py", "beta/test/test_beta.py", "idlelib/shell.py", "config-3.11-x86_64/conf.py",
            "broken.py")


def fake_stdlib(root: Path) -> Path:
    """A small stand-in for the standard library: training and held-out modules (and packages), files that
    ``source_files`` must skip, and one file indented with tabs."""
    for i, name in enumerate(TRAIN + HELD_OUT + EXCLUDED):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(MODULE.format(name=name, i=i), encoding="utf-8")
    (root / "broken.py").write_text("def broken(:\n    pass\n")
    (root / "tabbed.py").write_text("def tabbed(a):\n\tif a:\n\t\treturn a\n\treturn 0\n")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return code_corpus.source_files(fake_stdlib(tmp_path_factory.mktemp("stdlib")))


def samples(files, per_kind=60, seed=0):
    sampler = code_corpus.InfillSampler(files, seed)
    return [sampler(kind) for kind in code_corpus.KINDS for _ in range(per_kind)]


def test_source_files_skips_tests_tools_and_unparsable_files_and_expands_tabs(files):
    assert set(files) == {*TRAIN, *HELD_OUT, "tabbed.py"}
    assert files["tabbed.py"] == "def tabbed(a):\n    if a:\n        return a\n    return 0\n"


def test_split_is_disjoint_by_top_level_name_and_follows_the_held_out_list(files):
    train, held_out = code_corpus.split(files)
    assert set(held_out) == set(HELD_OUT) and set(train) == {*TRAIN, "tabbed.py"}
    names = code_corpus.held_out_names()
    train_names = {code_corpus.top_level_name(Path(f)) for f in train}
    held_names = {code_corpus.top_level_name(Path(f)) for f in held_out}
    assert held_names == {"enum", "email"} and held_names <= names
    assert not train_names & names and not train_names & held_names


def test_the_hashed_rule_reproduces_the_held_out_list_on_the_real_stdlib():
    paths = code_corpus.source_paths(code_corpus.stdlib_root())  # not read: the split needs names only
    names = {code_corpus.top_level_name(p) for p in paths}
    listed = code_corpus.held_out_names()
    assert {n for n in names if code_corpus.hashed_held_out(n)} == listed & names
    assert len(listed & names) >= 10, "most listed modules exist in this Python's stdlib"
    held_out = [p for p in paths if code_corpus.top_level_name(p) in listed]
    assert 0.05 * len(paths) < len(held_out) < 0.5 * len(paths)


def test_every_span_is_a_contiguous_run_of_whole_lines_of_its_file(files):
    for example in samples(files):
        text = files[example.source]
        assert example.prefix + example.answer + example.suffix in text
        assert example.prefix == "" or example.prefix.endswith("\n"), "the span starts at a line start"
        assert example.suffix == "" or example.suffix.startswith("\n"), "the span ends at a line end"
        assert len(example.prefix) <= code_corpus.PREFIX_CHARS and len(example.suffix) <= code_corpus.SUFFIX_CHARS
        assert example.answer.strip() and len(example.answer) <= MAX_ANSWER_CHARS


def test_kinds_are_respected(files):
    lines = {kind: set() for kind in code_corpus.KINDS}
    for example in samples(files):
        lines[example.kind].add(example.answer.count("\n") + 1)
        assert (example.function is not None) == (example.kind == "body")
    assert lines["line"] == {1}
    assert 2 in lines["lines"] and lines["lines"] <= {2, 3, 4}
    assert lines["body"] <= {1, 2, 3, 4} and len(lines["body"]) > 1


def test_a_body_answer_is_the_whole_body_of_its_function(files):
    bodies = set()
    for example in samples(files):
        if example.kind != "body":
            continue
        whole = example.function + example.answer
        assert whole in files[example.source] and example.prefix.endswith(example.function.splitlines()[-1] + "\n")
        tree = ast.parse(textwrap.dedent(whole))
        (node,) = tree.body  # one function, the answer inside it
        assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        assert node.end_lineno == whole.count("\n") + 1, "the answer ends the function"
        first = node.body[1] if len(node.body) > 1 and ast.get_docstring(node) else node.body[0]
        assert first.lineno == example.function.count("\n") + 1, "the answer starts the body (after a docstring)"
        # the function's full body is the answer: nothing of the function follows it in the file
        after = example.suffix.split("\n")[1:2]
        indent = len(example.answer) - len(example.answer.lstrip(" "))
        assert not after or not after[0].strip() or len(after[0]) - len(after[0].lstrip(" ")) < indent
        bodies.add(example.answer)
    assert any(b.startswith("    x = x + y * ") for b in bodies), "a docstring stays in the prompt"
    assert "        return await self.grow(self.size)" in bodies, "async functions and methods count"


def test_only_spans_whose_names_the_prompt_shows_are_cut(files):
    examples = samples(files)
    assert all(code_corpus.inferable(example) for example in examples)
    # `v` is named only inside this body: no prompt shows it
    assert "    return [v * LIMIT for v in values]" not in {e.answer for e in examples if e.kind == "body"}
    assert "        self.size = size" in {e.answer for e in examples}, "names of the prompt and `self` are known"


def test_inferable_ignores_keywords_and_builtins_but_not_unseen_names():
    def span(answer, prefix="def f(a):\n", suffix=""):
        return code_corpus.Infill(prefix, answer, suffix, "line", "m.py")

    assert code_corpus.inferable(span("    return len(a) if a is not None else self"))
    assert code_corpus.inferable(span("    return b", suffix="\nb = 1"))
    assert not code_corpus.inferable(span("    return b"))
    assert not code_corpus.inferable(span("    return 'b'")), "names in strings count too"


def test_records_hold_the_prompt_with_one_hole(files):
    for example in samples(files, per_kind=5):
        record = example.record()
        assert record["prompt"] == example.prefix + HOLE + example.suffix and record["prompt"].count(HOLE) == 1
        assert record["answer"] == example.answer and record["kind"] == example.kind
        assert record.get("function") == example.function


def test_sampling_is_a_pure_function_of_the_seed(files):
    assert samples(files, 10, seed=3) == samples(files, 10, seed=3) != samples(files, 10, seed=4)


def test_the_tokenizer_round_trips_code_and_keeps_the_hole_whole(files):
    tok = code_corpus.train_tokenizer(files.values(), vocab_size=400)
    code = "def f(x):\n\treturn {'é': x}  # ok\n"
    ids = tok.encode(code, add_special_tokens=False)
    assert tok.decode(ids) == code
    hole = tok.convert_tokens_to_ids(HOLE)
    assert tok.convert_tokens_to_ids(["<|eos|>", "<|bos|>", "<|eot|>", "<|mask|>", "<|unk|>", HOLE]) == list(range(6))
    assert tok.encode(f"a = 1\n{HOLE}\nb = 2", add_special_tokens=False).count(hole) == 1
