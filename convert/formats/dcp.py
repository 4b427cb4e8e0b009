"""PyTorch Distributed Checkpoint (DCP, ``torch.distributed.checkpoint``) folders, read.

Spec: there is no written one; the reference is torch/distributed/checkpoint/metadata.py and
filesystem.py (https://github.com/pytorch/pytorch/tree/main/torch/distributed/checkpoint). A
checkpoint is a folder holding:

* ``.metadata``: a pickled ``Metadata`` (written by the coordinator rank): ``state_dict_metadata``
  maps each flattened name (``model.layers.0.weight``, ``optim.state.w.exp_avg``) to a
  ``TensorStorageMetadata`` (``TensorProperties`` with the dtype, the global ``size``, and the
  ``chunks``: ``ChunkStorageMetadata(offsets, sizes)``, one per shard a rank saved) or to a
  ``BytesStorageMetadata`` (any other object); ``storage_data`` maps ``MetadataIndex(fqn, offset)``
  to ``_StorageInfo(relative_path, offset, length, transform_descriptors)``: where the item's
  bytes lie.
* ``__<rank>_<n>.distcp`` files: the items back to back. With the default serialization
  (``SerializationFormat.TORCH_SAVE``) every item is a complete ``torch.save`` archive, a tensor
  chunk or a pickled object; the archive stores the chunk's bytes uncompressed.

Why by hand: no library reads DCP but torch itself, and torch's reader imports torch, needs the
whole state dict in memory (``dcp_to_torch_save``) and unpickles non-tensor items with
``torch.load(weights_only=False)``, which runs whatever the file asks. Here nothing from the files
runs: ``.metadata`` goes through the restricted unpickler of :mod:`convert.formats.torch_pickle`,
extended by inert stand-ins for the handful of DCP record classes (:data:`ALLOWED`); each item goes
through the torch adapter's archive reader (the same restricted unpickler). A tensor chunk stored
whole and contiguous is a :class:`~convert.ir.FileRegion` into the ``.distcp`` file (copied as
bytes); a tensor split across ranks is stitched from its chunks by their offsets: chunks of whole
rows (the usual FSDP/tensor-parallel split along dimension 0) stream one after the other (still
byte copies), other tilings are assembled in memory, one tensor at a time. Items are opened only
when their tensor is read, so listing a checkpoint reads ``.metadata`` and the non-tensor items.

Names are DCP's flattened names. Non-tensor entries go to metadata as ``dcp.extra.<name>`` (JSON,
strings as they are); what cannot be carried is listed in ``dcp.skipped``.

Remote folders (``Format.remote``, :mod:`convert.storage`; training checkpoints live in buckets):
``.metadata`` is one GET, each ``.distcp`` file one HEAD for its size; an item's archive is read
when its tensor is, through a read-ahead file of small blocks (its records but the storage are a
few KB), and the chunk's bytes as a :class:`~convert.storage.RemoteRegion` (large ranged GETs,
the CRC-32 checked on the way).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from .. import dtypes
from .. import storage as remote_storage
from ..crc import CRC32C, combine
from ..errors import ConvertError, CorruptFileError, ReadError
from ..ir import CHUNK, Source, Tensor, TensorDict
from ..lazy import np
from .base import Format

# The restricted unpickler and the torch.save archive reader, in one place (their home may move).
from .torch import torch_pickle as tp  # isort: skip
from .torch.containers import _load_zip as load_torch_archive  # isort: skip
from .torch.reader import _tensor_source as torch_tensor_source  # isort: skip
from .torch.weights import _record_rest as record_rest  # isort: skip
from ..wire import ProtoError, check_shape  # isort: skip

NAME = "dcp"
METADATA = ".metadata"
_MAX_METADATA = 1 << 30  # a .metadata of millions of chunks is tens of MB
_MAX_BYTES_ITEM = 64 << 20  # a non-tensor item (a step counter, a scheduler's state) is small
_MODULE = "torch.distributed.checkpoint.metadata"


# ---- stand-ins for DCP's record classes -----------------------------------------------------------

class _Record:
    """One of DCP's dataclasses as the pickle describes it: only the fields its state gives. The
    unpickler makes these (NEWOBJ with no arguments, then BUILD); nothing of torch's is ever made."""

    __slots__ = ("fields",)
    ORDER: tuple[str, ...] = ()
    """Field names of a state pickled as a tuple (``TensorProperties.__getstate__``)."""

    def __init__(self):
        self.fields: dict = {}

    def build(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)) \
                and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict state, slots state)
        if isinstance(state, tuple) and self.ORDER and len(state) == len(self.ORDER):
            state = dict(zip(self.ORDER, state, strict=True))
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise tp.PickleFormatError(f"unexpected state for {type(self).__name__}")
        self.fields.update(state)

    def get(self, key: str, default=None):
        return self.fields.get(key, default)


def _record(name: str, order: tuple[str, ...] = ()) -> type[_Record]:
    return type(name, (_Record,), {"__slots__": (), "ORDER": order})


_RECORDS = {name: _record(name, order) for name, order in (
    ("Metadata", ()), ("TensorStorageMetadata", ()), ("BytesStorageMetadata", ()),
    ("ChunkStorageMetadata", ()), ("MetadataIndex", ()), ("StorageMeta", ()), ("_StorageInfo", ()),
    ("TensorProperties", ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")),
)}


def _layout(name) -> str:
    """``torch.serialization._get_layout('torch.strided')``: the layout's name."""
    if not isinstance(name, str):
        raise tp.PickleFormatError("unexpected layout")
    return name.removeprefix("torch.")


def _memory_format(code) -> int:
    """``_MEM_FORMAT_ENCODING(0)``: the enum's value (0 contiguous, 1 channels last, 2 preserve)."""
    if not isinstance(code, int):
        raise tp.PickleFormatError("unexpected memory format")
    return code


def _path(*parts) -> str:
    """``pathlib.PosixPath('ckpt')`` (``StorageMeta.checkpoint_id``): its text."""
    if not all(isinstance(p, str) for p in parts):
        raise tp.PickleFormatError("unexpected path")
    return "/".join(parts)


ALLOWED: dict[tuple[str, str], object] = {
    **{(_MODULE, name): cls for name, cls in _RECORDS.items() if name != "_StorageInfo"},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _RECORDS["_StorageInfo"],
    (_MODULE, "_MEM_FORMAT_ENCODING"): _memory_format,
    ("torch.serialization", "_get_layout"): _layout,
    **{("pathlib", name): _path for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")},
}
"""What a DCP ``.metadata`` needs beyond a state_dict's globals (:data:`torch_pickle.ALLOWED`):
our own stand-ins, every one inert."""


class _MetadataUnpickler(tp.RestrictedUnpickler):
    """The restricted unpickler, plus :data:`ALLOWED`, NEWOBJ of our records only, BUILD on them."""

    dispatch = dict(tp.RestrictedUnpickler.dispatch)

    def find_class(self, module: str, name: str):
        found = ALLOWED.get((module, name))
        return found if found is not None else super().find_class(module, name)

    def persistent_load(self, pid):
        raise tp.PickleFormatError("a persistent id in DCP metadata")

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if not (isinstance(cls, type) and issubclass(cls, _Record)) or args != ():
            self._refuse()
        self.append(cls())

    def load_build(self):
        if len(self.stack) >= 2 and isinstance(self.stack[-2], _Record):
            state = self.stack.pop()
            self.stack[-1].build(state)
        else:
            super().load_build()

    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.BUILD[0]] = load_build


@contextmanager
def _translated(path, what: str, label: str | None = None):
    """Every failure of the unpickler or an archive as one ConvertError naming the file."""
    try:
        yield
    except ConvertError:
        raise
    except tp.RefusedGlobal as e:
        raise ReadError(path, f"{what}: refused to load global '{e.what}' (a DCP checkpoint needs no such thing, "
                        "and loading it could run code from the file)", label) from None
    except tp.PickleFormatError as e:
        raise CorruptFileError(path, f"{what}: {e}", label) from None
    except tp.DamagedPickle as e:
        raise CorruptFileError(path, f"{what}: damaged pickle ({e})", label) from None
    except zipfile.BadZipFile as e:
        raise CorruptFileError(path, f"{what}: damaged torch.save archive ({e})", label) from None
    except (pickle.UnpicklingError, EOFError) as e:
        raise CorruptFileError(path, f"{what}: damaged pickle ({e or 'unexpected end of data'})", label) from None
    except OSError as e:
        raise ReadError(path, f"cannot read: {e.strerror or e}", label) from None
    except Exception as e:  # noqa: BLE001 - a damaged pickle can raise anything; never leak a traceback
        raise CorruptFileError(path, f"{what}: damaged ({type(e).__name__}: {e})", label) from None


# ---- detect ------------------------------------------------------------------------------------

def _metadata_file(path: os.PathLike | str) -> Path:
    p: Path = remote_storage.as_path(path)  # type: ignore[assignment]  # a RemotePath for a URL
    return p / METADATA if p.is_dir() else p


def detect(path: Path) -> bool:
    """A folder (or its ``.metadata``) whose ``.metadata`` is a pickle of DCP's ``Metadata``."""
    try:
        meta = _metadata_file(path)
        if meta.name != METADATA or not meta.is_file():
            return False
        head = remote_storage.read_at(meta, 0, 256)
    except (OSError, ReadError):  # ReadError: a remote path's
        return False
    return head.startswith(b"\x80") and _MODULE.encode() in head


# ---- read: the metadata --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Item:
    """Where one item's bytes lie: ``length`` bytes at ``offset`` of a ``.distcp`` file."""

    path: str | remote_storage.RemotePath
    offset: int
    length: int


@dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    item: _Item


def _int(value, what: str) -> int:
    if type(value) is not int or value < 0:
        raise tp.PickleFormatError(f"bad {what}: {tp._short(value)}")
    return value


def _dims(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 64:
        raise tp.PickleFormatError(f"bad {what}: {tp._short(value)}")
    return tuple(_int(v, what) for v in value)


def _fields(obj, kind: str, what: str) -> _Record:
    if type(obj) is not _RECORDS[kind]:
        raise tp.PickleFormatError(f"{what} is not a {kind}")
    return obj


def _load_metadata(meta: Path) -> _Record:
    try:
        size = meta.stat().st_size
        if size > _MAX_METADATA:
            raise CorruptFileError(meta, f"{size} bytes: more than any DCP metadata")
        data = meta.read_bytes()
    except OSError as e:
        raise ReadError(meta, f"cannot read: {e.strerror}") from None
    with _translated(meta, "not DCP metadata"):
        root = _MetadataUnpickler(io.BytesIO(data)).load()
        tp.check_object_graph(root)
        return _fields(root, "Metadata", "the pickle")


def _storage(meta: Path, folder: Path, root: _Record) -> dict[tuple[str, tuple[int, ...] | None], _Item]:
    """``storage_data`` checked: each item inside a file of the folder, within its size."""
    raw = root.get("storage_data")
    if not isinstance(raw, dict):
        raise tp.PickleFormatError("storage_data is not a dict")
    sizes: dict[str, int] = {}
    out: dict[tuple[str, tuple[int, ...] | None], _Item] = {}
    for key, info in raw.items():
        key = _fields(key, "MetadataIndex", "a storage_data key")
        fqn = key.get("fqn")
        if not isinstance(fqn, str):
            raise tp.PickleFormatError("a storage_data key without a name")
        offset = key.get("offset")
        index = (fqn, None if offset is None else _dims(offset, "chunk offset"))
        info = _fields(info, "_StorageInfo", f"storage of '{fqn}'")
        name = info.get("relative_path")
        if not isinstance(name, str) or not name or "\0" in name or "/" in name or "\\" in name \
                or name in (".", "..") or name == METADATA:
            raise CorruptFileError(meta, f"item of '{fqn}' names {tp._short(name)}, not a file of the folder")
        if info.get("transform_descriptors"):
            raise ReadError(meta, f"items stored through extensions {tp._short(info.get('transform_descriptors'))}"
                            " (e.g. compressed) are not supported", fqn)
        start, length = _int(info.get("offset"), "item offset"), _int(info.get("length"), "item length")
        if name not in sizes:
            file = folder / name
            try:
                sizes[name] = file.stat().st_size if file.is_file() else -1
            except OSError:
                sizes[name] = -1
        if sizes[name] < 0:
            raise ReadError(meta, f"the file '{name}' holding '{fqn}' is missing")
        if start + length > sizes[name]:
            raise CorruptFileError(folder / name, f"item of '{fqn}' at [{start}, {start + length}) lies past the "
                                   f"end of the file ({sizes[name]} bytes; truncated?)")
        if index in out:
            raise CorruptFileError(meta, f"two storage entries for '{fqn}' at offsets {index[1]}")
        file = folder / name
        out[index] = _Item(file if isinstance(file, remote_storage.RemotePath) else str(file), start, length)
    return out


# ---- read: sources -------------------------------------------------------------------------------

class _ItemSource(Source):
    """A chunk's bytes, found in its torch.save archive when first asked for."""

    def __init__(self, item: _Item, dtype: dtypes.DType, sizes: tuple[int, ...], label: str):
        self.item, self.dtype, self.sizes, self.label = item, dtype, sizes, label
        self._inner: Source | None = None
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return math.prod(self.sizes) * self.dtype.itemsize

    def inner(self) -> Source:
        with self._lock:
            if self._inner is None:
                self._inner = self._open()
            return self._inner

    def _open(self) -> Source:
        item, name = self.item, self.label
        with _translated(item.path, "not a torch.save tensor item", name):
            head = remote_storage.read_at(item.path, item.offset, item.offset + 10)
            if head[8:10] == b'{"':  # a safetensors header where the archive should be
                raise ReadError(item.path, "saved with serialization_format=SAFETENSORS, which is not supported "
                                "(torch's own dcp_to_torch_save cannot read it either)", name)
            loaded = load_torch_archive(item.path, item.offset, item.length)
            ref = loaded.root
            if not isinstance(ref, tp.TensorRef):
                raise CorruptFileError(item.path, f"item at {item.offset} holds {type(ref).__name__}, not a tensor",
                                       name)
            if ref.dtype.ir != self.dtype or ref.shape != self.sizes:
                raise CorruptFileError(item.path, f"item at {item.offset} holds {ref.dtype.name}{list(ref.shape)}, "
                                       f"the metadata says {self.dtype}{list(self.sizes)}", name)
            blob = loaded.blobs.get(ref.storage.view_of or ref.storage.key)
            if blob is None:
                raise CorruptFileError(item.path, f"item at {item.offset} has no storage record", name)
            return torch_tensor_source(blob, ref, self.dtype, name, item.path)

    def chunks(self, nbytes: int, size: int = CHUNK) -> Iterator[bytes | np.ndarray]:
        return self.inner().chunks(nbytes, size)

    def array(self, dtype: dtypes.DType, shape: tuple[int, ...]) -> np.ndarray:
        return self.inner().array(dtype, shape)

    def digest(self, nbytes: int) -> int:
        return self.inner().digest(nbytes)

    def copy_into(self, out: BinaryIO, nbytes: int, progress: Callable[[int], None] | None = None,
                  verified_after: bool = False) -> int:
        return self.inner().copy_into(out, nbytes, progress, verified_after)


class _Stitched(Source):
    """A tensor saved in several chunks. ``rows``: the chunks are consecutive blocks of whole rows
    (in offset order), so the tensor's bytes are theirs one after the other; otherwise the tensor
    is assembled in memory."""

    def __init__(self, shape: tuple[int, ...], parts: list[tuple[_Chunk, _ItemSource]], rows: bool):
        self.shape, self.parts, self.rows = shape, parts, rows

    def array(self, dtype: dtypes.DType, shape: tuple[int, ...]) -> np.ndarray:
        out = np.empty(self.shape, dtype.numpy)  # every element is written: the chunks tile it (checked)
        for chunk, src in self.parts:
            index = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))
            out[index] = src.array(dtype, chunk.sizes)
        return out

    def chunks(self, nbytes: int, size: int = CHUNK) -> Iterator[bytes | np.ndarray]:
        if not self.rows:
            flat = self.array(self.parts[0][1].dtype, self.shape).reshape(-1).view(np.uint8)
            for start in range(0, len(flat), size):
                yield flat[start:start + size]
            return
        for _, src in self.parts:
            yield from src.chunks(src.nbytes, size)

    def digest(self, nbytes: int) -> int:
        if not self.rows:
            return super().digest(nbytes)
        crc = 0
        for _, src in self.parts:
            crc = crc32c_combine(crc, src.digest(src.nbytes), src.nbytes)
        return crc

    def copy_into(self, out: BinaryIO, nbytes: int, progress: Callable[[int], None] | None = None,
                  verified_after: bool = False) -> int:
        if not self.rows:
            return super().copy_into(out, nbytes, progress, verified_after)
        crc = 0
        for _, src in self.parts:  # each part by the fastest means it allows (a kernel copy)
            crc = crc32c_combine(crc, src.copy_into(out, src.nbytes, progress, verified_after), src.nbytes)
        return crc


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32C of ``A + B`` from those of ``A`` and ``B`` (``len2`` bytes): google-crc32c has no
    combine; this lets stitched chunks keep their kernel copies."""
    return combine(crc1, crc2, len2, CRC32C)


def _tiling(meta: Path, name: str, shape: tuple[int, ...], chunks: list[_Chunk]) -> bool:
    """Check that the chunks tile the tensor exactly (inside it, no overlap, nothing left out);
    True when they are consecutive blocks of whole rows (sorted so)."""
    for c in chunks:
        if len(c.offsets) != len(shape) or len(c.sizes) != len(shape) or any(
                o + s > d for o, s, d in zip(c.offsets, c.sizes, shape, strict=True)):
            raise CorruptFileError(meta, f"chunk at {list(c.offsets)} of {list(c.sizes)} lies outside "
                                   f"the tensor's shape {list(shape)}", name)
    total = math.prod(shape)
    if sum(math.prod(c.sizes) for c in chunks) != total:
        raise CorruptFileError(meta, f"chunks hold {sum(math.prod(c.sizes) for c in chunks)} of the "
                               f"{total} elements of {list(shape)}", name)
    chunks.sort(key=lambda c: c.offsets)
    if shape and all(c.sizes[1:] == shape[1:] for c in chunks):
        row = 0
        for c in chunks:
            if c.offsets[0] != row:
                raise CorruptFileError(meta, f"chunks overlap or leave rows out at row {row}", name)
            row += c.sizes[0]
        return True
    boxes = [c for c in chunks if math.prod(c.sizes)]
    lo = np.array([c.offsets for c in boxes], dtype=np.int64).reshape(len(boxes), len(shape))
    hi = lo + np.array([c.sizes for c in boxes], dtype=np.int64).reshape(len(boxes), len(shape))
    for i in range(len(boxes) - 1):  # boxes overlap when they overlap along every dimension
        if np.any(np.all((lo[i] < hi[i + 1:]) & (lo[i + 1:] < hi[i]), axis=1)):
            raise CorruptFileError(meta, f"chunk at {list(boxes[i].offsets)} overlaps another", name)
    return False


# ---- read ----------------------------------------------------------------------------------------

def read(path: os.PathLike | str, **_opts) -> TensorDict:
    """Read a DCP checkpoint folder (or its ``.metadata``), lazily.

    Args:
        path: the folder ``torch.distributed.checkpoint.save`` wrote.

    Returns:
        A TensorDict of every tensor, stitched from its chunks; nothing but ``.metadata`` and the
        non-tensor items is read until a tensor is asked for.

    Example:
        >>> td = read("checkpoints/step-1000")  # doctest: +SKIP
        >>> td["model.layers.0.attention.wq.weight"].shape  # doctest: +SKIP
        (4096, 4096)
    """
    meta = _metadata_file(path)
    folder = meta.parent
    if not meta.is_file():
        raise ReadError(path, f"no {METADATA} file: not a DCP checkpoint folder")
    root = _load_metadata(meta)
    with _translated(meta, "not DCP metadata"):
        storage = _storage(meta, folder, root)
        entries = root.get("state_dict_metadata")
        if not isinstance(entries, dict):
            raise tp.PickleFormatError("state_dict_metadata is not a dict")
        plan = _plan(meta, entries, storage)
    tensors: list[Tensor] = []
    extras: dict[str, object] = {}
    skipped: dict[str, object] = {}
    for name, kind, value in plan:  # kind tells value's type
        if kind == "tensor":
            tensors.append(cast(Tensor, value))
        elif kind == "skip":
            skipped[name] = value
        else:
            _read_object(name, cast(_Item, value), extras, skipped)
    metadata = {"source.format": NAME}
    version = root.get("version")
    if isinstance(version, str):
        metadata["dcp.version"] = version
    for k, v in extras.items():
        metadata[f"dcp.extra.{k}"] = v if isinstance(v, str) else json.dumps(v)
    if skipped:
        metadata["dcp.skipped"] = json.dumps(skipped, sort_keys=True)
    return TensorDict(tensors, metadata)


def _plan(meta: Path, entries: dict, storage: dict) -> list[tuple[str, str, object]]:
    """(name, "tensor" | "object" | "skip", Tensor | _Item | reason) per entry, every check done."""
    out: list[tuple[str, str, object]] = []
    used = 0
    for name, entry in entries.items():
        if not isinstance(name, str):
            raise tp.PickleFormatError(f"entry name {tp._short(name)} is not a string")
        if type(entry) is _RECORDS["BytesStorageMetadata"]:
            item = storage.get((name, None))
            if item is None:
                raise CorruptFileError(meta, "no storage entry for this object", name)
            out.append((name, "object", item))
            continue
        entry = _fields(entry, "TensorStorageMetadata", f"entry '{name}'")
        props = _fields(entry.get("properties"), "TensorProperties", f"properties of '{name}'")
        shape = _dims(entry.get("size"), "tensor size")
        try:
            check_shape(shape)
        except ProtoError as e:
            raise CorruptFileError(meta, str(e), name) from None
        chunks_raw = entry.get("chunks")
        if not isinstance(chunks_raw, list) or len(chunks_raw) + used > len(storage):
            raise CorruptFileError(meta, "more chunks than the checkpoint has storage entries", name)
        used += len(chunks_raw)
        dtype_ref = props.get("dtype")
        if not isinstance(dtype_ref, tp.DTypeRef):
            raise tp.PickleFormatError(f"dtype of '{name}' is not a torch dtype")
        layout = props.get("layout", "strided")
        if layout != "strided":
            out.append((name, "skip", f"{layout} tensor"))
            continue
        dtype = dtype_ref.ir
        if dtype is None:
            out.append((name, "skip", f"tensor of torch.{dtype_ref.name}, which convert cannot hold"))
            continue
        chunks = []
        for raw in chunks_raw:
            raw = _fields(raw, "ChunkStorageMetadata", f"a chunk of '{name}'")
            offsets, sizes = _dims(raw.get("offsets"), "chunk offsets"), _dims(raw.get("sizes"), "chunk sizes")
            item = storage.get((name, offsets))
            if item is None:
                raise CorruptFileError(meta, f"no storage entry for the chunk at {list(offsets)}", name)
            if item.length < math.prod(sizes) * dtype.itemsize:  # before anything is allocated for it
                raise CorruptFileError(meta, f"the chunk at {list(offsets)} needs {math.prod(sizes) * dtype.itemsize}"
                                       f" bytes; its item holds {item.length}", name)
            chunks.append(_Chunk(offsets, sizes, item))
        rows = _tiling(meta, name, shape, chunks)
        parts = [(c, _ItemSource(c.item, dtype, c.sizes, name)) for c in chunks]
        source: Source = parts[0][1] if len(parts) == 1 else _Stitched(shape, parts, rows)
        role = "optimizer" if name.split(".", 1)[0] in ("optim", "optimizer", "optimizers") else "weight"
        attrs = {"role": role}
        if len(parts) > 1:
            attrs["dcp.chunks"] = str(len(parts))
        out.append((name, "tensor", Tensor(name, dtype, shape, source, attrs)))
    return out


def _read_object(name: str, item: _Item, extras: dict, skipped: dict) -> None:
    """A non-tensor entry (torch-saved): to ``extras`` if JSON can hold it, else to ``skipped``."""
    if item.length > _MAX_BYTES_ITEM:
        skipped[name] = f"object of {item.length} bytes (not read)"
        return
    with _translated(item.path, "not a torch.save object item", name):
        loaded = load_torch_archive(item.path, item.offset, item.length)
        record_rest(loaded.root, name, extras, skipped)


FORMAT = Format(
    name=NAME,
    description="PyTorch Distributed Checkpoint folder (.metadata + .distcp shards), read",
    detect=detect,
    read=read,
    suffixes=(),
    name_endings=(),
    checksums="CRC-32 of every tensor chunk (the torch.save archive of each item)",
    remote=True,
)
