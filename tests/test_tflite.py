"""TFLite models, read; TensorFlow is the oracle: ``tf.lite.TFLiteConverter`` writes the models (float,
int8 post-training quantized with a representative dataset, dynamic-range quantized, float16, and
with its buffers past the flatbuffer's end) and ``tf.lite.Interpreter.get_tensor`` reads every
constant tensor back; which tensors are constant comes from TensorFlow's own flatbuffer reader
(``tensorflow.lite.tools.flatbuffer_utils``).

TFLite is read-only here, so instead of the shared round-trip contract the tests check detect,
read and hostile input directly."""

from __future__ import annotations

import json
import random
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from blocking import blocker
from fuzzing import exercise, run_guarded

import convert
from convert import registry
from convert.errors import ConvertError, CorruptFileError
from convert.formats import tflite
from convert.ir import FileRegion

from oracles import safetensors_read

tf = pytest.importorskip("tensorflow")
from tensorflow.lite.tools import flatbuffer_utils  # noqa: E402

ROOT = Path(__file__).parent.parent
SMALL = 8 << 20
KINDS = ["float", "int8", "dynamic", "float16", "offset"]


def _keras_model():
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(4, 3, activation="relu")(inp)
    x = tf.keras.layers.DepthwiseConv2D(3)(x)
    x = tf.keras.layers.Flatten()(x)
    x = tf.keras.layers.Dense(64, activation="relu")(x)  # 4096 weights: enough for dynamic-range quantization
    out = tf.keras.layers.Dense(5)(x)
    return tf.keras.Model(inp, out)


def _representative():
    rng = np.random.default_rng(0)
    for _ in range(8):
        yield [rng.standard_normal((1, 8, 8, 3)).astype(np.float32)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tflite")
    model = _keras_model()
    out = {}
    for kind in KINDS:
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        if kind == "int8":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = _representative
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = conv.inference_output_type = tf.int8
        elif kind == "dynamic":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        elif kind == "float16":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.target_spec.supported_types = [tf.float16]
        elif kind == "offset":
            conv._experimental_use_buffer_offset = True  # buffers past the flatbuffer, as in models over 2 GB
        out[kind] = folder / f"{kind}.tflite"
        out[kind].write_bytes(conv.convert())
    return out


def interpreter(path: Path):
    it = tf.lite.Interpreter(model_path=str(path), experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    return it


def constant_indices(path: Path) -> set[int]:
    """The main subgraph's tensors whose buffer holds data, by TensorFlow's flatbuffer reader."""
    model = flatbuffer_utils.read_model(str(path))
    return {i for i, t in enumerate(model.subgraphs[0].tensors)
            if model.buffers[t.buffer].data is not None and len(model.buffers[t.buffer].data)}


@pytest.mark.parametrize("kind", KINDS)
def test_every_constant_tensor_reads_like_the_interpreter(models, kind):
    path = models[kind]
    td = tflite.read(path)
    it = interpreter(path)
    details = {d["index"]: d for d in it.get_tensor_details()}
    constants = constant_indices(path)
    assert constants and {int(t.attrs["tflite.tensor_index"]) for t in td.values()} == constants
    for t in td.values():
        d = details[int(t.attrs["tflite.tensor_index"])]
        assert t.name == d["name"]
        want = it.get_tensor(d["index"])
        got = t.numpy()
        assert got.dtype == want.dtype and got.shape == want.shape, t.name
        assert got.tobytes() == want.tobytes(), t.name
        assert isinstance(t.source, FileRegion)  # copied as bytes
        q = d["quantization_parameters"]
        if len(q["scales"]):
            mine = json.loads(t.attrs["tflite.quantization"])
            assert np.array_equal(np.float32(mine["scale"]), q["scales"]), t.name
            assert np.array_equal(mine["zero_point"], q["zero_points"]), t.name
            assert mine["quantized_dimension"] == q["quantized_dimension"], t.name
        else:
            assert "tflite.quantization" not in t.attrs, t.name
    if kind == "offset":
        assert td.metadata["tflite.metadata.buffer_location"] == "outside flatbuffers"
        flatbuffer_end = max(t.source.offset for t in td.values())
        assert all(t.source.offset > 0 for t in td.values()) and flatbuffer_end > 0


def test_quantized_models_keep_their_integers(models):
    for kind, want in (("int8", {"int8", "int32"}), ("dynamic", {"int8"})):
        td = tflite.read(models[kind])
        quantized = {t.dtype.name for t in td.values() if "tflite.quantization" in t.attrs}
        assert want <= quantized, (kind, quantized)
        per_axis = [t for t in td.values() if len(json.loads(t.attrs.get("tflite.quantization", '{"scale": []}'))
                                                  ["scale"]) > 1]
        assert per_axis, kind
        assert set(json.loads(td.metadata["tflite.quantization"])) == {
            t.name for t in td.values() if "tflite.quantization" in t.attrs}


@pytest.mark.parametrize("kind", ["int8", "dynamic"])
def test_dequantize_uses_the_interpreters_scales_and_zero_points(models, kind):
    path = models[kind]
    td = convert.read(path, "tflite", dequantize=True)
    it = interpreter(path)
    details = {d["index"]: d for d in it.get_tensor_details()}
    checked = 0
    for t in td.values():
        d = details[int(t.attrs["tflite.tensor_index"])]
        q, raw = d["quantization_parameters"], it.get_tensor(d["index"])
        if not len(q["scales"]):
            assert t.numpy().tobytes() == raw.tobytes()
            continue
        shape = [1] * raw.ndim
        if len(q["scales"]) > 1:
            shape[q["quantized_dimension"]] = len(q["scales"])
        scale = q["scales"].astype(np.float64).reshape(shape)
        zero = q["zero_points"].astype(np.int64).reshape(shape)
        want = (scale * (raw.astype(np.int64) - zero)).astype(np.float32)
        got = t.numpy()
        assert got.dtype == np.float32 and t.attrs["tflite.dequantized_from"] == raw.dtype.name
        assert np.array_equal(got, want), t.name
        checked += 1
    assert checked >= (4 if kind == "int8" else 1)
    assert "tflite.quantization" not in td.metadata  # float values: the parameters no longer apply


def test_to_safetensors_carries_the_quantization(models, tmp_path):
    out = tmp_path / "int8.safetensors"
    convert.convert(models["int8"], out, to="safetensors")
    got = safetensors_read(out)
    it = interpreter(models["int8"])
    by_name = {d["name"]: d["index"] for d in it.get_tensor_details()}
    for name, arr in got.items():
        assert arr.tobytes() == it.get_tensor(by_name[name]).tobytes(), name
    from safetensors import safe_open
    with safe_open(str(out), framework="np") as f:
        meta = f.metadata()
    assert set(json.loads(meta["tflite.quantization"])) <= set(got)


def test_detect_and_auto(models, tmp_path):
    for path in models.values():
        assert tflite.detect(path) and registry.detect(path).name == "tflite"
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(random.Random(0).randbytes(4096))
    assert not tflite.detect(junk) and not tflite.detect(tmp_path)
    with pytest.raises(ConvertError, match="TFL3"):  # the ending picks the reader, which says what is wrong
        convert.read(junk)


def test_reads_without_tensorflow(models, tmp_path):
    code = f"""
from convert.formats import tflite
td = tflite.read({str(models['int8'])!r}, dequantize=True)
print(len(td), sorted({{t.dtype.name for t in td.values()}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=blocker(tmp_path, ("tensorflow",)))
    assert out.returncode == 0, out.stderr
    n = len(tflite.read(models["int8"]))
    assert out.stdout.split(maxsplit=1) == [str(n), "['float32', 'int32']\n"]


# ---- hostile input -------------------------------------------------------------------------------

def _refused(path: Path, error=ConvertError, match: str | None = None) -> ConvertError:
    err = run_guarded(lambda: exercise(path, "tflite"), max_bytes=SMALL, seconds=10)
    assert isinstance(err, error), f"expected {error.__name__}, got {err!r}"
    assert str(path) in str(err) and "\n" not in str(err), str(err)
    if match is not None:
        assert re.search(match, str(err)), str(err)
    return err


def _edited(src: Path, dst: Path, edit, extra: bytes = b"") -> Path:
    """A model changed by ``edit(model)`` and written by TensorFlow's own flatbuffer code."""
    model = flatbuffer_utils.read_model(str(src))
    edit(model)
    dst.write_bytes(flatbuffer_utils.convert_object_to_bytearray(model, extra))
    return dst


def _first_constant(model):
    graph = model.subgraphs[0]
    return next(t for t in graph.tensors if model.buffers[t.buffer].data is not None
                and len(model.buffers[t.buffer].data) >= 16)


def _move_past_end(model, offset):
    t = _first_constant(model)
    b = model.buffers[t.buffer]
    b.offset, b.size, b.data = offset, len(b.data), None


def _set(obj, **kw):
    for k, v in kw.items():
        setattr(obj, k, v)


HOSTILE = {
    "buffer_offset_past_the_end": (lambda m: _move_past_end(m, 1 << 40), "past the end"),
    "shape_claims_more_than_its_buffer": (lambda m: _set(_first_constant(m), shape=[1 << 20, 1 << 20]),
                                          "needs"),
    "negative_dimension": (lambda m: _set(_first_constant(m), shape=[-4, 4]), "negative"),
    "rank_100": (lambda m: _set(_first_constant(m), shape=[1] * 100), "rank"),
    "buffer_index_out_of_range": (lambda m: _set(_first_constant(m), buffer=10_000), "buffer 10000"),
    "name_not_utf8": (lambda m: _set(_first_constant(m), name=b"\xff\xfe\x00"), "UTF-8"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_tables(models, tmp_path, case):
    edit, match = HOSTILE[case]
    _refused(_edited(models["float"], tmp_path / f"{case}.tflite", edit), CorruptFileError, match)


def test_wrong_scale_count_refused(models, tmp_path):
    def edit(m):
        t = next(t for t in m.subgraphs[0].tensors if t.quantization is not None
                 and t.quantization.scale is not None and len(t.quantization.scale) > 1)
        t.quantization.scale = list(t.quantization.scale) + [1.0]
    _refused(_edited(models["int8"], tmp_path / "scales.tflite", edit), CorruptFileError, "scales")


def test_vector_lengths_claiming_billions(models, tmp_path):
    """Every 4-byte word of the flatbuffer's head set to 0x7fffffff in turn (lengths, offsets, counts):
    refused or read, quickly and small, never another exception."""
    data = models["float"].read_bytes()
    end = min(len(data), 2048)
    for pos in range(8, end - 4, 4):
        bad = tmp_path / "v.tflite"
        bad.write_bytes(data[:pos] + struct.pack("<I", 0x7FFFFFFF) + data[pos + 4:])
        err = run_guarded(lambda p=bad: exercise(p, "tflite"), max_bytes=SMALL, seconds=5)
        assert err is None or (isinstance(err, ConvertError) and str(bad) in str(err)), (pos, err)


def test_truncated_and_flipped(models, tmp_path):
    """A cut through the tables or through any constant's data is refused. (TFLite has no checksums,
    and a cut through bytes no constant tensor needs, such as the operator codes a model may end
    with, goes unnoticed: the reader touches only the tables it reads, like the interpreter.)"""
    for kind in ("float", "offset"):
        data = models[kind].read_bytes()
        ends = sorted(t.source.offset + t.source.length for t in tflite.read(models[kind]).values())
        for cut in (8, 64, len(data) // 3, len(data) // 2, ends[-1] - 1):
            bad = tmp_path / f"{kind}-{cut}.tflite"
            bad.write_bytes(data[:cut])
            _refused(bad)
        rng = random.Random(0)
        for i in range(200):
            flipped = bytearray(data)
            flipped[rng.randrange(8, len(data))] ^= 1 << rng.randrange(8)
            bad = tmp_path / f"{kind}-flip{i}.tflite"
            bad.write_bytes(bytes(flipped))
            err = run_guarded(lambda p=bad: exercise(p, "tflite"), max_bytes=SMALL, seconds=5)
            assert err is None or str(bad) in str(err), err


def test_generated_reader_agrees_with_tensorflows_schema_module():
    """Our flatc output (convert/formats/tflite/GENERATED.md) reads every field TensorFlow 2.21's own
    generated module reads at the same vtable slot, and every enum value is the same."""
    from tensorflow.lite.python import schema_py_generated as theirs

    from convert.formats.tflite import schema_generated as ours

    def slots(module) -> dict:
        out = {}
        for cls_name, cls in vars(module).items():
            if not isinstance(cls, type) or cls_name.endswith("T"):
                continue
            for attr, value in vars(cls).items():
                if isinstance(value, int) and not attr.startswith("_"):  # an enum value
                    out[(cls_name, attr)] = value
                elif callable(value) and not attr.startswith("_"):
                    code = getattr(value, "__code__", None)
                    consts = [c for c in (code.co_consts if code else ()) if isinstance(c, int) and c >= 4]
                    if code and "Offset" in code.co_names and consts:  # an accessor: self._tab.Offset(slot)
                        out[(cls_name, attr)] = consts[0]
        return out

    mine, tfs = slots(ours), slots(theirs)
    assert tfs[("Buffer", "Offset")] == 6 and tfs[("Tensor", "Quantization")] == 12 and tfs[("TensorType", "INT8")] == 9
    assert len(tfs) > 900
    assert {k: mine.get(k) for k in tfs} == tfs
