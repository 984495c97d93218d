"""Bad input as a new user gives it: each case is one clear line, never a traceback.

From the API a ``ValueError`` subclass whose message names the file, what is wrong and how to fix it; from
the ``surelock`` command (generate and eval) exit code 2, nothing on stdout and one line ``error: ...`` on
stderr. No case changes a byte of the checkpoint directory.
"""
import json
import random
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surelock_fx import tasks
from surelock_fx.cli import main
from surelock_fx.models import CheckpointError, ConfigError, load_model, save_model
from surelock_fx.models import llada as llada_module
from surelock_fx.text import TokenizerError, load_tokenizer

SHIPPED = tasks.default_model_dir()
WEIGHTS = "model.safetensors"
Q_PROJ = "model.transformer.blocks.0.q_proj.weight"
LN_F = "model.transformer.ln_f.weight"
SCHEDULE = ["--gen-length", "4", "--steps", "4", "--block-length", "4"]
COMMANDS = {"generate": ["generate", "--prompt", "12+34", *SCHEDULE], "eval": ["eval", "--task", "add", "--n", "1",
                                                                               *SCHEDULE]}


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A copy of the shipped tiny-tasks checkpoint (config, weights, tokenizer), to break."""
    return Path(shutil.copytree(SHIPPED, tmp_path / "ckpt"))


def snapshot(path: Path) -> dict:
    """Every file under ``path``: its bytes and modification time."""
    return {p.relative_to(path): (p.read_bytes(), p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_weights(path: Path, edit, file: str = WEIGHTS) -> None:
    tensors = load_file(path / file)
    edit(tensors)
    save_file(tensors, path / file)


def edit_shard_of(path: Path, name: str, edit) -> None:
    """``edit_weights`` on the shard that holds tensor ``name``."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    edit_weights(path, edit, index["weight_map"][name])


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def shard(path: Path) -> Path:
    """Re-save the checkpoint in three or more shards; the first shard's path."""
    model = load_model(path)
    (path / WEIGHTS).unlink()
    save_model(model, path, max_shard_bytes=1_500_000)
    return sorted(path.glob("model-*.safetensors"))[0]


def set_value(name: str, value: float):
    def edit(tensors):
        tensors[name][0, 0] = value
    return edit


def cast(name: str, dtype: torch.dtype):
    return lambda tensors: tensors.update({name: tensors[name].to(dtype)})


CORRUPT = r"model[-0-9of]*\.safetensors is corrupt or incomplete .*re-download or re-save"
# case: (break the checkpoint, error class, message, load_model's dtype)
CASES = {
    "truncated-weights": (lambda p: truncate(p / WEIGHTS), CheckpointError, CORRUPT, None),
    "empty-weights": (lambda p: (p / WEIGHTS).write_bytes(b""), CheckpointError, CORRUPT, None),
    "garbage-weights": (lambda p: (p / WEIGHTS).write_bytes(random.Random(0).randbytes(4096)), CheckpointError,
                        CORRUPT, None),
    "truncated-shard": (lambda p: truncate(shard(p)), CheckpointError, CORRUPT, None),
    "missing-shard": (lambda p: shard(p).unlink(), CheckpointError,
                      r"missing shard\(s\) listed in model\.safetensors\.index\.json: model-00001-of", None),
    "index-not-an-object": (lambda p: (shard(p), (p / "model.safetensors.index.json").write_text("[]")),
                            CheckpointError, r"index\.json holds a JSON list, not an object", None),
    "index-without-weight-map": (lambda p: (shard(p), (p / "model.safetensors.index.json").write_text("{}")),
                                 CheckpointError, r"index\.json is malformed: it needs a 'weight_map' object", None),
    "config-is-a-list": (lambda p: (p / "config.json").write_text("[1, 2]"), ConfigError,
                         r"config\.json holds a JSON list, not an object: it must be one JSON object", None),
    "config-not-utf8": (lambda p: (p / "config.json").write_bytes(b"\xff\xfe{\x00}\x00"), ConfigError,
                        r"config\.json is not UTF-8 text \(byte 0xff at offset 0\).*save it as UTF-8", None),
    "config-invalid-json": (lambda p: (p / "config.json").write_text('{\n  "d_model": 128,\n'), ConfigError,
                            r"config\.json is not valid JSON: .* at line 3 column 1", None),
    "mask-token-id-null": (lambda p: edit_config(p, mask_token_id=None), ConfigError,
                           r"config\.json: config key 'mask_token_id' must be an integer token id, got None; "
                           "set it to the mask token's id", None),
    "d-model-true": (lambda p: edit_config(p, d_model=True), ConfigError,
                     r"'d_model' must be a positive integer, got True", None),
    "weight-tying-string": (lambda p: edit_config(p, weight_tying="false"), ConfigError,
                            r"'weight_tying' must be true or false, got 'false'", None),
    "rope-theta-null": (lambda p: edit_config(p, rope_theta=None), ConfigError,
                        r"'rope_theta' must be a positive number, got None", None),
    "mask-is-eos": (lambda p: edit_config(p, mask_token_id=0), ConfigError,
                    r"config\.json: mask_token_id and eos_token_id are both 0: the sampler could never tell a "
                    "generated eos token from a mask; set mask_token_id to the mask token's id", None),
    "mask-is-eot": (lambda p: edit_config(p, mask_token_id=2), ConfigError,
                    r"mask_token_id and eot_token_id are both 2", None),
    "scale-logits": (lambda p: edit_config(p, scale_logits=True), ConfigError,
                     r"config key 'scale_logits' is True: this model implements only scale_logits=False", None),
    "nan-weights": (lambda p: edit_weights(p, lambda t: (set_value(Q_PROJ, float("nan"))(t),
                                                         set_value("model.transformer.ff_out.weight", 1.0)(t),
                                                         t[LN_F].fill_(float("-inf")))),
                    CheckpointError, rf"ckpt holds NaN or inf in tensor\(s\) {Q_PROJ}, {LN_F}; .*re-download", None),
    "inf-weights-in-a-shard": (lambda p: (shard(p), edit_shard_of(p, Q_PROJ, set_value(Q_PROJ, float("inf")))),
                               CheckpointError, rf"NaN or inf in tensor\(s\) {Q_PROJ};", None),
    "integer-weights": (lambda p: edit_weights(p, cast(Q_PROJ, torch.int32)), CheckpointError,
                        rf"tensor {Q_PROJ} in \S+model\.safetensors has dtype torch\.int32, but weights must be "
                        "floating point", None),
    "bool-weights": (lambda p: edit_weights(p, cast(LN_F, torch.bool)), CheckpointError,
                     rf"tensor {LN_F} in \S+ has dtype torch\.bool", None),
    "float16-overflow": (lambda p: edit_weights(p, set_value(Q_PROJ, 1e5)), CheckpointError,
                         rf"tensor\(s\) {Q_PROJ} in \S+ckpt exceed the range of torch\.float16 \(at most 65504\); "
                         "load them in bfloat16 or float32", torch.float16),
}
DTYPE_FLAGS = {None: [], torch.float16: ["--dtype", "float16"]}


@pytest.mark.parametrize("case", list(CASES))
def test_api_raises_one_clear_error(checkpoint, case):
    breaker, error, message, dtype = CASES[case]
    breaker(checkpoint)
    before = snapshot(checkpoint)
    with pytest.raises(error, match=message) as caught:
        load_model(checkpoint, dtype=dtype)
    assert str(checkpoint) in str(caught.value) and "\n" not in str(caught.value)
    assert snapshot(checkpoint) == before


def run_cli(argv, capsys) -> str:
    """The one stderr line of a failing ``surelock`` command (exit code 2, nothing on stdout)."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(CASES))
def test_cli_prints_one_error_line(checkpoint, capsys, case, command):
    breaker, _, message, dtype = CASES[case]
    breaker(checkpoint)
    before = snapshot(checkpoint)
    line = run_cli([*COMMANDS[command], "--model", str(checkpoint), *DTYPE_FLAGS[dtype]], capsys)
    assert str(checkpoint) in line
    assert snapshot(checkpoint) == before
    assert re.search(message, line), line


@pytest.mark.parametrize("command", list(COMMANDS))
def test_missing_directory_says_so_before_looking_for_a_tokenizer(tmp_path, capsys, command):
    line = run_cli([*COMMANDS[command], "--model", str(tmp_path / "nowhere")], capsys)
    assert line == f"error: checkpoint directory {tmp_path / 'nowhere'} does not exist"
    with pytest.raises(TokenizerError, match="nowhere does not exist"):
        load_tokenizer(tmp_path / "nowhere")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_weights_file_for_the_directory_is_named(checkpoint, capsys, command):
    line = run_cli([*COMMANDS[command], "--model", str(checkpoint / WEIGHTS)], capsys)
    assert line.endswith("model.safetensors is a file: give the checkpoint directory that holds config.json and "
                         "the weights")


TOKENIZER_CASES = {
    "config-is-a-list": (lambda p: (p / "tokenizer_config.json").write_text("[1]"),
                         r"tokenizer_config\.json holds a JSON list, not an object"),
    "truncated-tokenizer-json": (lambda p: truncate(p / "tokenizer.json"),
                                 r"tokenizer\.json is not valid JSON: .* at line \d+ column \d+"),
    "garbage-tokenizer-json": (lambda p: (p / "tokenizer.json").write_bytes(b"\x99" * 64),
                               r"tokenizer\.json is not UTF-8 text"),
    "tokenizer-json-wrong-schema": (lambda p: (p / "tokenizer.json").write_text("{}"),
                                    r"could not load the tokenizer in \S+ \('added_tokens'\); restore its files"),
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_broken_tokenizer_is_one_clear_error(checkpoint, capsys, case):
    breaker, message = TOKENIZER_CASES[case]
    breaker(checkpoint)
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(checkpoint)
    line = run_cli([*COMMANDS["generate"], "--model", str(checkpoint)], capsys)
    assert re.search(message, line), line


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.complex64])
def test_dtypes_the_model_cannot_compute_in_are_refused(checkpoint, dtype):
    edit_weights(checkpoint, cast(Q_PROJ, dtype))
    with pytest.raises(CheckpointError, match=rf"tensor {Q_PROJ} in \S+ (is|has dtype) {dtype}"):
        load_model(checkpoint)
    if dtype.is_floating_point:  # a float8 checkpoint loads when cast to a dtype the model computes in
        load_model(checkpoint, dtype=torch.float32)


def test_a_dtype_argument_the_model_cannot_compute_in_is_refused(checkpoint):
    with pytest.raises(ValueError, match=r"dtype torch\.int8 is not one the model computes in"):
        load_model(checkpoint, dtype=torch.int8)


def test_mixed_dtypes_need_a_dtype(checkpoint):
    edit_weights(checkpoint, cast(LN_F, torch.float16))
    with pytest.raises(CheckpointError, match=r"ckpt mixes weight dtypes \(1 float16, \d+ float32 tensors\).*dtype="):
        load_model(checkpoint)
    assert {p.dtype for p in load_model(checkpoint, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("stored", [torch.float16, torch.float64])
def test_other_float_dtypes_load_silently(checkpoint, stored):
    edit_weights(checkpoint, lambda t: t.update({k: v.to(stored) for k, v in t.items()}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (None, torch.float32, torch.bfloat16):
            model = load_model(checkpoint, dtype=dtype)
            assert {p.dtype for p in model.parameters()} == {dtype or stored}


def test_unset_keys_no_shape_checks_warn_once(checkpoint, monkeypatch):
    monkeypatch.setattr(llada_module, "_warned", set())
    config = json.loads((checkpoint / "config.json").read_text())
    del config["rope_theta"], config["rms_norm_eps"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(checkpoint)
        load_model(checkpoint)
    assert [str(w.message) for w in caught] == [
        f"{checkpoint / 'config.json'} sets no rope_theta, rms_norm_eps: using LLaDA-8B's rope_theta=500000.0, "
        "rms_norm_eps=1e-05; if this model was trained with other values, add them there"
    ]


def test_a_good_decode_leaves_the_checkpoint_untouched(checkpoint, capsys):
    before = snapshot(checkpoint)
    for argv in COMMANDS.values():
        assert main([*argv, "--model", str(checkpoint)]) == 0
    assert snapshot(checkpoint) == before
