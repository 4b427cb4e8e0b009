"""Reading a torch checkpoint: its tensors as views of its storages, lazily (see
:mod:`convert.formats.torch`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import zipfile

from ... import dtypes, storage
from ...errors import ConvertError, CorruptFileError, ReadError
from ...ir import ArraySource, FileRegion, Source, Tensor, TensorDict
from ...lazy import np
from . import torch_pickle as tp
from .containers import _MAX_RECORD, Where, _Blob, _load_legacy, _load_zip, _Loaded
from .weights import (
    ROOT,
    Texts,
    _count_tensors,
    _find_weights,
    _flatten,
    _follow,
    _jsonable,
    _record_rest,
    _record_siblings,
    open_placeholders,
)

NAME = "torch"

_MAX_BROADCAST = 1024  # an expanded (stride 0) view may be this much larger than the bytes it spans


def _tensor_source(blob: _Blob, ref: tp.TensorRef, dtype: dtypes.DType, name: str, path: Where) -> Source:
    itemsize = dtype.itemsize
    stored = ref.storage
    base = ref.offset * itemsize
    if stored.view_of is not None:
        if stored.dtype is None:
            raise CorruptFileError(path, f"tensor '{name}' is a view of an untyped storage, which a legacy file never holds")
        base += stored.view_offset * stored.dtype.itemsize
    numel = math.prod(ref.shape)
    if numel == 0:
        return ArraySource(lambda: np.zeros(ref.shape, dtype.numpy))
    span = (sum((d - 1) * s for d, s in zip(ref.shape, ref.stride, strict=True)) + 1) * itemsize
    if base + span > blob.nbytes:
        raise CorruptFileError(path, f"tensor needs {base + span} bytes of storage '{stored.key}', "
                               f"which holds {blob.nbytes}", name)
    if numel * itemsize > max(_MAX_BROADCAST * span, _MAX_RECORD):
        raise CorruptFileError(path, f"a view of {span} bytes of storage '{stored.key}' that would expand to "
                               f"{numel * itemsize} bytes (strides {list(ref.stride)})", name)
    contiguous = all(s == c for d, s, c in zip(ref.shape, ref.stride, tp.contiguous_strides(ref.shape), strict=True) if d != 1)
    if contiguous and blob.member is None and not blob.big_endian and not (ref.conj or ref.neg):
        whole = base == 0 and numel * itemsize == blob.nbytes  # the zip CRC covers the whole storage
        crc32 = blob.crc32 if whole else None
        if isinstance(blob.path, storage.RemotePath):
            return storage.region(blob.path, blob.offset + base, numel * itemsize, label=name, crc32=crc32)
        return FileRegion(blob.path, blob.offset + base, numel * itemsize, label=name, crc32=crc32)

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


def _refuse_stubbed(path: Where, loaded: _Loaded):
    """Nothing to read outside the placeholders: refuse, naming what was not loaded."""
    first, rest = next(iter(loaded.stubbed)), len(loaded.stubbed) - 1
    named = f"'{first}'" + (f" (and {rest} other{'s' if rest != 1 else ''})" if rest else "")
    if loaded.layout.startswith("torchscript"):
        raise ReadError(path, f"the TorchScript modules declare no parameters or buffers convert can read: their "
                        f"tensors are inside other objects ({named} not loaded; quantized modules keep packed weights)")
    if loaded.blobs:
        raise ReadError(path, f"refused to load global {named}: the tensors are inside objects of classes convert "
                        "does not load, in a way it cannot follow; nothing from the file was imported or run. "
                        "Save model.state_dict() with torch.save instead")
    raise ReadError(path, f"refused to load global {named}: the file holds no tensors, only objects convert does not "
                    "load (nothing from it was imported or run)")


def _byteswap(raw: np.ndarray, dtype: dtypes.DType) -> np.ndarray:
    unit = dtype.itemsize // 2 if dtype.kind == "complex" else dtype.itemsize
    return raw.view(f"<u{unit}").byteswap().view(np.uint8)


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
    p = storage.as_path(path)  # a RemotePath for a URL: ranged GETs (convert.storage)
    where: Where = p if isinstance(p, storage.RemotePath) else os.fspath(p)
    try:
        if isinstance(where, storage.RemotePath):
            head = where.read_range(0, 4)  # one small GET, not a read-ahead block
        else:
            with open(where, "rb") as f:
                head = f.read(4)
    except OSError as e:
        raise ReadError(where, f"cannot open: {e.strerror}") from None
    try:
        loaded = _load_zip(where, stubs=True) if head == b"PK\x03\x04" else _load_legacy(where, stubs=True)
        return _to_tensordict(where, loaded, key, keep_prefix)
    except ConvertError:
        raise
    except tp.RefusedGlobal as e:
        raise ReadError(where, f"refused to load global '{e.what}': the pickle asks for more than tensors "
                        "(a state_dict needs no such thing, and loading it could run code from the file). "
                        "If this is a whole pickled model, save model.state_dict() instead") from None
    except tp.PickleFormatError as e:
        raise CorruptFileError(where, f"not a torch state_dict pickle: {e}") from None
    except tp.DamagedPickle as e:
        if isinstance(e.cause, (pickle.UnpicklingError, EOFError)):
            raise CorruptFileError(where, f"damaged pickle: {e.cause or 'unexpected end of data'}") from None
        raise CorruptFileError(where, f"damaged checkpoint ({type(e.cause).__name__}: {e.cause})") from None
    except zipfile.BadZipFile as e:
        raise CorruptFileError(where, f"damaged zip archive: {e}") from None
    except (pickle.UnpicklingError, EOFError) as e:
        raise CorruptFileError(where, f"damaged pickle: {e or 'unexpected end of data'}") from None
    except OSError as e:
        raise ReadError(where, f"cannot read: {e}") from None
    except Exception as e:  # noqa: BLE001 - a damaged pickle can raise anything; never leak a traceback
        raise CorruptFileError(where, f"damaged checkpoint ({type(e).__name__}: {e})") from None


def _to_tensordict(path: Where, loaded: _Loaded, key: str | None, keep_prefix: bool) -> TensorDict:
    root = loaded.root
    if key is not None:
        chosen, where = _follow(root, key, path)
    else:
        chosen, where = _find_weights(root)
    leaves: list = []
    if isinstance(chosen, tp.TENSORS):
        leaves.append(("tensor" if where == ROOT else where.rsplit(".", 1)[-1], chosen))
    else:
        _flatten(chosen, "", leaves)
    extras: dict[str, object] = {}
    skipped: dict[str, str] = {}
    stubs = Texts()
    tensors = [(n, v) for n, v in leaves if isinstance(v, tp.TENSORS)]
    inner = "" if where == ROOT else where
    for n, v in leaves:
        if not isinstance(v, tp.TENSORS):
            _record_rest(v, f"{inner}.{n}" if inner else n, extras, skipped, stubs=stubs)
    if where != ROOT:  # siblings along the path to the weights
        _record_siblings(root, where.split("."), extras, skipped, stubs)
    if not tensors and loaded.stubbed and _count_tensors(root) == 0:
        if loaded.blobs and "torch.opened_placeholders" not in loaded.metadata and "torch.script_class" not in loaded.metadata:
            opened = open_placeholders(root)
            if _count_tensors(opened):  # the tensors are all inside objects: name them by attribute path
                meta = {**loaded.metadata, "torch.opened_placeholders": "true"}
                return _to_tensordict(path, dataclasses.replace(loaded, root=opened, metadata=meta), key, keep_prefix)
        _refuse_stubbed(path, loaded)

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
    for k, v in stubs.items():
        metadata[f"torch.stubbed.{k}"] = v
    if loaded.stubbed:
        metadata["torch.stubbed_globals"] = json.dumps(loaded.stubbed)
        metadata["local.note.torch.stubbed"] = (
            f"{len(loaded.stubbed)} global{'s' if len(loaded.stubbed) != 1 else ''} of the pickle not loaded, "
            "nothing imported or run (objects of them kept as text in torch.stubbed.*"
            f"{', whole models read as their state_dict' if 'torch.pickled_modules' in loaded.metadata else ''}): "
            f"{', '.join(loaded.stubbed)}")

    groups: dict[str, list[str]] = {}
    for n, ref in tensors:
        if isinstance(ref, tp.TensorRef):
            groups.setdefault(ref.storage.view_of or ref.storage.key, []).append(n)
    role = "optimizer" if "optim" in where else "weight"
    sources: dict[tuple, Source] = {}
    out: list[Tensor] = []
    seen: set[str] = set()
    for n, ref in tensors:
        if n in seen:
            raise ReadError(path, "two entries flatten to the same name; pick one with --key", n)
        seen.add(n)
        if isinstance(ref, tp.NumpyArray):
            if ref.unsupported:
                skipped[f"{inner}.{n}" if inner else n] = ref.unsupported
            else:  # its bytes are in the pickle, already read
                out.append(Tensor(n, dtypes.from_numpy(ref.dtype), ref.shape, ArraySource(ref.array),
                                  {"role": role, "torch.numpy": "true"}))
            continue
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
