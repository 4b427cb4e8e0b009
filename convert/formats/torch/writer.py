"""Writing what ``torch.save(OrderedDict)`` writes, without torch: the pickle
(:mod:`.pickle_writer`) and the storages in a stored zip, streamed (see :mod:`convert.formats.torch`)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import BinaryIO, cast

from ... import storage
from ...errors import ConvertError, WriteError
from ...ir import Tensor, TensorDict, mapped_checksums, zlib_crc32
from . import torch_pickle as tp
from .containers import _METADATA_RECORD
from .pickle_writer import StorageOut, state_dict_pickle

_ALIGN = 64


def write(td: TensorDict, path: os.PathLike | str, **_opts) -> None:
    """Write ``td`` as a ``torch.save`` zip file of an ``OrderedDict`` name -> tensor.

    Args:
        td: the tensors (every dtype but string).
        path: the output file (must not exist); a :class:`~convert.storage.RemotePath` of
            ``outputs.atomic_output`` for a remote output (an upload, written in one pass).

    Example:
        >>> write(TensorDict.from_arrays({"w": np.ones((2, 2), np.float32)}), "model.pt")  # doctest: +SKIP
    """
    out = storage.as_path(path)
    remote = isinstance(out, storage.RemotePath)
    where = str(out)
    entries = []
    storage_of: list[tuple[Tensor, StorageOut, bool]] = []
    by_source: dict[int, tuple[Tensor, StorageOut]] = {}
    for t in td.values():
        prior = by_source.get(id(t.source))
        if prior is not None and prior[0].dtype == t.dtype and prior[0].shape == t.shape:
            out_storage = prior[1]
            fresh = False
        else:
            untyped = t.dtype.name not in tp.STORAGE_DTYPES.values()
            numel = t.numel * (t.dtype.itemsize if untyped else 1)
            out_storage = StorageOut(str(len(by_source)), t.dtype, numel)
            by_source[id(t.source)] = (t, out_storage)
            fresh = True
        entries.append((t.name, out_storage, t.shape))
        storage_of.append((t, out_storage, fresh))
    pkl = state_dict_pickle(entries)
    digest = hashlib.sha256(pkl).digest()
    serialization_id = str(int.from_bytes(digest[:16], "little")).zfill(40)
    prefix = "archive/"
    try:
        # local: read too (CRCs are taken from a map of what was written); remote: an upload
        with out.open("wb") if isinstance(out, storage.RemotePath) else open(out, "xb+") as f:
            zf = _ZipWriter(f, where, streaming=remote)
            zf.add(prefix + "data.pkl", pkl)
            zf.add(prefix + ".format_version", b"1")
            zf.add(prefix + ".storage_alignment", b"64")
            zf.add(prefix + "byteorder", b"little")
            for t, out_storage, fresh in storage_of:
                if fresh:
                    zf.add(f"{prefix}data/{out_storage.key}", t)
            zf.add(prefix + "version", b"3\n")
            zf.add(prefix + ".data/serialization_id", serialization_id.encode())
            if td.portable_metadata:
                zf.add(prefix + _METADATA_RECORD,
                       json.dumps(td.portable_metadata, sort_keys=True, ensure_ascii=False).encode("utf-8"))
            zf.finish()
    except ConvertError:
        raise
    except FileExistsError:
        raise WriteError(where, "already exists") from None


class _Crc32Out:
    """A file that takes the CRC-32 of what goes through it (an upload cannot be read back)."""

    def __init__(self, f):
        self.f, self.crc = f, 0

    def write(self, data) -> int:
        self.crc = zlib_crc32(data, self.crc)
        return self.f.write(data)

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()


class _ZipWriter:
    """The stored (uncompressed) zip ``torch.save`` writes: each member's data starts at a multiple
    of 64 bytes (torch maps storages in place), with zip64 fields where a size or offset passes
    4 GiB. Tensor data is copied by :meth:`Tensor.copy_into` (in the kernel when it sits in a file);
    its CRC-32 is then taken from the page cache and patched into the member's header.

    ``streaming`` (an upload, which cannot seek back): each member's CRC-32 is taken as its bytes go
    out and written after them in a data descriptor (flag bit 3, APPNOTE 4.3.9), as zip writers to
    pipes do; zipfile, torch.load and our reader take the CRC from the central directory."""

    _DOS_DATE, _DOS_TIME = (1 << 5) | 1, 0  # 1980-01-01 00:00, as zipfile writes for torch's fixed date
    _MAX32 = 0xFFFFFFFF

    def __init__(self, f, path: str, streaming: bool = False):
        self.f, self.path, self.streaming = f, path, streaming
        self.flags = 0x08 if streaming else 0
        self.members: list[tuple[bytes, int, int, int]] = []

    def add(self, name: str, data: bytes | Tensor) -> None:
        f, raw = self.f, name.encode("utf-8")
        nbytes = len(data) if isinstance(data, bytes) else data.nbytes
        start = f.tell()
        big = nbytes >= self._MAX32
        extra = struct.pack("<HHQQ", 1, 16, nbytes, nbytes) if big else b""
        pad = (-(start + 30 + len(raw) + len(extra) + 4)) % _ALIGN
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # the 'FB' padding field, as torch's miniz writes
        size32 = self._MAX32 if big else nbytes
        f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if big else 20, self.flags, 0, self._DOS_TIME, self._DOS_DATE,
                            0, size32, size32, len(raw), len(extra)) + raw + extra)
        begin = f.tell()
        if begin % _ALIGN:  # pragma: no cover - guards the arithmetic above
            raise WriteError(self.path, f"internal error: record {name} is not aligned")
        if isinstance(data, bytes):
            f.write(data)
            crc = zlib_crc32(data, 0)
        elif self.streaming:
            counted = _Crc32Out(f)
            data.copy_into(cast(BinaryIO, counted))
            crc = counted.crc
        else:
            data.copy_into(f)
            f.flush()
            zip_crc = mapped_checksums(f.fileno(), begin, nbytes, crc32=True, crc32c=False).crc32
            assert zip_crc is not None  # asked for (crc32=True)
            crc = zip_crc
        if self.streaming:
            f.write(struct.pack("<IIQQ" if big else "<IIII", 0x08074B50, crc, nbytes, nbytes))
        else:
            end = f.tell()
            f.seek(start + 14)
            f.write(struct.pack("<I", crc))
            f.seek(end)
        self.members.append((raw, start, nbytes, crc))

    def finish(self) -> None:
        f, m32 = self.f, self._MAX32
        directory = f.tell()
        for raw, offset, size, crc in self.members:
            wide = [size, size] if size >= m32 else []
            wide += [offset] if offset >= m32 else []
            extra = struct.pack(f"<HH{len(wide)}Q", 1, 8 * len(wide), *wide) if wide else b""
            version = 45 if wide else 20
            f.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, self.flags, 0, self._DOS_TIME,
                                self._DOS_DATE, crc, min(size, m32), min(size, m32), len(raw), len(extra),
                                0, 0, 0, 0, min(offset, m32)) + raw + extra)
        end, count = f.tell(), len(self.members)
        size = end - directory
        if count >= 0xFFFF or directory >= m32 or size >= m32:
            f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, size, directory))
            f.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                            min(size, m32), min(directory, m32), 0))
