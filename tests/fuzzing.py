"""Shared helpers of tests/test_hostile.py and tests/test_fuzz.py: seed files and the reading harness.

Seeds are real files, declared by each format's contract in its own test file
(``FormatContract.SEEDS``/``make_seeds``, tests/contract.py): written by the frameworks themselves
(TensorFlow's ``SaveV2``/``SaveSlices`` ops and ``tf.saved_model.save``, ``torch.save`` in both
layouts, ``onnx.save``, Keras, NumPy, the ``safetensors`` library) or copied from
``/work/shared/corpus`` (files written by other people's tools: :func:`corpus_seed`). A seed is a
folder; ``target`` is what is handed to the reader and ``files`` are the files a test may damage
(one at a time).

:func:`exercise` is what "reading" means in these tests: every adapter's ``detect`` (which must
answer True/False, never raise), then the reader with the format named explicitly, then every
tensor's data, both as ``numpy()`` and as raw ``chunks()`` (readers are lazy: a header can be fine
and the data broken). Anything but a :class:`~convert.errors.ConvertError` escaping is a bug;
:func:`run_guarded` adds a wall-clock limit (SIGALRM) and a memory limit (tracemalloc peak, plus
``RLIMIT_AS`` as a safety net so that a runaway allocation fails fast instead of swapping).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import tracemalloc
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import convert
from convert import registry
from convert.errors import ConvertError

CORPUS = Path("/work/shared/corpus")
SMALL = 8 << 20
"""Traced bytes a refused hand-built hostile file may cost (``FormatContract.HOSTILE``)."""

# --------------------------------------------------------------------------------------- seeds


@dataclass(frozen=True)
class Seed:
    """A readable checkpoint in its own folder ``root``."""

    name: str
    format: str  # registry name, passed explicitly to convert.read
    root: Path
    target: str  # relative to root: what the reader is given ("." for the folder itself)
    files: tuple[str, ...]  # relative to root: the files a test may damage
    checksummed: tuple[str, ...] = ()
    """Files whose every byte is covered by a checksum the reader verifies (a flip must be detected;
    in a LevelDB table, every byte but the footer's zero padding)."""
    metadata_only: tuple[str, ...] = ()
    """Files that only feed metadata (``saved_model.pb``, ``fingerprint.pb``): damage may go unseen."""

    @property
    def path(self) -> Path:
        return self.root / self.target


def corpus_seed(root: Path, name: str, fmt: str, folder: str, target: str, files: tuple[str, ...],
                checksummed: tuple[str, ...] = (), *, only_files: bool = False,
                metadata_only: tuple[str, ...] = ()) -> list[Seed]:
    """A seed copied from the corpus (a file by other people's tools), in a list: empty when the corpus
    does not hold it. ``only_files``: copy ``files`` alone, not the rest of the corpus folder."""
    src = CORPUS / folder
    if not (src / target).exists():
        return []
    d = root / name
    if only_files:
        d.mkdir()
        for f in files:
            shutil.copyfile(src / f, d / f)
    else:
        shutil.copytree(src, d)
    for p in d.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)  # the corpus is read-only; our copies are not
    return [Seed(name, fmt, d, target, files, checksummed, metadata_only)]


def seed_names() -> tuple[str, ...]:
    """Every seed's name, known without writing them (for parametrizing tests): those the formats'
    test files declare (``FormatContract.SEEDS``)."""
    import contract

    return tuple(n for c in contract.declared() for n in c.SEEDS)


_CACHE: dict[str, list[Seed]] = {}


def make_seeds(root: Path) -> list[Seed]:
    """Every seed the formats' contracts write (``FormatContract.make_seeds``), under ``root``, in name
    order (what the fuzz targets splice from does not depend on which test file was imported first);
    once per process: TensorFlow is slow to import."""
    import contract

    key = str(root)
    if key not in _CACHE:
        root.mkdir(parents=True, exist_ok=True)
        seeds = sorted((s for c in contract.declared() for s in c.make_seeds(root)), key=lambda s: s.name)
        names = [s.name for s in seeds]
        assert len(set(names)) == len(names) and set(names) <= set(seed_names()), names
        for seed in seeds:  # every seed must read cleanly, or the tests below prove nothing
            exercise(seed.path, seed.format)
        _CACHE[key] = seeds
    return _CACHE[key]


_SHARED_ROOT: list[Path] = []


def session_seeds(tmp_path_factory) -> list[Seed]:
    """The seeds, written once per pytest session whichever test file asks first."""
    if not _SHARED_ROOT:
        _SHARED_ROOT.append(tmp_path_factory.mktemp("seeds"))
    return make_seeds(_SHARED_ROOT[0])


# --------------------------------------------------------------------------------------- reading

def detect_all(path: Path) -> None:
    """Every adapter's ``detect`` must answer a bool and never raise."""
    for info in registry.FORMATS:
        answer = info.format.detect(path)
        assert isinstance(answer, bool), f"{info.name}.detect returned {answer!r}"


def read_all(path: Path, fmt: str | None) -> int:
    """Read with ``fmt`` (None: detect) and every tensor's data three ways (``numpy()``, ``chunks()``,
    :func:`convert.ir.digest`); returns the bytes read."""
    from convert.ir import digest

    td = convert.read(path, fmt)
    total = 0
    for t in td.values():
        arr = t.numpy()
        total += arr.size
        if t.dtype.kind != "string":
            for piece in t.chunks():
                total += len(piece)
        digest(t)  # inspect --verify's way: a memory map where the bytes sit raw in the file
    return total


def exercise(path: Path, fmt: str | None) -> int:
    detect_all(path)
    return read_all(path, fmt)


# --------------------------------------------------------------------------------------- guards

class Hang(Exception):
    """Raised by the SIGALRM handler: a reader took longer than the limit."""


class MemoryBlowUp(Exception):
    """A reader's traced allocations peaked above the limit."""


@contextmanager
def time_limit(seconds: float):
    fired = []

    def on_alarm(signum, frame):
        fired.append(True)
        raise Hang(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if fired:  # the Hang was raised where Python drops exceptions (a gc callback): still a hang
        raise Hang(f"took more than {seconds} s")


def _vm_size() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def address_space_headroom(extra: int):
    """Cap the process's address space at its current size + ``extra`` bytes, so that a runaway
    allocation fails at once (MemoryError) rather than swapping the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size() + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def run_guarded(fn: Callable[[], object], *, seconds: float = 10.0, max_bytes: int = 64 << 20,
                headroom: int = 1 << 30) -> BaseException | None:
    """Run ``fn``; return the ConvertError it raised (None if it returned).

    Fails (raises AssertionError) when it raises anything else, takes more than ``seconds``,
    allocates more than ``max_bytes`` (tracemalloc peak) or ran out of memory on the way (a
    MemoryError hidden inside a ConvertError counts: that is an allocation a header asked for).
    """
    started = tracemalloc.is_tracing()
    if not started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    error: BaseException | None = None
    try:
        with address_space_headroom(headroom), time_limit(seconds):
            fn()
    except ConvertError as e:
        error = e
    except Hang as e:
        raise AssertionError(f"hang: {e}") from None
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        if not started:
            tracemalloc.stop()
    if error is not None and any(isinstance(x, (MemoryError, Hang)) for x in _chain(error)):
        raise AssertionError(f"a ConvertError hides {type(error.__context__).__name__}: {error}") from error
    if peak > max_bytes:
        raise AssertionError(f"memory blow-up: {peak / 2**20:.1f} MiB traced (limit {max_bytes / 2**20:.0f} MiB)"
                             + (f"; ended with {error}" if error else ""))
    return error


def one_line_naming(error: BaseException, where: Path) -> None:
    """The error names a file inside ``where`` (the damaged checkpoint's folder) and is one line of
    printable text: what it quotes from the file (tensor names, keys) is escaped."""
    msg = str(error)
    assert str(where) in msg, f"message does not name the file: {msg!r}"
    assert msg.isprintable(), f"message is not one line of printable text: {msg!r}"


def clone(seed: Seed, dest: Path) -> Path:
    """A copy of a seed's folder at ``dest`` (hard links for the files: cheap; damage only through
    :func:`replace_file`, which writes a new file instead of writing through the link)."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(seed.root, dest, copy_function=link)
    return dest / seed.target


def replace_file(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


# --------------------------------------------------------------------------------------- hand-built bytes
# Independent of convert's own encoders: the hostile files of test_hostile.py are spelled out here
# from the published formats (protobuf wire format, LevelDB table format).

def varint(n: int) -> bytes:
    """Protobuf base-128 varint (a negative int as its 64-bit two's complement, as protobuf does)."""
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb_varint(num: int, value: int) -> bytes:
    return varint(num << 3) + varint(value)


def pb_bytes(num: int, value: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(value)) + value


def pb_fixed32(num: int, value: int) -> bytes:
    return varint(num << 3 | 5) + value.to_bytes(4, "little")


def masked_crc(data: bytes) -> int:
    import google_crc32c

    c = google_crc32c.value(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def table_block(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A LevelDB block with a restart point at every entry (no prefix sharing)."""
    body, restarts = bytearray(), []
    for key, value in entries:
        restarts.append(len(body))
        body += varint(0) + varint(len(key)) + varint(len(value)) + key + value
    for r in restarts or [0]:
        body += r.to_bytes(4, "little")
    body += len(restarts or [0]).to_bytes(4, "little")
    return bytes(body)


def with_trailer(block: bytes, ctype: int = 0) -> bytes:
    return block + bytes([ctype]) + masked_crc(block + bytes([ctype])).to_bytes(4, "little")


TABLE_MAGIC = (0xDB4775248B80FB57).to_bytes(8, "little")


def sstable(entries: list[tuple[bytes, bytes]], *, index_handle: tuple[int, int] | None = None,
            data_handle: tuple[int, int] | None = None) -> bytes:
    """A one-data-block table holding ``entries`` (sorted by the caller); the handles can be forged."""
    data = table_block(entries)
    out = bytearray(with_trailer(data))
    meta_at = len(out)
    out += with_trailer(table_block([]))
    last = entries[-1][0] if entries else b""
    dh = data_handle or (0, len(data))
    index = table_block([(last + b"\xff", varint(dh[0]) + varint(dh[1]))])
    index_at = len(out)
    out += with_trailer(index)
    ih = index_handle or (index_at, len(index))
    footer = varint(meta_at) + varint(len(table_block([]))) + varint(ih[0]) + varint(ih[1])
    out += footer.ljust(40, b"\x00") + TABLE_MAGIC
    return bytes(out)


# --------------------------------------------------------------------------------------- mutations

INTERESTING = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**40, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
"""Numbers that find off-by-one and overflow bugs when written over a length, count, offset or size."""

OPS = ("flip", "set_byte", "int_le", "int_varint", "insert", "delete", "truncate", "fill", "copy_within", "splice")


def mutate(draw, blob: bytes, pool: list[bytes]) -> bytes:
    """``blob`` with 1 to 4 mutations drawn with ``draw`` (hypothesis's ``data.draw``): bit flips, bytes
    set to edge values, little-endian ints and varints of :data:`INTERESTING` numbers written over
    fields, inserted and deleted runs, truncation, runs zeroed or set to 0xFF, a run copied elsewhere
    in the file, or spliced in from another seed file (``pool``)."""
    from hypothesis import strategies as st

    b = bytearray(blob)
    for _ in range(draw(st.integers(1, 4), label="mutations")):
        op = draw(st.sampled_from(OPS), label="op")
        pos = draw(st.integers(0, max(len(b) - 1, 0)), label="pos")
        if op == "flip" and b:
            b[pos] ^= 1 << draw(st.integers(0, 7), label="bit")
        elif op == "set_byte" and b:
            b[pos] = draw(st.sampled_from((0x00, 0xFF, 0x7F, 0x80, 0x01)) | st.integers(0, 255), label="byte")
        elif op == "int_le":
            width = draw(st.sampled_from((1, 2, 4, 8)), label="width")
            value = draw(st.sampled_from(INTERESTING), label="value") % (1 << (8 * width))
            b[pos:pos + width] = value.to_bytes(width, "little")
        elif op == "int_varint":
            value = varint(draw(st.sampled_from(INTERESTING + (-1,)), label="value"))
            if draw(st.booleans(), label="replace"):
                b[pos:pos + len(value)] = value
            else:
                b[pos:pos] = value
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=16), label="bytes")
        elif op == "delete":
            del b[pos:pos + draw(st.integers(1, 64), label="length")]
        elif op == "truncate":
            del b[pos:]
        elif op == "fill":
            n = draw(st.integers(1, 64), label="length")
            b[pos:pos + n] = bytes([draw(st.sampled_from((0x00, 0xFF)), label="fill")]) * len(b[pos:pos + n])
        elif op == "copy_within" and b:
            src = draw(st.integers(0, len(b) - 1), label="src")
            b[pos:pos] = b[src:src + draw(st.integers(1, 64), label="length")]
        elif op == "splice" and pool:
            other = draw(st.sampled_from(pool), label="other")
            if other:
                src = draw(st.integers(0, len(other) - 1), label="src")
                chunk = other[src:src + draw(st.integers(1, 128), label="length")]
                b[pos:pos + len(chunk)] = chunk
    return bytes(b)


def table_entries(path: Path) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of a LevelDB table (to damage its contents behind valid checksums)."""
    from convert.formats.tf_checkpoint.sstable import TableReader

    return [(k, bytes(v)) for k, v in TableReader(path).items()]


def mutate_table(draw, entries: list[tuple[bytes, bytes]], pool: list[bytes]) -> bytes:
    """A table of ``entries`` with one entry's value (mostly) or key mutated, or an entry dropped or
    duplicated under another key, rebuilt with correct block checksums: this reaches the protobuf
    and bundle parsers behind the checksums, which plain byte damage almost never gets past."""
    from hypothesis import strategies as st

    entries = list(entries)
    i = draw(st.integers(0, len(entries) - 1), label="entry")
    key, value = entries[i]
    what = draw(st.sampled_from(("value", "value", "value", "key", "drop", "clone")), label="change")
    if what == "value":
        entries[i] = (key, mutate(draw, value, pool))
    elif what == "key":
        entries[i] = (mutate(draw, key, pool), value)
    elif what == "drop":
        del entries[i]
    else:
        entries.append((mutate(draw, key, pool), value))
    unique = dict(sorted(entries))
    return sstable(sorted(unique.items()))


def zip_records(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def rezip(records: list[tuple[str, bytes]]) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            zf.writestr(name, data)
    return buf.getvalue()
