"""surelock_fx.infill: the shipped held-out infilling evaluation, its scores and Gen-PPL."""
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from surelock_fx import infill  # noqa: E402
from surelock_fx.models import random_llada  # noqa: E402
from surelock_fx.tasks import special_token_ids  # noqa: E402
from surelock_fx.text import encode_batch  # noqa: E402

import code_corpus  # noqa: E402
from helpers import tiny_config  # noqa: E402

EOS, EOT, MASK = 99, 98, 100  # helpers.TINY_DEFAULTS


@pytest.fixture(scope="module")
def records():
    return [json.loads(line) for line in infill.eval_file().read_text(encoding="utf-8").splitlines()]


def test_the_shipped_evaluation_has_100_spans_of_each_kind_interleaved(records):
    assert len(records) == 300
    assert [r["kind"] for r in records] == list(code_corpus.KINDS) * 100
    assert len({(r["prompt"], r["answer"]) for r in records}) == 300, "no duplicates"
    for r in records:
        assert set(r) == {"prompt", "answer", "kind", "source"} | ({"function"} if r["kind"] == "body" else set())
        assert r["prompt"].count(infill.HOLE) == 1
        assert r["answer"].strip() and len(r["answer"]) <= infill.MAX_ANSWER_CHARS
        lines = r["answer"].count("\n") + 1
        assert lines == 1 if r["kind"] == "line" else 2 <= lines <= 4 if r["kind"] == "lines" else lines <= 4


def test_the_shipped_evaluation_is_cut_from_held_out_modules_only(records):
    held_out = code_corpus.held_out_names()
    sources = Counter(code_corpus.top_level_name(Path(r["source"])) for r in records)
    assert set(sources) <= held_out and len(sources) >= 5


def test_every_shipped_body_parses_with_its_true_answer(records):
    bodies = [r for r in records if r["kind"] == "body"]
    assert len(bodies) == 100
    for r in bodies:
        assert infill.parses(r["function"], r["answer"]), r
        assert r["function"].endswith("\n") and r["prompt"].split(infill.HOLE)[0].endswith(r["function"].split("\n")[-2]
                                                                                          + "\n")
    assert infill.parse_rate([r["answer"].strip() for r in bodies], bodies) == 1.0


def test_shipped_answers_fit_the_answer_region_by_the_tiny_code_tokenizer(records):
    from surelock_fx.text import load_tokenizer

    tokenizer = load_tokenizer(infill.default_model_dir())
    lengths = [len(tokenizer.encode(r["answer"], add_special_tokens=False)) for r in records]
    assert max(lengths) < infill.GEN_LENGTH  # room for the EOS


def test_exact_match_is_per_kind_and_ignores_surrounding_whitespace():
    records = [dict(answer="x = 1", kind="line"), dict(answer="  y = 2\n", kind="line"),
               dict(answer="    return a", kind="body", function="def f(a):\n"), dict(answer="z")]
    answers = [" x = 1\n", "y = 3", "return a", "z"]
    assert infill.exact_match(answers, records) == {"line": 0.5, "body": 1.0, "all": 1.0}


def test_parses_needs_the_whole_function_to_be_valid():
    assert infill.parses("def f(x):\n", "    return x")
    assert infill.parses("    def m(self):\n        \"\"\"Doc.\"\"\"\n", "        return self")  # a method: dedented
    assert not infill.parses("def f(x):\n", "    return (x")
    assert not infill.parses("def f(x):\n", "return x")  # not indented: no body
    assert not infill.parses("def f(x):\n", "    y = 1\n      return y")  # inconsistent indentation
    assert not infill.parses("def f(x):\n", "    return '\0'\x00")


def test_parse_rate_reindents_stripped_answers_and_counts_only_bodies():
    body = dict(answer="        if a:\n            return 1", kind="body", function="    def m(self, a):\n")
    line = dict(answer="x = 1", kind="line")
    answers = ["if a:\n            return 1", "x = (", "if a:\n    return 1", "if a:\n            return (1"]
    assert infill.parse_rate(answers, [body, line, body, body]) == pytest.approx(1 / 3)
    assert infill.parse_rate(["x"], [line]) is None
    assert infill.is_infill([line]) and infill.is_infill([dict(answer="b", function="def f():\n")])
    assert not infill.is_infill([dict(prompt="1+1=", answer="2")])


@pytest.fixture(scope="module")
def model():
    return random_llada(tiny_config(n_layers=2), seed=3)


def brute_force_nll(model, prompt_ids, attention_mask, generated):
    """The definition, one prefix at a time: sum over j up to the first stop of -log p(g_j | prompt, g_<j,
    positions >= j masked)."""
    P, G = prompt_ids.shape[1], generated.shape[1]
    sums, counts = [], []
    for ids, mask, gen in zip(prompt_ids, attention_mask, generated):
        stops = [j for j, t in enumerate(gen.tolist()) if t in (EOS, EOT)]
        count = stops[0] + 1 if stops else G
        total = 0.0
        for j in range(count):
            region = torch.cat([gen[:j], torch.full((G - j,), MASK)])
            x = torch.cat([ids, region])[None]
            attn = torch.cat([mask, torch.ones(G, dtype=torch.long)])[None]
            with torch.no_grad():
                logits = model(x, attention_mask=attn)[0, P + j]
            total -= F.log_softmax(logits.double(), -1)[gen[j]].item()
        sums.append(total)
        counts.append(count)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts)


@pytest.mark.parametrize("chunk_bytes", [1, 64 << 20], ids=["one-prefix-per-forward", "all-at-once"])
def test_generated_nll_is_the_left_to_right_chain_rule(model, chunk_bytes):
    gen = torch.Generator().manual_seed(0)
    B, P, G = 4, 7, 6
    prompt_ids = torch.randint(0, 97, (B, P), generator=gen)
    attention_mask = torch.ones(B, P, dtype=torch.long)
    for b, pad in enumerate([0, 3, 1, 5]):  # left padding, as encode_batch makes it
        prompt_ids[b, :pad] = EOS
        attention_mask[b, :pad] = 0
    generated = torch.randint(0, 97, (B, G), generator=gen)
    generated[0, 2] = EOS  # stop mid-answer: what follows it does not count
    generated[0, 4] = MASK
    generated[2, 0] = EOT  # stop at once: one token
    generated[3, G - 1] = EOS  # row 1 has no stop: all G tokens count
    sums, counts = infill.generated_nll(model, prompt_ids, attention_mask, generated, (EOS, EOT),
                                        chunk_bytes=chunk_bytes)
    want_sums, want_counts = brute_force_nll(model, prompt_ids, attention_mask, generated)
    assert counts.tolist() == want_counts.tolist() == [3, G, 1, G]
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-5)
    assert (sums > 0).all()


def test_gen_ppl_does_not_depend_on_the_batching():
    files = {"a.py": "def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n" * 3}
    tok = code_corpus.train_tokenizer(files.values(), vocab_size=300)
    model = random_llada(tiny_config(vocab_size=len(tok), **special_token_ids(tok)), seed=1)
    prompts = ["def f(x):\n" + infill.HOLE, "x = 1\n" + infill.HOLE + "\ny = 2\n\n\nclass B:\n    pass",
               infill.HOLE + "\n"]
    gen = torch.Generator().manual_seed(2)
    generated = [torch.randint(6, len(tok), (8,), generator=gen) for _ in prompts]
    generated[1][3] = tok.eos_token_id
    whole = infill.gen_ppl(model, tok, prompts, generated, batch_size=3)
    one_by_one = infill.gen_ppl(model, tok, prompts, generated, batch_size=1)
    assert whole == pytest.approx(one_by_one, rel=1e-5)
    ids, mask = encode_batch(tok, prompts)
    sums, counts = infill.generated_nll(model, ids, mask, torch.stack(generated), (tok.eos_token_id,))
    assert counts.tolist() == [8, 4, 8]
    assert whole == pytest.approx(float(torch.exp(sums.sum() / counts.sum())), rel=1e-6)

