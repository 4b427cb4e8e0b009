"""Where a torch checkpoint's pickle and storages are: the zip layout's records, or the legacy
layout's stream of pickles and storage blocks (see :mod:`convert.formats.torch`)."""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ... import storage
from ...errors import CorruptFileError, ReadError
from . import script
from . import torch_pickle as tp

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
PROTOCOL_VERSION = 1001
_METADATA_RECORD = "convert/metadata.json"
_LEGACY_HEAD = b"\x80\x02\x8a\x0a" + MAGIC_NUMBER.to_bytes(10, "little")
_DETECT_BLOCK = 64 << 10


# ---- detect ------------------------------------------------------------------------------------

def detect(path: Path) -> bool:
    """A torch zip archive (``*/data.pkl``) or a legacy pickle stream starting with torch's magic number."""
    try:
        p = storage.as_path(path)
        if not p.is_file():
            return False
        with open_input(p if isinstance(p, storage.RemotePath) else str(p), _DETECT_BLOCK) as f:  # remote: small blocks (a zip's directory is at its end)
            head = f.read(64)
            if head.startswith(b"PK\x03\x04"):
                f.seek(0)
                return _zip_prefix(_open_zip(f)) is not None
            if head.startswith(_LEGACY_HEAD):
                return True
            if head.startswith(b"\x80") and len(head) > 2:  # other pickle protocols: read the first object
                f.seek(0)
                return tp.load(io.BytesIO(f.read(4096)), allow_globals=False) == MAGIC_NUMBER
    except (OSError, ReadError, zipfile.BadZipFile, tp.RefusedGlobal, tp.PickleFormatError, tp.DamagedPickle):
        return False  # not mine (ReadError: a remote path's): no zip, no pickle (or not torch's)
    return False


def _open_zip(f) -> zipfile.ZipFile:
    """``zipfile.ZipFile(f)``, a damaged archive always being :class:`zipfile.BadZipFile` (zipfile also
    raises NotImplementedError for a version it does not know and UnicodeDecodeError for a name
    flagged UTF-8 that is not)."""
    try:
        return zipfile.ZipFile(f)
    except (NotImplementedError, ValueError) as e:
        raise zipfile.BadZipFile(f"{type(e).__name__}: {e}") from None


def _zip_prefix(zf: zipfile.ZipFile) -> str | None:
    for name in zf.namelist():
        head, sep, tail = name.partition("/")
        if sep and tail == "data.pkl":
            return head + "/"
    return None


# ---- read: containers ----------------------------------------------------------------------------

Where = str | storage.RemotePath
"""A checkpoint's file: a local path, or an object in remote storage (read by ranged GETs)."""


def open_input(path: Where, block_size: int = storage.HEADER_BLOCK):
    """``path`` open for reading (remote: read-ahead blocks of ``block_size``; see
    :func:`convert.storage.open_input`)."""
    return path.open("rb", block_size=block_size) if isinstance(path, storage.RemotePath) else open(path, "rb")


_EMBEDDED_BLOCK = 64 << 10
"""Read-ahead of a torch.save archive embedded in a larger object (a DCP item): its records but the
storage are a few KB, and a block of the default size would fetch the neighbouring items' data."""


@dataclass(frozen=True)
class _Blob:
    """Where a storage's bytes are: ``nbytes`` at ``offset`` of the file, or inside a compressed member."""

    path: Where
    offset: int
    nbytes: int
    member: str | None = None  # set when the zip member is compressed (then offset is unused)
    big_endian: bool = False
    crc32: int | None = None  # the zip member's CRC-32 (zip files)

    def read(self, start: int, length: int, label: str) -> bytes:
        if self.member is not None:
            try:
                with open_input(self.path) as raw, zipfile.ZipFile(raw) as zf, zf.open(self.member) as f:
                    f.seek(start)
                    data = f.read(length)
            except OSError as e:
                raise ReadError(self.path, f"cannot read: {e}", label) from None
            except Exception as e:  # noqa: BLE001 - BadZipFile, zlib.error, NotImplementedError (method), EOFError
                raise CorruptFileError(self.path, f"damaged zip record {self.member} ({type(e).__name__}: {e})",
                                       label) from None
        else:  # remote: parallel ranged GETs
            data = storage.region(self.path, self.offset + start, length, label=label).read()
        if len(data) != length:
            raise CorruptFileError(self.path, "file is truncated", label)
        return data


@dataclass
class _Loaded:
    root: object
    blobs: dict[str, _Blob]  # root storage key -> bytes
    layout: str
    metadata: dict[str, str]
    stubbed: dict[str, int]  # globals not loaded (placeholders made instead) -> how often the pickle names them


_MAX_RECORD = 1 << 30  # data.pkl and the small records: more is not a state_dict
_MAX_RATIO = 1100  # deflate's best ratio is 1032:1; a record claiming more is lying about its size


def _check_record(info: zipfile.ZipInfo, size: int, path: Where, limit: int | None = None) -> None:
    """Refuse a zip record whose sizes cannot be true, before anything is allocated for it
    (zipfile would ask the file for all ``compress_size`` bytes in one read)."""
    stored = info.compress_type == zipfile.ZIP_STORED
    if (info.compress_size > size or (stored and info.file_size != info.compress_size)
            or info.file_size > _MAX_RATIO * info.compress_size + 64 or (limit is not None and info.file_size > limit)):
        raise CorruptFileError(path, f"zip record {info.filename} claims {info.file_size} bytes "
                               f"({info.compress_size} compressed) in a file of {size} bytes")


def _read_record(zf: zipfile.ZipFile, name: str, size: int, path: Where) -> bytes:
    _check_record(zf.getinfo(name), size, path, _MAX_RECORD)
    return zf.read(name)


class _Window:
    """Bytes ``[start, start + length)`` of an open file as a seekable read-only file: a torch.save
    archive embedded in a larger file (each item of a DCP ``.distcp`` file is one)."""

    def __init__(self, f, start: int, length: int):
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, pos + (0, self._pos, self._length)[whence])
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self._length - self._pos)
        self._f.seek(self._start + self._pos)
        data = self._f.read(left if n is None or n < 0 else min(n, left))
        self._pos += len(data)
        return data


def _load_zip(path: Where, start: int = 0, length: int | None = None, stubs: bool = False) -> _Loaded:
    """The archive that is the file, or (``length`` given) the one at ``[start, start + length)`` of it.
    ``stubs``: globals not loaded become placeholders (else they are refused)."""
    with open_input(path, storage.HEADER_BLOCK if length is None else _EMBEDDED_BLOCK) as raw:
        if length is not None:
            size = length
        elif isinstance(path, storage.RemotePath):
            size = path.stat().st_size
        else:
            size = os.fstat(raw.fileno()).st_size
        f = raw if length is None else _Window(raw, start, length)
        zf = zipfile.ZipFile(f)
        prefix = _zip_prefix(zf)
        if prefix is None:
            raise ReadError(path, "zip file without a data.pkl: not a torch checkpoint")
        names = set(zf.namelist())
        scripted = script.is_script(names, prefix)
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = _read_record(zf, f"{prefix}byteorder", size, path).decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CorruptFileError(path, f"unknown byte order {byteorder!r}")
        storages: dict[str, tp.StorageRef] = {}
        stubbed: dict[str, int] | None = {} if stubs else None
        metadata: dict[str, str] = {}
        root = tp.load(io.BytesIO(_read_record(zf, f"{prefix}data.pkl", size, path)), storages=storages,
                       stubbed=stubbed)
        if scripted:  # the module tree's classes are placeholders by design: not worth a note
            metadata["torch.script_class"] = getattr(root, "cls", "")
            sources = {n: _read_record(zf, n, size, path) for n in script.code_records(zf, prefix, path)}
            root = script.state_dict(root, script.declared(sources, prefix, path), path)
            stubbed = {k: n for k, n in (stubbed or {}).items() if not k.startswith("__torch__.")}
        elif stubs:
            root = _unfold(root, path, metadata)
        if f"{prefix}{_METADATA_RECORD}" in names:
            stored = json.loads(_read_record(zf, f"{prefix}{_METADATA_RECORD}", size, path).decode("utf-8"))
            if isinstance(stored, dict):
                metadata.update({str(k): str(v) for k, v in stored.items()})
        blobs = {}
        records = []  # the stored (uncompressed) storage records
        for key, ref in storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise CorruptFileError(path, f"storage '{key}' is missing (no record {member})")
            info = zf.getinfo(member)
            _check_record(info, size, path)
            if info.file_size < ref.nbytes:
                raise CorruptFileError(path, f"storage '{key}' holds {info.file_size} bytes, expected {ref.nbytes}")
            if info.compress_type == zipfile.ZIP_STORED:
                records.append((key, member, info))
            elif length is not None:  # _Blob reopens a compressed member by path: the whole file's archive
                raise CorruptFileError(path, f"compressed storage record {member} in an embedded archive")
            else:
                blobs[key] = _Blob(path, 0, info.file_size, member=member, big_endian=byteorder == "big")
        # the records' local headers (their name and extra lengths): remote, one round trip for all
        heads = storage.read_ranges(raw, path, [(start + i.header_offset, start + i.header_offset + 30) for _, _, i in records])
        for (key, member, info), header in zip(records, heads, strict=True):
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise CorruptFileError(path, f"bad local header for {member}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            offset = info.header_offset + 30 + name_len + extra_len
            if offset + info.file_size > size:
                raise CorruptFileError(path, f"file is truncated (storage '{key}' ends past the end)")
            blobs[key] = _Blob(path, start + offset, info.file_size, big_endian=byteorder == "big", crc32=info.CRC)
    layout = "zip" if f"{prefix}byteorder" in names else "zip (no byteorder record)"
    if scripted:
        layout = f"torchscript {layout}"
    return _Loaded(root, blobs, layout, metadata, stubbed or {})


def _unfold(root, path: Where, metadata: dict[str, str]):
    """Whole pickled models (``torch.save(model)``) in ``root`` as their state_dicts, said in ``torch.pickled_modules``."""
    found: dict[str, str] = {}
    root = script.unfold_modules(root, path, found)
    if found:
        metadata["torch.pickled_modules"] = json.dumps(found)
    return root


def _load_legacy(path: Where, stubs: bool = False) -> _Loaded:
    with open_input(path) as f:
        size = path.stat().st_size if isinstance(path, storage.RemotePath) else os.fstat(f.fileno()).st_size
        if tp.load(f, allow_globals=False) != MAGIC_NUMBER:
            raise CorruptFileError(path, "not a torch legacy file (bad magic number)")
        if (version := tp.load(f, allow_globals=False)) != PROTOCOL_VERSION:
            raise ReadError(path, f"unsupported torch legacy protocol version {version!r}")
        sys_info = tp.load(f, allow_globals=False)
        big = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
        storages: dict[str, tp.StorageRef] = {}
        stubbed: dict[str, int] | None = {} if stubs else None
        root = tp.load(f, storages=storages, stubbed=stubbed)
        metadata: dict[str, str] = {}
        if stubs:
            root = _unfold(root, path, metadata)
        keys = tp.load(f, allow_globals=False)
        if not isinstance(keys, list):
            raise CorruptFileError(path, "storage key list is missing")
        pos = f.tell()
        blobs: dict[str, _Blob] = {}
        for key in keys:
            key = str(key)
            ref = storages.get(key)
            if ref is None:
                raise CorruptFileError(path, f"storage '{key}' is listed but no tensor uses it")
            if ref.dtype is None:
                raise CorruptFileError(path, f"storage '{key}' is untyped, which a legacy file never holds")
            head, = storage.read_ranges(f, path, [(pos, pos + 8)])  # remote: one small GET per storage
            if len(head) != 8:
                raise CorruptFileError(path, f"file is truncated (storage '{key}')")
            count = struct.unpack(">q" if big else "<q", head)[0]
            nbytes = count * ref.dtype.itemsize
            if count < 0 or pos + 8 + nbytes > size:
                raise CorruptFileError(path, f"file is truncated (storage '{key}' ends past the end)")
            if nbytes < ref.nbytes:
                raise CorruptFileError(path, f"storage '{key}' holds {nbytes} bytes, expected {ref.nbytes}")
            blobs[key] = _Blob(path, pos + 8, nbytes, big_endian=big)
            pos += 8 + nbytes
        missing = [k for k in storages if k not in blobs]
        if missing:
            raise CorruptFileError(path, f"storage(s) {', '.join(missing[:5])} have no data")
    return _Loaded(root, blobs, "legacy", metadata, stubbed or {})
