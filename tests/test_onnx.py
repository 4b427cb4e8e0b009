"""ONNX weights: the contract, plus Constant nodes, subgraphs, external data, templates.

Oracles: the onnx library (``onnx.load`` with external data, ``numpy_helper.to_array``,
``onnx.checker``), onnxruntime (runs what we write) and torch (the template test's forward).
"""

from __future__ import annotations

import copy
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from fuzzing import Seed, corpus_seed, pb_bytes, pb_varint, varint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convert
from convert import dtypes
from convert.errors import ConvertError, CorruptFileError, ReadError, UsageError, WriteError
from convert.formats import onnx as onnx_format
from convert.ir import FileRegion, Source, Tensor, TensorDict

from contract import FormatContract, same_values, sample_array, samples

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

# ../shared/corpus beside the repository (DESIGN.md); the keanulim models keep 3 of 4 weights external.
CORPUS = str(Path(__file__).resolve().parents[2] / "shared" / "corpus" / "keanulim+tensor-inference-engine@e9fc79a8c608")
needs_corpus = pytest.mark.skipif(not os.path.isdir(CORPUS), reason="shared corpus not present")


def oracle_arrays(path) -> dict[str, np.ndarray]:
    """Every main-graph initializer as onnx reads it (external data loaded by onnx itself).

    Strings come from ``string_data`` as bytes: ``to_array`` decodes them as UTF-8 and
    fails on binary strings, which ONNX allows.
    """
    model = onnx.load(str(path))
    out = {}
    for t in model.graph.initializer:
        if t.data_type == TensorProto.STRING:
            arr = np.empty(len(t.string_data), dtype=object)
            arr[:] = list(t.string_data)
            out[t.name] = arr.reshape(tuple(t.dims))
        else:
            out[t.name] = numpy_helper.to_array(t)
    return out


# ---- seeds of the damage suites (tests/test_hostile.py, tests/test_fuzz.py)

def _seeds(root: Path) -> list[Seed]:
    """onnx.save of a model with raw and typed initializers, a string, a sparse initializer, a
    Constant node and an If subgraph; the same model with its data external; and a corpus model
    with external data (keanulim's toy model, not the folder's others)."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    b = helper.make_tensor("b", TensorProto.INT64, [3], [1, -2, 3])  # typed field, not raw_data
    s = helper.make_tensor("s", TensorProto.STRING, [2], [b"x", b"yz"])
    h = numpy_helper.from_array(np.array([1.0, 2.5], np.float16), "h")
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([5.0, 6.0], np.float32), "sp"),
                                       numpy_helper.from_array(np.array([1, 7], np.int64), "sp_idx"), [2, 4])
    c = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array([9.0], np.float32)))
    then_g = helper.make_graph([helper.make_node("Constant", [], ["t"], value_floats=[1.0, 2.0])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_g = helper.make_graph([helper.make_node("Constant", [], ["e"], value_floats=[3.0, 4.0])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    cond = helper.make_node("If", ["flag"], ["out"], then_branch=then_g, else_branch=else_g, name="branch")
    graph = helper.make_graph([c, cond], "g", [helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])],
                              initializer=[w, b, s, h], sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fuzz")
    seeds = []
    d = root / "onnx_inline"
    d.mkdir()
    onnx.save(model, str(d / "model.onnx"))
    seeds.append(Seed("onnx_inline", "onnx", d, "model.onnx", ("model.onnx",)))
    d = root / "onnx_external"
    d.mkdir()
    onnx.save(model, str(d / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    seeds.append(Seed("onnx_external", "onnx", d, "model.onnx", ("model.onnx", "model.onnx.data")))
    return seeds + corpus_seed(root, "corpus_onnx_external", "onnx", "keanulim+tensor-inference-engine@e9fc79a8c608",
                               "toy.onnx", ("toy.onnx", "toy.onnx.data"), only_files=True)


# ---- hostile files, by hand (collected by tests/test_hostile.py)

TB = 1 << 20  # a dimension: two of them make 4 TB of float32


def _onnx_model(tmp_path: Path, initializer: bytes = b"", sparse: bytes = b"", name: str = "m.onnx") -> Path:
    """ModelProto{ir_version 8, graph{initializer, sparse_initializer}, opset_import{version 17}} by hand."""
    graph = (pb_bytes(5, initializer) if initializer else b"") + (pb_bytes(15, sparse) if sparse else b"")
    path = tmp_path / name
    path.write_bytes(pb_varint(1, 8) + pb_bytes(7, graph + pb_bytes(2, b"g")) + pb_bytes(8, pb_varint(2, 17)))
    return path


def _onnx_tensor(name=b"w", dims=(4,), data_type=1, raw=None, floats=None, external=None) -> bytes:
    """TensorProto: dims 1, data_type 2, float_data 4, name 8, raw_data 9, external_data 13, data_location 14."""
    out = b"".join(pb_varint(1, d) for d in dims) + pb_varint(2, data_type)
    if floats is not None:
        out += pb_bytes(4, b"".join(struct.pack("<f", f) for f in floats))
    out += pb_bytes(8, name)
    if raw is not None:
        out += pb_bytes(9, raw)
    if external is not None:
        out += b"".join(pb_bytes(13, pb_bytes(1, k.encode()) + pb_bytes(2, v.encode())) for k, v in external.items())
        out += pb_varint(14, 1)
    return out


def _outside(folder: Path) -> tuple[Path, Path]:
    """A folder for the model, and a file and a folder outside it that a model must not reach."""
    model_dir = folder / "model"
    model_dir.mkdir()
    secret = folder / "secret.bin"
    secret.write_bytes(b"\x01" * 64)
    (folder / "elsewhere").mkdir()
    (folder / "elsewhere" / "data.bin").write_bytes(b"\x02" * 64)
    return model_dir, secret


EXTERNAL_CASES = {
    "dotdot": ({"location": "../secret.bin"}, "outside the model's folder"),
    "dotdot_inside": ({"location": "sub/../../secret.bin"}, "outside the model's folder"),
    "absolute": ({"location": "{secret}"}, "outside the model's folder"),
    "nul_byte": ({"location": "data.bin\0../../secret.bin"}, "NUL byte"),
    "symlink_out": ({"location": "link.bin"}, "leads outside the model's folder"),
    "symlinked_folder_out": ({"location": "linkdir/data.bin"}, "leads outside the model's folder"),
    "a_folder": ({"location": "."}, "is not a file"),
    "offset_past_eof": ({"location": "data.bin", "offset": str(10**12)}, "runs past the end"),
    "negative_offset": ({"location": "data.bin", "offset": "-8"}, "does not fit"),
    "length_terabytes": ({"location": "data.bin", "length": str(1 << 42)}, "does not fit"),
    "offset_not_a_number": ({"location": "data.bin", "offset": "0x10"}, "bad external data offset"),
    "missing_file": ({"location": "nothing.bin"}, "missing"),
}



def _external_case(info: dict[str, str], message: str):
    """External data must be a file of the model's folder, at offsets inside it: ``../``, absolute
    paths, NUL bytes and symbolic links leading out are refused before anything is opened."""
    def build(folder: Path):
        model_dir, secret = _outside(folder)
        (model_dir / "data.bin").write_bytes(b"\0" * 64)
        os.symlink(secret, model_dir / "link.bin")
        os.symlink(secret.parent / "elsewhere", model_dir / "linkdir")
        spelled = {k: v.format(secret=secret) for k, v in info.items()}
        return _onnx_model(model_dir, _onnx_tensor(external=spelled)), ReadError, message
    return build


def _model_case(message: str, initializer: bytes = b"", sparse: bytes = b""):
    return lambda folder: (_onnx_model(folder, initializer, sparse), CorruptFileError, message)


def _written(data: bytes, message: str):
    def build(folder: Path):
        (folder / "m.onnx").write_bytes(data)
        return folder / "m.onnx", CorruptFileError, message
    return build


def _if_nested_3000_deep() -> bytes:
    """If nodes nested 3000 deep (protobuf's parser stops at 100; our walk never gets there)."""
    graph = pb_bytes(2, b"leaf")
    for _ in range(3000):
        attr = pb_bytes(1, b"then_branch") + pb_bytes(6, graph) + pb_varint(20, 5)
        graph = pb_bytes(1, pb_bytes(1, b"c") + pb_bytes(2, b"c") + pb_bytes(4, b"If") + pb_bytes(5, attr))
    return pb_varint(1, 8) + pb_bytes(7, graph) + pb_bytes(8, pb_varint(2, 17))


HOSTILE = {
    **{f"external_{case}": _external_case(info, message) for case, (info, message) in EXTERNAL_CASES.items()},
    "raw_data_short_of_4_tb": _model_case("raw_data holds 16 bytes, expected 4398046511104",
                                          _onnx_tensor(dims=(TB, TB), raw=b"\0" * 16)),
    "float_data_short_of_4_tb": _model_case("cannot decode tensor data", _onnx_tensor(dims=(TB, TB), floats=[1.0])),
    "shape_beyond_any_array": _model_case("too large for any array", _onnx_tensor(dims=(0, (1 << 63) - 1, 3), raw=b"")),
    "negative_dimension": _model_case("negative dimension", _onnx_tensor(dims=(-4,), raw=b"")),
    "rank_65": _model_case("rank 65", _onnx_tensor(dims=[1] * 65, raw=b"\0" * 4)),
    # a sparse tensor whose dense form would be 4 TB, from a model of a few dozen bytes
    "sparse_densifying_to_4_tb": _model_case("sparse tensor .* would take", sparse=(
        pb_bytes(1, _onnx_tensor(b"v", (1,), raw=b"\0" * 4)) + pb_bytes(2, _onnx_tensor(b"i", (1,), 7, raw=b"\0" * 8))
        + pb_varint(3, TB) + pb_varint(3, TB))),
    "graph_length_past_the_end": _written(pb_varint(1, 8) + varint(7 << 3 | 2) + varint(1 << 60) + b"\x0a\x00",
                                          "runs past the end of the file"),
    "if_nested_3000_deep": _written(_if_nested_3000_deep(), "not a readable ONNX model"),
}


def test_onnx_tensor_helper_matches_onnx(tmp_path):
    """The hand-built model above is what onnx itself reads (the oracle)."""
    model = onnx.load(str(_onnx_model(tmp_path, _onnx_tensor(raw=np.arange(4, dtype=np.float32).tobytes()))))
    assert numpy_helper.to_array(model.graph.initializer[0]).tolist() == [0, 1, 2, 3]


def test_onnx_symlink_inside_the_folder_is_fine(tmp_path):
    model_dir, _ = _outside(tmp_path)
    (model_dir / "real.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    os.symlink("real.bin", model_dir / "alias.bin")
    model = _onnx_model(model_dir, _onnx_tensor(external={"location": "alias.bin"}))
    assert convert.read(model, "onnx")["w"].numpy().tolist() == [0, 1, 2, 3]


class TestOnnxContract(FormatContract):
    FORMAT = "onnx"
    SEEDS = ("onnx_inline", "onnx_external", "corpus_onnx_external")
    FUZZ = {"onnx": (SEEDS, "raw")}
    HOSTILE = HOSTILE

    @classmethod
    def make_seeds(cls, root):
        return _seeds(root)

    def oracle_read(self, path):
        return oracle_arrays(path)


# ------------------------------------------------------------------ writing, checked by onnx/onnxruntime

def every_dtype() -> TensorDict:
    """Every dtype of the table ONNX holds."""
    td = samples()["every_dtype"]
    return td.replace(t for t in td.values() if t.dtype.onnx is not None)


def test_weights_only_model_passes_full_checker_and_equals_onnx_save(tmp_path):
    td = every_dtype()
    out = tmp_path / "w.onnx"
    onnx_format.write(td, out)
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    # Our hand-made stream is exactly protobuf's canonical serialization of the same model.
    assert model.SerializeToString(deterministic=True) == out.read_bytes()
    assert model.producer_name == "convert" and model.ir_version == 10
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 21)]
    assert [o.name for o in model.graph.output] == list(td)
    assert len(model.graph.node) == 0
    got = oracle_arrays(out)
    for name, t in td.items():
        assert same_values(got[name], t.numpy()), name
        # bf16/float8: compare the raw bits too
        if t.dtype.kind != "string":
            assert np.ascontiguousarray(got[name]).tobytes() == t.tobytes(), name


def test_onnxruntime_returns_the_weights_as_outputs(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    arrays = {"w": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
              "i": np.arange(5, dtype=np.int64), "h": np.linspace(-1, 1, 6).astype(np.float16),
              "d": np.array(2.5), "b": np.array([True, False])}
    out = tmp_path / "w.onnx"
    onnx_format.write(TensorDict.from_arrays(arrays), out)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    for name, value in zip(names, sess.run(None, {}), strict=True):
        assert same_values(value, arrays[name]), name


def test_opset_option_and_metadata(tmp_path):
    td = TensorDict.from_arrays({"w": np.ones(2, np.float32)},
                                {"tf.global_step": "190", "onnx.meta.author": "me", "onnx.producer": "torch"})
    out = tmp_path / "w.onnx"
    onnx_format.write(td, out, opset=17)
    model = onnx.load(str(out))
    assert model.opset_import[0].version == 17
    assert {p.key: p.value for p in model.metadata_props} == {"tf.global_step": "190", "author": "me"}
    meta = onnx_format.read(out).metadata
    assert meta["onnx.meta.author"] == "me" and meta["onnx.meta.tf.global_step"] == "190"
    assert meta["onnx.producer"] == "convert" and meta["onnx.opset"] == "17" and meta["source.format"] == "onnx"


class _ChunksOnly(Source):
    """A source that can only stream, and counts how often it was asked."""

    def __init__(self, data: bytes):
        self.data, self.calls = data, 0

    def chunks(self, nbytes, size=1 << 20):
        self.calls += 1
        for i in range(0, len(self.data), 7):  # odd, small pieces
            yield self.data[i:i + 7]

    def array(self, dtype, shape):
        raise AssertionError("the writer materialised a tensor instead of streaming it")


@pytest.mark.parametrize("external", [False, True])
def test_writer_streams_chunks_never_arrays(tmp_path, external):
    values = np.arange(100, dtype=np.float32)
    source = _ChunksOnly(values.tobytes())
    td = TensorDict([Tensor("w", dtypes.FLOAT32, (100,), source)])
    out = tmp_path / "w.onnx"
    onnx_format.write(td, out, external_data_threshold=0 if external else None)
    assert source.calls == 1
    assert same_values(oracle_arrays(out)["w"], values)


def test_external_data_when_over_threshold(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(1)
    arrays = {"big": rng.standard_normal((300, 700)).astype(np.float32),  # 840 KB
              "huge": rng.standard_normal((1024, 300)).astype(np.float32),  # 1.2 MB: 64 KiB-aligned
              "small": np.arange(3, dtype=np.int8), "s": np.array([b"kept", b"inline"], dtype=object),
              "empty": np.zeros((0, 4), np.float32)}
    td = TensorDict.from_arrays(arrays)
    out = tmp_path / "w.onnx"
    onnx_format.write(td, out, external_data_threshold=1000)
    data = tmp_path / "w.onnx.data"
    assert data.exists() and out.stat().st_size < 2000
    onnx.checker.check_model(str(out), full_check=True)
    got = oracle_arrays(out)  # onnx.load resolves the external data itself
    for name, value in arrays.items():
        assert same_values(got[name], value), name
    model = onnx.load(str(out), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer}
    assert where["huge"]["location"] == "w.onnx.data" and int(where["huge"]["offset"]) % 65536 == 0
    assert int(where["small"]["offset"]) % 64 == 0
    assert where["s"] == {} and where["empty"] == {}
    back = onnx_format.read(out)
    assert isinstance(back["big"].source, FileRegion) and back["big"].attrs["origin"] == "external:w.onnx.data"
    assert back["s"].attrs["origin"] == "initializer"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    outputs = dict(zip(["big", "huge"], sess.run(["big", "huge"], {}), strict=True))
    assert same_values(outputs["big"], arrays["big"])


def test_external_data_name(tmp_path):
    td = TensorDict.from_arrays({"w": np.ones(4, np.float32)})
    onnx_format.write(td, tmp_path / "a.onnx", external_data_threshold=0, external_data_name="weights.bin")
    assert (tmp_path / "weights.bin").exists()
    assert same_values(oracle_arrays(tmp_path / "a.onnx")["w"], np.ones(4, np.float32))
    with pytest.raises(UsageError):
        onnx_format.write(td, tmp_path / "c.onnx", external_data_threshold=0, external_data_name="../x.data")


def test_external_data_through_the_api(tmp_path):
    td = TensorDict.from_arrays({"w": np.arange(10, dtype=np.float32), "s": np.array(b"x", dtype=object)})
    out = tmp_path / "model.onnx"
    convert.write(td, out, "onnx", external_data_threshold=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert same_values(oracle_arrays(out)["w"], np.arange(10, dtype=np.float32))
    # The data file is an output too: never replaced without --force, and never left behind.
    (tmp_path / "other.onnx.data").write_bytes(b"precious")
    with pytest.raises(WriteError, match="other.onnx.data: already exists"):
        convert.write(td, tmp_path / "other.onnx", "onnx", external_data_threshold=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data", "other.onnx.data"]
    convert.write(td, tmp_path / "other.onnx", "onnx", external_data_threshold=0, force=True)
    assert same_values(oracle_arrays(tmp_path / "other.onnx")["w"], np.arange(10, dtype=np.float32))


def test_write_refuses_empty_name(tmp_path):
    td = TensorDict([Tensor.from_array("", np.ones(1, np.float32))])
    with pytest.raises(WriteError, match="empty name"):
        onnx_format.write(td, tmp_path / "w.onnx")


# ------------------------------------------------------------------ templates

@pytest.fixture(scope="module")
def torch_template(tmp_path_factory):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path_factory.mktemp("tmpl") / "graph.onnx"
    # dynamo=False: the torch.export-based exporter needs onnxscript, which is not a dependency.
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    return torch, model, x, path


def test_template_gets_new_weights_and_runs_like_torch(tmp_path, torch_template):
    ort = pytest.importorskip("onnxruntime")
    torch, model, x, template = torch_template
    names = [t.name for t in onnx.load(str(template)).graph.initializer]
    assert sorted(names) == sorted(model.state_dict())
    with torch.no_grad():
        new = {k: v + 0.5 * torch.randn_like(v) for k, v in model.state_dict().items()}
    tuned = copy.deepcopy(model)
    tuned.load_state_dict(new)
    with torch.no_grad():
        want = tuned(x).numpy()
    td = TensorDict.from_arrays({k: v.numpy() for k, v in new.items()})
    out = tmp_path / "new.onnx"
    convert.write(td, out, "onnx", template=str(template))
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    old = ort.InferenceSession(str(template), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(old, want, atol=1e-3)
    # The graph is the template's: same nodes, inputs and outputs.
    a, b = onnx.load(str(template)), onnx.load(str(out))
    assert a.graph.node == b.graph.node and a.graph.input == b.graph.input and a.graph.output == b.graph.output
    assert b.producer_name == a.producer_name and b.opset_import == a.opset_import


def test_template_mismatches_are_all_listed(tmp_path, torch_template):
    torch, model, x, template = torch_template
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    bad = dict(sd)
    del bad["0.bias"]                                   # missing
    bad["0.weight"] = sd["0.weight"][:2]                # wrong shape
    bad["3.bias"] = sd["3.bias"].astype(np.float64)     # wrong dtype
    bad["extra.w"] = np.zeros(2, np.float32)            # not in the template
    with pytest.raises(WriteError) as e:
        onnx_format.write(TensorDict.from_arrays(bad), tmp_path / "x.onnx", template=template)
    msg = str(e.value)
    for needle in ("missing '0.bias'", "'0.weight' is float32 [2, 3, 3, 3]", "'3.bias' is float64 [5]",
                   "extra 'extra.w'", "4 problems"):
        assert needle in msg, needle
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(UsageError):
        onnx_format.write(TensorDict.from_arrays(sd), tmp_path / "y.onnx", template=template, opset=17)
    with pytest.raises(WriteError, match="template: .*nope.onnx: no such file"):
        onnx_format.write(TensorDict.from_arrays(sd), tmp_path / "y.onnx", template=tmp_path / "nope.onnx")


@needs_corpus
def test_template_with_external_output_and_external_template(tmp_path, torch_template):
    ort = pytest.importorskip("onnxruntime")
    torch, model, x, template = torch_template
    # A template whose own weights (and a Constant) are external: e.g. the corpus toy model.
    toy = onnx.load(f"{CORPUS}/toy.onnx", load_external_data=False)
    td = onnx_format.read(f"{CORPUS}/toy.onnx")
    rng = np.random.default_rng(2)
    new = {k: (t.numpy() + rng.standard_normal(t.shape).astype(np.float32)) for k, t in td.items()}
    out = tmp_path / "toy2.onnx"
    onnx_format.write(TensorDict.from_arrays(new), out, template=f"{CORPUS}/toy.onnx", external_data_threshold=100)
    assert (tmp_path / "toy2.onnx.data").exists()
    got = oracle_arrays(out)
    for k, v in new.items():
        assert same_values(got[k], v), k
    inp = toy.graph.input[0]
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    feed = {inp.name: rng.standard_normal(shape).astype(np.float32)}
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    h = np.maximum(feed[inp.name] @ new["0.weight"].T + new["0.bias"], 0)
    np.testing.assert_allclose(y, h @ new["2.weight"].T + new["2.bias"], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ reading every place weights live

def _constant(output, **attrs):
    return helper.make_node("Constant", [], [output], name=f"const_{output}", **attrs)


@pytest.fixture(scope="module")
def control_flow_model(tmp_path_factory):
    """If and Loop with initializers and Constant nodes in the branches, plus every Constant form."""
    f32 = TensorProto.FLOAT
    then_w = numpy_helper.from_array(np.full((2,), 3.0, np.float32), "then_w")
    then_g = helper.make_graph(
        [_constant("then_c", value=numpy_helper.from_array(np.array([1.5, 2.5], np.float32), "ignored")),
         helper.make_node("Add", ["then_c", "then_w"], ["then_out"])],
        "then", [], [helper.make_tensor_value_info("then_out", f32, [2])], initializer=[then_w])
    deep_w = numpy_helper.from_array(np.array([4.0], np.float32), "deep_w")
    deep_then = helper.make_graph([helper.make_node("Identity", ["deep_w"], ["deep_out"])], "deep_then", [],
                                  [helper.make_tensor_value_info("deep_out", f32, [1])], initializer=[deep_w])
    deep_else = helper.make_graph([_constant("deep_c", value_floats=[5.0])], "deep_else", [],
                                  [helper.make_tensor_value_info("deep_c", f32, [1])])
    else_g = helper.make_graph(
        [_constant("else_c", value_floats=[7.0, 8.0]), _constant("inner_cond", value_int=1),
         helper.make_node("Cast", ["inner_cond"], ["inner_bool"], to=TensorProto.BOOL),
         helper.make_node("If", ["inner_bool"], ["inner_out"], name="inner_if",
                          then_branch=deep_then, else_branch=deep_else)],
        "else", [], [helper.make_tensor_value_info("else_c", f32, [2])])
    body_w = numpy_helper.from_array(np.array([0.25, 0.5], np.float32), "body_w")
    body = helper.make_graph(
        [_constant("body_one", value_int=1),
         helper.make_node("Add", ["acc_in", "body_w"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", f32, [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", f32, [2])],
        initializer=[body_w])
    nodes = [
        helper.make_node("If", ["cond"], ["if_out"], name="the_if", then_branch=then_g, else_branch=else_g),
        _constant("trip", value=numpy_helper.from_array(np.array(3, np.int64))),
        helper.make_node("Loop", ["trip", "cond", "if_out"], ["loop_out"], name="the_loop", body=body),
        _constant("c_float", value_float=1.25), _constant("c_ints", value_ints=[1, -2, 3]),
        _constant("c_string", value_string="hi"), _constant("c_strings", value_strings=["a", "bc"]),
        _constant("c_sparse", sparse_value=helper.make_sparse_tensor(
            numpy_helper.from_array(np.array([5.0, 6.0], np.float32), "v"),
            numpy_helper.from_array(np.array([1, 4], np.int64), "i"), [2, 3])),
    ]
    main_w = numpy_helper.from_array(np.arange(4, dtype=np.float64).reshape(2, 2), "main_w")
    sparse_init = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1, 2], np.int32), "sp"),
        numpy_helper.from_array(np.array([[0, 1], [2, 0]], np.int64), "sp_idx"), [3, 2])
    graph = helper.make_graph(
        nodes, "main", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("loop_out", f32, [2])], initializer=[main_w], sparse_initializer=[sparse_init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hand", ir_version=8)
    model.metadata_props.add(key="author", value="test")
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path_factory.mktemp("cf") / "cf.onnx"
    onnx.save(model, str(path))
    return path


def test_reads_constants_subgraphs_and_sparse(control_flow_model):
    ort = pytest.importorskip("onnxruntime")
    td = onnx_format.read(control_flow_model)
    got = {k: t.numpy() for k, t in td.items()}
    origin = {k: t.attrs["origin"] for k, t in td.items()}
    assert origin == {
        "main_w": "initializer", "sp": "sparse_initializer",
        "then_w": "subgraph:the_if/then_branch", "then_c": "subgraph:the_if/then_branch",
        "else_c": "subgraph:the_if/else_branch", "trip": "constant",
        "inner_cond": "subgraph:the_if/else_branch",
        "deep_w": "subgraph:the_if/else_branch/inner_if/then_branch",
        "deep_c": "subgraph:the_if/else_branch/inner_if/else_branch",
        "body_w": "subgraph:the_loop/body", "body_one": "subgraph:the_loop/body",
        "c_float": "constant", "c_ints": "constant", "c_string": "constant", "c_strings": "constant",
        "c_sparse": "constant"}
    assert td["then_c"].attrs["onnx.kind"] == "constant" and td["then_w"].attrs["role"] == "weight"
    # onnx's own decoding of every place:
    model = onnx.load(str(control_flow_model))
    g = model.graph
    assert same_values(got["main_w"], numpy_helper.to_array(g.initializer[0]))
    if_node, loop_node = g.node[0], g.node[2]
    attr = {a.name: a for a in list(if_node.attribute) + list(loop_node.attribute)}
    then_g, else_g, body = attr["then_branch"].g, attr["else_branch"].g, attr["body"].g
    assert same_values(got["then_w"], numpy_helper.to_array(then_g.initializer[0]))
    assert same_values(got["then_c"], numpy_helper.to_array(then_g.node[0].attribute[0].t))
    assert same_values(got["body_w"], numpy_helper.to_array(body.initializer[0]))
    assert same_values(got["trip"], numpy_helper.to_array(g.node[1].attribute[0].t))
    assert same_values(got["else_c"], np.array(else_g.node[0].attribute[0].floats, np.float32))
    deep_then = next(a.g for a in else_g.node[3].attribute if a.name == "then_branch")
    assert same_values(got["deep_w"], numpy_helper.to_array(deep_then.initializer[0]))
    assert same_values(got["deep_c"], np.array([5.0], np.float32))
    (cond_false_out,) = ort.InferenceSession(str(control_flow_model), providers=["CPUExecutionProvider"]).run(
        None, {"cond": np.array(False)})
    np.testing.assert_array_equal(cond_false_out, got["else_c"])  # a false cond also stops the Loop at once
    assert same_values(got["body_one"], np.array(1, np.int64))
    assert same_values(got["c_float"], np.array(1.25, np.float32))
    assert same_values(got["c_ints"], np.array([1, -2, 3], np.int64))
    assert same_values(got["c_string"], np.array(b"hi", dtype=object))
    assert same_values(got["c_strings"], np.array([b"a", b"bc"], dtype=object))
    assert same_values(got["c_sparse"], np.array([[0, 5, 0], [0, 6, 0]], np.float32))
    assert same_values(got["sp"], np.array([[0, 1], [0, 0], [2, 0]], np.int32))
    # onnxruntime evaluates the constants the same way: the If's then-branch output and the loop.
    sess = ort.InferenceSession(str(control_flow_model), providers=["CPUExecutionProvider"])
    (loop_out,) = sess.run(None, {"cond": np.array(True)})
    np.testing.assert_array_equal(loop_out, got["then_c"] + got["then_w"] + 3 * got["body_w"])
    assert td.metadata["onnx.meta.author"] == "test" and td.metadata["onnx.producer"] == "hand"


def test_external_constants_and_subgraphs_read_and_serve_as_template(tmp_path, control_flow_model):
    """onnx's writer with convert_attribute=True puts Constant values and subgraph weights outside too."""
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(control_flow_model))
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(model, str(src / "cf.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="cf.bin", size_threshold=0, convert_attribute=True)
    td = onnx_format.read(src / "cf.onnx")
    assert td["then_c"].attrs["origin"] == "external:cf.bin" and td["then_c"].attrs["onnx.kind"] == "constant"
    assert td["body_w"].attrs["origin"] == "external:cf.bin"
    plain = onnx_format.read(control_flow_model)
    for name, t in plain.items():
        assert same_values(td[name].numpy(), t.numpy()), name
    # As a template: the kept Constant/subgraph tensors are inlined, so the output stands alone.
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    new_w = np.array([[9.0, 8.0], [7.0, 6.0]])
    onnx_format.write(TensorDict.from_arrays({"main_w": new_w}), out_dir / "new.onnx", template=src / "cf.onnx")
    assert sorted(os.listdir(out_dir)) == ["new.onnx"]
    (loop_out,) = ort.InferenceSession(str(out_dir / "new.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"cond": np.array(True)})
    np.testing.assert_array_equal(loop_out, plain["then_c"].numpy() + plain["then_w"].numpy()
                                  + 3 * plain["body_w"].numpy())
    assert same_values(oracle_arrays(out_dir / "new.onnx")["main_w"], new_w)


def test_initializers_only_leaves_constants_out(control_flow_model):
    td = convert.read(control_flow_model, "onnx", initializers_only=True)
    assert set(td) == {"main_w", "sp", "then_w", "body_w", "deep_w"}
    assert all(t.attrs["onnx.kind"] != "constant" for t in td.values())


def function_model():
    """A model whose graph calls a model-local function ``custom.AddBias`` holding a Constant (0.5)."""
    fn = helper.make_function(
        "custom", "AddBias", ["x"], ["y"],
        [helper.make_node("Constant", [], ["bias"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
         helper.make_node("Add", ["x", "bias"], ["y"])],
        opset_imports=[helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("AddBias", ["x"], ["y"], domain="custom")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, functions=[fn], ir_version=8,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])


def test_reads_constants_in_model_functions(tmp_path):
    model = function_model()
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "f.onnx"))
    td = onnx_format.read(tmp_path / "f.onnx")
    assert list(td) == ["AddBias/bias"] and td["AddBias/bias"].attrs["origin"] == "function:custom.AddBias"
    assert same_values(td["AddBias/bias"].numpy(), np.array([0.5], np.float32))
    assert td.metadata["onnx.opset.custom"] == "1"


def test_reads_typed_fields_like_to_array(tmp_path):
    """Tensors stored in float_data/int32_data/int64_data/double_data/uint64_data/string_data."""
    specs = {
        "f32": (TensorProto.FLOAT, np.array([1.5, -2.0, np.inf], np.float32)),
        "f64": (TensorProto.DOUBLE, np.array([1e300, -0.0], np.float64)),
        "f16": (TensorProto.FLOAT16, np.array([1.0, 65504.0, -0.5], np.float16)),
        "bf16": (TensorProto.BFLOAT16, np.array([1.0, -3.5], ml_dtypes.bfloat16)),
        "f8": (TensorProto.FLOAT8E4M3FN, np.array([448.0, -0.5], ml_dtypes.float8_e4m3fn)),
        "f8e5": (TensorProto.FLOAT8E5M2, np.array([57344.0, 0.25], ml_dtypes.float8_e5m2)),
        "i8": (TensorProto.INT8, np.array([-128, 127], np.int8)),
        "i16": (TensorProto.INT16, np.array([-32768, 5], np.int16)),
        "i32": (TensorProto.INT32, np.array([-2**31, 7], np.int32)),
        "i64": (TensorProto.INT64, np.array([-2**63, 2**62], np.int64)),
        "u8": (TensorProto.UINT8, np.array([0, 255], np.uint8)),
        "u16": (TensorProto.UINT16, np.array([65535], np.uint16)),
        "u32": (TensorProto.UINT32, np.array([2**32 - 1], np.uint32)),
        "u64": (TensorProto.UINT64, np.array([2**64 - 1], np.uint64)),
        "bool": (TensorProto.BOOL, np.array([True, False, True])),
        "c64": (TensorProto.COMPLEX64, np.array([1 + 2j, -3.5j], np.complex64)),
        "c128": (TensorProto.COMPLEX128, np.array([1e200 + 2j], np.complex128)),
    }
    inits = []
    for name, (code, arr) in specs.items():
        # make_tensor(raw=False) stores 16/8-bit floats as bit patterns in int32_data,
        # complex as (re, im) pairs in float_data/double_data.
        vals = arr.astype(np.float32).tolist() if arr.dtype.kind == "V" or arr.itemsize < 4 and arr.dtype.kind == "f" \
            else arr.tolist()
        t = helper.make_tensor(name, code, list(arr.shape), vals, raw=False)
        assert not t.HasField("raw_data")
        inits.append(t)
    # (not make_tensor: it goes through a NumPy "S" array, which drops trailing NULs)
    inits.append(TensorProto(name="str", data_type=TensorProto.STRING, dims=[2], string_data=[b"\xff\x00", b"ok"]))
    graph = helper.make_graph([], "g", [], [], initializer=inits)
    path = tmp_path / "typed.onnx"
    onnx.save(helper.make_model(graph), str(path))
    td = onnx_format.read(path)
    loaded = onnx.load(str(path))
    for proto in loaded.graph.initializer[:-1]:
        oracle = numpy_helper.to_array(proto)
        ours = td[proto.name].numpy()
        assert ours.dtype == oracle.dtype and ours.tobytes() == oracle.tobytes(), proto.name
        assert same_values(ours, specs[proto.name][1]), proto.name
    assert list(td["str"].numpy()) == [b"\xff\x00", b"ok"]


def test_round_trip_every_dtype_through_read_and_write(tmp_path):
    """read(write(x)) == x and write(read(write(x))) == write(x), byte for byte."""
    td = every_dtype()
    a = tmp_path / "a.onnx"
    onnx_format.write(td, a)
    back = onnx_format.read(a)
    for name, t in td.items():
        assert same_values(back[name].numpy(), t.numpy()), name
    b = tmp_path / "b.onnx"
    onnx_format.write(TensorDict(back.values(), td.metadata), b)
    assert a.read_bytes() == b.read_bytes()


def test_sample_values_of_every_dtype_survive_external_data(tmp_path):
    arrays = {f"t/{dt.name}": sample_array(dt, (3, 5)) for dt in dtypes.TABLE if dt.onnx is not None}
    td = TensorDict.from_arrays(arrays)
    out = tmp_path / "e.onnx"
    onnx_format.write(td, out, external_data_threshold=0)
    got = oracle_arrays(out)
    for name, value in arrays.items():
        assert same_values(got[name], value), name
        assert same_values(onnx_format.read(out)[name].numpy(), value), name
    # deterministic: the same tensors give the same two files
    again = tmp_path / "again"
    again.mkdir()
    onnx_format.write(td, again / "e.onnx", external_data_threshold=0)
    for f in ("e.onnx", "e.onnx.data"):
        assert (again / f).read_bytes() == (tmp_path / f).read_bytes(), f


def test_unsupported_dtype_names_the_tensor(tmp_path):
    t = helper.make_tensor("packed", TensorProto.INT4, [4], [1, -2, 3, 0])
    path = tmp_path / "i4.onnx"
    onnx.save(helper.make_model(helper.make_graph([], "g", [], [], initializer=[t])), str(path))
    with pytest.raises(ReadError, match="packed.*INT4"):
        onnx_format.read(path)


# ------------------------------------------------------------------ detect

@needs_corpus
def test_detect_accepts_onnx_files(tmp_path, control_flow_model, torch_template):
    assert onnx_format.detect(control_flow_model)
    assert onnx_format.detect(torch_template[3])
    for name in ("model.onnx", "toy.onnx", "model_inline.onnx"):
        assert onnx_format.detect(f"{CORPUS}/{name}")


@needs_corpus
def test_detect_rejects_other_files(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file

    save_file({"w": np.ones(300, np.float32)}, str(tmp_path / "a.safetensors"))
    torch.save({"w": torch.ones(3)}, str(tmp_path / "a.pt"))
    # A TF GraphDef: field 1 (node) is length-delimited; a FingerprintDef starts with two varints.
    (tmp_path / "graph.pb").write_bytes(b"\x0a\x0c\x0a\x01x\x12\x07Const\x22\x02\x08\x1b")
    (tmp_path / "fingerprint.pb").write_bytes(b"\x08\x96\x01\x10\x05\x18\x07")
    (tmp_path / "trunc.onnx").write_bytes((tmp_path / "a.safetensors").read_bytes()[:10])
    rejected = [tmp_path / n for n in ("a.safetensors", "a.pt", "graph.pb", "fingerprint.pb", "trunc.onnx")]
    corpus = Path(CORPUS).parent
    rejected += [os.path.join(root, f) for root, _, files in os.walk(corpus) for f in files
                 if not f.endswith(".onnx") and not f.endswith(".md")]
    rejected += [tmp_path / "missing", tmp_path]
    assert len(rejected) > 30
    for p in rejected:
        assert not onnx_format.detect(p), p


@needs_corpus
def test_detect_rejects_truncated_onnx(tmp_path):
    data = open(f"{CORPUS}/model_inline.onnx", "rb").read()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) - 300])
    assert not onnx_format.detect(tmp_path / "t.onnx")


# ------------------------------------------------------------------ errors

def _copy_corpus(tmp_path, name="model.onnx"):
    for f in (name, name + ".data"):
        src = f"{CORPUS}/{f}"
        if os.path.exists(src):
            (tmp_path / f).write_bytes(open(src, "rb").read())
    return tmp_path / name


@needs_corpus
def test_truncated_and_corrupt_models(tmp_path):
    data = open(f"{CORPUS}/model_inline.onnx", "rb").read()
    for cut in (10, 100, len(data) // 2, len(data) - 20):
        p = tmp_path / f"cut{cut}.onnx"
        p.write_bytes(data[:cut])
        with pytest.raises(CorruptFileError) as e:
            for t in onnx_format.read(p).values():
                t.numpy()
        assert str(p) in str(e.value)
    p = tmp_path / "garbage.onnx"
    p.write_bytes(b"\xff" * 100)
    with pytest.raises(CorruptFileError):
        onnx_format.read(p)
    with pytest.raises(ReadError):
        onnx_format.read(tmp_path / "absent.onnx")


@needs_corpus
def test_missing_external_data_file(tmp_path):
    model = _copy_corpus(tmp_path)
    (tmp_path / "model.onnx.data").unlink()
    with pytest.raises(ReadError) as e:
        onnx_format.read(model)
    assert "model.onnx.data" in str(e.value) and "tensor '0.bias'" in str(e.value)


@needs_corpus
def test_external_data_past_end_of_file(tmp_path):
    model = _copy_corpus(tmp_path)
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:6000])  # 0.weight sits at 5632 + 32768
    with pytest.raises(CorruptFileError) as e:
        onnx_format.read(model)
    assert "model.onnx.data" in str(e.value) and "tensor '0.weight'" in str(e.value)
    # Shrunk after reading: the lazy region notices at read time, still naming the tensor.
    _copy_corpus(tmp_path)
    td = onnx_format.read(model)
    data.write_bytes(data.read_bytes()[:6000])
    with pytest.raises(CorruptFileError, match="0.weight"):
        td["0.weight"].numpy()


def _edit_external(model_path, name, **changes):
    m = onnx.load(str(model_path), load_external_data=False)
    for t in m.graph.initializer:
        if t.name == name:
            for e in t.external_data:
                if e.key in changes:
                    e.value = changes[e.key]
    onnx.save(m, str(model_path))


@needs_corpus
@pytest.mark.parametrize("change, message", [
    ({"offset": "99999999"}, "past the end"),
    ({"length": "12"}, "does not fit"),
    ({"offset": "abc"}, "bad external data"),
    ({"location": "../../etc/passwd"}, "outside the model's folder"),
])
def test_bad_external_data_entries(tmp_path, change, message):
    model = _copy_corpus(tmp_path)
    _edit_external(model, "2.weight", **change)
    with pytest.raises(CorruptFileError, match=message) as e:
        onnx_format.read(model)
    assert "2.weight" in str(e.value)


def test_raw_data_of_wrong_size(tmp_path):
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[3], raw_data=b"\0" * 8)
    path = tmp_path / "w.onnx"
    onnx.save(helper.make_model(helper.make_graph([], "g", [], [], initializer=[t])), str(path))
    with pytest.raises(CorruptFileError, match="raw_data holds 8 bytes"):
        onnx_format.read(path)
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[3], float_data=[1.0, 2.0])  # too short
    onnx.save(helper.make_model(helper.make_graph([], "g", [], [], initializer=[t])), str(path))
    with pytest.raises(ConvertError, match="'w'"):
        onnx_format.read(path)["w"].numpy()


@needs_corpus
def test_random_damage_gives_convert_errors_only(tmp_path):
    """Flipped bytes and cuts anywhere: the reader succeeds or raises a ConvertError, nothing else."""
    rng = np.random.default_rng(7)
    for name in ("model_inline.onnx", "model.onnx"):
        src = _copy_corpus(tmp_path, name)
        data = src.read_bytes()
        victim = tmp_path / f"victim-{name}"
        if name == "model.onnx":
            (tmp_path / "model.onnx.data").write_bytes(open(f"{CORPUS}/model.onnx.data", "rb").read())
        for _ in range(int(os.environ.get("ONNX_FUZZ", "150"))):  # ONNX_FUZZ=3000 for a longer run
            damaged = bytearray(data)
            if rng.random() < 0.3:
                damaged = damaged[: int(rng.integers(0, len(data)))]
            else:
                for pos in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
                    damaged[pos] = int(rng.integers(0, 256))
            victim.write_bytes(bytes(damaged))
            onnx_format.detect(victim)
            try:
                for t in onnx_format.read(victim).values():
                    t.numpy()
            except ConvertError:
                pass


def test_sparse_tensor_with_bad_indices(tmp_path):
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.0], np.float32), "sp"),
                                       numpy_helper.from_array(np.array([-1], np.int64), "i"), [4])
    graph = helper.make_graph([], "g", [], [], sparse_initializer=[sparse])
    path = tmp_path / "sp.onnx"
    onnx.save(helper.make_model(graph), str(path))
    td = onnx_format.read(path)
    with pytest.raises(CorruptFileError, match="sp"):
        td["sp"].numpy()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_round_trip_checked_by_onnx(tmp_path_factory, data):
    """Random names, dtypes, shapes and bytes; onnx's reader must see exactly what we wrote."""
    numeric = [dt for dt in dtypes.TABLE if dt.kind != "string" and dt.onnx is not None]
    n = data.draw(st.integers(1, 5))
    names = data.draw(st.lists(st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12),
                               min_size=n, max_size=n, unique=True))
    arrays = {}
    for name in names:
        dt = data.draw(st.sampled_from(numeric + [dtypes.STRING]))
        shape = tuple(data.draw(st.lists(st.integers(0, 4), max_size=3)))
        count = int(np.prod(shape))
        if dt.kind == "string":
            items = data.draw(st.lists(st.binary(max_size=8), min_size=count, max_size=count))
            arr = np.empty(count, dtype=object)
            arr[:] = items
            arrays[name] = arr.reshape(shape)
        else:
            raw = data.draw(st.binary(min_size=count * dt.itemsize, max_size=count * dt.itemsize))
            arr = np.frombuffer(raw, dtype=dt.numpy).reshape(shape)
            if dt.kind == "bool":
                arr = arr.view(np.uint8).astype(bool)  # ONNX bools are 0/1 bytes
            arrays[name] = arr
    external = data.draw(st.booleans())
    folder = tmp_path_factory.mktemp("prop")
    out = folder / "p.onnx"
    onnx_format.write(TensorDict.from_arrays(arrays), out, external_data_threshold=0 if external else None)
    got = oracle_arrays(out)
    assert list(got) == list(arrays)
    for name, value in arrays.items():
        assert same_values(got[name], value), name
