"""PyTorch checkpoints: ``torch.save`` files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``).

Spec: there is no written spec; the reference is torch/serialization.py
(https://github.com/pytorch/pytorch/blob/main/torch/serialization.py) and
caffe2/serialize/inline_container.h. Three layouts exist, told apart by content:

* zip (torch >= 1.6): ``<stem>/data.pkl`` (protocol-2 pickle of the object, storages as
  persistent ids ``('storage', torch.FloatStorage, key, location, numel)``),
  ``<stem>/data/<key>`` (raw little-endian storage bytes, stored uncompressed with the
  data aligned to 64 bytes), ``<stem>/byteorder``, ``<stem>/version``,
  ``<stem>/.data/serialization_id``. Files from torch 1.6-1.12 lack ``byteorder`` and
  often use ``archive/`` as the top folder.
* legacy (torch < 1.6, or ``_use_new_zipfile_serialization=False``): a bare stream of
  pickles: the magic number 0x1950a86a20f9469cfc6c, the protocol version 1001, a sys-info
  dict, the object, the list of storage keys; then each storage as an int64 element
  count followed by its bytes.
* (the pre-0.4 tar layout is not supported.)

Reading never runs code from the file and never imports torch: the pickle goes through
:mod:`convert.formats.torch.torch_pickle`'s restricted unpickler, which refuses every global a
state_dict does not need, like ``torch.load(weights_only=True)`` does. We use it even when
torch is installed, because it gives what ``torch.load`` cannot: lazy per-tensor reads
(each tensor a :class:`~convert.ir.FileRegion` into the zip member, found from the local
file header, so a conversion reads one storage at a time and a rename-only conversion
copies bytes without NumPy), no 1.6 s torch import, and the same result with and without
torch. The tests check that it equals ``torch.load(weights_only=True)`` on every corpus
file and every generated file.

Views are resolved here: a tensor is (storage, offset, shape, stride); a contiguous one is
a FileRegion, any other (transposed, sliced, conj/neg bit, big-endian) an ArraySource
built with ``as_strided`` over the bytes it spans. Names sharing one storage (tied
weights) get ``attrs["torch.shared_with"]`` (a JSON list of the other names).

Training checkpoints: the weights are looked up under ``state_dict``,
``model_state_dict``, ``model_state``, ``model``, ``net``, ``network``, ``module``
(metadata ``torch.key`` says which; ``--key a.b`` picks another); a ``module.`` prefix on
every name (DataParallel) is removed (``torch.stripped_prefix``). Non-tensor entries that
JSON can hold go to ``torch.extra.<path>``; everything else not read (optimizer tensors,
unsupported objects) is listed in ``torch.skipped``.

Writing produces what ``torch.save(OrderedDict)`` produces (zip layout, no torch needed):
deterministic bytes (fixed timestamps, a serialization id derived from the content),
storages streamed one at a time with 64-byte alignment, tied tensors (the same source
object) sharing one storage. The TensorDict's metadata rides along in an extra record
``<stem>/convert/metadata.json`` that torch ignores.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ... import dtypes
from ...errors import ConvertError, CorruptFileError, ReadError, WriteError
from ...ir import ArraySource, FileRegion, Source, Tensor, TensorDict, mapped_checksums, zlib_crc32
from ...lazy import np
from ..base import Format, Option, Writer
from . import torch_pickle as tp

NAME = "torch"

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
PROTOCOL_VERSION = 1001
WEIGHT_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net", "network", "module")
ROOT = "(root)"
_ALIGN = 64
_METADATA_RECORD = "convert/metadata.json"
_LEGACY_HEAD = b"\x80\x02\x8a\x0a" + MAGIC_NUMBER.to_bytes(10, "little")


# ---- detect ------------------------------------------------------------------------------------

def detect(path: Path) -> bool:
    """A torch zip archive (``*/data.pkl``) or a legacy pickle stream starting with torch's magic number."""
    try:
        if not Path(path).is_file():
            return False
        with open(path, "rb") as f:
            head = f.read(64)
            if head.startswith(b"PK\x03\x04"):
                f.seek(0)
                return _zip_prefix(zipfile.ZipFile(f)) is not None
            if head.startswith(_LEGACY_HEAD):
                return True
            if head.startswith(b"\x80") and len(head) > 2:  # other pickle protocols: read the first object
                f.seek(0)
                return tp.load(io.BytesIO(f.read(4096)), allow_globals=False) == MAGIC_NUMBER
    except Exception:  # noqa: BLE001 - detect answers "not mine" for anything it cannot parse
        return False
    return False


def _zip_prefix(zf: zipfile.ZipFile) -> str | None:
    for name in zf.namelist():
        head, sep, tail = name.partition("/")
        if sep and tail == "data.pkl":
            return head + "/"
    return None


# ---- read: containers ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Blob:
    """Where a storage's bytes are: ``nbytes`` at ``offset`` of the file, or inside a compressed member."""

    path: str
    offset: int
    nbytes: int
    member: str | None = None  # set when the zip member is compressed (then offset is unused)
    big_endian: bool = False
    crc32: int | None = None  # the zip member's CRC-32 (zip files)

    def read(self, start: int, length: int, label: str) -> bytes:
        if self.member is not None:
            try:
                with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
                    f.seek(start)
                    data = f.read(length)
            except OSError as e:
                raise ReadError(self.path, f"cannot read: {e}", label) from None
            except Exception as e:  # noqa: BLE001 - BadZipFile, zlib.error, NotImplementedError (method), EOFError
                raise CorruptFileError(self.path, f"damaged zip record {self.member} ({type(e).__name__}: {e})",
                                       label) from None
        else:
            with open(self.path, "rb") as f:
                f.seek(self.offset + start)
                data = f.read(length)
        if len(data) != length:
            raise CorruptFileError(self.path, "file is truncated", label)
        return data


@dataclass
class _Loaded:
    root: object
    blobs: dict[str, _Blob]  # root storage key -> bytes
    layout: str
    metadata: dict[str, str]


_MAX_RECORD = 1 << 30  # data.pkl and the small records: more is not a state_dict
_MAX_RATIO = 1100  # deflate's best ratio is 1032:1; a record claiming more is lying about its size


def _check_record(info: zipfile.ZipInfo, size: int, path: str, limit: int | None = None) -> None:
    """Refuse a zip record whose sizes cannot be true, before anything is allocated for it
    (zipfile would ask the file for all ``compress_size`` bytes in one read)."""
    stored = info.compress_type == zipfile.ZIP_STORED
    if (info.compress_size > size or (stored and info.file_size != info.compress_size)
            or info.file_size > _MAX_RATIO * info.compress_size + 64 or (limit is not None and info.file_size > limit)):
        raise CorruptFileError(path, f"zip record {info.filename} claims {info.file_size} bytes "
                               f"({info.compress_size} compressed) in a file of {size} bytes")


def _read_record(zf: zipfile.ZipFile, name: str, size: int, path: str) -> bytes:
    _check_record(zf.getinfo(name), size, path, _MAX_RECORD)
    return zf.read(name)


def _load_zip(path: str) -> _Loaded:
    with open(path, "rb") as f:
        zf = zipfile.ZipFile(f)
        size = os.fstat(f.fileno()).st_size
        prefix = _zip_prefix(zf)
        if prefix is None:
            raise ReadError(path, "zip file without a data.pkl: not a torch checkpoint")
        names = set(zf.namelist())
        if f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names):
            raise ReadError(path, "this is a TorchScript archive (torch.jit.save), not a state_dict; "
                            "save model.state_dict() with torch.save instead")
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = _read_record(zf, f"{prefix}byteorder", size, path).decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CorruptFileError(path, f"unknown byte order {byteorder!r}")
        storages: dict[str, tp.StorageRef] = {}
        root = tp.load(io.BytesIO(_read_record(zf, f"{prefix}data.pkl", size, path)), storages=storages)
        metadata = {}
        if f"{prefix}{_METADATA_RECORD}" in names:
            stored = json.loads(_read_record(zf, f"{prefix}{_METADATA_RECORD}", size, path).decode("utf-8"))
            if isinstance(stored, dict):
                metadata = {str(k): str(v) for k, v in stored.items()}
        blobs = {}
        for key, ref in storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise CorruptFileError(path, f"storage '{key}' is missing (no record {member})")
            info = zf.getinfo(member)
            _check_record(info, size, path)
            if info.file_size < ref.nbytes:
                raise CorruptFileError(path, f"storage '{key}' holds {info.file_size} bytes, expected {ref.nbytes}")
            if info.compress_type == zipfile.ZIP_STORED:
                f.seek(info.header_offset)
                header = f.read(30)
                if len(header) != 30 or header[:4] != b"PK\x03\x04":
                    raise CorruptFileError(path, f"bad local header for {member}")
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                offset = info.header_offset + 30 + name_len + extra_len
                if offset + info.file_size > size:
                    raise CorruptFileError(path, f"file is truncated (storage '{key}' ends past the end)")
                blobs[key] = _Blob(path, offset, info.file_size, big_endian=byteorder == "big", crc32=info.CRC)
            else:
                blobs[key] = _Blob(path, 0, info.file_size, member=member, big_endian=byteorder == "big")
    layout = "zip" if f"{prefix}byteorder" in names else "zip (no byteorder record)"
    return _Loaded(root, blobs, layout, metadata)


def _load_legacy(path: str) -> _Loaded:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if tp.load(f, allow_globals=False) != MAGIC_NUMBER:
            raise CorruptFileError(path, "not a torch legacy file (bad magic number)")
        if (version := tp.load(f, allow_globals=False)) != PROTOCOL_VERSION:
            raise ReadError(path, f"unsupported torch legacy protocol version {version!r}")
        sys_info = tp.load(f, allow_globals=False)
        big = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
        storages: dict[str, tp.StorageRef] = {}
        root = tp.load(f, storages=storages)
        keys = tp.load(f, allow_globals=False)
        if not isinstance(keys, list):
            raise CorruptFileError(path, "storage key list is missing")
        pos = f.tell()
        blobs = {}
        for key in keys:
            key = str(key)
            ref = storages.get(key)
            if ref is None:
                raise CorruptFileError(path, f"storage '{key}' is listed but no tensor uses it")
            f.seek(pos)
            head = f.read(8)
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
    return _Loaded(root, blobs, "legacy", {})


# ---- read: tensors -------------------------------------------------------------------------------

_MAX_BROADCAST = 1024  # an expanded (stride 0) view may be this much larger than the bytes it spans


def _tensor_source(blob: _Blob, ref: tp.TensorRef, dtype: dtypes.DType, name: str, path: str) -> Source:
    itemsize = dtype.itemsize
    storage = ref.storage
    base = ref.offset * itemsize
    if storage.view_of is not None:
        base += storage.view_offset * storage.dtype.itemsize
    numel = math.prod(ref.shape)
    if numel == 0:
        return ArraySource(lambda: np.zeros(ref.shape, dtype.numpy))
    span = (sum((d - 1) * s for d, s in zip(ref.shape, ref.stride, strict=True)) + 1) * itemsize
    if base + span > blob.nbytes:
        raise CorruptFileError(path, f"tensor needs {base + span} bytes of storage '{storage.key}', "
                               f"which holds {blob.nbytes}", name)
    if numel * itemsize > max(_MAX_BROADCAST * span, _MAX_RECORD):
        raise CorruptFileError(path, f"a view of {span} bytes of storage '{storage.key}' that would expand to "
                               f"{numel * itemsize} bytes (strides {list(ref.stride)})", name)
    contiguous = all(s == c for d, s, c in zip(ref.shape, ref.stride, tp.contiguous_strides(ref.shape), strict=True) if d != 1)
    if contiguous and blob.member is None and not blob.big_endian and not (ref.conj or ref.neg):
        whole = base == 0 and numel * itemsize == blob.nbytes  # the zip CRC covers the whole storage
        return FileRegion(path, blob.offset + base, numel * itemsize, label=name, crc32=blob.crc32 if whole else None)

    def produce() -> np.ndarray:
        raw = np.frombuffer(blob.read(base, span, name), dtype=np.uint8)
        if blob.big_endian and itemsize > 1:
            raw = _byteswap(raw, dtype)
        flat = raw.view(dtype.numpy)
        arr = np.lib.stride_tricks.as_strided(flat, ref.shape, tuple(s * itemsize for s in ref.stride), writeable=False)
        arr = np.ascontiguousarray(arr)
        if ref.conj:
            arr = np.conj(arr)
        if ref.neg:
            arr = np.negative(arr)
        return arr

    return ArraySource(produce)


def _byteswap(raw: np.ndarray, dtype: dtypes.DType) -> np.ndarray:
    unit = dtype.itemsize // 2 if dtype.kind == "complex" else dtype.itemsize
    return raw.view(f"<u{unit}").byteswap().view(np.uint8)


# ---- read: finding the weights -------------------------------------------------------------------

def _is_dict(obj) -> bool:
    return isinstance(obj, dict)


def _count_tensors(obj, depth: int = 0) -> int:
    if isinstance(obj, tp.TensorRef):
        return 1
    if depth > 64:
        return 0
    if isinstance(obj, dict):
        return sum(_count_tensors(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v, depth + 1) for v in obj)
    return 0


def _follow(root, key: str, path: str):
    """The object at dotted path ``key``; a dict key that itself contains dots is matched whole first."""
    if key in ("", ROOT):
        return root, ROOT
    obj, parts, used = root, key.split("."), []
    while parts:
        if not isinstance(obj, (dict, list, tuple)):
            break
        for n in range(len(parts), 0, -1):
            k = ".".join(parts[:n])
            found, value = _child(obj, k)
            if found:
                obj, parts = value, parts[n:]
                used.append(k)
                break
        else:
            break
    if parts:
        where = ".".join(used) or ROOT
        keys = list(obj.keys()) if isinstance(obj, dict) else []
        raise ReadError(path, f"--key {key!r}: no entry '{parts[0]}' under {where}; "
                        f"keys there: {', '.join(map(str, keys[:20])) or '(not a dict)'}")
    return obj, key


def _child(obj, k: str):
    if isinstance(obj, dict):
        for cand in obj:
            if str(cand) == k:
                return True, obj[cand]
        return False, None
    if k.isdigit() and int(k) < len(obj):
        return True, obj[int(k)]
    return False, None


def _find_weights(root):
    """(object holding the weights, its dotted path or ROOT)."""
    obj, path = root, []
    while isinstance(obj, dict) and not any(isinstance(v, tp.TensorRef) for v in obj.values()):
        for k in WEIGHT_KEYS:
            if k in obj and isinstance(obj[k], dict) and _count_tensors(obj[k]):
                obj = obj[k]
                path.append(k)
                break
        else:
            break
    return obj, ".".join(path) or ROOT


def _flatten(obj, prefix: str, out: list, depth: int = 0):
    """(dotted name, leaf) for every leaf under ``obj``; dicts/lists/tuples are descended."""
    if depth > 64:
        raise tp.PickleFormatError("nesting deeper than 64 levels")
    if isinstance(obj, dict):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)) and _count_tensors(obj):
        items = [(str(i), v) for i, v in enumerate(obj)]
    else:
        out.append((prefix, obj))
        return
    if not items and prefix:
        out.append((prefix, obj))
    for k, v in items:
        _flatten(v, f"{prefix}.{k}" if prefix else k, out, depth + 1)


def _jsonable(value) -> bool:
    try:
        json.dumps(value, allow_nan=True)
        return not isinstance(value, (tp.TensorRef, tp.Unsupported))
    except (TypeError, ValueError, RecursionError):
        return False


def _describe(value) -> str:
    if isinstance(value, tp.Unsupported):
        return value.what
    if isinstance(value, tp.TensorRef):
        return f"tensor {value.dtype.name}{list(value.shape)}"
    if isinstance(value, (dict, list, tuple)) and (n := _count_tensors(value)):
        return f"{type(value).__name__} holding {n} tensor{'s' if n != 1 else ''}"
    return type(value).__name__


def _record_rest(obj, prefix: str, extras: dict, skipped: dict, depth: int = 0):
    """Everything outside the chosen weights: JSON-able values to extras, the rest to skipped."""
    if _count_tensors(obj) == 0:
        if _jsonable(obj):
            extras[prefix] = obj
        elif isinstance(obj, (set, frozenset)) and _jsonable(sorted(obj, key=repr)):
            extras[prefix] = sorted(obj, key=repr)
        elif isinstance(obj, (tp.Device, complex, bytes, bytearray)):
            extras[prefix] = str(obj) if not isinstance(obj, (bytes, bytearray)) else obj.hex()
        elif isinstance(obj, dict) and depth < 64:
            for k, v in obj.items():
                _record_rest(v, f"{prefix}.{k}" if prefix else str(k), extras, skipped, depth + 1)
        else:
            skipped[prefix or ROOT] = _describe(obj)
    elif isinstance(obj, dict) and depth < 64 and any(_count_tensors(v) == 0 for v in obj.values()):
        for k, v in obj.items():
            _record_rest(v, f"{prefix}.{k}" if prefix else str(k), extras, skipped, depth + 1)
    else:
        skipped[prefix or ROOT] = _describe(obj) + (f" (read with --key {prefix})" if prefix else "")


def read(path: os.PathLike | str, key: str | None = None, keep_prefix: bool = False, **_opts) -> TensorDict:
    """Read the tensors of a torch checkpoint, lazily.

    Args:
        path: a ``torch.save`` file (zip or legacy layout).
        key: dotted path of the state_dict inside a training checkpoint; None finds it.
        keep_prefix: keep a DataParallel ``module.`` prefix.

    Returns:
        A TensorDict; nothing but the pickle is read until a tensor is asked for.

    Example:
        >>> td = read("model.ckpt")  # doctest: +SKIP
        >>> td.metadata["torch.key"]  # doctest: +SKIP
        'state_dict'
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ReadError(path, f"cannot open: {e.strerror}") from None
    try:
        loaded = _load_zip(path) if head == b"PK\x03\x04" else _load_legacy(path)
        return _to_tensordict(path, loaded, key, keep_prefix)
    except ConvertError:
        raise
    except tp.RefusedGlobal as e:
        raise ReadError(path, f"refused to load global '{e.what}': the pickle asks for more than tensors "
                        "(a state_dict needs no such thing, and loading it could run code from the file). "
                        "If this is a whole pickled model, save model.state_dict() instead") from None
    except tp.PickleFormatError as e:
        raise CorruptFileError(path, f"not a torch state_dict pickle: {e}") from None
    except zipfile.BadZipFile as e:
        raise CorruptFileError(path, f"damaged zip archive: {e}") from None
    except (pickle.UnpicklingError, EOFError) as e:
        raise CorruptFileError(path, f"damaged pickle: {e or 'unexpected end of data'}") from None
    except OSError as e:
        raise ReadError(path, f"cannot read: {e}") from None
    except Exception as e:  # noqa: BLE001 - a damaged pickle can raise anything; never leak a traceback
        raise CorruptFileError(path, f"damaged checkpoint ({type(e).__name__}: {e})") from None


def _to_tensordict(path: str, loaded: _Loaded, key: str | None, keep_prefix: bool) -> TensorDict:
    root = loaded.root
    if key is not None:
        chosen, where = _follow(root, key, path)
    else:
        chosen, where = _find_weights(root)
    leaves: list = []
    if isinstance(chosen, tp.TensorRef):
        leaves.append(("tensor" if where == ROOT else where.rsplit(".", 1)[-1], chosen))
    else:
        _flatten(chosen, "", leaves)
    extras: dict[str, object] = {}
    skipped: dict[str, str] = {}
    tensors = [(n, v) for n, v in leaves if isinstance(v, tp.TensorRef)]
    inner = "" if where == ROOT else where
    for n, v in leaves:
        if not isinstance(v, tp.TensorRef):
            _record_rest(v, f"{inner}.{n}" if inner else n, extras, skipped)
    if where != ROOT:  # siblings along the path to the weights
        _record_siblings(root, where.split("."), extras, skipped)

    metadata: dict[str, str] = {**loaded.metadata, "source.format": NAME}
    metadata["torch.layout"] = loaded.layout
    metadata["torch.key"] = where
    names = [n for n, _ in tensors]
    if not keep_prefix and names and all(n.startswith("module.") for n in names):
        tensors = [(n[len("module."):], v) for n, v in tensors]
        metadata["torch.stripped_prefix"] = "module."
    state_meta = getattr(chosen, "__dict__", {}).get("_metadata") if isinstance(chosen, dict) else None
    if state_meta is not None and _jsonable(state_meta):
        metadata["torch.module_versions"] = json.dumps(state_meta, sort_keys=True)
    for k, v in extras.items():
        metadata[f"torch.extra.{k}"] = v if isinstance(v, str) else json.dumps(v)

    groups: dict[str, list[str]] = {}
    for n, ref in tensors:
        groups.setdefault(ref.storage.view_of or ref.storage.key, []).append(n)
    role = "optimizer" if "optim" in where else "weight"
    sources: dict[tuple, Source] = {}
    out: list[Tensor] = []
    seen: set[str] = set()
    for n, ref in tensors:
        if n in seen:
            raise ReadError(path, "two entries flatten to the same name; pick one with --key", n)
        seen.add(n)
        dtype = ref.dtype.ir
        if dtype is None:
            skipped[f"{inner}.{n}" if inner else n] = f"tensor of torch.{ref.dtype.name}, which convert cannot hold"
            continue
        root_key = ref.storage.view_of or ref.storage.key
        blob = loaded.blobs.get(root_key)
        if blob is None:
            raise CorruptFileError(path, f"storage '{root_key}' has no data", n)
        ident = (root_key, ref.storage.view_offset, ref.offset, ref.shape, ref.stride, dtype.name, ref.conj, ref.neg)
        source = sources.get(ident)
        if source is None:
            source = sources[ident] = _tensor_source(blob, ref, dtype, n, path)
        attrs = {"role": role}
        others = [m for m in groups[root_key] if m != n]
        if others:
            attrs["torch.shared_with"] = json.dumps(others)
        out.append(Tensor(n, dtype, ref.shape, source, attrs))
    if skipped:
        metadata["torch.skipped"] = json.dumps(skipped, sort_keys=True)
    return TensorDict(out, metadata)


def _record_siblings(root, parts: list[str], extras: dict, skipped: dict):
    obj, prefix = root, ""
    for part in parts:
        if not isinstance(obj, dict):
            return
        nxt = None
        for k, v in obj.items():
            if str(k) == part:
                nxt = v
                continue
            _record_rest(v, f"{prefix}.{k}" if prefix else str(k), extras, skipped)
        if nxt is None:
            return
        obj, prefix = nxt, f"{prefix}.{part}" if prefix else part


# ---- write ---------------------------------------------------------------------------------------

def write(td: TensorDict, path: os.PathLike | str, **_opts) -> None:
    """Write ``td`` as a ``torch.save`` zip file of an ``OrderedDict`` name -> tensor.

    Args:
        td: the tensors (every dtype but string).
        path: the output file (must not exist).

    Example:
        >>> write(TensorDict.from_arrays({"w": np.ones((2, 2), np.float32)}), "model.pt")  # doctest: +SKIP
    """
    path = os.fspath(path)
    entries = []
    storage_of: list[tuple[Tensor, tp.StorageOut, bool]] = []
    by_source: dict[int, tuple[Tensor, tp.StorageOut]] = {}
    for t in td.values():
        prior = by_source.get(id(t.source))
        if prior is not None and prior[0].dtype == t.dtype and prior[0].shape == t.shape:
            storage = prior[1]
            fresh = False
        else:
            untyped = t.dtype.name not in tp.STORAGE_DTYPES.values()
            numel = t.numel * (t.dtype.itemsize if untyped else 1)
            storage = tp.StorageOut(str(len(by_source)), t.dtype, numel)
            by_source[id(t.source)] = (t, storage)
            fresh = True
        entries.append((t.name, storage, t.shape))
        storage_of.append((t, storage, fresh))
    pkl = tp.state_dict_pickle(entries)
    digest = hashlib.sha256(pkl).digest()
    serialization_id = str(int.from_bytes(digest[:16], "little")).zfill(40)
    prefix = "archive/"
    try:
        with open(path, "xb+") as f:  # read too: CRCs are taken from a map of what was written
            zf = _ZipWriter(f, path)
            zf.add(prefix + "data.pkl", pkl)
            zf.add(prefix + ".format_version", b"1")
            zf.add(prefix + ".storage_alignment", b"64")
            zf.add(prefix + "byteorder", b"little")
            for t, storage, fresh in storage_of:
                if fresh:
                    zf.add(f"{prefix}data/{storage.key}", t)
            zf.add(prefix + "version", b"3\n")
            zf.add(prefix + ".data/serialization_id", serialization_id.encode())
            if td.portable_metadata:
                zf.add(prefix + _METADATA_RECORD,
                       json.dumps(td.portable_metadata, sort_keys=True, ensure_ascii=False).encode("utf-8"))
            zf.finish()
    except ConvertError:
        raise
    except FileExistsError:
        raise WriteError(path, "already exists") from None
    except OSError as e:
        raise WriteError(path, f"cannot write: {e.strerror or e}") from None


class _ZipWriter:
    """The stored (uncompressed) zip ``torch.save`` writes: each member's data starts at a multiple
    of 64 bytes (torch maps storages in place), with zip64 fields where a size or offset passes
    4 GiB. Tensor data is copied by :meth:`Tensor.copy_into` (in the kernel when it sits in a file);
    its CRC-32 is then taken from the page cache and patched into the member's header."""

    _DOS_DATE, _DOS_TIME = (1 << 5) | 1, 0  # 1980-01-01 00:00, as zipfile writes for torch's fixed date
    _MAX32 = 0xFFFFFFFF

    def __init__(self, f, path: str):
        self.f, self.path, self.members = f, path, []

    def add(self, name: str, data: bytes | Tensor) -> None:
        f, raw = self.f, name.encode("utf-8")
        nbytes = len(data) if isinstance(data, bytes) else data.nbytes
        start = f.tell()
        big = nbytes >= self._MAX32
        extra = struct.pack("<HHQQ", 1, 16, nbytes, nbytes) if big else b""
        pad = (-(start + 30 + len(raw) + len(extra) + 4)) % _ALIGN
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # the 'FB' padding field, as torch's miniz writes
        size32 = self._MAX32 if big else nbytes
        f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if big else 20, 0, 0, self._DOS_TIME, self._DOS_DATE,
                            0, size32, size32, len(raw), len(extra)) + raw + extra)
        begin = f.tell()
        if begin % _ALIGN:  # pragma: no cover - guards the arithmetic above
            raise WriteError(self.path, f"internal error: record {name} is not aligned")
        if isinstance(data, bytes):
            f.write(data)
            crc = zlib_crc32(data, 0)
        else:
            data.copy_into(f)
            f.flush()
            crc = mapped_checksums(f.fileno(), begin, nbytes, crc32=True, crc32c=False).crc32
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
            f.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, 0, 0, self._DOS_TIME,
                                self._DOS_DATE, crc, min(size, m32), min(size, m32), len(raw), len(extra),
                                0, 0, 0, 0, min(offset, m32)) + raw + extra)
        end, count = f.tell(), len(self.members)
        size = end - directory
        if count >= 0xFFFF or directory >= m32 or size >= m32:
            f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, size, directory))
            f.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                            min(size, m32), min(directory, m32), 0))


FORMAT = Format(
    name=NAME,
    description="PyTorch state_dict (.pt/.pth/.bin/.ckpt)",
    detect=detect,
    read=read,
    writers=(Writer("", write, dtypes.held_by("torch"), suffix=".pt", keeps_shared_storage=True),),
    options=(
        Option("--key", "read", str,
               "dotted path of the state_dict inside a training checkpoint (e.g. model.state_dict); "
               "'' for the top level. Default: found automatically"),
        Option("--keep-prefix", "read", bool, "keep the 'module.' prefix DataParallel puts on every name"),
    ),
    suffixes=(".pt", ".pth"),
    name_endings=(r"\.bin", r"\.ckpt"),
    checksums="zip layouts: CRC-32 of every storage record (legacy pickle files have none)",
)
