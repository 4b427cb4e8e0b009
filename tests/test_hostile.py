"""Broken and hostile input (issue 9, the reader half).

Every reader refuses damaged or malicious input with a :class:`~convert.errors.ConvertError` that is
one line naming the file: never another exception, a hang, an allocation a header asked for, or code
from the file run. "Reading" is always the whole of it (:func:`fuzzing.exercise`): every adapter's
``detect``, the reader, and every tensor's data (readers are lazy).

* Systematic damage to real files: the seeds of ``tests/fuzzing.py`` (written here by TensorFlow,
  torch, onnx and safetensors, and other people's files from the corpus), each of their files cut at
  many points, bits flipped, blocks zeroed or filled with 0xFF, magic numbers changed. Where the
  format has checksums (LevelDB table blocks: V2 ``.index``, V1 files; V2 data: each tensor's crc32c)
  every flipped bit is detected; torch zips check their records' CRC-32s (which ``torch.load`` does
  not). Formats without checksums (safetensors, ONNX, legacy torch files) may read a flipped data bit
  as a different value: there the test asks only "reads or ConvertError".
* Hostile headers built by hand, a few bytes each: shapes claiming terabytes, offsets past the end,
  negative and overflowing lengths, block handles outside the file, zip records lying about their
  size, ONNX external data leaving the model's folder; refused with a precise message while the
  traced memory stays under a few MB.
* Malicious pickles by every route the pickle machine offers; the payload (which a plain
  ``pickle.loads`` does run: checked in a child process) never runs.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import re
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import fuzzing
import google_crc32c
import numpy as np
import pytest
from fuzzing import (
    TABLE_MAGIC,
    clone,
    exercise,
    masked_crc,
    one_line_naming,
    pb_bytes,
    pb_fixed32,
    pb_varint,
    replace_file,
    run_guarded,
    sstable,
    table_block,
    varint,
    with_trailer,
)

import convert
from convert import cli
from convert.errors import ConvertError, CorruptFileError, ReadError
from convert.formats.tf_checkpoint import metagraph

import contract

SMALL = 8 << 20  # traced bytes a refused hostile file may cost
SEED_NAMES = fuzzing.seed_names()  # ours and those the formats' test files declare (contract.py)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    found = {s.name: s for s in fuzzing.session_seeds(tmp_path_factory)}
    tracemalloc.start()  # once for the module (after TensorFlow wrote the seeds): per read it costs more
    yield found
    tracemalloc.stop()


def _seed(seeds, name):
    if name not in seeds:
        pytest.skip(f"corpus seed {name} is not available")
    return seeds[name]


class Damage:
    """One copy of a seed in a scratch folder, in which one file at a time is replaced by damaged bytes."""

    def __init__(self, seed, tmp_path):
        self.seed = seed
        self.folder = tmp_path / "copy"
        self.target = clone(seed, self.folder)
        self.damaged: str | None = None

    def read(self, file: str, data: bytes, *, full: bool = True) -> tuple[BaseException | None, Path]:
        """Read the seed with ``file`` replaced by ``data``; the ConvertError (or None) and the copy's folder.

        ``full``: also every adapter's detect (the checksum tests skip it: they read thousands of variants).
        """
        if self.damaged not in (None, file):
            replace_file(self.folder / self.damaged, (self.seed.root / self.damaged).read_bytes())
        self.damaged = file
        replace_file(self.folder / file, data)
        if full:
            err = run_guarded(lambda: exercise(self.target, self.seed.format))
        else:
            err = run_guarded(lambda: fuzzing.read_all(self.target, self.seed.format))
        if err is not None:
            one_line_naming(err, self.folder)
        return err, self.folder


def _spread(length: int, edge: int, middle: int) -> list[int]:
    """Positions in [0, length): every one of the first and last ``edge``, ``middle`` evenly between."""
    points = set(range(min(edge, length))) | set(range(max(0, length - edge), length))
    if length:
        points |= {i * length // middle for i in range(middle)}
    return sorted(p for p in points if p < length)


def _footer_padding(data: bytes) -> range:
    """The zero padding of a LevelDB table footer (after its two block handles, before the magic):
    the one part of a table no checksum covers and no reader looks at."""
    pos = len(data) - 48
    for _ in range(4):  # two handles of two varints each
        while data[pos] & 0x80:
            pos += 1
        pos += 1
    return range(pos, len(data) - 8)


# ------------------------------------------------------------------------------- damage to real files

@pytest.mark.parametrize("name", SEED_NAMES)
def test_truncated_anywhere_is_a_convert_error(seeds, name, tmp_path):
    """Cut at every one of the first and last 64 bytes and at 64 points between: always refused
    (only the files that feed nothing but metadata may lose their tail unnoticed)."""
    seed = _seed(seeds, name)
    damage = Damage(seed, tmp_path)
    for file in seed.files:
        data = (seed.root / file).read_bytes()
        for cut in _spread(len(data), 64, 64):
            err, _ = damage.read(file, data[:cut])
            if file not in seed.metadata_only:
                assert err is not None, f"{file} cut at {cut} of {len(data)} bytes read without complaint"


@pytest.mark.parametrize("name", SEED_NAMES)
def test_flipped_bits_read_or_convert_error(seeds, name, tmp_path):
    """A flipped bit at 192 places of each file: read (a format without checksums cannot tell a
    changed value) or a ConvertError; never anything else."""
    seed = _seed(seeds, name)
    damage = Damage(seed, tmp_path)
    for file in seed.files:
        data = (seed.root / file).read_bytes()
        for pos in _spread(len(data), 32, 128):
            flipped = bytearray(data)
            flipped[pos] ^= 1 << (pos * 5 % 8)
            damage.read(file, bytes(flipped))


CHECKSUMMED = [(s, f) for s in SEED_NAMES for f in dict(
    (c[0], c[5]) for c in fuzzing._CORPUS_SEEDS).get(s, ())] + [
    ("tf_v2", "model.ckpt.index"), ("tf_v2", "model.ckpt.data-00000-of-00001"), ("tf_v1", "model.ckpt"),
    ("saved_model", "variables/variables.index"), ("saved_model", "variables/variables.data-00000-of-00001")]


@pytest.mark.parametrize("name,file", CHECKSUMMED, ids=[f"{s}:{f}" for s, f in CHECKSUMMED])
def test_every_flipped_bit_of_a_checksummed_file_is_detected(seeds, name, file, tmp_path):
    """V2 data shards (a crc32c per tensor) and LevelDB tables (a crc32c per block: V2 ``.index``,
    V1 checkpoints): a bit flipped in any byte, a different bit each time, is a CorruptFileError.
    The only exception is the footer's zero padding, which no reader (TensorFlow's included) looks at;
    a flip in the table magic may also read as "not a TensorFlow checkpoint" (a ReadError)."""
    seed = _seed(seeds, name)
    assert file in seed.checksummed
    data = (seed.root / file).read_bytes()
    table = data.endswith(TABLE_MAGIC)
    padding = _footer_padding(data) if table else range(0)
    damage = Damage(seed, tmp_path)
    positions = range(len(data)) if len(data) <= 1024 else _spread(len(data), 256, 512)
    undetected = []
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 1 << (pos % 8)
        err, _ = damage.read(file, bytes(flipped), full=False)
        if pos in padding:
            continue
        if table and pos >= len(data) - 8:
            assert isinstance(err, ConvertError), f"flip in the magic at {pos}"
        elif not isinstance(err, CorruptFileError):
            undetected.append((pos, err))
    assert not undetected, f"{len(undetected)} of {len(positions)} flips not detected: {undetected[:5]}"


@pytest.mark.parametrize("name", SEED_NAMES)
def test_zeroed_and_filled_blocks(seeds, name, tmp_path):
    """16 bytes zeroed, or set to 0xFF (endless varints, huge lengths), at 24 places of each file:
    read or ConvertError; in a checksummed file, always a CorruptFileError (or the table magic's ReadError)."""
    seed = _seed(seeds, name)
    damage = Damage(seed, tmp_path)
    for file in seed.files:
        data = (seed.root / file).read_bytes()
        padding = _footer_padding(data) if data.endswith(TABLE_MAGIC) else range(0)
        for pos in _spread(len(data), 0, 24):
            for fill in (0x00, 0xFF):
                block = bytearray(data)
                block[pos:pos + 16] = bytes([fill]) * len(block[pos:pos + 16])
                if bytes(block) == data:
                    continue
                err, _ = damage.read(file, bytes(block))
                changed = [i for i in range(pos, min(pos + 16, len(data))) if data[i] != block[i]]
                if file in seed.checksummed and not all(i in padding for i in changed):
                    assert isinstance(err, (CorruptFileError, ReadError)), f"{file}: {fill:#x} at {pos} not detected"


def _wrong_magic(seed) -> tuple[str, bytes]:
    """The seed's main file with its format's magic number changed."""
    file = seed.target if seed.target != "." else next(f for f in seed.files if f.endswith((".index", ".json")))
    data = (seed.root / file).read_bytes()
    if data.endswith(TABLE_MAGIC):
        return file, data[:-8] + b"\x57\xfb\x80\x8b\x24\x75\x47\xdc"  # LevelDB's magic, one byte off
    if data.startswith(b"PK\x03\x04"):
        return file, b"PK\x05\x06" + data[4:]
    if data.startswith(b"\x80\x02\x8a\x0a"):  # torch legacy: the pickled magic number
        return file, data[:4] + bytes([data[4] ^ 0xFF]) + data[5:]
    if file.endswith(".safetensors"):
        return file, struct.pack("<Q", 1 << 62) + data[8:]
    if file.endswith(".json"):
        return file, b"[" + data
    if file.endswith(".onnx"):
        return file, b"\x00" + data[1:]  # field number 0
    if data.startswith(b"\x89HDF\r\n\x1a\n"):  # HDF5's superblock signature, one byte off
        return file, data[:7] + b"\x0b" + data[8:]
    raise AssertionError(f"no magic known for {file}")


@pytest.mark.parametrize("name", SEED_NAMES)
def test_wrong_magic_exit_status_1_one_line_no_output(seeds, name, tmp_path, capsys):
    """A changed magic number: a ConvertError from the reader of the named format; from the command
    line, exit status 1, one line on stderr naming the file, no traceback and no output."""
    seed = _seed(seeds, name)
    file, data = _wrong_magic(seed)
    folder = tmp_path / "bad"
    target = clone(seed, folder)
    replace_file(folder / file, data)
    err = run_guarded(lambda: exercise(target, seed.format))
    assert err is not None
    one_line_naming(err, folder)
    capsys.readouterr()
    out = tmp_path / "out.safetensors"
    for argv in ([seed.format, str(target), "--to", "safetensors", "-o", str(out)],
                 ["auto", str(target), "--to", "safetensors", "-o", str(out)],
                 ["inspect", str(target)]):
        status = cli.main(argv)
        captured = capsys.readouterr()
        assert status == 1, (argv, captured.err)
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("convert: ") and "Traceback" not in captured.err, captured.err
        assert str(folder) in lines[0] and "internal error" not in lines[0], lines[0]
        assert not out.exists() and not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_torch_zip_crcs_are_checked(seeds, tmp_path):
    """torch zips carry a CRC-32 per record: a flipped bit in ``data.pkl`` or in a storage a tensor
    covers whole is a CorruptFileError, although ``torch.load`` (the oracle) reads the flipped
    storage without complaint (it checks no CRC)."""
    torch = pytest.importorskip("torch")

    seed = seeds["torch_zip"]
    data = (seed.root / seed.target).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = {i.filename.split("/", 1)[1]: i for i in zf.infolist()}

    def payload_offset(info):
        name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
        return info.header_offset + 30 + name_len + extra_len

    damage = Damage(seed, tmp_path)
    pkl = bytearray(data)
    pkl[payload_offset(infos["data.pkl"]) + 40] ^= 0x04
    err, _ = damage.read(seed.target, bytes(pkl))
    assert isinstance(err, CorruptFileError) and "CRC" in str(err), err

    storage = bytearray(data)
    storage[payload_offset(infos["data/0"]) + 1] ^= 0x40
    err, folder = damage.read(seed.target, bytes(storage))
    assert isinstance(err, CorruptFileError) and "crc32" in str(err) and "fc.weight" in str(err), err
    flipped = torch.load(folder / seed.target, weights_only=True)["state_dict"]["fc.weight"]
    original = torch.load(seed.path, weights_only=True)["state_dict"]["fc.weight"]
    assert not torch.equal(flipped, original)  # torch read the damage as data


# ------------------------------------------------------------------------------- hostile headers, by hand

def _refused(path: Path, fmt: str, error=ConvertError, match: str | None = None) -> ConvertError:
    """Reading ``path`` fails with ``error`` (whose message matches ``match``) at little memory cost."""
    err = run_guarded(lambda: exercise(path, fmt), max_bytes=SMALL)
    assert isinstance(err, error), f"expected {error.__name__}, got {err!r}"
    if match is not None:
        assert re.search(match, str(err)), str(err)
    assert str(path.parent if fmt in ("tf-ckpt", "onnx", "torch", "safetensors") else path) in str(err)
    return err


DECLARED = {f"{c.FORMAT}:{name}": (c.FORMAT, build) for c in contract.declared() for name, build in c.HOSTILE.items()}


@pytest.mark.parametrize("case", list(DECLARED))
def test_declared_hostile_case(case, tmp_path):
    """The hostile inputs a format's test file declares (``FormatContract.HOSTILE``)."""
    fmt, build = DECLARED[case]
    path, error, match = build(tmp_path)
    _refused(path, fmt, error, match)


def _reads(path: Path, fmt: str):
    assert run_guarded(lambda: exercise(path, fmt), max_bytes=SMALL) is None


def _shape(*dims: int) -> bytes:
    return b"".join(pb_bytes(2, pb_varint(1, d)) for d in dims)


def _extent(start: int, length: int | None = None) -> bytes:
    return pb_bytes(1, pb_varint(1, start) + (b"" if length is None else pb_varint(2, length)))


BUNDLE_HEADER = pb_varint(1, 1) + pb_bytes(3, pb_varint(1, 1))  # num_shards 1, version {producer 1}
DT_FLOAT, DT_STRING = 1, 7
TB = 1 << 20  # a dimension: two of them make 4 TB of float32


def _entry(dtype=DT_FLOAT, shape=b"", shard=0, offset=0, size=0, crc=None, slices=()) -> bytes:
    """BundleEntryProto (tensor_bundle.proto), field by field."""
    out = pb_varint(1, dtype) + pb_bytes(2, shape) + pb_varint(3, shard) + pb_varint(4, offset) + pb_varint(5, size)
    if crc is not None:
        out += pb_fixed32(6, crc)
    return out + b"".join(pb_bytes(7, s) for s in slices)


def _bundle(tmp_path: Path, entries: list[tuple[bytes, bytes]], data: bytes = b"\0" * 16,
            header: bytes = BUNDLE_HEADER) -> Path:
    (tmp_path / "m.data-00000-of-00001").write_bytes(data)
    index = tmp_path / "m.index"
    index.write_bytes(sstable(sorted([(b"", header), *entries])))
    return index


def _slice_key(name: bytes, extents: list[tuple[int, int]]) -> bytes:
    """``EncodeTensorNameSlice`` (tensorflow/core/util/saved_tensor_slice_util.cc), for small numbers:
    OrderedCode: 0 as an increasing number, the escaped name, the rank, signed (start, length) pairs."""
    def signed(v):  # OrderedCode WriteSignedNumIncreasing, |v| < 64: one byte
        assert -64 <= v < 64
        return bytes([(0x80 ^ v) & 0xFF])
    out = b"\x00" + name.replace(b"\xff", b"\xff\x00").replace(b"\x00", b"\x00\xff") + b"\x00\x01"
    out += bytes([1, len(extents)])
    for start, length in extents:
        out += signed(start) + signed(length)
    return out


def test_slice_key_helper_matches_tensorflow_files(seeds):
    """The hand-written slice key above is the key TensorFlow wrote for the partitioned seed."""
    from convert.formats.tf_checkpoint.sstable import TableReader

    keys = [k for k, _ in TableReader(seeds["tf_v2"].root / "model.ckpt.index").items()]
    assert _slice_key(b"part", [(0, 4), (0, -1)]) in keys


TABLE_CASES = {
    # name: (entries-or-bytes builder, message)
    "index_handle_past_eof": (lambda: sstable([(b"", BUNDLE_HEADER)], index_handle=(10**12, 100)), "runs past the end"),
    "index_handle_huge_size": (lambda: sstable([(b"", BUNDLE_HEADER)], index_handle=(0, 1 << 62)), "runs past the end"),
    "data_handle_outside": (lambda: sstable([(b"", BUNDLE_HEADER)], data_handle=(10**9, 10)), "runs past the end"),
    "data_handle_negative_as_varint": (lambda: sstable([(b"", BUNDLE_HEADER)], data_handle=(-1, 10)), "runs past the end"),
    "footer_endless_varint": (lambda: b"\xff" * 40 + TABLE_MAGIC, "bad table index"),
    "only_a_footer": (lambda: b"\x00" * 40 + TABLE_MAGIC, "checksum|bad table|runs past"),
    "restart_count_huge": (lambda: _raw_block_table(b"\x00" * 8 + b"\xff\xff\xff\xff"), "bad restart array"),
    "entry_value_length_huge": (lambda: _raw_block_table(varint(0) + varint(1) + varint(1 << 60) + b"k"
                                                         + (0).to_bytes(4, "little") + (1).to_bytes(4, "little")),
                                "bad block entry"),
    "entry_shares_more_than_the_key": (lambda: _raw_block_table(varint(9) + varint(1) + varint(0) + b"k"
                                                                + (0).to_bytes(4, "little") + (1).to_bytes(4, "little")),
                                       "bad block entry"),
    "unknown_compression": (lambda: _raw_block_table(table_block([(b"", BUNDLE_HEADER)]), ctype=9),
                            "unknown block compression type 9"),
    "bad_snappy": (lambda: _raw_block_table(b"\xff\xff\xff\xff\x0f" + b"\x00" * 16, ctype=1), "bad snappy block"),
}


def _raw_block_table(block: bytes, ctype: int = 0) -> bytes:
    """A table whose one data block is ``block`` (with a correct checksum), index and footer right."""
    out = bytearray(with_trailer(block, ctype))
    meta_at = len(out)
    empty = table_block([])
    out += with_trailer(empty)
    index = table_block([(b"\xff", varint(0) + varint(len(block)))])
    index_at = len(out)
    out += with_trailer(index)
    footer = varint(meta_at) + varint(len(empty)) + varint(index_at) + varint(len(index))
    return bytes(out + footer.ljust(40, b"\x00") + TABLE_MAGIC)


@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_hostile_table(case, tmp_path):
    build, message = TABLE_CASES[case]
    (tmp_path / "m.data-00000-of-00001").write_bytes(b"")
    index = tmp_path / "m.index"
    index.write_bytes(build())
    _refused(index, "tf-ckpt", CorruptFileError, message)
    v1 = tmp_path / "v1.ckpt"  # the same table as a V1 file
    v1.write_bytes(build())
    _refused(v1, "tf-ckpt", CorruptFileError, message)


BUNDLE_CASES = {
    "shape_claims_terabytes": ([(b"w", _entry(shape=_shape(TB, TB), size=16))],
                               CorruptFileError, r"entry size 16 does not match float32\[1048576, 1048576\]"),
    "offset_past_eof": ([(b"w", _entry(shape=_shape(1), offset=10**15, size=4))], CorruptFileError, "runs past the end"),
    "offset_plus_size_past_2_63": ([(b"w", _entry(shape=_shape(1), offset=(1 << 63) - 1, size=(1 << 63) - 1))],
                                   CorruptFileError, "runs past the end"),
    "negative_size": ([(b"w", _entry(shape=_shape(1), size=-4))], CorruptFileError, "negative offset, size"),
    "negative_offset": ([(b"w", _entry(shape=_shape(1), offset=-4, size=4))], CorruptFileError, "negative offset"),
    "negative_dimension": ([(b"w", _entry(shape=_shape(-1), size=4))], CorruptFileError, "dimension of unknown size"),
    "shape_beyond_any_array": ([(b"w", _entry(shape=_shape(0, 1 << 62, 4), size=0))], CorruptFileError,
                               "too large for any array"),
    "rank_100": ([(b"w", _entry(shape=_shape(*[1] * 100), size=4))], CorruptFileError, "rank 100"),
    "shard_out_of_range": ([(b"w", _entry(shape=_shape(1), shard=7, size=4))], CorruptFileError, "shard 7 of 1"),
    "string_count_terabytes": ([(b"w", _entry(DT_STRING, shape=_shape(TB, TB), size=16))], CorruptFileError,
                               "bad string tensor"),
    "unknown_dtype": ([(b"w", _entry(999, shape=_shape(1), size=4))], ReadError, "unsupported TensorFlow dtype 999"),
    "entry_not_a_message": ([(b"w", b"\xff" * 12)], CorruptFileError, "bad index entry"),
    "slice_outside_the_tensor": ([(b"w", _entry(shape=_shape(4), slices=[_extent(2, 9)])),
                                  (_slice_key(b"w", [(2, 9)]), _entry(shape=_shape(9), size=36))],
                                 CorruptFileError, "runs past the end|bad slice"),
    "slice_missing": ([(b"w", _entry(shape=_shape(4), slices=[_extent(0, 2)]))], CorruptFileError,
                      "slice of this partitioned variable is missing"),
}


@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_hostile_bundle_entry(case, tmp_path):
    entries, error, message = BUNDLE_CASES[case]
    _refused(_bundle(tmp_path, entries), "tf-ckpt", error, message)


def test_hostile_bundle_header(tmp_path):
    _refused(_bundle(tmp_path, [], header=pb_varint(1, (1 << 31) - 1)), "tf-ckpt", ReadError, "data shard .* missing")
    _refused(_bundle(tmp_path, [], header=pb_varint(1, -5)), "tf-ckpt", CorruptFileError, "bad number of shards")
    (tmp_path / "m.index").write_bytes(sstable([(b"w", _entry(shape=_shape(1), size=4))]))
    _refused(tmp_path / "m.index", "tf-ckpt", CorruptFileError, "no bundle header")


def test_partitioned_variable_of_empty_slices_claiming_terabytes(tmp_path):
    """Slices of zero length pass every per-slice size check; the full shape must be refused before
    the tensor is allocated (today: np.empty of 4 TB, a MemoryError)."""
    entries = [(b"w", _entry(shape=_shape(TB, TB), slices=[_extent(0, 0) + _extent(0)])),
               (_slice_key(b"w", [(0, 0), (0, -1)]), _entry(shape=_shape(0, TB), size=0))]
    _refused(_bundle(tmp_path, entries), "tf-ckpt", CorruptFileError, "larger than the data files|slices cover")


def _v1(tmp_path: Path, metas: list[bytes], slices: list[tuple[bytes, bytes]] = ()) -> Path:
    """A V1 checkpoint: key "" = SavedTensorSlices{meta = {tensor...}}, then the slices' data."""
    path = tmp_path / "v1.ckpt"
    meta = b"".join(pb_bytes(1, m) for m in metas)
    path.write_bytes(sstable(sorted([(b"", pb_bytes(1, meta)), *slices])))
    return path


def _v1_meta(name: bytes, shape: bytes, dtype: int, *slices: bytes) -> bytes:
    return pb_bytes(1, name) + pb_bytes(2, shape) + pb_varint(3, dtype) + b"".join(pb_bytes(4, s) for s in slices)


def _v1_slice(name: bytes, extents: bytes, tensor_proto: bytes) -> bytes:
    return pb_bytes(2, pb_bytes(1, name) + pb_bytes(2, extents) + pb_bytes(3, tensor_proto))


def test_hostile_v1(tmp_path):
    key = _slice_key(b"w", [(0, -1)])
    # one full slice claiming 4 TB, holding one value
    path = _v1(tmp_path, [_v1_meta(b"w", _shape(TB, TB), DT_FLOAT, _extent(0) + _extent(0))],
               [(_slice_key(b"w", [(0, -1), (0, -1)]), _v1_slice(b"w", _extent(0) + _extent(0), pb_bytes(5, b"\0" * 4)))])
    _refused(path, "tf-ckpt", CorruptFileError, "bad slice data|more elements than")
    # the slice's data is missing
    _refused(_v1(tmp_path, [_v1_meta(b"w", _shape(2), DT_FLOAT, _extent(0))]), "tf-ckpt", CorruptFileError,
             "data of a saved slice is missing")
    # a slice starting past the end of its dimension
    _refused(_v1(tmp_path, [_v1_meta(b"w", _shape(2), DT_FLOAT, _extent(5, 1))]), "tf-ckpt", CorruptFileError,
             "bad slice")
    # float_val as packed bytes of the wrong length: not whole values
    _refused(_v1(tmp_path, [_v1_meta(b"w", _shape(2), DT_FLOAT, _extent(0))],
                 [(key, _v1_slice(b"w", _extent(0), pb_bytes(5, b"\0" * 7)))]), "tf-ckpt", CorruptFileError,
             "bad slice data")
    # a meta that is not a message
    path = tmp_path / "v1.ckpt"
    path.write_bytes(sstable([(b"", b"\xff" * 9)]))
    _refused(path, "tf-ckpt", CorruptFileError, "bad checkpoint meta")


def test_hostile_v1_shapes_and_wire_types(tmp_path):
    # two slices claiming 4 TB between them, no data: refused before np.empty(4 TB)
    half = TB // 2
    meta = _v1_meta(b"w", _shape(TB, TB), DT_FLOAT, _extent(0, half) + _extent(0), _extent(half, half) + _extent(0))
    _refused(_v1(tmp_path, [meta]), "tf-ckpt", CorruptFileError, "more elements than the checkpoint has bytes")
    # float_val (fixed32) sent as a varint of 2**60: a protobuf type error, not an OverflowError
    key = _slice_key(b"w", [(0, -1)])
    path = _v1(tmp_path, [_v1_meta(b"w", _shape(2), DT_FLOAT, _extent(0))],
               [(key, _v1_slice(b"w", _extent(0), pb_varint(5, 1 << 60) + pb_varint(5, 1)))])
    _refused(path, "tf-ckpt", CorruptFileError, "wrong wire type")


def test_names_from_files_cannot_break_lines_or_drive_the_terminal(tmp_path, capsys):
    """Tensor names come from the file: one holding a newline or a terminal escape sequence is shown
    escaped (the error stays one line, the terminal is not cleared or recoloured), and one that looks
    like rich markup is shown as it is (not interpreted: '[/x]' crashed inspect, '[link=...]' hid)."""
    data = b"\0" * 4
    c = google_crc32c.value(data)
    ok = _entry(shape=_shape(1), size=4, crc=(((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)
    names = [b"[/x]", b"[link=file:///etc/passwd]click[/link]", b"red\x1b[31m\x1b[2J\x07"]
    index = _bundle(tmp_path, [(n, ok) for n in names], data=data)
    capsys.readouterr()
    assert cli.main(["inspect", str(index)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "[/x]" in out and "[link=file:///etc/passwd]click[/link]" in out and "red\\x1b[31m" in out
    bad = _bundle(tmp_path, [(b"bad\x1b[2J\nline2", _entry(shape=_shape(1), size=8))], data=data)
    assert cli.main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "bad\\x1b[2J\\nline2" in err, err


def test_keys_quoted_in_messages_are_escaped(tmp_path):
    """Messages quote more than tensor names: a torch storage key, a safetensors index's tensor name.
    Whatever they quote, a message is one line of printable text."""
    pkl = _tensor_pickle(4, (4,), (1,)).replace(b"X\x01\x00\x00\x000X\x03", b"X\x01\x00\x00\x00\x1bX\x03")
    path = _zip(tmp_path / "m.pt", {"m/data.pkl": pkl, "m/byteorder": b"little"})
    err = _refused(path, "torch", CorruptFileError, "is missing")
    assert str(err).isprintable(), str(err)
    folder = tmp_path / "sharded"
    folder.mkdir()
    _safetensors(folder / "a.safetensors", b"{}", data=b"")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x\n\x1b[2J": "a.safetensors"}}))
    err = _refused(folder, "safetensors", CorruptFileError, "in no shard")
    assert str(err).isprintable(), str(err)


def _string_tensor(strings: list[bytes]) -> tuple[bytes, int]:
    """A V2 string tensor's bytes (varint lengths, masked crc32c of the uint32 lengths, the bytes)
    and its entry's masked crc32c, as tensor_bundle.cc writes them."""
    lengths = b"".join(len(s).to_bytes(4, "little") for s in strings)
    crc_lengths = masked_crc(lengths).to_bytes(4, "little")
    data = b"".join(varint(len(s)) for s in strings) + crc_lengths + b"".join(strings)
    c = google_crc32c.value(lengths + crc_lengths + b"".join(strings))
    return data, (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@pytest.mark.parametrize("graph", [
    pb_bytes(1, pb_bytes(1, pb_varint(1, 1) + pb_varint(2, 1 << 40))),  # a name sent as a varint of 2**40
    pb_bytes(1, pb_bytes(1, pb_bytes(1, b"xx"))),  # a node id sent as bytes
    pb_bytes(1, pb_bytes(2, pb_varint(3, 1 << 62))),  # a checkpoint key sent as a varint
    b"",  # no nodes at all
], ids=["name_as_huge_varint", "node_id_as_bytes", "key_as_varint", "empty"])
def test_hostile_object_graph_allocates_nothing(graph, tmp_path):
    """A TF2 object graph with fields of the wrong wire type (a length where a string should be):
    ignored as protobuf ignores them, never ``bytes(2**40)``; the checkpoint reads."""
    data, crc = _string_tensor([graph])
    entry = _entry(DT_STRING, shape=b"", size=len(data), crc=crc)
    index = _bundle(tmp_path, [(b"_CHECKPOINTABLE_OBJECT_GRAPH", entry)], data=data)
    _reads(index, "tf-ckpt")


def test_object_graph_giving_two_variables_one_name(tmp_path):
    """Two variables whose keys unescape to the same path and share a full name (only a forged graph
    does that): both are read, the second under its raw key, rather than a nameless 'two tensors are
    named' error."""
    keys = [b"a.Sb/.ATTRIBUTES/VARIABLE_VALUE", b"a/b/.ATTRIBUTES/VARIABLE_VALUE"]
    attribute = [pb_bytes(2, pb_bytes(1, b"VARIABLE_VALUE") + pb_bytes(2, b"x") + pb_bytes(3, k)) for k in keys]
    graph = pb_bytes(1, b"") + b"".join(pb_bytes(1, a) for a in attribute)
    strings, crc = _string_tensor([graph])
    values = np.array([1.0, 2.0], np.float32).tobytes()
    c = google_crc32c.value(values[:4])
    value_crc = (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    c = google_crc32c.value(values[4:])
    value_crc2 = (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    entries = [(b"_CHECKPOINTABLE_OBJECT_GRAPH", _entry(DT_STRING, size=len(strings), offset=8, crc=crc)),
               (keys[0], _entry(shape=_shape(1), size=4, crc=value_crc)),
               (keys[1], _entry(shape=_shape(1), offset=4, size=4, crc=value_crc2))]
    index = _bundle(tmp_path, entries, data=values + strings)
    _reads(index, "tf-ckpt")
    td = convert.read(index, "tf-ckpt")
    assert {k: t.numpy().tolist() for k, t in td.items()} == {"a/b": [1.0], keys[1].decode(): [2.0]}


def test_hostile_saved_model_pb(tmp_path):
    """``saved_model.pb`` is read for its tags and signature names only: fields of the wrong wire
    type are skipped (never ``bytes(2**40)``), a file that is no protobuf is a CorruptFileError."""
    for body in (pb_bytes(1, pb_varint(4, 1 << 40)), pb_bytes(5, pb_varint(1, 1 << 40))):
        folder = tmp_path / f"sm{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "saved_model.pb").write_bytes(pb_varint(1, 1) + pb_bytes(2, body))
        _reads(folder, "saved-model")
    (folder / "saved_model.pb").write_bytes(b"\xff" * 64)
    _refused(folder, "saved-model", CorruptFileError, "not a SavedModel protobuf")
    (folder / "variables").mkdir()
    (folder / "variables" / "junk").write_bytes(b"x")
    (folder / "saved_model.pb").write_bytes(b"")
    _refused(folder, "saved-model", ReadError, "holds no variables.index")


@pytest.mark.parametrize("meta", [
    b"\xff" * 32,
    pb_varint(2, 1 << 40),  # graph_def as a varint
    pb_bytes(2, pb_varint(1, 1 << 40)),  # a node as a varint
    pb_bytes(2, pb_bytes(1, pb_bytes(2, b"VariableV2") + pb_varint(1, 1 << 40) + pb_bytes(5, pb_varint(2, 5)))),
    pb_bytes(3, pb_varint(7, 1 << 62)) + pb_bytes(2, pb_bytes(1, pb_bytes(2, b"VariableV2") + pb_bytes(
        5, pb_bytes(1, b"shape") + pb_bytes(2, pb_varint(7, 3)))))
], ids=["garbage", "graph_as_varint", "node_as_varint", "name_as_varint", "shape_as_varint"])
def test_hostile_meta_graph_is_skipped_not_trusted(meta):
    """A ``.meta`` file is read only to decide whether it fits the converted checkpoint: whatever
    its fields hold, :func:`metagraph.read_meta` and the V2 decision (:func:`metagraph.for_version`)
    return or raise ProtoError (or say the graph cannot be rewritten), allocating nothing."""
    def read():
        for decide in (metagraph.read_meta, lambda m: metagraph.for_version(m, 2)):
            try:
                decide(meta)
            except (metagraph.pw.ProtoError, metagraph._NotExact):
                pass
    assert run_guarded(read, max_bytes=SMALL) is None


# ---- ONNX

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


def test_onnx_tensor_helper_matches_onnx(tmp_path):
    """The hand-built model above is what onnx itself reads (the oracle)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(_onnx_model(tmp_path, _onnx_tensor(raw=np.arange(4, dtype=np.float32).tobytes()))))
    assert numpy_helper.to_array(model.graph.initializer[0]).tolist() == [0, 1, 2, 3]


@pytest.fixture
def outside(tmp_path):
    """A folder with the model, and a file and a folder outside it that a model must not reach."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x01" * 64)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "data.bin").write_bytes(b"\x02" * 64)
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


@pytest.mark.parametrize("case", list(EXTERNAL_CASES))
def test_hostile_onnx_external_data(case, outside):
    """External data must be a file of the model's folder, at offsets inside it: ``../``, absolute
    paths, NUL bytes and symbolic links leading out are refused before anything is opened."""
    model_dir, secret = outside
    (model_dir / "data.bin").write_bytes(b"\0" * 64)
    os.symlink(secret, model_dir / "link.bin")
    os.symlink(secret.parent / "elsewhere", model_dir / "linkdir")
    info, message = EXTERNAL_CASES[case]
    info = {k: v.format(secret=secret) for k, v in info.items()}
    model = _onnx_model(model_dir, _onnx_tensor(external=info))
    _refused(model, "onnx", ReadError, message)


def test_onnx_symlink_inside_the_folder_is_fine(outside):
    model_dir, _ = outside
    (model_dir / "real.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    os.symlink("real.bin", model_dir / "alias.bin")
    model = _onnx_model(model_dir, _onnx_tensor(external={"location": "alias.bin"}))
    assert convert.read(model, "onnx")["w"].numpy().tolist() == [0, 1, 2, 3]


def test_hostile_onnx_shapes(tmp_path):
    _refused(_onnx_model(tmp_path, _onnx_tensor(dims=(TB, TB), raw=b"\0" * 16)), "onnx", CorruptFileError,
             "raw_data holds 16 bytes, expected 4398046511104")
    _refused(_onnx_model(tmp_path, _onnx_tensor(dims=(TB, TB), floats=[1.0])), "onnx", CorruptFileError,
             "cannot decode tensor data")
    _refused(_onnx_model(tmp_path, _onnx_tensor(dims=(0, (1 << 63) - 1, 3), raw=b"")), "onnx", CorruptFileError,
             "too large for any array")
    _refused(_onnx_model(tmp_path, _onnx_tensor(dims=(-4,), raw=b"")), "onnx", CorruptFileError, "negative dimension")
    _refused(_onnx_model(tmp_path, _onnx_tensor(dims=[1] * 65, raw=b"\0" * 4)), "onnx", CorruptFileError, "rank 65")
    # a sparse tensor whose dense form would be 4 TB, from a model of a few dozen bytes
    sparse = (pb_bytes(1, _onnx_tensor(b"v", (1,), raw=b"\0" * 4)) + pb_bytes(2, _onnx_tensor(b"i", (1,), 7, raw=b"\0" * 8))
              + pb_varint(3, TB) + pb_varint(3, TB))
    _refused(_onnx_model(tmp_path, sparse=sparse), "onnx", CorruptFileError, "sparse tensor .* would take")


def test_hostile_onnx_structure(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(pb_varint(1, 8) + varint(7 << 3 | 2) + varint(1 << 60) + b"\x0a\x00")
    _refused(path, "onnx", CorruptFileError, "runs past the end of the file")
    # If nodes nested 3000 deep (protobuf's parser stops at 100; our walk never gets there)
    graph = pb_bytes(2, b"leaf")
    for _ in range(3000):
        attr = pb_bytes(1, b"then_branch") + pb_bytes(6, graph) + pb_varint(20, 5)
        graph = pb_bytes(1, pb_bytes(1, b"c") + pb_bytes(2, b"c") + pb_bytes(4, b"If") + pb_bytes(5, attr))
    path.write_bytes(pb_varint(1, 8) + pb_bytes(7, graph) + pb_bytes(8, pb_varint(2, 17)))
    _refused(path, "onnx", CorruptFileError, "not a readable ONNX model")


# ---- safetensors

def _safetensors(path: Path, header: bytes, data: bytes = b"\0" * 16, length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


SAFETENSORS_CASES = {
    "header_length_2_63": (b"{}", 1 << 63, "header length"),
    "header_length_past_eof": (b"{}", 10**6, "header length"),
    "offsets_past_eof": (b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,1000000000000]}}', None, "outside the data"),
    "offsets_negative": (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}}', None, "outside the data"),
    "offsets_reversed": (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}', None, "outside the data"),
    "offsets_huge_float": (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,1e400]}}', None, "malformed"),
    "shape_terabytes": (b'{"w":{"dtype":"F32","shape":[1048576,1048576],"data_offsets":[0,16]}}', None,
                        "holds 16 bytes but"),
    "shape_negative": (b'{"w":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}}', None, "negative dimension"),
    "shape_not_a_list": (b'{"w":{"dtype":"F32","shape":7,"data_offsets":[0,16]}}', None, "malformed"),
    "entry_not_an_object": (b'{"w":[1,2]}', None, "malformed"),
    "unknown_dtype": (b'{"w":{"dtype":"Q9","shape":[4],"data_offsets":[0,16]}}', None, "malformed"),
    "metadata_not_strings": (b'{"__metadata__":{"a":[1]}}', None, "__metadata__"),
    "header_not_utf8": (b'{"\xff":1}', None, "not valid JSON"),
    "header_not_an_object": (b"[1,2,3]", None, "not a JSON object"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_hostile_safetensors_header(case, tmp_path):
    header, length, message = SAFETENSORS_CASES[case]
    _refused(_safetensors(tmp_path / "m.safetensors", header, length=length), "safetensors", CorruptFileError, message)


def test_hostile_safetensors_nesting_and_shards(tmp_path):
    # JSON nested 100000 deep: json raises RecursionError
    deep = b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
    _refused(_safetensors(tmp_path / "deep.safetensors", deep), "safetensors", CorruptFileError, "too deeply")
    # a sharded index naming files outside its folder, or not naming files at all
    folder = tmp_path / "sharded"
    folder.mkdir()
    _safetensors(tmp_path / "outside.safetensors", b"{}")
    index = folder / "model.safetensors.index.json"
    for weight_map, message in (({"w": "../outside.safetensors"}, "not a file of the index's folder"),
                                ({"w": str(tmp_path / "outside.safetensors")}, "not a file of the index's folder"),
                                ({"w": 5}, "not a safetensors index")):
        index.write_text(json.dumps({"weight_map": weight_map}))
        _refused(folder, "safetensors", CorruptFileError, message)


# ---- torch

def _zip(path: Path, records: dict[str, bytes], compress: dict[str, int] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in records.items():
            zf.writestr(name, data, compress_type=(compress or {}).get(name, zipfile.ZIP_STORED))
    return path


def _lie_about_size(data: bytes, member: str, size: int) -> bytes:
    """Rewrite a record's compressed and uncompressed sizes in the zip's central directory."""
    out = bytearray(data)
    pos = out.find(b"PK\x01\x02")
    while pos >= 0:
        name_len = struct.unpack_from("<H", out, pos + 28)[0]
        if out[pos + 46:pos + 46 + name_len] == member.encode():
            struct.pack_into("<II", out, pos + 20, size, size)
        pos = out.find(b"PK\x01\x02", pos + 4)
    return bytes(out)


def _tensor_pickle(numel: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """The data.pkl torch.save writes for {'w': tensor}: _rebuild_tensor_v2 over a FloatStorage, by hand."""
    def ints(values):
        return b"(" + b"".join(b"J" + struct.pack("<i", v) if v < 1 << 31 else b"\x8a\x08" + v.to_bytes(8, "little")
                               for v in values) + b"t"
    return (b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n("
            b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
            + b"J" + struct.pack("<i", numel) + b"tQ" + b"K\x00" + ints(shape) + ints(stride)
            + b"\x89ccollections\nOrderedDict\n)RtRs.")


def _torch_zip(path: Path, pkl: bytes, storage: bytes = b"\0" * 16) -> Path:
    return _zip(path, {"m/data.pkl": pkl, "m/byteorder": b"little", "m/data/0": storage, "m/version": b"3\n"})


def test_tensor_pickle_helper_matches_torch(tmp_path):
    """The hand-written data.pkl above is one torch.load reads (the oracle)."""
    torch = pytest.importorskip("torch")
    path = _torch_zip(tmp_path / "ok.pt", _tensor_pickle(4, (2, 2), (2, 1)), np.arange(4, dtype=np.float32).tobytes())
    assert torch.load(path, weights_only=True)["w"].tolist() == [[0, 1], [2, 3]]
    assert convert.read(path, "torch")["w"].numpy().tolist() == [[0, 1], [2, 3]]


def test_hostile_torch_tensors(tmp_path):
    path = _torch_zip(tmp_path / "m.pt", _tensor_pickle(4, (TB, TB), (TB, 1)))
    _refused(path, "torch", CorruptFileError, "tensor needs 4398046511104 bytes of storage '0', which holds 16")
    path = _torch_zip(tmp_path / "m.pt", _tensor_pickle(4, (0, 1 << 62, 4), (1, 1, 1)))
    _refused(path, "torch", CorruptFileError, "too large for any array")
    # the storage record claims 4 GB (stored: its bytes would lie past the end of the file)
    path.write_bytes(_lie_about_size(_torch_zip(path, _tensor_pickle(4, (4,), (1,))).read_bytes(), "m/data/0", 0xFFFFFFF0))
    _refused(path, "torch", CorruptFileError, "ends past the end|zip record m/data/0 claims")


def test_hostile_torch_zip_records_and_views(tmp_path):
    # data.pkl's record claims 4 GB: zipfile asks the file for all of it in one read (1 GB allocated)
    path = _torch_zip(tmp_path / "m.pt", _tensor_pickle(4, (4,), (1,)))
    path.write_bytes(_lie_about_size(path.read_bytes(), "m/data.pkl", 0xFFFFFFF0))
    _refused(path, "torch", CorruptFileError, "zip record m/data.pkl claims")
    # a broadcast (stride 0) view of 4 bytes claiming 4 TB once made contiguous
    _refused(_torch_zip(tmp_path / "b.pt", _tensor_pickle(4, (TB, TB), (0, 0))), "torch", CorruptFileError,
             "would expand to")
    # a storage record whose compression method is unknown: found when its data is read
    path = _zip(tmp_path / "c.pt", {"m/data.pkl": _tensor_pickle(4, (4,), (1,)), "m/byteorder": b"little",
                                    "m/data/0": b"\0" * 16}, compress={"m/data/0": zipfile.ZIP_DEFLATED})
    data = bytearray(path.read_bytes())
    for sig, at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # method 8 (deflate) -> 99 in both headers
        pos = data.find(sig)
        while pos >= 0:
            if struct.unpack_from("<H", data, pos + at)[0] == 8:
                struct.pack_into("<H", data, pos + at, 99)
            pos = data.find(sig, pos + 4)
    path.write_bytes(bytes(data))
    _refused(path, "torch", CorruptFileError, "damaged zip record")


def _legacy(path: Path, root: bytes, keys: bytes = b"\x80\x02]q\x00X\x01\x00\x00\x000a.", tail: bytes = b"") -> Path:
    """A legacy torch file: magic number, protocol version, sys info, ``root``, storage keys, ``tail``."""
    head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    path.write_bytes(head + root + keys + tail)
    return path


def test_hostile_torch_legacy(tmp_path):
    pkl = _tensor_pickle(4, (4,), (1,))
    _refused(_legacy(tmp_path / "m.pt", pkl, tail=struct.pack("<q", 1 << 62)), "torch", CorruptFileError,
             "ends past the end")
    _refused(_legacy(tmp_path / "m.pt", pkl, tail=struct.pack("<q", -4) + b"\0" * 16), "torch", CorruptFileError,
             "ends past the end")
    _refused(_legacy(tmp_path / "m.pt", pkl, tail=b"\x04"), "torch", CorruptFileError, "truncated")


PICKLE_BOMBS = {
    # protocol 2 pickles, by hand; each is a state_dict-shaped dict holding something hostile
    "binbytes8_claims_1TB": (b"\x80\x04}X\x01\x00\x00\x00w\x8e" + struct.pack("<Q", 1 << 40) + b"abcds.", "damaged|truncated"),
    "binunicode8_claims_1TB": (b"\x80\x04}X\x01\x00\x00\x00w\x8d" + struct.pack("<Q", 1 << 40) + b"abcds.", "damaged|truncated"),
    "frame_claims_1TB": (b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b"}.", None),  # the frame ends short
    "bytearray8_claims_1TB": (b"\x80\x05}X\x01\x00\x00\x00w\x96" + struct.pack("<Q", 1 << 40) + b"s.", "out-of-band|damaged"),
    "long4_claims_2GB": (b"\x80\x02}X\x01\x00\x00\x00w\x8b" + struct.pack("<i", (1 << 31) - 1) + b"\x01s.", "damaged|truncated"),
    "long_text_100k_digits": (b"\x80\x02}X\x01\x00\x00\x00wL" + b"9" * 100000 + b"L\ns.", "damaged|Exceeds"),
    "nested_10k_lists": (b"\x80\x02" + b"]" * 10000 + b"a" * 9999 + b".", "nested deeper than"),
    "list_contains_itself": (b"\x80\x02]q\x00h\x00a.", "contains itself"),
    "dict_contains_itself": (b"\x80\x02}q\x00X\x01\x00\x00\x00wh\x00s.", "contains itself"),
    "billion_laughs": (b"\x80\x02]q\x00X\x03\x00\x00\x00lolaq\x00" + b"".join(
        b"h\x00h\x00\x86q\x00" for _ in range(64)) + b".", "refer to each other so often"),
    "memo_get_missing": (b"\x80\x02}h\x07s.", "damaged pickle|Memo"),
    "put_huge_index": (b"\x80\x02}r\xff\xff\xff\xff.", None),  # a memo dict entry, not 4 G of list: reads
}


@pytest.mark.parametrize("case", list(PICKLE_BOMBS))
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_pickle_bombs(case, layout, tmp_path):
    """Pickles built to exhaust memory or time: lengths claiming terabytes, nesting 10000 deep, objects
    holding themselves, a memo "billion laughs" (64 levels of (x, x): 2**64 leaves); refused quickly,
    small, with a ConvertError (or read, when the pickle is merely odd)."""
    pkl, message = PICKLE_BOMBS[case]
    path = tmp_path / "bomb.pt"
    if layout == "zip":
        _zip(path, {"m/data.pkl": pkl, "m/byteorder": b"little"})
    else:
        _legacy(path, pkl, keys=b"\x80\x02].")
    err = run_guarded(lambda: exercise(path, "torch"), max_bytes=SMALL, seconds=5)
    if message is not None or err is not None:
        assert isinstance(err, CorruptFileError) and str(path) in str(err), err
        assert re.search(message or ".", str(err)), str(err)


# ---- malicious pickles: nothing from a file ever runs

def _payloads(marker: Path) -> dict[str, tuple[bytes, bool]]:
    """Pickles by every route the pickle machine has to call or construct something (GLOBAL+REDUCE,
    STACK_GLOBAL, INST, OBJ, NEWOBJ(_EX), BUILD, copyreg reconstructors, extension codes, persistent
    ids, NumPy object dtypes), each inside a state_dict-shaped dict. The flag says whether plain
    ``pickle.loads`` creates ``marker`` with it (the routes that only construct cannot run code)."""
    m = str(marker)
    code = f"open({m!r}, 'w').close()".encode()
    uni = b"X" + struct.pack("<I", len(code)) + code
    touch = f"touch {m}".encode()
    touch_u = b"X" + struct.pack("<I", len(touch)) + touch

    def in_dict(obj: bytes, proto: bytes = b"\x80\x02") -> bytes:
        return proto + b"}X\x01\x00\x00\x00w" + obj + b"s."

    return {
        "reduce_builtins_eval": (in_dict(b"cbuiltins\neval\n(" + uni + b"tR"), True),
        "reduce_builtins_exec": (in_dict(b"cbuiltins\nexec\n(" + uni + b"tR"), True),
        "reduce_py2_builtin_eval": (in_dict(b"c__builtin__\neval\n(" + uni + b"tR"), True),
        "global_os_system": (in_dict(b"cos\nsystem\n(" + touch_u + b"tR"), True),
        "global_posix_system": (in_dict(b"cposix\nsystem\n(" + touch_u + b"tR"), True),
        "stack_global_exec": (in_dict(b"\x8c\x08builtins\x8c\x04exec\x93(" + uni + b"tR", b"\x80\x04"), True),
        "inst_exec": (in_dict(b"(" + uni + b"ibuiltins\nexec\n"), True),
        "obj_exec": (in_dict(b"(cbuiltins\nexec\n" + uni + b"o"), True),
        "obj_allowed_class": (in_dict(b"(ccollections\nOrderedDict\no"), False),
        "apply_via_functools_partial": (in_dict(b"cfunctools\npartial\n(cbuiltins\nexec\n" + uni + b"tR)R"), True),
        "getattr_import_chain": (in_dict(b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(X\x02\x00\x00\x00ostR"
                                         b"X\x06\x00\x00\x00systemtR(" + touch_u + b"tR"), True),
        "subprocess_popen": (in_dict(b"csubprocess\nPopen\n((X\x05\x00\x00\x00touchX" + struct.pack("<I", len(m))
                                     + m.encode() + b"ltR"), True),
        "newobj_object": (in_dict(b"cbuiltins\nobject\n)\x81"), False),
        "newobj_allowed_class": (in_dict(b"ccollections\nOrderedDict\n)\x81"), False),
        "newobj_ex_allowed_class": (in_dict(b"ccollections\nOrderedDict\n)}\x92", b"\x80\x04"), False),
        "copyreg_newobj": (in_dict(b"ccopyreg\n__newobj__\n(cbuiltins\nobject\ntR"), False),
        "copyreg_reconstructor": (in_dict(b"ccopy_reg\n_reconstructor\n(cbuiltins\nobject\ncbuiltins\nobject\nNtR"),
                                  False),
        "build_on_a_list": (in_dict(b"]}b"), False),
        "build_state_with_code": (in_dict(b"ccollections\nOrderedDict\n)R}X\x0c\x00\x00\x00__setstate__"
                                          b"cbuiltins\nexec\nsb"), False),
        "extension_code": (in_dict(b"\x82\x01"), False),
        "persistent_id_module": (b"\x80\x02}X\x01\x00\x00\x00w(X\x06\x00\x00\x00modulecbuiltins\nexec\n" + uni
                                 + b"tQs.", False),
        "numpy_object_scalar": (in_dict(b"cnumpy.core.multiarray\nscalar\n(cnumpy\ndtype\n(X\x02\x00\x00\x00O8tR"
                                        b"C\x08\x00\x00\x00\x00\x00\x00\x00\x00tR"), False),
        "numpy_reconstruct": (in_dict(b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(K\x00tC\x01btR"),
                              False),
        "torch_rebuild_with_code_in_its_args": (
            b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(cbuiltins\nexec\n(" + uni + b"tR"
            b"K\x00)))\x89ccollections\nOrderedDict\n)RtRs.", False),
        "rebuild_from_type_with_a_foreign_function": (
            in_dict(b"ctorch._tensor\n_rebuild_from_type_v2\n(ccollections\nOrderedDict\nctorch\nTensor\n)}tR"), False),
    }


PAYLOAD_NAMES = list(_payloads(Path("/x")))


def _wait_for(path: Path, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists():
            return True
        time.sleep(0.02)
    return path.exists()


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("route", PAYLOAD_NAMES)
def test_malicious_pickle_never_runs(route, layout, tmp_path):
    """Reading never runs the payload, and is a ConvertError naming the file: a refused global
    (ReadError) or a pickle that builds what no state_dict holds (CorruptFileError). The payload is
    live: a plain ``pickle.loads`` in a child process does create the marker file (zip layout only,
    for the routes that can call something)."""
    marker = tmp_path / "pwned"
    pkl, live = _payloads(marker)[route]
    path = tmp_path / "evil.pt"
    if layout == "zip":
        _zip(path, {"archive/data.pkl": pkl, "archive/byteorder": b"little", "archive/version": b"3\n"})
    else:
        _legacy(path, pkl, keys=b"\x80\x02].")
    err = run_guarded(lambda: exercise(path, "torch"), max_bytes=SMALL)
    assert not _wait_for(marker, 0.2 if route == "subprocess_popen" else 0), "the payload ran"
    assert isinstance(err, (ReadError, CorruptFileError)) and str(path) in str(err), err
    assert "refused to load global" in str(err) or "not a torch state_dict pickle" in str(err), str(err)
    if live and layout == "zip":
        (tmp_path / "payload.pkl").write_bytes(pkl)
        child = subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())",
                                str(tmp_path / "payload.pkl")], capture_output=True, timeout=60, cwd=tmp_path)
        assert _wait_for(marker, 5), f"the test's payload is not live: {child.stderr.decode()[-300:]}"


def test_every_calling_opcode_has_a_route():
    """The routes above use every opcode that can call or construct something."""
    used = set()
    for pkl, _ in _payloads(Path("/x")).values():
        used |= {op.name for op, _, _ in pickletools.genops(pkl)}
    calling = {"REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD", "GLOBAL", "STACK_GLOBAL", "BINPERSID", "EXT1"}
    assert calling <= used, calling - used


# ---- memory: refused headers cost little even without tracemalloc's view (a child with RLIMIT_AS)

def test_hostile_headers_under_an_address_space_limit(tmp_path):
    """In a child process capped at its start-up size + 512 MB of address space, every hostile file
    above that is refused in the parent is refused there too (a header honoured even lazily,
    e.g. a calloc'd 4 TB array, would fail with MemoryError and escape)."""
    files = []
    (tmp_path / "m.data-00000-of-00001").write_bytes(b"\0" * 16)
    for case, (entries, _, _) in BUNDLE_CASES.items():
        folder = tmp_path / f"b_{case}"
        folder.mkdir()
        files.append((str(_bundle(folder, entries)), "tf-ckpt"))
    for case, (header, length, _) in SAFETENSORS_CASES.items():
        files.append((str(_safetensors(tmp_path / f"{case}.safetensors", header, length=length)), "safetensors"))
    files.append((str(_torch_zip(tmp_path / "t.pt", _tensor_pickle(4, (TB, TB), (TB, 1)))), "torch"))
    files.append((str(_onnx_model(tmp_path, _onnx_tensor(dims=(TB, TB), floats=[1.0]), name="o.onnx")), "onnx"))
    script = f"""
import resource, sys, json
sys.path.insert(0, {str(Path(__file__).parent)!r})
import convert.formats.onnx, convert.formats.torch, convert.formats.safetensors, convert.formats.tf_checkpoint
import onnx
from fuzzing import exercise, _vm_size
from convert.errors import ConvertError
resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + (512 << 20), resource.RLIM_INFINITY))
bad = []
for path, fmt in json.loads(sys.argv[1]):
    try:
        exercise(__import__("pathlib").Path(path), fmt)
        bad.append((path, "read"))
    except ConvertError:
        pass
    except BaseException as e:
        bad.append((path, type(e).__name__ + ": " + str(e)[:200]))
print(json.dumps(bad))
"""
    out = subprocess.run([sys.executable, "-c", script, json.dumps(files)], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert json.loads(out.stdout.decode().strip().splitlines()[-1]) == []


def test_deflate_bomb_storage_is_read_within_its_tensor(tmp_path):
    """A deflated storage record (torch never writes one, but zip allows it) is decompressed only as
    far as its tensor needs: a 1 MB record of zeros behind a 1 KB compressed one reads as 1 MB."""
    raw = b"\0" * (1 << 20)
    assert len(zlib.compress(raw)) < 2048
    path = _zip(tmp_path / "m.pt", {"m/data.pkl": _tensor_pickle(1 << 18, (1 << 18,), (1,)), "m/byteorder": b"little",
                                    "m/data/0": raw}, compress={"m/data/0": zipfile.ZIP_DEFLATED})
    assert path.stat().st_size < 4096
    td = convert.read(path, "torch")
    assert run_guarded(lambda: td["w"].numpy(), max_bytes=8 << 20) is None
