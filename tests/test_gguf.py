"""GGUF: the contract, every GGML type the ``gguf`` package writes, metadata, hostile headers, and a
tiny Llama from Hugging Face to llama.cpp's layout and back, checked by ``gguf`` and ``transformers``.

Oracles: ``gguf.GGUFReader`` (raw tensor bytes, key/values), ``gguf.quants.dequantize`` (values),
``gguf.GGUFWriter`` (writes the inputs), the ``safetensors`` library, and transformers' own GGUF
loader (``from_pretrained(..., gguf_file=...)``).
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from blocking import blocker
from fuzzing import exercise, one_line_naming, run_guarded

import convert
from convert import dtypes
from convert.errors import ConvertError, CorruptFileError, MappingError, ReadError, WriteError
from convert.ir import FileRegion

from contract import FormatContract, same_values
from oracles import safetensors_read

gguf = pytest.importorskip("gguf")
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
Q = GGMLQuantizationType
_TYPED = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8, Q.I16: np.int16,
          Q.I32: np.int32, Q.I64: np.int64}
NO_DEQUANTIZER = ("q8_1", "q8_k", "q1_0")  # gguf 0.19 has no routine for them: raw bytes only
_QUANTIZED_BY_GGUF = ("F32", "F16", "BF16", "F64", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "MXFP4")


def gguf_values(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a file as gguf reads it: typed arrays, BF16 viewed from its bytes, quantized
    types through ``gguf.quants.dequantize`` (but those it has no routine for)."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.tensor_type.name.lower() in NO_DEQUANTIZER:
            continue
        shape = tuple(reversed([int(d) for d in t.shape]))
        if t.tensor_type in _TYPED:
            out[t.name] = np.asarray(t.data).reshape(shape)
        elif t.tensor_type == Q.BF16:
            out[t.name] = np.asarray(t.data).view(ml_dtypes.bfloat16).reshape(shape)
        else:
            out[t.name] = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
    return out


def gguf_raw(path: Path) -> dict[str, tuple[int, bytes]]:
    return {t.name: (int(t.tensor_type), np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(path)).tensors}


def gguf_fields(path: Path) -> dict[str, tuple[list, object]]:
    """Key/values as gguf reads them: (types, contents)."""
    return {k: ([int(x) for x in f.types], f.contents()) for k, f in gguf.GGUFReader(str(path)).fields.items()
            if not k.startswith("GGUF.")}


class TestGGUFContract(FormatContract):
    FORMAT = "gguf"
    # gguf 0.19 cannot dequantize these, so neither the oracle nor convert gives their values;
    # their raw blocks are checked in test_every_ggml_type_reads_as_gguf_reads_it
    SKIP_DTYPES = NO_DEQUANTIZER

    def oracle_read(self, path):
        return gguf_values(path)


def test_value_and_tensor_type_numbers_agree_with_gguf():
    from convert.formats import gguf as ours

    assert {num: name for num, (name, _, _) in ours._SCALARS.items()} == {
        int(v): v.name.lower() for v in GGUFValueType if v not in (GGUFValueType.STRING, GGUFValueType.ARRAY)}
    assert (ours._STRING, ours._ARRAY) == (GGUFValueType.STRING, GGUFValueType.ARRAY)
    rows = {d.gguf: d for d in dtypes.TABLE if d.gguf is not None}
    assert set(rows) == {int(q) for q in Q}, "a GGML type of gguf has no row (or a row no type)"
    for q in Q:
        d = rows[int(q)]
        assert d.name == q.name.lower() or (d.block is None and d.numpy == np.dtype(_TYPED.get(q, ml_dtypes.bfloat16)))
        elements, size = GGML_QUANT_SIZES[q]
        assert (d.block or (1, d.itemsize)) == (elements, size), q.name


def _all_types_file(path: Path) -> dict[str, tuple[Q, np.ndarray]]:
    """A file written by gguf's own writer holding every GGML type: values quantized by gguf where it
    quantizes that type, random blocks where it does not; typed key/values of every kind."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("k.u8", 200)
    writer.add_int8("k.i8", -100)
    writer.add_uint16("k.u16", 60000)
    writer.add_int16("k.i16", -30000)
    writer.add_uint32("k.u32", 4_000_000_000)
    writer.add_int32("k.i32", -2_000_000_000)
    writer.add_float32("k.f32", 1e-5)
    writer.add_uint64("k.u64", 2**63 + 5)
    writer.add_int64("k.i64", -(2**62))
    writer.add_float64("k.f64", 1 / 3)
    writer.add_bool("k.bool", True)
    writer.add_string("k.str", "unicod\u00e9 \u2713")
    writer.add_key_value("k.ints", [1, -2, 3], GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    writer.add_key_value("k.floats", [0.5, -1e30, float("inf")], GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    writer.add_array("k.strs", ["a", "", "\u00fcber"])
    made = {}
    for q in Q:
        elements, size = GGML_QUANT_SIZES[q]
        values = rng.standard_normal((3, 2 * max(elements, 8))).astype(np.float32)
        name = f"t.{q.name.lower()}"
        if q in _TYPED:
            arr = (values * 100).astype(_TYPED[q])
            writer.add_tensor(name, arr)
        else:
            try:
                arr = quantize(values, q)
            except NotImplementedError:  # no quantizer: random blocks (every pattern dequantizes)
                assert q.name not in _QUANTIZED_BY_GGUF
                arr = rng.integers(0, 256, (3, values.shape[1] // elements * size), dtype=np.uint8)
            writer.add_tensor(name, arr, raw_dtype=q)
        made[name] = (q, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return made


@pytest.fixture(scope="module")
def all_types(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "all.gguf"
    _all_types_file(path)
    return path


def test_every_ggml_type_reads_as_gguf_reads_it(all_types):
    td = convert.read(all_types)
    raw = gguf_raw(all_types)
    assert list(td) == list(raw)
    expected = gguf_values(all_types)
    for name, (qtype, data) in raw.items():
        ours = td[name]
        assert ours.dtype.gguf == qtype and ours.tobytes() == data, name  # raw: bit for bit
        assert isinstance(ours.source, FileRegion)
        if name in expected:
            assert same_values(ours.numpy(), expected[name]), name  # values: gguf's own dequantizer
        else:
            with pytest.raises(ConvertError, match="cannot dequantize"):
                ours.numpy()
    assert {d.name for d in (t.dtype for t in td.values())} >= {"q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "iq2_xxs"}


def test_key_values_read_with_their_types(all_types):
    meta = convert.read(all_types).metadata
    for key, (types, contents) in gguf_fields(all_types).items():
        (tname, value), = json.loads(meta[f"gguf.{key}"]).items()
        names = [GGUFValueType(t).name.lower() for t in types]
        assert tname == (f"array[{names[1]}]" if names[0] == "array" else names[0]), key
        if isinstance(contents, float) or (isinstance(contents, list) and contents and isinstance(contents[0], float)):
            assert np.array_equal(np.float64(value), np.float64(contents)), key
        else:
            assert value == contents, key


def test_gguf_to_gguf_is_byte_identical_and_copies_bytes(all_types, tmp_path):
    out = tmp_path / "copy.gguf"
    summary = convert.convert(all_types, out, to="gguf")
    assert summary["outputs"][0]["verified"]
    assert out.read_bytes() == all_types.read_bytes()
    rules = tmp_path / "rename.yaml"
    rules.write_text("schema: 1\nrules:\n  - match: 't\\.(.+)'\n    to: 'renamed.\\1'\n")
    td, _ = convert.api.apply_maps(convert.read(all_types), [str(rules)])
    assert all(isinstance(t.source, FileRegion) for t in td.values())  # renamed only: copied as bytes
    convert.write(td, tmp_path / "renamed.gguf", "gguf")
    raw = gguf_raw(tmp_path / "renamed.gguf")
    assert raw == {f"renamed.{k[2:]}": v for k, v in gguf_raw(all_types).items()}
    assert gguf_fields(tmp_path / "renamed.gguf") == gguf_fields(all_types)


def test_quantized_to_safetensors_needs_dtype_then_dequantizes(all_types, tmp_path):
    include = [rf"t\.(?!{'|'.join(NO_DEQUANTIZER)}$).*"]
    with pytest.raises(WriteError) as e:
        convert.convert(all_types, tmp_path / "x.safetensors", to="safetensors", include=include)
    msg = str(e.value)
    quantized = [t.name for t in convert.read(all_types).values() if t.dtype.is_quantized]
    assert all(name in msg for name in quantized if name.removeprefix("t.") not in NO_DEQUANTIZER)
    assert "--dtype float32" in msg and "\n" not in msg and not (tmp_path / "x.safetensors").exists()
    expected = gguf_values(all_types)
    quantized_by_gguf = [rf"t\.{q.name.lower()}" for q in Q if q.name in _QUANTIZED_BY_GGUF]
    for target, np_dtype in (("float32", np.float32), ("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)):
        out = tmp_path / f"{target}.safetensors"
        # random blocks dequantize to values float16 cannot hold: narrower targets get gguf's quantized values
        convert.convert(all_types, out, to="safetensors", include=include if target == "float32" else quantized_by_gguf,
                        dtype=target)
        got = safetensors_read(out)
        for name, arr in got.items():
            want = expected[name]
            if want.dtype.kind == "f" or want.dtype == ml_dtypes.bfloat16:
                want = want.astype(np.float32).astype(np_dtype)
            assert same_values(arr, want), (target, name)
    with pytest.raises(ConvertError, match="cannot dequantize"):  # no routine: one clear line, nothing written
        convert.convert(all_types, tmp_path / "q81.safetensors", to="safetensors", include=[r"t\.q8_1"],
                        dtype="float32")
    assert not (tmp_path / "q81.safetensors").exists()


def test_metadata_travels_through_safetensors_and_back(all_types, tmp_path):
    from safetensors import safe_open

    st = tmp_path / "m.safetensors"
    convert.convert(all_types, st, to="safetensors", include=[r"t\.f32"])
    with safe_open(str(st), framework="np") as f:
        meta = f.metadata()
    assert json.loads(meta["gguf.general.architecture"]) == {"string": "llama"}
    assert json.loads(meta["gguf.k.u64"]) == {"uint64": 2**63 + 5}
    back = tmp_path / "back.gguf"
    convert.convert(st, back, to="gguf")
    fields = gguf_fields(back)
    assert fields == gguf_fields(all_types)


def test_other_metadata_is_kept_under_convert_keys(tmp_path):
    td = convert.TensorDict.from_arrays({"w": np.ones(4, np.float32)}, {"tf.global_step": "190"})
    convert.write(td, tmp_path / "m.gguf", "gguf")
    assert gguf_fields(tmp_path / "m.gguf") == {"convert.tf.global_step": ([GGUFValueType.STRING], "190")}
    assert convert.read(tmp_path / "m.gguf").metadata["tf.global_step"] == "190"


def test_bad_typed_metadata_is_refused(tmp_path):
    for text, why in (('"llama"', "one key"), ('{"uint8": 300}', "typed GGUF value"), ('{"int128": 1}', "unknown"),
                      ('{"array[int32]": []}', "empty arrays")):
        td = convert.TensorDict.from_arrays({"w": np.ones(2, np.float32)}, {"gguf.k": text})
        with pytest.raises(WriteError, match="metadata gguf.k") as e:
            convert.write(td, tmp_path / "bad.gguf", "gguf")
        assert why in str(e.value)
        assert not (tmp_path / "bad.gguf").exists()


def test_inspect_names_the_quantization_type(all_types):
    report = convert.inspect(all_types, verify=True)
    rows = {t["name"]: t for t in report["tensors"]}
    assert rows["t.q4_k"]["dtype"] == "q4_k" and rows["t.q4_k"]["bytes"] == 3 * 2 * 144
    assert report["verified"]["tensors"] == len(rows)
    out = subprocess.run([sys.executable, "-m", "convert", "inspect", str(all_types)], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0 and "q6_k" in out.stdout and "iq2_xxs" in out.stdout


def test_conversion_memory_is_bounded_by_the_largest_tensor(tmp_path):
    rng = np.random.default_rng(0)
    tensor_bytes = 8 << 20
    writer = gguf.GGUFWriter(str(tmp_path / "in.gguf"), "llama")
    for i in range(8):
        writer.add_tensor(f"t{i}", rng.standard_normal(tensor_bytes // 4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tracemalloc.start()
    convert.convert(tmp_path / "in.gguf", tmp_path / "out.gguf", to="gguf")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * tensor_bytes, peak
    assert (tmp_path / "out.gguf").read_bytes() == (tmp_path / "in.gguf").read_bytes()


def test_reading_needs_no_gguf_package_and_says_what_needs_it(all_types, tmp_path):
    code = f"""
import convert
from convert.errors import MissingDependencyError
td = convert.read({str(all_types)!r})
assert td["t.f16"].numpy().dtype == "float16"
for action in (lambda: td["t.q4_k"].numpy(), lambda: convert.write(td, {str(tmp_path / 'o.gguf')!r}, "gguf")):
    try:
        action()
    except MissingDependencyError as e:
        print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=blocker(tmp_path, ("gguf", "torch", "transformers")))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all("pip install 'ckpt-convert[gguf]'" in line for line in lines), lines


# ------------------------------------------------------------------------------ damaged and hostile files

def _string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def hand_built(kvs: list[bytes] = (), infos: list[bytes] = (), *, version: int = 3, n_kv: int | None = None,
               n_tensors: int | None = None, data: bytes = b"", magic: bytes = b"GGUF", pad: int = 32) -> bytes:
    """A GGUF file from raw pieces: key/value records and tensor-info records, as given."""
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % pad) + data


def kv_u32(key: str, value: int) -> bytes:
    return _string(key) + struct.pack("<II", 4, value)


def info(name: str, dims: list[int], ggml: int = 0, offset: int = 0) -> bytes:
    return _string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", ggml, offset)


HOSTILE = {
    "bad magic": (hand_built(magic=b"GGUG"), "magic"),
    "version 1": (hand_built(version=1), "version 1"),
    "big-endian": (hand_built(version=3 << 24), "big-endian"),
    "huge key/value count": (hand_built(n_kv=2**63), "key/value count"),
    "huge tensor count": (hand_built(n_tensors=2**62), "tensor count"),
    "huge string length": (hand_built([struct.pack("<Q", 2**62) + b"k"]), "past the end"),
    "huge array": (hand_built([_string("a") + struct.pack("<IIQ", 9, 4, 2**61)]), "array"),
    "huge string array": (hand_built([_string("a") + struct.pack("<IIQ", 9, 8, 2**60)]), "count"),
    "truncated key/value": (hand_built([_string("general.name") + struct.pack("<I", 8) + struct.pack("<Q", 50) + b"x"],
                                       pad=1), "past the end"),
    "unknown value type": (hand_built([_string("k") + struct.pack("<I", 77) + b"\0" * 8]), "unknown value type"),
    "array of arrays": (hand_built([_string("k") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 4, 0)]),
                        "array of arrays"),
    "duplicate key": (hand_built([kv_u32("k", 1), kv_u32("k", 2)]), "twice"),
    "alignment not a power of two": (hand_built([kv_u32("general.alignment", 48)]), "power of two"),
    "huge dimensions": (hand_built([], [info("w", [2**40, 2**40])]), "past the end"),
    "too many dimensions": (hand_built([], [info("w", [1] * 9)]), "at most 4"),
    "offset past the end": (hand_built([], [info("w", [4], 0, 2**60)], data=b"\0" * 16), "past the end"),
    "misaligned offset": (hand_built([], [info("w", [2], 0, 4)], data=b"\0" * 64), "not aligned"),
    "unknown tensor type": (hand_built([], [info("w", [4], 99)], data=b"\0" * 16), "unknown GGML type 99"),
    "partial block": (hand_built([], [info("w", [16], 8)], data=b"\0" * 64), "whole blocks"),
    "overlapping tensors": (hand_built([], [info("a", [8]), info("b", [8])], data=b"\0" * 64), "overlap"),
    "duplicate tensor": (hand_built([], [info("a", [4]), info("a", [4], 0, 32)], data=b"\0" * 64), "twice"),
    "name not UTF-8": (hand_built([], [info("a", [4])]).replace(b"\x01\0\0\0\0\0\0\0a", b"\x01\0\0\0\0\0\0\0\xff"),
                       "not UTF-8"),
    "truncated data": (hand_built([], [info("w", [1000])], data=b"\0" * 16), "past the end"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_header_is_one_line_naming_the_file(tmp_path, case):
    blob, expected = HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(blob)
    error = run_guarded(lambda: exercise(path, "gguf"), max_bytes=4 << 20)
    assert isinstance(error, (CorruptFileError, ReadError)), case
    one_line_naming(error, tmp_path)
    assert expected in str(error), str(error)


def test_damaged_real_file_reads_or_fails_cleanly(all_types, tmp_path):
    """Cut at many points, bytes flipped in the header: never anything but a ConvertError."""
    data = all_types.read_bytes()
    header_end = gguf.GGUFReader(str(all_types)).data_offset
    rnd = random.Random(0)
    victims = [data[:n] for n in sorted(rnd.sample(range(len(data)), 60))]
    for _ in range(120):
        blob = bytearray(data)
        blob[rnd.randrange(header_end)] ^= 1 << rnd.randrange(8)
        victims.append(bytes(blob))
    failed = 0
    for i, blob in enumerate(victims):
        path = tmp_path / f"v{i}.gguf"
        path.write_bytes(blob)
        error = run_guarded(lambda p=path: exercise(p, "gguf"), max_bytes=16 << 20)
        if error is not None:
            failed += 1
            one_line_naming(error, tmp_path)
        path.unlink()
    assert failed >= 60  # every cut lost some tensor data


# ------------------------------------------------------------------------------ mapping: permute_rope, references

def _llama_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, verbatim in NumPy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def test_permute_rope_and_references(tmp_path):
    from convert import mapping

    w = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    td = convert.TensorDict.from_arrays({"q": w, "k": w[:8]}, {"local.hf.config": json.dumps(
        {"num_attention_heads": 4, "num_key_value_heads": 2, "nested": {"theta": 5.0}}), "gguf.h": '{"uint32":4}'})
    rules = mapping.loads("""schema: 1
rules:
  - match: q
    transforms: [{permute_rope: {heads: {config: num_attention_heads}}}]
  - match: k
    transforms: [{permute_rope: {heads: {config: [num_key_value_heads, num_attention_heads]}}}]
metadata:
  gguf.x: {float32: {config: nested.theta}}
  gguf.y: {uint32: {config: absent, default: 7}}
  gguf.z: {uint32: {config: absent, default: null}}
  plain: hello
""")
    out, report = mapping.apply(td, [rules])
    assert same_values(out["q"].numpy(), _llama_permute(w, 4, 4))
    assert same_values(out["k"].numpy(), _llama_permute(w[:8], 4, 2))
    assert {k: out.metadata[k] for k in ("gguf.x", "gguf.y", "plain")} == {
        "gguf.x": '{"float32":5.0}', "gguf.y": '{"uint32":7}', "plain": "hello"}
    assert "gguf.z" not in out.metadata
    assert "permute_rope(heads=4)" in report.to_text()
    back, _ = mapping.apply(out, [mapping.loads("""schema: 1
rules:
  - match: '[qk]'
    transforms: [{permute_rope: {heads: {meta: gguf.h}, reverse: true}}]
""")])
    assert same_values(back["q"].numpy(), w)
    with pytest.raises(MappingError, match="config.json beside the source"):
        mapping.apply(convert.TensorDict.from_arrays({"q": w}), [rules])
    with pytest.raises(MappingError, match=r"16 rows are not 3 heads"):
        mapping.apply(td, [mapping.loads("schema: 1\nrules:\n  - match: q\n    transforms: [{permute_rope: {heads: 3}}]\n"
                                         "  - match: k\n")])
    for bad in ("{permute_rope: {heads: 0}}", "{permute_rope: {heads: {config: a, meta: b}}}",
                "{permute_rope: {reverse: true}}", "{cast: q4_k}"):
        with pytest.raises(MappingError, match=r"<string>:\d+"):
            mapping.loads(f"schema: 1\nrules:\n  - match: q\n    transforms: [{bad}]\n")


# ------------------------------------------------------------------------------ Hugging Face Llama <-> llama.cpp

BLOCK_FRAMEWORKS = """
import sys
from convert.cli import main
code = main(sys.argv[1:])
assert all(sys.modules.get(m) is None for m in ("torch", "transformers", "tensorflow")), "a framework was imported"
sys.exit(code)
"""


def run_cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """The command line, in a child where torch, transformers, TensorFlow and accelerate cannot be imported."""
    env = blocker(folder, ("torch", "transformers", "tensorflow", "accelerate"), {**os.environ, "PYTHONPATH": str(ROOT)})
    out = subprocess.run([sys.executable, "-c", BLOCK_FRAMEWORKS, *args], capture_output=True, text=True, cwd=ROOT,
                         env=env)
    assert out.returncode == 0, out.stderr
    return out


def test_tiny_llama_to_gguf_loads_in_transformers_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                      rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "hf")  # model.safetensors + config.json
    out_dir = tmp_path / "gguf"
    out_dir.mkdir()
    gguf_file = out_dir / "model.gguf"
    run_cli(tmp_path, "safetensors", str(tmp_path / "hf" / "model.safetensors"), "--to", "gguf", "--map", "hf-llama-to-gguf",
            "-o", str(gguf_file), "--quiet")

    # the q/k rows are in llama.cpp's converter's order, the rest as they were
    values = gguf_values(gguf_file)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert same_values(values["blk.1.attn_q.weight"], _llama_permute(state["model.layers.1.self_attn.q_proj.weight"], 8, 8))
    assert same_values(values["blk.1.attn_k.weight"], _llama_permute(state["model.layers.1.self_attn.k_proj.weight"], 8, 2))
    assert same_values(values["blk.0.ffn_down.weight"], state["model.layers.0.mlp.down_proj.weight"])
    fields = gguf_fields(gguf_file)
    assert fields["general.architecture"][1] == "llama" and fields["llama.attention.head_count_kv"][1] == 2

    loaded = transformers.LlamaForCausalLM.from_pretrained(out_dir, gguf_file="model.gguf", dtype=torch.float32).eval()
    tokens = torch.tensor([[1, 17, 42, 5, 88, 3, 64, 2]])
    with torch.no_grad():
        want, got = model(tokens).logits, loaded(tokens).logits
    assert float((want - got).abs().max()) < 1e-4

    # and back: gguf-to-hf-llama gives the original state dict bit for bit
    back = tmp_path / "back.safetensors"
    run_cli(tmp_path, "gguf", str(gguf_file), "--to", "safetensors", "--map", "gguf-to-hf-llama", "-o", str(back), "--quiet")
    got_state = safetensors_read(back)
    assert set(got_state) == set(state)
    for name, arr in state.items():
        assert same_values(got_state[name], arr), name


def test_quantized_llama_gguf_to_hf_matches_transformers_dequantizing_it(tmp_path):
    """A Q8_0 GGUF (quantized by gguf from our F32 one) -> safetensors with --dtype float32: the same
    weights transformers' GGUF loader makes of it, so the same logits."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    f32 = tmp_path / "f32.gguf"
    convert.convert(tmp_path / "hf" / "model.safetensors", f32, to="gguf", maps=["hf-llama-to-gguf"])
    qdir = tmp_path / "q"
    qdir.mkdir()
    reader = gguf.GGUFReader(str(f32))
    writer = gguf.GGUFWriter(str(qdir / "model.gguf"), "")
    for key, value in convert.read(f32).metadata.items():
        if key.startswith("gguf."):
            (tname, v), = json.loads(value).items()
            writer.add_key_value(key[5:], v, GGUFValueType[tname.upper()])
    for t in reader.tensors:
        data = np.asarray(t.data).reshape(tuple(reversed([int(d) for d in t.shape])))
        if data.ndim == 2:
            writer.add_tensor(t.name, quantize(data, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert convert.read(qdir / "model.gguf")["blk.0.attn_q.weight"].dtype.name == "q8_0"

    out = tmp_path / "hf-back"
    out.mkdir()
    convert.convert(qdir / "model.gguf", out / "model.safetensors", to="safetensors", maps=["gguf-to-hf-llama"],
                    dtype="float32")
    config.save_pretrained(out)
    ours = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(qdir, gguf_file="model.gguf", dtype=torch.float32).eval()
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    tokens = torch.tensor([[1, 7, 30, 2]])
    with torch.no_grad():
        assert torch.equal(ours(tokens).logits, theirs(tokens).logits)
