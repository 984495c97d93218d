"""Export of the locked graph: the shared torch.export, ONNX + ONNX Runtime, TensorRT settings.

The ONNX file is checked against the eager locked graph in ONNX Runtime on fresh random inputs,
and the "onnxruntime" backend against the eager backend on whole locked decodes. TensorRT needs
torch-tensorrt and a GPU: here only what can be checked without them is (the exported program's
dims and ranges, the lowering inputs and settings, the error when they are missing); the GPU
tests at the end skip with the reason.
"""
import collections
import sys
import types

import onnx
import pytest
import torch
from torch.utils._sympy.numbers import int_oo

import surelock_fx
from surelock_fx import export as ex
from surelock_fx.backends import OrtLockedGraph
from surelock_fx.cli import export as cli_export
from surelock_fx.cli import main
from surelock_fx.export import tensorrt as tensorrt_export
from surelock_fx.models import save_model
from surelock_fx.signature import cache_specs, input_names

from helpers import run_locked, tiny_model

LOCK = surelock_fx.LockConfig(kl_threshold=1e-2)
DECODE = dict(gen_length=16, steps=16, block_length=16)


def _tensorrt_missing() -> str | None:
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        return "torch-tensorrt is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on 2 OpenMP threads slow down 50x when other processes load the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, n_kv_heads=2)


@pytest.fixture(scope="module")
def ort_model(model, tmp_path_factory):
    return surelock_fx.optimize(model, backend="onnxruntime", export_dir=tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def optimized(model):
    return surelock_fx.optimize(model)


def _symbols(program):
    """Input name -> its shape (SymInts and ints), for the graph's user inputs."""
    user = set(program.graph_signature.user_inputs)
    return {n.name: n.meta["val"].shape for n in program.graph.nodes if n.op == "placeholder" and n.name in user}


def _range(program, size):
    r = program.range_constraints[size.node.expr]
    return int(r.lower), (None if r.upper == int_oo else int(r.upper))


# --- the shared torch.export --------------------------------------------------------------------

def test_example_inputs_follow_graph_inputs(optimized):
    gm = optimized.graph_module
    names = input_names(gm)
    assert names[:4] == ["input_ids", "position_ids", "active_index", "key_mask"]
    assert names[4:] == [s.name for s in cache_specs(gm)]
    assert list(ex.input_shapes(gm, 2, 8, 3)) == names
    args = ex.example_inputs(gm, 2, 8, 3)
    assert args[2].tolist() == [[0, 1, 2], [0, 1, 8]]  # padding rows point at the scratch slot N
    assert [tuple(a.shape) for a in args[4:]] == [(2, 2, 9, 16)] * len(cache_specs(gm))


def test_exported_program_dims_and_ranges(optimized):
    """What TensorRT lowers: named dims batch/seq/active with the engine's min..max ranges,
    caches at seq + 1, logits [batch, active, V]."""
    ranges = ex.tensorrt_ranges(min_active=1, opt_active=16, max_active=64, batch=(1, 2, 4), seq=(8, 64, 128))
    dims = ex.make_dims(*(ranges[k] for k in ex.DIM_NAMES))
    assert {k: (d.__name__, d.min, d.max) for k, d in dims.items()} == {
        "batch": ("batch", 1, 4), "seq": ("seq", 8, 128), "active": ("active", 1, 64),
        "rows": ("rows", 1, 256)}  # a packed graph's real rows: up to batch x active
    program = ex.export_locked(optimized, **ranges)
    shapes = _symbols(program)
    B, N = shapes["input_ids"]
    M = shapes["active_index"][1]
    assert (_range(program, B), _range(program, N), _range(program, M)) == ((1, 4), (8, 128), (1, 64))
    assert len({B.node.expr, N.node.expr, M.node.expr}) == 3
    for name in ("position_ids", "key_mask"):
        assert [s.node.expr for s in shapes[name]] == [B.node.expr, N.node.expr]
    for spec in cache_specs(optimized.graph_module):
        b, h, n1, d = shapes[spec.name]
        assert (b.node.expr, n1.node.expr, h, d) == (B.node.expr, N.node.expr + 1, 2, 16)
    outputs = [n for n in program.graph.nodes if n.op == "output"][0].args[0]
    logits = outputs[0].meta["val"]
    assert [logits.shape[0].node.expr, logits.shape[1].node.expr, logits.shape[2]] == [B.node.expr, M.node.expr, 101]
    assert len(outputs) == 1 + len(cache_specs(optimized.graph_module))


def test_fixed_sizes_are_static_and_default_is_unbounded(optimized):
    gm = optimized.graph_module
    dims = ex.make_dims(ex.DimRange.of(1), ex.DimRange.of((2, 32, 64)), ex.DimRange.of((1, 8, 64)))
    assert dims["batch"] is None
    shapes = ex.dynamic_shapes(gm, dims)
    assert shapes["input_ids"] == {1: dims["seq"]} and shapes["active_index"] == {1: dims["active"]}
    assert set(shapes["k_cache_0"]) == {2}
    default = ex.make_dims(*(ex.UNBOUNDED[k] for k in ex.DIM_NAMES))
    assert [(d.__name__, d.min, d.max) for d in default.values()] == [
        ("batch", 1, int_oo), ("seq", 2, int_oo), ("active", 1, int_oo), ("rows", 1, int_oo)]


# --- TensorRT: everything checkable without a GPU -----------------------------------------------

def test_tensorrt_ranges_and_input_specs(optimized):
    ranges = ex.tensorrt_ranges(max_active=96, batch=(1, 2, 4), seq=(16, 128, 256))
    assert ranges == {"batch": ex.DimRange(1, 2, 4), "seq": ex.DimRange(16, 128, 256), "active": ex.DimRange(1, 64, 96)}
    assert ex.tensorrt_ranges(seq=512)["active"] == ex.DimRange(1, 256, 512)
    specs = {s["name"]: s for s in ex.tensorrt_input_specs(optimized, ranges)}
    assert list(specs) == input_names(optimized.graph_module)
    assert specs["active_index"] == dict(name="active_index", dtype=torch.long, min_shape=(1, 1),
                                         opt_shape=(2, 64), max_shape=(4, 96))
    assert specs["key_mask"]["dtype"] is torch.bool and specs["key_mask"]["max_shape"] == (4, 256)
    assert specs["v_cache_1"] == dict(name="v_cache_1", dtype=torch.float32, min_shape=(1, 2, 17, 16),
                                      opt_shape=(2, 2, 129, 16), max_shape=(4, 2, 257, 16))
    with pytest.raises(ValueError, match="max_active"):
        ex.tensorrt_ranges(max_active=300, seq=(16, 128, 256))
    with pytest.raises(ValueError, match="maximum"):
        ex.tensorrt_ranges(seq=(16, 128, None))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ex.DimRange(4, 2, 8)
    # tracing sizes: inside the ranges, >= 2 where dynamic (export specializes 1), M <= N
    R = ex.DimRange
    assert ex.example_sizes(R(1, 1, 4), R(2, 128, 256), R(16, 64, 256)) == (2, 16, 16)
    assert ex.example_sizes(R(1, 1, 1), R(2, 2, 2), R(1, 1, 2)) == (1, 2, 2)
    assert ex.example_sizes(*ex.UNBOUNDED.values()) == (2, 8, 3)


def test_tensorrt_settings():
    settings = ex.tensorrt_settings()
    assert settings == dict(use_explicit_typing=True, min_block_size=1, truncate_double=True,
                            require_full_compilation=False, immutable_weights=True)
    assert ex.tensorrt_settings(min_block_size=3, optimization_level=5)["min_block_size"] == 3


def test_loaded_tensorrt_engines_run_padded(model, optimized, monkeypatch, tmp_path):
    """load_tensorrt's model feeds its engines the padded graph's inputs (they take no packing inputs),
    with a stand-in for torch_tensorrt.load: the eager backend's padded graph, which has the engines'
    signature."""
    from surelock_fx.backends import get_backend

    engines = get_backend("eager").compile(optimized.graph_module, packed=False)
    program = types.SimpleNamespace(module=lambda: engines)
    monkeypatch.setattr(tensorrt_export, "require_tensorrt", lambda: types.SimpleNamespace(load=lambda path: program))
    loaded = surelock_fx.load_tensorrt(tmp_path, model)
    assert loaded.backend == "tensorrt" and loaded.forms.packed is None and loaded.forms.padded is engines
    prompt = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(7))
    got = surelock_fx.generate(loaded, prompt, lock=LOCK, **DECODE)
    want = surelock_fx.generate(optimized, prompt, lock=LOCK, **DECODE)
    assert got.stats.packed_passes == 0 and torch.equal(got.tokens, want.tokens)


@pytest.mark.skipif(_tensorrt_missing() is None, reason="torch-tensorrt and CUDA are present")
def test_tensorrt_missing_is_a_clear_error(model, optimized, tmp_path):
    with pytest.raises(ex.TensorRTUnavailableError) as err:
        surelock_fx.export_tensorrt(optimized, tmp_path, max_active=32, seq=(2, 32, 64))
    message = str(err.value)
    assert "TensorRT export needs" in message
    if "torch_tensorrt" not in sys.modules:
        assert "torch-tensorrt" in message
    if not torch.cuda.is_available():
        assert "CUDA" in message
    with pytest.raises(ex.TensorRTUnavailableError):
        surelock_fx.load_tensorrt(tmp_path, model)
    with pytest.raises(ex.TensorRTUnavailableError):
        surelock_fx.optimize(model, backend="tensorrt", max_active=32, seq=(2, 32, 64))


def test_tensorrt_without_cuda_names_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", types.ModuleType("torch_tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ex.TensorRTUnavailableError, match="CUDA") as err:
        ex.require_tensorrt()
    assert "torch-tensorrt" not in str(err.value)


# --- ONNX and ONNX Runtime ----------------------------------------------------------------------

def test_onnx_file_has_named_dims_cache_io_and_external_data(ort_model):
    path = ort_model.forms.padded.path
    assert path.name == "model.onnx"
    proto = onnx.load(str(path), load_external_data=False)

    def dims(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    layers = 2
    caches = [f"{kv}_cache_{i}" for i in range(layers) for kv in "kv"]
    assert dims(proto.graph.input) == {
        "input_ids": ["batch", "seq"], "position_ids": ["batch", "seq"], "active_index": ["batch", "active"],
        "key_mask": ["batch", "seq"], **{c: ["batch", 2, "seq + 1", 16] for c in caches}}
    assert dims(proto.graph.output) == {"logits": ["batch", "active", 101],
                                        **{f"{c}_out": ["batch", 2, "seq + 1", 16] for c in caches}}
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    # whole cache rows written (passes.index_copy_cache_updates); a float attention mask, no NaN guard
    assert ops["ScatterND"] == len(caches) and ops["ScatterElements"] == 0 and ops["IsNaN"] == 0
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and (path.parent / f"{path.name}.data").stat().st_size > path.stat().st_size


def test_packed_onnx_file_takes_the_packing_inputs_and_returns_the_real_rows(optimized, tmp_path):
    path = ex.export_onnx(optimized, tmp_path, packed=True)
    assert path.name == "model.packed.onnx" and (tmp_path / "model.packed.onnx.data").exists()
    proto = onnx.load(str(path), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*proto.graph.input, *proto.graph.output]}
    assert [v.name for v in proto.graph.input][:6] == ["input_ids", "position_ids", "active_index", "key_mask",
                                                      "packed_rows", "unpack_index"]
    assert dims["packed_rows"] == ["rows"] and dims["unpack_index"] == ["batch", "active"]
    assert dims["logits"] == [1, "rows", 101]


def _random_inputs(gm, B, N, M, seed):
    gen = torch.Generator().manual_seed(seed)
    args = list(ex.example_inputs(gm, B, N, M))
    args[0] = torch.randint(0, 100, (B, N), generator=gen)
    counts = [M] + [int(torch.randint(1, M + 1, (), generator=gen)) for _ in range(B - 1)]
    index = torch.full((B, M), N)
    for row, count in enumerate(counts):  # active rows in order, then padding rows -> scratch slot N
        index[row, :count] = torch.randperm(N, generator=gen)[:count].sort().values
    args[2] = index
    args[3] = torch.rand(B, N, generator=gen) > 0.25
    args[3][:, 0] = True
    for i in range(4, len(args)):
        args[i] = torch.randn(args[i].shape, generator=gen)
    return args, counts


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("B,N,M", [(1, 7, 1), (1, 9, 9), (3, 12, 5), (2, 6, 6), (4, 10, 1)])
def test_onnx_matches_eager_locked_graph(ort_model, B, N, M, packed):
    gm = ort_model.graph_module
    args, counts = _random_inputs(gm, B, N, M, seed=B * 100 + N * 10 + M)
    with torch.no_grad():
        want = gm(*args)
    logits, caches = run_locked(ort_model.forms.packed if packed else ort_model.forms.padded, args, packed)
    got = (logits, *caches)  # packed: padding entries get some real row's logits, not compared
    assert len(got) == len(want)
    for row, count in enumerate(counts):
        torch.testing.assert_close(got[0][row, :count], want[0][row, :count], rtol=1e-4, atol=1e-4)
    for cache_got, cache_want in zip(got[1:], want[1:]):  # slot N is scratch: padding rows land there
        torch.testing.assert_close(cache_got[:, :, :N], cache_want[:, :, :N], rtol=1e-5, atol=1e-5)


def test_onnxruntime_backend_decodes_like_eager(model, optimized, ort_model):
    """Through both ONNX graphs: the padded one, and the packed one on steps with enough padding."""
    assert ort_model.backend == "onnxruntime" and isinstance(ort_model.forms.padded, OrtLockedGraph)
    prompt = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(7))
    want = surelock_fx.generate(optimized, prompt, lock=LOCK, **DECODE)
    got = surelock_fx.generate(ort_model, prompt, lock=LOCK, **DECODE)
    assert 0 < got.stats.packed_passes < got.stats.forward_passes
    assert isinstance(ort_model.forms.packed.graph, OrtLockedGraph)  # exported on its first call
    assert torch.equal(got.tokens, want.tokens)
    assert got.stats.active_counts == want.stats.active_counts
    assert min(got.stats.active_counts) < 2 * (prompt.shape[1] + DECODE["gen_length"])  # rows were locked
    assert got.stats.flops_ratio == want.stats.flops_ratio < 1
    plain = surelock_fx.generate(model, prompt, **DECODE)
    assert torch.equal(surelock_fx.generate(ort_model, prompt, **DECODE).tokens, plain.tokens)


def test_backend_options_are_checked_before_capture(model):
    with pytest.raises(ValueError, match="export_dir"):
        surelock_fx.optimize(model, export_dir="somewhere")
    with pytest.raises(ValueError, match="unknown option"):
        surelock_fx.optimize(model, backend="onnxruntime", max_active=8)


# --- surelock export ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return save_model(model, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def stub_optimize(monkeypatch):
    """optimize() and what the CLI hands it, without the capture (the export itself is tested above)."""
    seen = {}

    def optimize(model):
        seen["model"] = model
        return "optimized"

    monkeypatch.setattr(cli_export, "optimize", optimize)
    return seen


@pytest.mark.parametrize("packed", [False, True])
def test_cli_export_onnx(checkpoint, model, tmp_path, stub_optimize, monkeypatch, capsys, packed):
    calls = []
    monkeypatch.setattr(cli_export, "export_onnx",
                        lambda optimized, out, packed: calls.append((optimized, out, packed)) or out / "model.onnx")
    code = main(["export", "--model", str(checkpoint), "--format", "onnx", "--out", str(tmp_path),
                 "--device", "cpu", "--dtype", "float16"] + ["--packed"] * packed)
    assert code == 0 and calls == [("optimized", tmp_path, packed)]
    assert capsys.readouterr().out.strip() == str(tmp_path / "model.onnx")
    loaded = stub_optimize["model"]
    assert loaded.lm_head_weight.dtype == torch.float16
    assert torch.equal(loaded.lm_head_weight.float(), model.lm_head_weight.half().float())


def test_cli_packed_is_for_onnx_only(checkpoint, tmp_path, capsys):
    argv = ["export", "--model", str(checkpoint), "--format", "tensorrt", "--out", str(tmp_path), "--packed"]
    assert main(argv) == 2
    assert "--packed applies to --format onnx only" in capsys.readouterr().err


def test_cli_export_tensorrt(checkpoint, tmp_path, stub_optimize, monkeypatch, capsys):
    argv = ["export", "--model", str(checkpoint), "--format", "tensorrt", "--out", str(tmp_path / "e.ep"),
            "--device", "cpu", "--batch", "1,2,4", "--seq", "8,64,128", "--max-active", "128"]
    if _tensorrt_missing() is not None:  # the real error, before any weights are loaded
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: TensorRT export needs") and "\n" not in err.strip()
        assert "model" not in stub_optimize
    calls = []
    monkeypatch.setattr(cli_export, "require_tensorrt", lambda: None)
    monkeypatch.setattr(cli_export, "export_tensorrt",
                        lambda optimized, out, **kw: calls.append((optimized, out, kw)) or out)
    assert main(argv) == 0
    assert calls == [("optimized", tmp_path / "e.ep", dict(min_active=1, opt_active=None, max_active=128,
                                                           batch=(1, 2, 4), seq=(8, 64, 128)))]
    assert main(argv[:-2] + ["--max-active", "256"]) == 2  # more rows than the longest sequence
    assert "max_active (256)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv[:-6] + ["--batch", "1,2"])


# --- on a GPU with torch-tensorrt (skipped here) ------------------------------------------------

@pytest.mark.skipif(_tensorrt_missing() is not None, reason=f"TensorRT test needs a GPU: {_tensorrt_missing()}")
def test_tensorrt_engines_decode_like_eager(tmp_path):
    model = tiny_model(seed=3, n_kv_heads=2).cuda()
    eager = surelock_fx.optimize(model)
    path = surelock_fx.export_tensorrt(eager, tmp_path, max_active=32, batch=(1, 2, 2), seq=(2, 22, 32))
    assert path.exists()
    prompt = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(7)).cuda()
    want = surelock_fx.generate(eager, prompt, lock=LOCK, **DECODE)
    for trt_model in (surelock_fx.load_tensorrt(path, model),
                      surelock_fx.optimize(model, backend="tensorrt", max_active=32, batch=(1, 2, 2), seq=(2, 22, 32))):
        got = surelock_fx.generate(trt_model, prompt, lock=LOCK, **DECODE)
        assert torch.equal(got.tokens, want.tokens)
