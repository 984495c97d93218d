"""transformers architectures through ``surelock_fx.optimize`` under the installed transformers version.

Each architecture of ``ARCHITECTURES`` (config.is_causal = False, sdpa) must be locked exactly,
against the model called with an all-allowed 4D mask, or, where expected, refused in one clear sentence. With
SURELOCK_WRITE_ARCH_TABLE=1 the results become this version's rows of docs/architectures.md; without it nothing
is written, and the rows already there for this version must agree with the results.
"""
import dataclasses
import os
import re
from pathlib import Path

import pytest
import torch
import transformers

import surelock_fx
from surelock_fx.capture import LogitsModule
from surelock_fx.lock import LockConfig
from surelock_fx.models import random_weights_
from surelock_fx.reference import ReferenceModel
from surelock_fx.signature import cache_specs

pytestmark = pytest.mark.xdist_group("architectures")  # one process builds every model once

WRITE_TABLE = os.environ.get("SURELOCK_WRITE_ARCH_TABLE") == "1"
REFUSED = {"Mistral, 4-wide sliding window": "sliding_window"}  # architecture -> what its error must name
TOLERANCE = 1e-4
DECODE = dict(gen_length=16, steps=16, block_length=16, lock=LockConfig(kl_threshold=5e-2))
INTERNALS = re.compile(r"torch\._|Traceback|Guard|[Dd]ynamo|FakeTensor|\bfx\b")
TABLE_PATH = Path(__file__).resolve().parent.parent / "docs" / "architectures.md"
MASK_ID = 100
COMMON = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=97, eos_token_id=99, pad_token_id=99,
              attn_implementation="sdpa")
# name -> (transformers class prefix, config fields beyond COMMON)
ARCHITECTURES = {
    "Llama": ("Llama", {}),
    "Qwen2": ("Qwen2", {}),
    "Mistral": ("Mistral", {"sliding_window": None}),
    "Phi3": ("Phi3", {}),
    "Gemma": ("Gemma", {"head_dim": 16, "hidden_activation": "gelu_pytorch_tanh"}),
    "Mistral, 4-wide sliding window": ("Mistral", {"sliding_window": 4}),
}


def tiny_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A random 2-layer ``name`` model (``ARCHITECTURES``) with ``config.is_causal = False`` and a mask id."""
    prefix, fields = ARCHITECTURES[name]
    config = getattr(transformers, f"{prefix}Config")(**COMMON, **fields)
    config.is_causal, config.mask_token_id = False, MASK_ID
    model = getattr(transformers, f"{prefix}ForCausalLM")(config)
    return random_weights_(model, seed, logit_scale=1.0)


class FullAttention(torch.nn.Module):
    """The dense bidirectional reference: ``model`` called with an all-allowed 4D attention mask, which
    transformers 4.x and 5.x both use as it is (4.x ignores ``config.is_causal``)."""

    def __init__(self, model: transformers.PreTrainedModel):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, attention_mask=None):
        assert attention_mask is None, "the reference takes no padding"
        batch, seq = input_ids.shape
        mask = torch.zeros(batch, 1, seq, seq, dtype=self.model.dtype, device=input_ids.device)
        return self.model(input_ids, attention_mask=mask).logits


@dataclasses.dataclass
class Row:
    """One architecture under one transformers version: accepted or refused (and why), and how exactly."""

    architecture: str
    transformers: str
    result: str
    max_logit_error: str = "-"
    decode_equal: str = "-"

    def cells(self) -> list[str]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


HEADER = ["architecture", "transformers", "result", "max logit error", "locked decode = reference"]
BEGIN, END = "<!-- table: written by tests/test_architectures.py -->", "<!-- end of table -->"
INTRO = """# Tested architectures

`tests/test_architectures.py` builds a tiny random model of each architecture below (2 layers, hidden size 64,
4 heads, 2 KV heads, vocabulary 101, `config.is_causal = False`, `attn_implementation="sdpa"`) and checks
`surelock_fx.optimize(model)` against the model called with an all-allowed 4D attention mask (checked to be
bidirectional): the locked graph with every row active (max absolute logit error, float32, at most 1e-4) and a
whole locked decode (`LockConfig(kl_threshold=5e-2)`) against the dense reference semantics, token for token;
a refused architecture must be refused with one clear `ValueError`. CI runs it under the main environment's
transformers; the transformers 4.46 job runs it from the repository root in a second environment that takes torch and
surelock_fx from the main one:

```bash
python -m venv --system-site-packages /tmp/tf446 && /tmp/tf446/bin/pip install "transformers==4.46.3"
/tmp/tf446/bin/python -m pytest -q -n 0 tests/test_architectures.py
```

With `SURELOCK_WRITE_ARCH_TABLE=1` in front of the pytest command, the test rewrites the installed version's rows
of the table below and keeps the other versions' rows; without it, the rows of the installed version must say what
the test finds.
"""


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def read_rows(path: Path) -> list[Row]:
    """The table rows already in ``path`` (none if it does not exist)."""
    if not path.exists():
        return []
    text = path.read_text()
    body = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip().splitlines()[2:]
    return [Row(*[cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]) for line in body]


def merged(old: list[Row], new: list[Row]) -> list[Row]:
    """``new`` plus the rows of ``old`` under other transformers versions, by architecture, then version."""
    versions = {row.transformers for row in new}
    rows = [row for row in old if row.transformers not in versions] + new
    order = {name: i for i, name in enumerate(ARCHITECTURES)}
    return sorted(rows, key=lambda r: (order.get(r.architecture, len(order)), version_key(r.transformers)))


def render(rows: list[Row]) -> str:
    """docs/architectures.md with ``rows`` as its table."""
    lines = [HEADER, ["---"] * len(HEADER)] + [[c.replace("|", "\\|") for c in row.cells()] for row in rows]
    table = "\n".join("| " + " | ".join(line) + " |" for line in lines)
    return f"{INTRO}\n{BEGIN}\n{table}\n{END}\n"


def random_tokens(shape, seed: int) -> torch.Tensor:
    return torch.randint(0, MASK_ID, shape, generator=torch.Generator().manual_seed(seed))


@dataclasses.dataclass
class Outcome:
    """What optimize() made of one architecture; the error or the measurements of the accepted graph."""

    reference: FullAttention
    error: Exception | None = None
    logit_error: float | None = None
    decode_equal: bool | None = None
    locked: int = 0
    plain_equal: bool | None = None

    def row(self, name: str) -> Row:
        if self.error is not None:
            message = " ".join(str(self.error).split())
            return Row(name, transformers.__version__, f"refused ({type(self.error).__name__}): {message}")
        return Row(name, transformers.__version__, "accepted", f"{self.logit_error:.1e}",
                   "yes" if self.decode_equal else "no")


def every_row_logits(optimized, x: torch.Tensor) -> torch.Tensor:
    """The locked graph's logits with every row active and empty caches."""
    B, N = x.shape
    positions = torch.arange(N).expand(B, N)
    caches = [torch.zeros(B, s.heads, N + 1, s.head_dim) for s in cache_specs(optimized.graph_module)]
    with torch.no_grad():
        return optimized.graph_module(x, positions, positions, torch.ones(B, N, dtype=torch.bool), *caches)[0]


def run(name: str) -> Outcome:
    reference = FullAttention(tiny_model(name))
    try:
        optimized = surelock_fx.optimize(reference.model)
    except Exception as error:  # recorded, and checked by the tests below
        return Outcome(reference, error)
    x = random_tokens((2, 12), seed=1)
    with torch.no_grad():
        error = (every_row_logits(optimized, x) - reference(x)).abs().max().item()
    prompt = random_tokens((2, 5), seed=2)
    locked = surelock_fx.generate(optimized, prompt, **DECODE)
    dense = surelock_fx.generate(ReferenceModel(reference), prompt, **DECODE)
    unlocked = {**DECODE, "lock": None}  # the plain model decodes through decoding.model_forward
    plain = surelock_fx.generate(reference.model, prompt, **unlocked)
    plain_equal = torch.equal(plain.tokens, surelock_fx.generate(optimized, prompt, **unlocked).tokens)
    return Outcome(reference, None, error, torch.equal(locked.tokens, dense.tokens), locked.stats.locked_counts[-1],
                   plain_equal)


@pytest.fixture(scope="module")
def table_before() -> bytes | None:
    return TABLE_PATH.read_bytes() if TABLE_PATH.exists() else None


@pytest.fixture(scope="module")
def outcomes(table_before) -> dict[str, Outcome]:
    return {name: run(name) for name in ARCHITECTURES}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_reference_is_bidirectional(outcomes, name):
    """Changing the last token changes the first position's logits."""
    x = random_tokens((1, 12), seed=3)
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % MASK_ID
    with torch.no_grad():
        first, changed = outcomes[name].reference(x)[0, 0], outcomes[name].reference(y)[0, 0]
    assert (first - changed).abs().max() > 1e-3


@pytest.mark.parametrize("name", [name for name in ARCHITECTURES if name not in REFUSED])
def test_architecture_is_locked_exactly(outcomes, name):
    outcome = outcomes[name]
    assert outcome.error is None, f"{type(outcome.error).__name__}: {outcome.error}"
    assert outcome.logit_error <= TOLERANCE
    assert outcome.decode_equal and outcome.locked > 0
    assert outcome.plain_equal, "the plain model's own decode is not the bidirectional one"


@pytest.mark.parametrize("name", REFUSED)
def test_architecture_is_refused_in_one_clear_sentence(outcomes, name):
    error = outcomes[name].error
    assert isinstance(error, ValueError), f"{type(error).__name__}: {error}"
    message = str(error)
    assert "\n" not in message and len(message) < 400 and not INTERNALS.search(message), message
    assert REFUSED[name] in message


def test_results_table(outcomes, table_before):
    """Written with SURELOCK_WRITE_ARCH_TABLE=1; otherwise untouched, and its rows of this version (if any)
    say what this run found."""
    rows = [outcome.row(name) for name, outcome in outcomes.items()]
    if WRITE_TABLE:
        TABLE_PATH.write_text(render(merged(read_rows(TABLE_PATH), rows)))
        return
    assert (TABLE_PATH.read_bytes() if TABLE_PATH.exists() else None) == table_before
    recorded = {row.architecture: row for row in read_rows(TABLE_PATH) if row.transformers == transformers.__version__}
    for row in rows:
        if row.architecture in recorded:
            assert (recorded[row.architecture].result, recorded[row.architecture].decode_equal) == (
                row.result, row.decode_equal), f"docs/architectures.md is out of date for {row.architecture}"


def test_table_keeps_the_rows_of_other_versions(tmp_path):
    old = [Row("Llama", "4.46.3", "accepted", "1.0e-06", "yes"), Row("Llama", "5.0.0", "refused: a | b")]
    path = tmp_path / "architectures.md"
    path.write_text(render(old))
    new = [Row("Llama", "5.0.0", "accepted", "2.0e-06", "yes"), Row("Gemma", "5.0.0", "accepted", "3.0e-06", "yes")]
    assert read_rows(path) == old
    path.write_text(render(merged(read_rows(path), new)))
    assert read_rows(path) == [old[0], new[0], new[1]]


class MaskReader(transformers.PreTrainedModel):
    """A transformers model declared bidirectional whose attention reads a 4D mask as ``read`` makes it."""

    config_class = transformers.PretrainedConfig

    def __init__(self, read):
        super().__init__(transformers.PretrainedConfig(is_causal=False))
        self.embed, self.read = torch.nn.Embedding(10, 8), read

    def forward(self, input_ids, position_ids, attention_mask=None):
        h = self.embed(input_ids)[:, None]
        return torch.nn.functional.scaled_dot_product_attention(h, h, h, attn_mask=self.read(attention_mask))


@pytest.mark.parametrize("read, dtype", [(lambda mask: mask, torch.float32), (lambda mask: mask.bool(), None),
                                         (lambda mask: mask.flatten(1), None)], ids=["as-is", "1-attends", "2d"])
def test_only_a_model_that_honours_the_full_mask_gets_it(read, dtype):
    """Where the all-allowed 4D mask would block keys (read as 1 = attend, as 4.x's GPT-2 does) or break the
    model, capture passes none and the model's own attention goes to the passes."""
    assert LogitsModule(MaskReader(read)).mask_dtype == dtype
