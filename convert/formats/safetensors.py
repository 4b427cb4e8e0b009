"""safetensors files and Hugging Face sharded safetensors folders.

Spec: https://github.com/huggingface/safetensors#format -- an 8-byte little-endian
header length N, N bytes of JSON (``{name: {dtype, shape, data_offsets: [begin, end]}}``
plus an optional ``__metadata__`` str->str map), then the packed data, offsets
relative to the end of the header.

Sharded checkpoints (https://huggingface.co/docs/transformers/main/en/big_models):
``model-00001-of-00003.safetensors`` ... plus ``model.safetensors.index.json`` with
``{"metadata": {"total_size": N}, "weight_map": {name: shard file}}``.

Why by hand and not with the ``safetensors`` library: its readers hand out arrays,
not file offsets, so a rename-only conversion could not copy bytes without NumPy,
and its ``numpy`` binding has no bfloat16/float8; its writers take the whole
checkpoint in memory at once and write non-contiguous arrays in memory order.
Parsing the JSON header ourselves gives lazy :class:`~convert.ir.FileRegion` s and a
streaming writer. The library is the oracle in the tests.

Packed dtypes (``F4``: two 4-bit floats a byte) take ``ceil(bits / 8)`` bytes; as the
reference implementation does, a tensor whose bits do not end on a byte boundary is refused.

A Hugging Face model folder keeps its ``config.json`` beside the weights: its text is carried
as ``local.hf.config`` (not written into outputs) for rule files that need the model's numbers
(``hf-llama-to-gguf``: head counts, sizes).

Remote paths (``Format.remote``): every path here is what :func:`convert.storage.as_path` gives,
a ``Path`` or a :class:`~convert.storage.RemotePath`. A header costs one ranged GET (a read-ahead
block), each tensor's bytes are a :class:`~convert.storage.RemoteRegion` (large ranged GETs,
small neighbours read in one), and a write goes through ``path.open("wb")``: an upload,
completed by the core once verified, ``model.safetensors.index.json`` after every shard. A
remote folder of shards with no index is refused (the index is the commit object: shards
without it are an unfinished output).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Sequence
from operator import itemgetter
from pathlib import Path, PurePosixPath

from .. import dtypes, storage
from ..copying import copy_many
from ..errors import CorruptFileError, ReadError, WriteError
from ..ir import FileRegion, Tensor, TensorDict
from ..units import parse_size
from .base import Format, Option, ShardWriter, Writer

NAME = "safetensors"

_MAX_HEADER = 100 << 20  # the reference implementation refuses headers above 100 MB
_INDEX_SUFFIX = ".safetensors.index.json"
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")


def detect(path: Path) -> bool:
    try:
        if path.is_dir():
            return _index_in(path) is not None or any(path.glob("*.safetensors"))
        if path.name.endswith(_INDEX_SUFFIX):
            return True
        with path.open("rb") as f:
            head = f.read(9)
            size = path.stat().st_size
    except (OSError, ReadError):  # ReadError: a remote path's (convert.storage)
        return False
    if len(head) < 9:
        return False
    n = struct.unpack("<Q", head[:8])[0]
    return head[8:9] == b"{" and 2 <= n <= min(_MAX_HEADER, size - 8)


def _index_in(folder: Path) -> Path | None:
    found = sorted(folder.glob("*" + _INDEX_SUFFIX), key=str)
    return found[0] if found else None


def read(path: Path) -> TensorDict:
    """Read a ``.safetensors`` file, a sharded folder, or its ``*.safetensors.index.json``."""
    path = storage.as_path(path)  # type: ignore[assignment]  # a RemotePath for a URL
    if path.is_dir():
        index = _index_in(path)
        if index is not None:
            return _read_sharded(index)
        files = sorted(path.glob("*.safetensors"), key=str)
        if len(files) == 1:
            return _read_file(files[0])
        if not files:
            raise ReadError(path, "folder holds no .safetensors file")
        if storage.is_remote(path):  # the index is the commit object of a sharded output
            raise ReadError(path, f"folder holds {len(files)} .safetensors files and no *{_INDEX_SUFFIX} "
                                  "(an unfinished output?); name one of them")
        if all(_SHARD.match(f.name) for f in files):
            return _merge(path, [_read_file(f) for f in files], {})
        raise ReadError(path, f"folder holds {len(files)} .safetensors files and no index.json; name one of them")
    if path.name.endswith(_INDEX_SUFFIX):
        return _read_sharded(path)
    return _read_file(path)


def read_header(path: Path) -> tuple[int, dict]:
    """The header of one file: (offset of the data section, parsed JSON). Validated."""
    start, header, _ = _header(path)
    return start, header


def _header(path: Path) -> tuple[int, dict, int]:
    """:func:`read_header` and the file's size."""
    try:
        with storage.open_input(path) as f:
            size = path.stat().st_size
            head = f.read(8)
            if len(head) < 8:
                raise CorruptFileError(path, "file is shorter than the 8-byte header length")
            n = struct.unpack("<Q", head)[0]
            if n > _MAX_HEADER or n > size - 8:
                raise CorruptFileError(path, f"header length {n} is larger than the file allows")
            raw = f.read(n)
    except OSError as e:
        raise ReadError(path, f"cannot read: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(path, f"header is not valid JSON ({e})") from None
    except RecursionError:
        raise CorruptFileError(path, "header nests JSON too deeply") from None
    if not isinstance(header, dict):
        raise CorruptFileError(path, "header is not a JSON object")
    return 8 + n, header, size


def _read_file(path: Path) -> TensorDict:
    start, header, size = _header(path)
    data_size = size - start
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptFileError(path, "__metadata__ must map strings to strings")
    entries = []
    kinds: dict = {}  # safetensors dtype code -> row (a file has a few)
    for name, info in header.items():  # 50,000 entries at a time: kept lean
        try:
            code = info["dtype"]
            dtype = kinds.get(code) or kinds.setdefault(code, dtypes.from_safetensors(code))
            shape = tuple(map(int, info["shape"]))
            begin, end = map(int, info["data_offsets"])
        except Exception as e:  # any malformed entry: KeyError, TypeError, ValueError, ConvertError
            raise CorruptFileError(path, f"malformed header entry ({type(e).__name__}: {e})", name) from None
        numel = math.prod(shape)
        if end - begin != dtype.nbytes(numel) or not 0 <= begin <= end <= data_size or dtype.block is not None \
                or min(shape, default=0) < 0:  # one test for the common case, then which one failed
            if any(d < 0 for d in shape):
                raise CorruptFileError(path, f"negative dimension in shape {list(shape)}", name)
            if not 0 <= begin <= end <= data_size:
                raise CorruptFileError(path, f"data_offsets [{begin}, {end}] lie outside the data section"
                                             f" of {data_size} bytes (file truncated?)", name)
            if dtype.block is not None and numel % dtype.block[0]:
                raise CorruptFileError(path, f"{dtype} {list(shape)} does not end on a byte boundary", name)
            if end - begin != dtype.nbytes(numel):
                raise CorruptFileError(path, f"holds {end - begin} bytes but {dtype} {list(shape)} needs"
                                             f" {dtype.nbytes(numel)}", name)
        entries.append((begin, end, name, dtype, shape))
    entries.sort(key=itemgetter(0, 1))
    pos = 0
    for begin, end, name, _, _ in entries:
        if begin != pos:
            raise CorruptFileError(path, "tensor data overlaps or leaves a gap", name)
        pos = end
    if isinstance(path, storage.RemotePath):
        tensors = [Tensor(name, dtype, shape, storage.region(path, start + begin, end - begin, label=name))
                   for begin, end, name, dtype, shape in entries]
    else:
        where = str(path)  # one string for every region
        tensors = [Tensor(name, dtype, shape, FileRegion(where, start + begin, end - begin, None, name))
                   for begin, end, name, dtype, shape in entries]
    return TensorDict(tensors, {**meta, "source.format": NAME, **hf_config_beside(path)})


_MAX_CONFIG = 1 << 20


def hf_config_beside(path: Path) -> dict[str, str]:
    """``{"local.hf.config": text}`` when a Hugging Face ``config.json`` (a JSON object) sits beside
    ``path``; {} otherwise (an unreadable one is no concern of the weights)."""
    config = storage.as_path(path).parent / "config.json"
    try:
        if config.stat().st_size > _MAX_CONFIG:
            return {}
        text = config.read_text("utf-8")
        if isinstance(json.loads(text), dict):
            return {"local.hf.config": text}
    except (OSError, ReadError, UnicodeDecodeError, ValueError, RecursionError):  # ReadError: a remote one's
        pass
    return {}


def _read_sharded(index: Path) -> TensorDict:
    try:
        doc = json.loads(index.read_text("utf-8"))
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
        if not isinstance(doc.get("metadata") or {}, dict):
            raise TypeError("metadata is not an object")
    except OSError as e:
        raise ReadError(index, f"cannot read: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise CorruptFileError(index, f"not a safetensors index ({type(e).__name__}: {e})") from None
    shards = list(dict.fromkeys(weight_map.values()))
    parts = []
    remote = isinstance(index, storage.RemotePath)
    folder = index.parent if remote else index.parent.resolve()
    for shard in shards:
        shard_path = index.parent / shard
        # shards sit beside the index: a name leading elsewhere ('../', '/abs', a symlink out) is refused
        if "\0" in shard or (".." in PurePosixPath(shard).parts or shard.startswith("/") if remote
                             else not shard_path.resolve().is_relative_to(folder)):
            raise CorruptFileError(index, f"shard {shard!r} is not a file of the index's folder")
        if not shard_path.is_file():
            raise ReadError(index, f"shard '{shard}' named in the index does not exist")
        parts.append(_read_file(shard_path))
    merged = _merge(index, parts, {f"hf.{k}": str(v) for k, v in (doc.get("metadata") or {}).items()})
    missing = [n for n in weight_map if n not in merged]
    if missing:
        raise CorruptFileError(index, f"tensors named in the index are in no shard: {', '.join(missing)}")
    return merged


def _merge(where: Path, parts: list[TensorDict], extra_meta: dict) -> TensorDict:
    tensors: dict[str, Tensor] = {}
    for part in parts:
        for name, t in part.items():
            if name in tensors:
                raise CorruptFileError(where, "tensor appears in two shards", name)
            tensors[name] = t
    meta = {**(parts[0].metadata if parts else {}), **extra_meta}
    return TensorDict(tensors.values(), meta)


def write(td: TensorDict, path: Path, max_shard_size: str | None = None) -> None:
    """Write one ``.safetensors`` file, or a sharded folder when ``max_shard_size`` is set.

    Memory: one tensor at a time (see :meth:`convert.ir.Tensor.copy_into`).
    """
    path = storage.as_path(path)  # type: ignore[assignment]  # a RemotePath for a URL
    metadata = td.portable_metadata
    for t in td.values():
        if t.dtype.block is not None and t.numel % t.dtype.block[0]:
            raise WriteError(path, f"safetensors stores {t.dtype} tensors only in whole bytes; shape {list(t.shape)} "
                                   f"has an odd number of elements", t.name)
    if max_shard_size is None:
        _write_file(list(td.values()), metadata, path)
        return
    limit = parse_size(max_shard_size, "--max-shard-size")
    shards: list[list[Tensor]] = [[]]
    used = 0
    for t in td.values():
        if shards[-1] and used + t.nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += t.nbytes
    path.mkdir()
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        _write_file(shard, metadata, path / name)
        weight_map.update((t.name, name) for t in shard)
    index = {"metadata": {"total_size": td.nbytes}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", "utf-8")


def _write_file(tensors: list[Tensor], metadata: dict, path: Path) -> list:
    """One file; returns ``[name, offset in the file, size, crc32c]`` of each tensor."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    starts = []
    for t in tensors:
        n = t.nbytes
        header[t.name] = {"dtype": t.dtype.safetensors, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        starts.append(offset)
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8 bytes with spaces
    start = 8 + len(raw)
    with path.open("wb") as f:  # remote: an upload (convert.storage)
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        crcs = copy_many(tensors, f)
    return [[t.name, start + at, t.nbytes, crc] for t, at, crc in zip(tensors, starts, crcs, strict=True)]


# --split shards (convert.split): each shard a standalone file, the index written last
def _shard_name(td: TensorDict, k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def _write_shard(tensors: Sequence[Tensor], path: Path, td: TensorDict) -> list:
    return _write_file(list(tensors), td.portable_metadata, path)


def _commit(td: TensorDict, shards: Sequence[tuple[str, Sequence[tuple[Tensor, list]]]]) -> list[tuple[str, bytes]]:
    weight_map = {t.name: name for name, tensors in shards for t, _ in tensors}
    total = sum(t.nbytes for _, tensors in shards for t, _ in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return [("model.safetensors.index.json", (json.dumps(index, indent=2) + "\n").encode("utf-8"))]


FORMAT = Format(
    name=NAME,
    description="safetensors file, or a Hugging Face sharded folder / index.json",
    detect=detect,
    read=read,
    writers=(Writer("", write, dtypes.held_by("safetensors"), suffix=".safetensors",
                    shards=ShardWriter(_shard_name, _write_shard, _commit), commit=("*" + _INDEX_SUFFIX,)),),
    options=(Option("--max-shard-size", "write", str,
                    "write a Hugging Face sharded folder with shards of at most this size (e.g. 5GB, 500MB)"),),
    suffixes=(".safetensors",),
    name_endings=(r"\.safetensors\.index\.json",),
    remote=True,
)
