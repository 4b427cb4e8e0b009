"""NumPy .npz: the contract, what np.savez / np.savez_compressed write, lazy regions of stored members,
hostile archives, and conversions npz <-> safetensors <-> torch. The seeds (cut, flipped, fuzzed) and
the hand-built hostile .npy headers are declared on the contract class and run by the shared suites
(tests/test_hostile.py, tests/test_fuzz.py).

Oracles: ``numpy.load(allow_pickle=False)`` (reads every output), ``np.savez`` / ``np.savez_compressed``
(write the inputs, and the bytes an npz output must equal), the ``safetensors`` library and ``torch.load``.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from fuzzing import Seed, exercise, one_line_naming, run_guarded

import convert
from convert import crc
from convert.errors import ConvertError, CorruptFileError, ReadError, WriteError
from convert.formats import npz as ours
from convert.ir import BytesSource, FileRegion, Tensor, TensorDict

from contract import FormatContract, same_values
from oracles import safetensors_read, torch_to_numpy

SMALL = 8 << 20  # traced bytes a refused hostile file may cost


def numpy_read(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv1/w": rng.standard_normal((3, 3, 1, 8)).astype(np.float32),
        "layer.0/attn.q": rng.integers(-100, 100, (5,), dtype=np.int64),
        "half": rng.standard_normal((4, 2)).astype(np.float16),
        "flags": np.array([True, False, True]),
        "z": (rng.standard_normal(3) + 1j).astype(np.complex128),
        "u16": np.arange(7, dtype=np.uint16),
        "scalar": np.float64(2.5),
        "empty": np.zeros((0, 4), np.int32),
    }


def savez(path: Path, values: dict, compressed: bool = False) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **values)
    return path


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _zip(path: Path, members: dict[str, bytes], method=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _refused(path: Path, error=ConvertError, match: str | None = None) -> ConvertError:
    e = run_guarded(lambda: exercise(path, "npz"), max_bytes=SMALL)
    assert isinstance(e, error), f"{path.name}: {e!r}"
    one_line_naming(e, path.parent)
    if match:
        assert match in str(e), str(e)
    return e


def _header(d: str, version: bytes = b"\x01\x00") -> bytes:
    text = d.encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    size = struct.pack("<H" if version == b"\x01\x00" else "<I", len(text))
    return b"\x93NUMPY" + version + size + text


HOSTILE_NPY = {
    "bad_magic": (b"\x93NUMPX\x01\x00" + b"\0" * 64, "not a readable .npy array"),
    "version_9": (b"\x93NUMPY\x09\x00" + b"\0" * 64, "not a readable .npy array"),
    "not_a_dict": (_header("[1, 2, 3]"), "not a readable .npy array"),
    "missing_key": (_header("{'descr': '<f4', 'shape': (2,)}"), "not a readable .npy array"),
    "code_in_header": (_header("{'descr': __import__('os').system('false'), 'fortran_order': False, 'shape': ()}"),
                       "not a readable .npy array"),
    "huge_shape": (_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 1099511627776)}")
                   + b"\0" * 16, "needs 4835703278458516698824704"),
    "negative_dim": (_header("{'descr': '<f4', 'fortran_order': False, 'shape': (-4,)}"), "negative dimension"),
    "short_data": (_header("{'descr': '<f8', 'fortran_order': False, 'shape': (100,)}") + b"\0" * 8, "needs 800"),
    "header_past_member": (b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31), "expected 2147483648 bytes got 0"),
    "huge_header": (_header("{'descr': '<f4', 'fortran_order': False, 'shape': (0,)}" + " " * 20000),
                    "longer than numpy.load's limit"),
    "void": (_npy(np.zeros(2, "V3")), "dtype '|V3'"),
    "datetime": (_npy(np.zeros(2, "M8[s]")), "dtype '<M8[s]'"),
    "structured": (_npy(np.zeros(2, [("a", "<f4"), ("b", "<i2")])), "structured dtype"),
    "pickled_object": (_header("{'descr': '|O', 'fortran_order': False, 'shape': (1,)}") + b"\x80\x04N.",
                       "object array"),
}




def _hostile(data: bytes, method: int, match: str):
    def build(folder: Path):
        return _zip(folder / "hostile.npz", {"w.npy": data}, method), CorruptFileError, re.escape(match)
    return build


def _seeds(root: Path) -> list[Seed]:
    """np.savez and np.savez_compressed of every dtype numpy.load reads, a scalar, an empty array, a
    Fortran-order and a big-endian one."""
    values = arrays() | {"fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
                         "big_endian": np.arange(5, dtype=">i4"), "bytes": np.array([b"ab", b"c"])}
    seeds = []
    for name, compressed in (("npz_stored", False), ("npz_compressed", True)):
        (root / name).mkdir()
        savez(root / name / "arrays.npz", values, compressed)
        seeds.append(Seed(name, "npz", root / name, "arrays.npz", ("arrays.npz",)))
    return seeds


class TestNpzContract(FormatContract):
    FORMAT = "npz"
    SEEDS = ("npz_stored", "npz_compressed")
    FUZZ = {"npz": (SEEDS, "raw")}
    HOSTILE = {f"{method_name}-{case}": _hostile(data, method, match) for case, (data, match) in HOSTILE_NPY.items()
               for method_name, method in (("stored", zipfile.ZIP_STORED), ("deflated", zipfile.ZIP_DEFLATED))}

    def oracle_read(self, path):
        return numpy_read(path)

    @classmethod
    def make_seeds(cls, root):
        return _seeds(root)


# ---- what numpy writes, read --------------------------------------------------------------------

@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
def test_reads_what_numpy_writes(tmp_path, compressed):
    path = savez(tmp_path / "a.npz", arrays(), compressed)
    assert convert.registry.detect(path).name == "npz"
    td = convert.read(path)
    expected = numpy_read(path)
    assert list(td) == list(expected)
    for name, arr in expected.items():
        assert same_values(td[name].numpy(), arr), name
        assert td[name].tobytes() == arr.tobytes(), name
    regions = [isinstance(t.source, FileRegion) for t in td.values()]
    assert all(regions) if not compressed else not any(regions)  # compressed: streamed through zipfile


def test_stored_members_are_file_regions_at_their_data(tmp_path):
    values = arrays()
    path = savez(tmp_path / "a.npz", values)
    data = path.read_bytes()
    td = convert.read(path)
    for name, arr in values.items():
        src = td[name].source
        assert isinstance(src, FileRegion), name
        assert data[src.offset:src.offset + src.length] == np.ascontiguousarray(arr).tobytes(), name


def test_large_stored_member_is_copied_not_loaded(tmp_path):
    import tracemalloc

    big = np.arange(6 << 20, dtype=np.float32)  # 24 MiB
    path = savez(tmp_path / "big.npz", {"big": big, "small": np.ones(3, np.float32)})
    tracemalloc.start()
    try:
        summary = convert.convert(path, tmp_path / "big.safetensors", to="safetensors")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary["outputs"][0]["verified"]
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB traced for a 24 MiB tensor"
    assert same_values(safetensors_read(tmp_path / "big.safetensors")["big"], big)


def test_fortran_order_and_big_endian_are_read_in_c_order(tmp_path):
    base = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    values = {"fortran": np.asfortranarray(base), "big_endian": base.astype(">i4"),
              "both": np.asfortranarray(base.astype(">f4")), "c64be": (base + 1j).astype(">c8")}
    for compressed in (False, True):
        path = savez(tmp_path / f"f{compressed}.npz", values, compressed)
        with zipfile.ZipFile(path) as z:
            assert b"'fortran_order': True" in z.read("fortran.npy")[:128]
        td = convert.read(path)
        for name, arr in numpy_read(path).items():
            got = td[name].numpy()
            assert got.dtype == arr.dtype.newbyteorder("<") and np.array_equal(got, arr), name
            assert got.flags.c_contiguous


def test_byte_strings_and_unicode_read_as_string_tensors(tmp_path):
    values = {"s": np.array([b"ab", b"", b"\x00\xff"]), "u": np.array([["h\u00e9", "x"], ["", "\u2713"]])}
    path = savez(tmp_path / "s.npz", values)
    td = convert.read(path)
    assert td["s"].dtype.name == "string" and td["s"].numpy().tolist() == [b"ab", b"", b"\x00\xff"]
    assert td["u"].numpy().tolist() == [[s.encode() for s in row] for row in values["u"].tolist()]
    with pytest.raises(WriteError, match="npz cannot hold string tensors: s, u"):
        convert.convert(path, tmp_path / "back.npz", to="npz")


def test_object_arrays_are_refused_in_one_line_naming_the_file(tmp_path):
    path = tmp_path / "o.npz"
    np.savez(path, ok=np.ones(2), obj=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError):  # the oracle refuses it too
        numpy_read(path)
    with pytest.raises(CorruptFileError) as e:
        convert.read(path)
    one_line_naming(e.value, tmp_path)
    assert "obj" in str(e.value) and "object array" in str(e.value)


def test_a_member_that_is_not_npy_is_refused(tmp_path):
    path = tmp_path / "x.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("w.npy", _npy(np.ones(2, np.float32)))
        z.writestr("README.txt", b"hello")
    with pytest.raises(ReadError, match="README.txt.*not a .npy array"):
        convert.read(path)


def test_crc32_combine_is_zlibs():
    rng = np.random.default_rng(1)
    for n1, n2 in [(0, 0), (1, 0), (0, 5), (128, 1), (100, 1000), (7, 65537)]:
        a, b = rng.bytes(n1), rng.bytes(n2)
        assert crc.combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
        assert zlib.crc32(a + b) ^ crc.shift(zlib.crc32(a), len(b)) == zlib.crc32(b)


def test_a_stored_region_carries_the_crc32_of_its_own_bytes(tmp_path):
    values = arrays()
    td = convert.read(savez(tmp_path / "a.npz", values))
    for name, arr in values.items():
        assert td[name].source.crc32 == zlib.crc32(np.ascontiguousarray(arr).tobytes()), name


# ---- what we write, read by numpy ---------------------------------------------------------------

def test_output_is_byte_identical_to_np_savez(tmp_path):
    values = arrays()
    convert.write(TensorDict.from_arrays(values), tmp_path / "ours.npz", "npz")
    np.savez(tmp_path / "numpy.npz", **values)
    assert (tmp_path / "ours.npz").read_bytes() == (tmp_path / "numpy.npz").read_bytes()


def test_every_member_is_stored_with_zip64_fields_and_fixed_timestamps(tmp_path):
    out = tmp_path / "o.npz"
    convert.write(TensorDict.from_arrays(arrays()), out, "npz")
    with zipfile.ZipFile(out) as z:
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED and info.date_time == (1980, 1, 1, 0, 0, 0)
            assert z.read(info).startswith(b"\x93NUMPY\x01\x00")
    data = out.read_bytes()
    assert data.count(b"PK\x03\x04") == len(arrays())
    # the local headers carry a zip64 extra field (id 1), as np.savez's force_zip64 writes them
    first_extra = struct.unpack_from("<H", data, 30 + struct.unpack_from("<H", data, 26)[0])[0]
    assert first_extra == 1


def test_headers_are_version_1_even_for_64_large_dimensions_and_more_are_refused(tmp_path):
    shape = (1,) * 63 + (0,)  # NumPy's limit of dimensions: the header still fits 1.0's 65535 bytes
    td = TensorDict([Tensor("deep", convert.dtypes.FLOAT32, shape, BytesSource(b""))])
    out = tmp_path / "deep.npz"
    convert.write(td, out, "npz")
    with zipfile.ZipFile(out) as z:
        assert z.read("deep.npy")[6:8] == b"\x01\x00"
    assert numpy_read(out)["deep"].shape == shape
    td = TensorDict([Tensor("deeper", convert.dtypes.FLOAT32, (1,) * 65, BytesSource(b"1234"))])
    with pytest.raises(WriteError, match="deeper.*at most 64 dimensions"):
        convert.write(td, tmp_path / "deeper.npz", "npz")


def test_reads_version_2_and_3_headers(tmp_path):
    arr = np.arange(6, dtype=np.int16).reshape(2, 3)
    members = {}
    for version in ((2, 0), (3, 0)):
        buf = io.BytesIO()
        np.lib.format.write_array(buf, arr, version=version)
        members[f"v{version[0]}.npy"] = buf.getvalue()
    path = _zip(tmp_path / "v.npz", members)
    td = convert.read(path)
    for name, got in numpy_read(path).items():
        assert same_values(td[name].numpy(), got) and same_values(got, arr)
        assert isinstance(td[name].source, FileRegion)


def test_bfloat16_and_float8_are_refused_as_numpy_cannot_read_them_back(tmp_path):
    import ml_dtypes

    for dt in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn):  # what np.savez would make of them
        np.savez(tmp_path / "ml.npz", x=np.zeros(2, dt))
        assert numpy_read(tmp_path / "ml.npz")["x"].dtype != np.dtype(dt)
        assert not ours.holds(convert.dtypes.from_numpy(np.dtype(dt)))
    td = TensorDict([Tensor.from_array("b", np.zeros(2, ml_dtypes.bfloat16))])
    with pytest.raises(WriteError, match=r"npz cannot hold bfloat16 tensors: b \(convert them with --dtype float32"):
        convert.write(td, tmp_path / "x.npz", "npz")


def test_names_with_nul_are_refused(tmp_path):
    td = TensorDict([Tensor.from_array("a\0b", np.ones(2))])
    with pytest.raises(WriteError, match="NUL"):
        convert.write(td, tmp_path / "x.npz", "npz")
    assert not list(tmp_path.iterdir())


def test_metadata_is_left_out_with_a_note(tmp_path):
    td = TensorDict.from_arrays({"w": np.ones(2, np.float32)}, {"user.note": "hi", "tf.global_step": "3"})
    summary = convert.write(td, tmp_path / "m.npz", "npz")
    assert summary["notes"] == ["npz holds no metadata; left out: user.note, tf.global_step"]


# ---- conversions, checked by the other side's library -------------------------------------------

def test_npz_to_safetensors_and_torch_and_back(tmp_path):
    torch = pytest.importorskip("torch")
    values = {k: v for k, v in arrays().items() if v.dtype != np.complex128}  # safetensors has no C128
    src = savez(tmp_path / "src.npz", values, compressed=True)
    convert.convert(src, tmp_path / "a.safetensors", to="safetensors")
    got = safetensors_read(tmp_path / "a.safetensors")
    assert set(got) == set(values) and all(same_values(got[k], v) for k, v in values.items())
    convert.convert(src, tmp_path / "a.pt", to="torch")
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    assert all(same_values(torch_to_numpy(loaded[k]), v) for k, v in values.items())
    convert.convert(tmp_path / "a.pt", tmp_path / "from_torch.npz", to="npz")
    convert.convert(tmp_path / "a.safetensors", tmp_path / "from_st.npz", to="npz")
    for out in ("from_torch.npz", "from_st.npz"):
        got = numpy_read(tmp_path / out)
        assert set(got) == set(values) and all(same_values(got[k], v) for k, v in values.items()), out


def test_written_by_libraries_to_npz(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file

    values = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([-1, 2], np.int16)}
    save_file(values, str(tmp_path / "lib.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in values.items()}, tmp_path / "lib.pt")
    for src in ("lib.safetensors", "lib.pt"):
        out = tmp_path / (src + ".npz")
        assert convert.convert(tmp_path / src, out, to="npz")["outputs"][0]["verified"]
        got = numpy_read(out)
        assert set(got) == set(values) and all(same_values(got[k], v) for k, v in values.items()), src


# ---- hostile archives ---------------------------------------------------------------------------

def test_flipped_data_bit_of_a_stored_member_is_detected_by_its_crc(tmp_path):
    path = savez(tmp_path / "a.npz", {"w": np.arange(1 << 19, dtype=np.float32)})  # 2 MiB: the kernel copy path
    region = convert.read(path)["w"].source
    data = bytearray(path.read_bytes())
    data[region.offset + region.length // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(zipfile.BadZipFile):
        numpy_read(path)  # numpy sees it too
    e = _refused(path, CorruptFileError, "checksum mismatch")
    assert "w" in str(e)
    with pytest.raises(CorruptFileError, match="checksum mismatch"):
        convert.convert(path, tmp_path / "out.safetensors", to="safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_flipped_bit_of_a_compressed_member_is_a_convert_error(tmp_path):
    path = savez(tmp_path / "a.npz", {"w": np.arange(4096, dtype=np.float32)}, compressed=True)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    _refused(path, ConvertError)


def test_path_traversal_member_names_are_only_keys(tmp_path):
    folder = tmp_path / "inner"
    folder.mkdir()
    members = {"../../evil.npy": _npy(np.ones(2, np.float32)), "/abs/path.npy": _npy(np.zeros(1, np.int8)),
               "a/../b.npy": _npy(np.arange(3, dtype=np.int16))}
    path = _zip(folder / "t.npz", members)
    before = sorted(p for p in tmp_path.rglob("*"))
    td = convert.read(path)
    expected = numpy_read(path)
    assert set(td) == set(expected) == {"../../evil", "/abs/path", "a/../b"}
    for k, v in expected.items():
        assert same_values(td[k].numpy(), v)
    convert.convert(path, folder / "t2.npz", to="npz")
    assert numpy_read(folder / "t2.npz").keys() == expected.keys()
    assert sorted(p for p in tmp_path.rglob("*")) == sorted([*before, folder / "t2.npz"])


def test_duplicate_members_are_refused(tmp_path):
    path = tmp_path / "dup.npz"
    with pytest.warns(UserWarning):
        _zip(path, {"w.npy": _npy(np.ones(2))})
        with zipfile.ZipFile(path, "a") as z:
            z.writestr("w.npy", _npy(np.zeros(2)))
    _refused(path, CorruptFileError, "appears twice")


def test_deflate_bomb_claim_is_refused_before_inflating(tmp_path):
    path = _zip(tmp_path / "bomb.npz", {"w.npy": _npy(np.zeros(1 << 16, np.uint8))}, zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("w.npy")
    central = data.rindex(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 0xFFFFFFF0)  # the uncompressed size the directory claims
    path.write_bytes(bytes(data))
    assert info.compress_size < 1024
    _refused(path, CorruptFileError, "more than deflate can expand")


def test_no_local_header_where_the_directory_says(tmp_path):
    path = savez(tmp_path / "a.npz", {"a": np.ones(3), "b": np.zeros(2)})
    data = bytearray(path.read_bytes())
    second = data.index(b"PK\x03\x04", 1)
    data[second:second + 4] = b"XXXX"
    path.write_bytes(bytes(data))
    _refused(path, CorruptFileError, "no local file header")


def test_empty_archive_reads_as_empty(tmp_path):
    np.savez(tmp_path / "empty.npz")
    assert len(convert.read(tmp_path / "empty.npz")) == 0
    convert.write(TensorDict([]), tmp_path / "ours.npz", "npz")
    assert numpy_read(tmp_path / "ours.npz") == {}


@pytest.mark.slow
def test_member_over_4_gib_and_offsets_past_it_use_zip64(tmp_path):
    """A 4 GiB + 16 B member (a sparse file of zeros as its source, streamed) and a small one after
    it, whose offset needs zip64 in the central directory: zipfile and numpy.load read both."""
    n = (4 << 30) + 16
    sparse = tmp_path / "zeros.bin"
    with open(sparse, "wb") as f:
        f.truncate(n)
    small = np.arange(5, dtype=np.int16)
    td = TensorDict([Tensor("big", convert.dtypes.by_name("uint8"), (n,), FileRegion(str(sparse), 0, n)),
                     Tensor.from_array("small", small)])
    out = tmp_path / "big.npz"
    try:
        assert convert.write(td, out, "npz")["verified"]
        with zipfile.ZipFile(out) as z:
            big, after = z.getinfo("big.npy"), z.getinfo("small.npy")
            assert big.file_size > 0xFFFFFFFF and after.header_offset > 0xFFFFFFFF
            with z.open(big) as member:
                version = np.lib.format.read_magic(member)
                assert np.lib.format.read_array_header_1_0(member)[0] == (n,) and version == (1, 0)
                member.seek(big.file_size - 16)
                assert member.read() == b"\0" * 16
        with np.load(out, allow_pickle=False) as z:
            assert same_values(z["small"], small)
        back = convert.read(out)
        assert isinstance(back["big"].source, FileRegion) and back["big"].source.length == n
        assert same_values(back["small"].numpy(), small)
    finally:
        out.unlink(missing_ok=True)
        sparse.unlink()
