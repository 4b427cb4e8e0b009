"""Broken and hostile input (issue 9, the reader half).

Every reader refuses damaged or malicious input with a :class:`~convert.errors.ConvertError` that is
one line naming the file: never another exception, a hang, an allocation a header asked for, or code
from the file run. "Reading" is always the whole of it (:func:`fuzzing.exercise`): every adapter's
``detect``, the reader, and every tensor's data (readers are lazy).

* Systematic damage to real files: the seeds the formats' contracts declare (``FormatContract.SEEDS``,
  written by TensorFlow, torch, onnx, Keras, NumPy and safetensors, and other people's files from
  the corpus), each of their files cut at many points, bits flipped, blocks zeroed or filled with
  0xFF, magic numbers changed. Where the format has checksums (LevelDB table blocks: V2 ``.index``,
  V1 files; V2 data: each tensor's crc32c; ``FormatContract.CHECKSUMMED``) every flipped bit is
  detected. Formats without checksums (safetensors, ONNX, legacy torch files) may read a flipped data
  bit as a different value: there the test asks only "reads or ConvertError".
* Hostile files built by hand, a few bytes each, declared by each format's contract
  (``FormatContract.HOSTILE``: shapes claiming terabytes, offsets past the end, negative and
  overflowing lengths, block handles outside the file, zip records lying about their size, ONNX
  external data leaving the model's folder): refused with a precise message in one printable line
  while the traced memory stays under a few MB, and refused again in a child process whose address
  space is capped.

What is particular to one format (malicious pickles, the CRCs torch.load does not check, a .meta
graph that is never trusted) is tested in that format's test file.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import fuzzing
import pytest
from fuzzing import SMALL, TABLE_MAGIC, clone, exercise, one_line_naming, replace_file, run_guarded

import convert
from convert import cli
from convert.errors import ConvertError, CorruptFileError, ReadError

import contract

SEED_NAMES = fuzzing.seed_names()  # those the formats' test files declare (contract.py)


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


CHECKSUMMED = [pair for c in contract.declared() for pair in c.CHECKSUMMED]


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
    err = _refused(path, fmt, error, match)
    assert str(err).isprintable(), str(err)  # what it quotes from the file is escaped: one line


# ---- memory: refused headers cost little even without tracemalloc's view (a child with RLIMIT_AS)

def test_hostile_headers_under_an_address_space_limit(tmp_path):
    """In a child process capped at its start-up size + 512 MB of address space, every declared
    hostile file (refused in the parent: test_declared_hostile_case) is refused there too (a header
    honoured even lazily, e.g. a calloc'd 4 TB array, would fail with MemoryError and escape)."""
    files = []
    for i, (case, (fmt, build)) in enumerate(DECLARED.items()):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        files.append((str(build(folder)[0]), fmt, case))
    modules = sorted({convert.registry.get(fmt).module for _, fmt, _ in files})
    script = f"""
import importlib, resource, sys, json
sys.path.insert(0, {str(Path(__file__).parent)!r})
for module in {modules!r}:
    importlib.import_module(module)
try:
    import onnx
except ImportError:
    pass
from fuzzing import exercise, _vm_size
from convert.errors import ConvertError
resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + (512 << 20), resource.RLIM_INFINITY))
bad = []
for path, fmt, case in json.loads(sys.argv[1]):
    try:
        exercise(__import__("pathlib").Path(path), fmt)
        bad.append((case, "read"))
    except ConvertError:
        pass
    except BaseException as e:
        bad.append((case, type(e).__name__ + ": " + str(e)[:200]))
print(json.dumps(bad))
"""
    out = subprocess.run([sys.executable, "-c", script, json.dumps(files)], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert json.loads(out.stdout.decode().strip().splitlines()[-1]) == []
