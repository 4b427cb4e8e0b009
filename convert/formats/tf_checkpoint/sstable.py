"""Reader and writer of the LevelDB table ("SSTable") files TensorFlow checkpoints use.

The V2 ``.index`` file and the whole V1 checkpoint file are tables in the format of
https://github.com/google/leveldb/blob/main/doc/table_format.md, as implemented by
tensorflow/core/lib/io/table_builder.cc: data blocks of prefix-compressed entries with
restart points, each followed by a 5-byte trailer (compression type, masked crc32c of
block+type); a metaindex block (empty in TF files); an index block (one entry per data
block, restart interval 1); a 48-byte footer (two block handles, zero padding, magic
``0xdb4775248b80fb57``).

Why by hand: the Python LevelDB bindings open LevelDB *databases* (directories with
a MANIFEST and logs), not a lone table file, and TensorFlow's reader ships only inside
``tensorflow``. The format is small; we verify every block checksum on read, read
snappy-compressed blocks through ``cramjam`` when met, and write uncompressed blocks
exactly as TF's ``TableBuilder`` lays them out (same separators, restart points and
block size), so our files are byte-for-byte what TF writes for the same entries.

A table may be an object in remote storage (a URL, or a :class:`~convert.storage.RemotePath`):
its footer and blocks are then read by ranged GETs (:func:`convert.storage.open_input`).
"""

from __future__ import annotations

import bisect
import os
import struct
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import google_crc32c

from ... import storage
from ...errors import CorruptFileError, ReadError
from ...lazy import np
from ...wire import ProtoError, encode_varint, read_varint

MAGIC = 0xDB4775248B80FB57
MAGIC_BYTES = struct.pack("<Q", MAGIC)
FOOTER_SIZE = 48
TRAILER_SIZE = 5
NO_COMPRESSION, SNAPPY = 0, 1
BLOCK_SIZE = 262144  # tensorflow/core/lib/io/table_options.h
RESTART_INTERVAL = 16
_MASK_DELTA = 0xA282EAD8
_CACHE_LIMIT = 4 << 20  # bytes: blocks larger than this are not cached
_SNAPPY_MAX_RATIO = 22  # snappy's densest element, a 3-byte copy of 64 bytes, expands 21.3 times


def crc32c_extend(crc: int, buf) -> int:
    """crc32c over any buffer (google_crc32c takes only bytes or NumPy arrays, not memoryviews)."""
    if not isinstance(buf, bytes):
        if len(buf) <= 1 << 16:  # small (every index block): a copy, and NumPy stays unloaded
            buf = bytes(buf)
        elif not isinstance(buf, np.ndarray):
            buf = np.frombuffer(buf, dtype=np.uint8)
    return google_crc32c.extend(crc, buf)


def mask_crc(crc: int) -> int:
    """LevelDB/TF masked crc32c: rotate right by 15 bits and add a constant."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def _open(path: os.PathLike | str | storage.RemotePath):
    """A table file open for reading: a local file, or a remote object (ranged GETs)."""
    return storage.as_path(path).open("rb") if storage.is_remote(path) else open(path, "rb")  # type: ignore[arg-type]


def has_table_magic(path: os.PathLike | str | storage.RemotePath) -> bool:
    """True when ``path`` is a regular file ending with the table magic (cheap, never raises)."""
    try:
        with _open(path) as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < FOOTER_SIZE:
                return False
            f.seek(-8, os.SEEK_END)
            return f.read(8) == MAGIC_BYTES
    except (OSError, ReadError):  # ReadError: a remote path's (convert.storage)
        return False


def _decode_handle(buf, pos: int) -> tuple[tuple[int, int], int]:
    offset, pos = read_varint(buf, pos)
    size, pos = read_varint(buf, pos)
    return (offset, size), pos


def encode_handle(offset: int, size: int) -> bytes:
    return encode_varint(offset) + encode_varint(size)


def iter_block(data, seek: bytes | None = None) -> Iterator[tuple[bytes, memoryview]]:
    """The (key, value) entries of one decoded block, in order; with ``seek``, from the last restart
    point whose key is at most ``seek`` (a binary search over the block's restart array, as
    LevelDB's Block::Iter::Seek: a lookup reads at most one restart interval, not the block)."""
    mv = memoryview(data)
    n = len(mv)
    if n < 4:
        raise ProtoError("block too short")
    num_restarts = struct.unpack_from("<I", mv, n - 4)[0]
    limit = n - 4 - 4 * num_restarts
    if num_restarts == 0 and n > 4 or limit < 0:
        raise ProtoError("bad restart array")
    pos, key = 0, b""
    if seek is not None and num_restarts > 1:
        lo, hi = 0, num_restarts - 1  # the answer: the last restart whose key <= seek (restart 0 if none)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            at = struct.unpack_from("<I", mv, limit + 4 * mid)[0]
            if at >= limit:
                raise ProtoError("bad restart point")
            shared, q = read_varint(mv, at)
            non_shared, q = read_varint(mv, q)
            _, q = read_varint(mv, q)
            if shared != 0 or q + non_shared > limit:
                raise ProtoError("bad restart point")
            if bytes(mv[q:q + non_shared]) <= seek:
                lo = mid
            else:
                hi = mid - 1
        pos = struct.unpack_from("<I", mv, limit + 4 * lo)[0]
        if pos >= limit:
            raise ProtoError("bad restart point")
    while pos < limit:
        shared, pos = read_varint(mv, pos)
        non_shared, pos = read_varint(mv, pos)
        vlen, pos = read_varint(mv, pos)
        if shared > len(key) or pos + non_shared + vlen > limit:
            raise ProtoError("bad block entry")
        key = key[:shared] + bytes(mv[pos:pos + non_shared])
        pos += non_shared
        yield key, mv[pos:pos + vlen]
        pos += vlen


def block_entries(data) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of one decoded block, in order, in one pass: what :func:`iter_block`
    yields, as bytes (no memoryviews), for a reader that wants them all (a V2 index of 50,000
    entries). Entries whose three lengths are one-byte varints (all of a TF index's) take a
    short path; the others, and every malformation, go through :func:`~convert.wire.read_varint`."""
    b = bytes(data)
    n = len(b)
    if n < 4:
        raise ProtoError("block too short")
    num_restarts = int.from_bytes(b[n - 4:], "little")
    limit = n - 4 - 4 * num_restarts
    if num_restarts == 0 and n > 4 or limit < 0:
        raise ProtoError("bad restart array")
    out = []
    pos, key = 0, b""
    while pos < limit:
        shared, non_shared, vlen = b[pos:pos + 3] if pos + 3 <= limit else (0x80, 0, 0)
        if (shared | non_shared | vlen) & 0x80:
            shared, pos = read_varint(b, pos)
            non_shared, pos = read_varint(b, pos)
            vlen, pos = read_varint(b, pos)
        else:
            pos += 3
        end = pos + non_shared
        if shared > len(key) or end + vlen > limit:
            raise ProtoError("bad block entry")
        key = key[:shared] + b[pos:end] if shared else b[pos:end]
        pos = end + vlen
        out.append((key, b[end:pos]))
    return out


class TableReader:
    """Random and sequential access to one table file; every block's crc is checked.

    Errors are :class:`CorruptFileError` naming the file (and ``label`` when given).
    """

    def __init__(self, path: os.PathLike | str | storage.RemotePath, cache_blocks: int = 4):
        self.remote = storage.as_path(path) if storage.is_remote(path) else None
        self.path = str(self.remote) if self.remote is not None else os.fspath(path)  # type: ignore[arg-type]
        self._cache: OrderedDict[int, bytes | memoryview] = OrderedDict()
        self._cache_size = cache_blocks
        self._lookups: OrderedDict[int, dict[bytes, bytes]] = OrderedDict()  # blocks decoded for get()
        self._asked: set[int] = set()  # blocks get() looked into once
        try:
            size = self.remote.stat().st_size if self.remote is not None else os.path.getsize(self.path)
            with _open(self.remote or self.path) as f:
                if size < FOOTER_SIZE:
                    raise CorruptFileError(self.path, f"too short for a table ({size} bytes); truncated?")
                f.seek(size - FOOTER_SIZE)
                footer = f.read(FOOTER_SIZE)
        except OSError as e:
            raise ReadError(self.path, f"cannot open: {e.strerror}") from None
        if footer[-8:] != MAGIC_BYTES:
            raise CorruptFileError(self.path, "no table magic at the end of the file; truncated or not a TF checkpoint")
        self.file_size = size
        try:
            metaindex_handle, pos = _decode_handle(footer, 0)
            index_handle, _ = _decode_handle(footer, pos)
            # TF never uses the metaindex block (empty in its files) but it is part of the file:
            # checking its crc too means no flipped bit anywhere but the footer padding goes unseen.
            self.read_block(metaindex_handle)
            index = self.read_block(index_handle)
            self.index: list[tuple[bytes, tuple[int, int]]] = [
                (k, _decode_handle(v, 0)[0]) for k, v in iter_block(index)]
        except ProtoError as e:
            raise CorruptFileError(self.path, f"bad table index: {e}") from None
        self._index_keys = [k for k, _ in self.index]

    def read_block(self, handle: tuple[int, int], label: str | None = None) -> bytes | memoryview:
        """The decoded contents of the block at ``handle``, crc-checked and decompressed."""
        offset, size = handle
        cached = self._cache.get(offset)
        if cached is not None:
            self._cache.move_to_end(offset)
            return cached
        if offset + size + TRAILER_SIZE > self.file_size:
            raise CorruptFileError(self.path, f"block at {offset} runs past the end of the file; truncated?", label)
        with _open(self.remote or self.path) as f:
            f.seek(offset)
            raw = f.read(size + TRAILER_SIZE)
        if len(raw) != size + TRAILER_SIZE:
            raise CorruptFileError(self.path, "file is truncated", label)
        ctype = raw[size]
        stored = struct.unpack_from("<I", raw, size + 1)[0]
        actual = mask_crc(google_crc32c.extend(google_crc32c.value(raw[:size]), raw[size:size + 1]))  # bytes: no NumPy
        if stored != actual:
            raise CorruptFileError(self.path, f"block checksum mismatch at offset {offset}", label)
        data: bytes | memoryview
        if ctype == NO_COMPRESSION:
            data = memoryview(raw)[:size]  # no copy: a V1 block can hold a whole tensor
        elif ctype == SNAPPY:
            # The block starts with its decompressed length, which the decompressor allocates up
            # front (and aborts the process when it cannot): check it against snappy's best ratio.
            try:
                claimed = read_varint(raw, 0)[0] if size else 0
            except ProtoError:
                claimed = -1
            if not 0 <= claimed <= _SNAPPY_MAX_RATIO * size + 64:
                raise CorruptFileError(self.path, f"bad snappy block at offset {offset}: claims {claimed} bytes "
                                       f"from {size}", label)
            try:
                import cramjam
                data = bytes(cramjam.snappy.decompress_raw(raw[:size]))
            except ImportError:  # pragma: no cover - cramjam is a core dependency
                raise ReadError(self.path, "snappy-compressed block needs the 'cramjam' package", label) from None
            except Exception as e:  # cramjam.DecompressionError
                raise CorruptFileError(self.path, f"bad snappy block at offset {offset}: {e}", label) from None
        else:
            raise CorruptFileError(self.path, f"unknown block compression type {ctype}", label)
        if len(data) <= _CACHE_LIMIT:  # V1 blocks can hold a whole (huge) tensor: never keep those
            self._cache[offset] = data
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return data

    def items(self) -> Iterator[tuple[bytes, memoryview]]:
        """Every (key, value) of the table in key order."""
        for _, handle in self.index:
            block = self.read_block(handle)
            try:
                yield from iter_block(block)
            except ProtoError as e:
                raise CorruptFileError(self.path, f"bad data block at offset {handle[0]}: {e}") from None

    def entries(self) -> list[tuple[bytes, bytes]]:
        """:meth:`items`, all at once (:func:`block_entries`: one pass per block, bytes values)."""
        out: list[tuple[bytes, bytes]] = []
        for _, handle in self.index:
            block = self.read_block(handle)
            try:
                out += block_entries(block)
            except ProtoError as e:
                raise CorruptFileError(self.path, f"bad data block at offset {handle[0]}: {e}") from None
        return out

    def block_for(self, key: bytes) -> tuple[int, int] | None:
        """The handle (offset, size) of the only block that may hold ``key``, or None."""
        i = bisect.bisect_left(self._index_keys, key)
        return self.index[i][1] if i < len(self.index) else None

    def get(self, key: bytes, label: str | None = None) -> bytes | memoryview | None:
        """The value stored under ``key``, or None."""
        handle = self.block_for(key)
        if handle is None:
            return None
        offset = handle[0]
        found = self._lookups.get(offset)
        if found is not None:
            self._lookups.move_to_end(offset)
            return found.get(key)
        block = self.read_block(handle, label)
        if offset in self._asked and len(block) <= _CACHE_LIMIT:
            # a second key of this block (a V1 file read tensor by tensor): decoded whole, once
            try:
                self._lookups[offset] = found = dict(block_entries(block))
            except ProtoError as e:
                raise CorruptFileError(self.path, f"bad data block: {e}", label) from None
            if len(self._lookups) > self._cache_size:
                self._lookups.popitem(last=False)
            return found.get(key)
        self._asked.add(offset)
        try:
            for k, v in iter_block(block, key):
                if k == key:
                    return v
                if k > key:
                    return None
        except ProtoError as e:
            raise CorruptFileError(self.path, f"bad data block: {e}", label) from None
        return None


# ------------------------------------------------------------------ writing

def shortest_separator(start: bytes, limit: bytes) -> bytes:
    """LevelDB BytewiseComparator::FindShortestSeparator."""
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n:
        b = start[i]
        if b < 0xFF and b + 1 < limit[i]:
            return start[:i] + bytes([b + 1])
    return start


def short_successor(key: bytes) -> bytes:
    """LevelDB BytewiseComparator::FindShortSuccessor."""
    for i, b in enumerate(key):
        if b != 0xFF:
            return key[:i] + bytes([b + 1])
    return key


class _BlockBuilder:
    def __init__(self, restart_interval: int):
        self.interval = restart_interval
        self.reset()

    def reset(self):
        self.buf = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""

    def add(self, key: bytes, value) -> None:
        self.add_header(key, len(value))
        self.buf += value

    def add_header(self, key: bytes, value_length: int) -> None:
        """An entry whose value's bytes the caller appends (or streams) next."""
        shared = 0
        if self.counter < self.interval:
            n = min(len(key), len(self.last_key))
            while shared < n and key[shared] == self.last_key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.counter = 0
        self.buf += encode_varint(shared) + encode_varint(len(key) - shared) + encode_varint(value_length)
        self.buf += key[shared:]
        self.last_key = key
        self.counter += 1

    def size_estimate(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def finish(self) -> bytearray:
        self.buf += self.trailer()
        return self.buf

    def trailer(self) -> bytes:
        """The restart points and their count, which end the block."""
        return struct.pack(f"<{len(self.restarts) + 1}I", *self.restarts, len(self.restarts))

    @property
    def empty(self) -> bool:
        return not self.buf


class TableWriter:
    """Writes a table to an open binary file, entry by entry, in strictly increasing key order.

    Memory holds one data block (or one value larger than a block).
    """

    def __init__(self, f, block_size: int = BLOCK_SIZE, restart_interval: int = RESTART_INTERVAL):
        self.f = f
        self.block_size = block_size
        self.offset = 0
        self.data = _BlockBuilder(restart_interval)
        self.index = _BlockBuilder(1)
        self.last_key: bytes | None = None
        self.pending: tuple[int, int] | None = None  # handle of the last flushed block, awaiting its index key

    def add(self, key: bytes, value) -> None:
        self._next(key, len(value))
        self.data.add(key, value)
        if self.data.size_estimate() >= self.block_size:
            self._flush()

    def add_streamed(self, key: bytes, length: int, pieces: Iterable[bytes]) -> None:
        """Like ``add(key, b"".join(pieces))``, same bytes, but a value larger than a block is
        written as its pieces come (memory: one piece), not held whole."""
        if length < self.block_size:
            self.add(key, b"".join(pieces))
            return
        self._next(key, length)
        self.data.add_header(key, length)  # the block with this entry is flushed right after it, as add() does
        head, tail = bytes(self.data.buf), self.data.trailer()
        crc, written = crc32c_extend(0, head), 0
        self.f.write(head)
        for piece in pieces:
            crc = crc32c_extend(crc, piece)
            self.f.write(piece)
            written += len(piece)
        if written != length:
            raise ValueError(f"a streamed value gave {written} bytes, announced {length}")
        crc = crc32c_extend(crc32c_extend(crc, tail), b"\x00")
        self.f.write(tail + b"\x00" + struct.pack("<I", mask_crc(crc)))
        size = len(head) + length + len(tail)
        self.pending = (self.offset, size)
        self.offset += size + TRAILER_SIZE
        self.data.reset()

    def _next(self, key: bytes, value_length: int) -> None:
        if self.last_key is not None and key <= self.last_key:
            raise ValueError(f"table keys must increase: {key!r} after {self.last_key!r}")
        if self.last_key is not None and len(key) + value_length >= 2 * self.block_size:
            self._flush()  # TF's TableBuilder::Add: an entry that would make its block overly large starts one
        if self.pending is not None:
            assert self.last_key is not None  # a pending block holds entries: the last is last_key
            self.index.add(shortest_separator(self.last_key, key), encode_handle(*self.pending))
            self.pending = None
        self.last_key = key

    def _flush(self) -> None:
        if self.data.empty:
            return
        self.pending = self._write_block(self.data.finish())
        self.data.reset()

    def _write_block(self, contents) -> tuple[int, int]:
        handle = (self.offset, len(contents))
        crc = mask_crc(crc32c_extend(crc32c_extend(0, contents), b"\x00"))
        self.f.write(contents)
        self.f.write(b"\x00" + struct.pack("<I", crc))
        self.offset += len(contents) + TRAILER_SIZE
        return handle

    def finish(self) -> None:
        self._flush()
        meta_handle = self._write_block(_BlockBuilder(1).finish())
        if self.pending is not None:
            assert self.last_key is not None  # a pending block holds entries: the last is last_key
            self.index.add(short_successor(self.last_key), encode_handle(*self.pending))
            self.pending = None
        index_handle = self._write_block(self.index.finish())
        footer = encode_handle(*meta_handle) + encode_handle(*index_handle)
        footer = footer.ljust(FOOTER_SIZE - 8, b"\x00") + MAGIC_BYTES
        self.f.write(footer)
        self.offset += len(footer)
