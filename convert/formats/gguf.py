"""GGUF files: llama.cpp's (and Ollama's, LM Studio's) single-file models.

Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md -- ``GGUF`` magic, a u32
version (2 or 3), u64 tensor and key/value counts, the typed key/values, one info per tensor
(name, rank, dims innermost first, GGML type, offset into the data section), padding to
``general.alignment`` (32 unless set), then the data, each tensor at an aligned offset.
Little-endian only here (big-endian GGUF files exist for s390x; they are refused).

Reading needs no package: the header is parsed here (value type numbers as
``gguf.constants.GGUFValueType``; a test checks they agree), and every count, length, dimension and offset checked against the file's size before anything is
allocated or looped over; tensors become :class:`~convert.ir.FileRegion` s, so a rename-only
conversion copies bytes in the kernel. Not through ``gguf.GGUFReader`` (the tests' oracle):
it maps the whole file, builds one NumPy view per array element (a 128k-token vocabulary is
hundreds of thousands of objects, a hostile array as many as the file has bytes), multiplies
dimensions in wrapping uint64 and fails on damaged files with assorted built-in exceptions.
Dequantizing (``--dtype``) needs ``gguf``; so does writing.

Tensors: F32, F16, BF16, F64 and I8-I64 are their dtypes of the table; GGML's block-quantized
types (Q8_0, Q4_K, IQ2_XXS...) are dtype rows of their own (kind ``quant``, shape in elements,
raw bytes = the blocks; :mod:`convert.dtypes`). Why dtype rows rather than raw bytes with
attributes behind a float32 face: the type then travels with the tensor through selection and
mapping, ``inspect`` shows it, every writer's ``holds`` refuses it in one error listing the
tensors (before anything is written), verification compares the raw blocks, and GGUF -> GGUF
copies them byte for byte. Their values are the dequantized float32 numbers
(``gguf.quants.dequantize``): ``--dtype float32`` (or float16, bfloat16) turns them into
tensors any format holds.

Metadata: every key/value ``K`` becomes ``metadata["gguf.K"]``, a JSON object naming the GGUF
type, e.g. ``{"uint32":2048}``, ``{"string":"llama"}``, ``{"array[float32]":[...]}``, so that
it survives safetensors ``__metadata__`` (strings) and comes back with its exact type. Other
portable metadata (``tf.global_step``) is kept as GGUF strings under ``convert.<key>`` and read
back under its own name.

Writing: ``gguf.GGUFWriter`` writes the header (magic, counts, key/values, tensor infos with
their aligned offsets); the data is then streamed one tensor at a time (``copy_into``: a kernel
copy for a tensor that is only renamed), padded as the writer pads it. Its own data path would
need every tensor as a NumPy array. Output is deterministic: the writer adds nothing of its own
(no architecture key unless the metadata has one, no timestamps). A GGUF file written by
``gguf`` comes out byte-identical through GGUF -> GGUF.

Remote paths (``Format.remote``, :mod:`convert.storage`): the header is read from the start of
the object in a few growing reads (a 128k-token vocabulary is a few MB), each tensor is a
:class:`~convert.storage.RemoteRegion`; a remote output is ``GGUFWriter``'s file replaced by an
upload, written in one pass as locally (GGUF has no field to patch afterwards).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path

from .. import dtypes, storage
from ..errors import ConvertError, CorruptFileError, ReadError, WriteError
from ..ir import FileRegion, Tensor, TensorDict
from .base import Format, Writer

NAME = "gguf"
MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses more
META_PREFIX = "gguf."
OTHER_PREFIX = "convert."

# GGUF value types (gguf.constants.GGUFValueType): number -> (name, struct format, size)
_SCALARS = {0: ("uint8", "B", 1), 1: ("int8", "b", 1), 2: ("uint16", "H", 2), 3: ("int16", "h", 2),
            4: ("uint32", "I", 4), 5: ("int32", "i", 4), 6: ("float32", "f", 4), 7: ("bool", "?", 1),
            10: ("uint64", "Q", 8), 11: ("int64", "q", 8), 12: ("float64", "d", 8)}
_STRING, _ARRAY = 8, 9
_TYPE_NAMES = {name: num for num, (name, _, _) in _SCALARS.items()} | {"string": _STRING}
_MIN_KV = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_INFO = 8 + 4 + 4 + 8  # name length, rank, type, offset


def detect(path: Path) -> bool:
    try:
        return storage.read_at(storage.as_path(path), 0, 4) == MAGIC
    except (OSError, ReadError):  # ReadError: a remote path's
        return False


# ------------------------------------------------------------------------------------------ reading

class _Bad(Exception):
    """A header problem; turned into one CorruptFileError naming the file."""


class _Header:
    """A bounds-checked cursor over the mapped file (or a remote file's header, read as it goes)."""

    def __init__(self, buf, size: int, grow=None):
        self.buf, self.size, self.pos, self.grow = buf, size, 0, grow

    def take(self, n: int, what: str) -> int:
        if n < 0 or n > self.size - self.pos:
            raise _Bad(f"{what} runs past the end of the file (truncated?)")
        start = self.pos
        self.pos += n
        if self.grow is not None:
            self.grow(self.pos)
        return start

    def scalar(self, fmt: str, size: int, what: str):
        return struct.unpack_from("<" + fmt, self.buf, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return self.scalar("I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"{what}'s length")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{what} is not UTF-8") from None

    def count(self, n: int, each: int, what: str) -> int:
        if n > (self.size - self.pos) // each:
            raise _Bad(f"{what} count {n} is more than the rest of the file can hold")
        return n

    def value(self, vtype: int, what: str) -> tuple[str, object]:
        """(type name, value) of one key's value."""
        if vtype in _SCALARS:
            name, fmt, size = _SCALARS[vtype]
            return name, self.scalar(fmt, size, what)
        if vtype == _STRING:
            return "string", self.string(what)
        if vtype != _ARRAY:
            raise _Bad(f"{what} has unknown value type {vtype}")
        itype = self.u32(f"{what}'s item type")
        n = self.u64(f"{what}'s length")
        if itype in _SCALARS:
            name, fmt, size = _SCALARS[itype]
            self.count(n, size, f"{what}: array")
            start = self.take(n * size, what)
            values = list(struct.unpack_from(f"<{n}{fmt}", self.buf, start)) if n else []
            return f"array[{name}]", values
        if itype == _STRING:
            self.count(n, 8, f"{what}: string array")
            return "array[string]", [self.string(f"{what}[{i}]") for i in range(n)]
        if itype == _ARRAY:
            raise _Bad(f"{what} is an array of arrays, which llama.cpp does not read either")
        raise _Bad(f"{what} has unknown item type {itype}")


class _Growing:
    """The start of a remote object, read further (ranged GETs of doubling size) as the header
    parser needs: the header costs a few GETs, the tensors none."""

    def __init__(self, path: storage.RemotePath):
        self.path, self.buf = path, bytearray()

    def __call__(self, end: int) -> None:
        if end > len(self.buf):
            start = len(self.buf)
            self.buf += self.path.read_range(start, start + max(end - start, start, storage.HEADER_BLOCK))


def read(path: Path) -> TensorDict:
    """Read a ``.gguf`` file lazily: the header now, each tensor's bytes when a writer asks."""
    path = storage.as_path(path)  # type: ignore[assignment]  # a RemotePath for a URL
    try:
        if isinstance(path, storage.RemotePath):
            size = path.stat().st_size
            if size < 24:
                raise CorruptFileError(path, f"is {size} bytes, shorter than a GGUF header")
            grow = _Growing(path)
            grow(8)
            return _parse(path, grow.buf, size, grow)
        with path.open("rb") as f:
            size = path.stat().st_size
            if size < 24:
                raise CorruptFileError(path, f"is {size} bytes, shorter than a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf, size)
    except OSError as e:
        raise ReadError(path, f"cannot read: {e.strerror or e}") from None
    except _Bad as e:
        raise CorruptFileError(path, str(e)) from None


def _parse(path: Path, buf, size: int, grow=None) -> TensorDict:
    h = _Header(buf, size, grow)
    if bytes(buf[:4]) != MAGIC:
        raise _Bad(f"does not start with the GGUF magic (found {bytes(buf[:4])!r})")
    h.pos = 4
    version = h.u32("version")
    if version not in VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in VERSIONS:
            raise ReadError(path, "is a big-endian GGUF file, which convert does not read")
        raise ReadError(path, f"is GGUF version {version}; convert reads versions {', '.join(map(str, VERSIONS))}")
    n_tensors, n_kv = h.u64("tensor count"), h.u64("key/value count")
    h.count(n_kv, _MIN_KV, "key/value")
    metadata: dict[str, str] = {}
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = h.string(f"key {i}")
        what = f"key '{key}'"
        vtype = h.u32(f"{what}'s type")
        tname, value = h.value(vtype, what)
        if key == "general.alignment":
            if tname != "uint32" or not isinstance(value, int) or not value or value & (value - 1):
                raise _Bad(f"general.alignment must be a power of two (uint32), not {tname} {value!r}")
            alignment = value
        if key.startswith(OTHER_PREFIX) and tname == "string":
            meta_key = key[len(OTHER_PREFIX):]
        else:
            meta_key = META_PREFIX + key
        if meta_key in metadata:
            raise _Bad(f"{what} appears twice")
        metadata[meta_key] = str(value) if meta_key != META_PREFIX + key else _typed_json(tname, value)
    h.count(n_tensors, _MIN_INFO, "tensor")
    infos = []
    for i in range(n_tensors):
        name = h.string(f"tensor {i}'s name")
        rank = h.u32(f"tensor '{name}''s rank")
        if rank > MAX_DIMS:
            raise _Bad(f"tensor '{name}' has {rank} dimensions; GGUF holds at most {MAX_DIMS}")
        dims = [h.u64(f"tensor '{name}''s dimensions") for _ in range(rank)]
        ggml = h.u32(f"tensor '{name}''s type")
        offset = h.u64(f"tensor '{name}''s offset")
        infos.append((name, dims, ggml, offset))
    data_start = -(-h.pos // alignment) * alignment
    data_size = size - data_start
    if isinstance(path, storage.RemotePath):
        def source(offset: int, nbytes: int, name: str) -> FileRegion:
            return storage.region(path, offset, nbytes, label=name)
    else:
        where = str(path)  # one string for every region

        def source(offset: int, nbytes: int, name: str) -> FileRegion:
            return FileRegion(where, offset, nbytes, label=name)
    tensors, seen, spans = [], set(), []
    for name, dims, ggml, offset in infos:
        if name in seen:
            raise _Bad(f"tensor '{name}' appears twice")
        seen.add(name)
        try:
            dtype = dtypes.from_ggml(ggml)
        except ConvertError:
            raise _Bad(f"tensor '{name}' has unknown GGML type {ggml}") from None
        shape = tuple(reversed(dims))  # GGUF lists the innermost dimension first
        numel = math.prod(shape)
        if dtype.block is not None and (not dims or dims[0] % dtype.block[0]):
            raise _Bad(f"tensor '{name}' is {dtype} but its rows ({dims[0] if dims else 1} elements) are not "
                       f"whole blocks of {dtype.block[0]}")
        nbytes = dtype.nbytes(numel)
        if offset % alignment:
            raise _Bad(f"tensor '{name}''s data offset {offset} is not aligned to {alignment} bytes")
        if offset > data_size or nbytes > data_size - offset:
            raise _Bad(f"tensor '{name}' ({dtype} {list(shape)}, {nbytes} bytes at offset {offset}) lies past the "
                       f"end of the data section of {max(data_size, 0)} bytes (file truncated?)")
        spans.append((offset, offset + nbytes, name))
        tensors.append(Tensor(name, dtype, shape, source(data_start + offset, nbytes, name)))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise _Bad(f"tensors '{a}' and '{b}' overlap")
    return TensorDict(tensors, {**metadata, "source.format": NAME})


def _typed_json(tname: str, value) -> str:
    return json.dumps({tname: value}, ensure_ascii=False, separators=(",", ":"))


# ------------------------------------------------------------------------------------------ writing

def _kv(key: str, text: str, path: Path):
    """(GGUFValueType, value, item type) of a ``gguf.*`` metadata value; WriteError if malformed."""
    from gguf.constants import GGUFValueType

    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or len(doc) != 1:
            raise ValueError("not an object with one key, the GGUF type")
        (tname, value), = doc.items()
        if tname.startswith("array[") and tname.endswith("]"):
            item = _TYPE_NAMES[tname[6:-1]]
            if not isinstance(value, list):
                raise ValueError(f"{tname} needs a list")
            if not value:
                raise ValueError("the gguf package's writer writes no empty arrays")
            return GGUFValueType.ARRAY, [_checked(item, v) for v in value], GGUFValueType(item)
        return GGUFValueType(_TYPE_NAMES[tname]), _checked(_TYPE_NAMES[tname], value), None
    except KeyError as e:
        raise WriteError(path, f"metadata {META_PREFIX}{key}: unknown GGUF type {e}") from None
    except (ValueError, TypeError, RecursionError, struct.error) as e:
        raise WriteError(path, f"metadata {META_PREFIX}{key}: not a typed GGUF value such as "
                               f'{{"uint32": 2048}} ({e})') from None


def _checked(vtype: int, value):
    if vtype == _STRING:
        if not isinstance(value, str):
            raise TypeError(f"{value!r} is not a string")
        return value
    name, fmt, _ = _SCALARS[vtype]
    if name == "bool" and not isinstance(value, bool):
        raise TypeError(f"{value!r} is not true/false")
    if name.startswith(("int", "uint")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{value!r} is not an integer")
    elif name.startswith("float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"{value!r} is not a number")
    struct.pack("<" + fmt, value)  # range check (struct.error)
    return float(value) if name.startswith("float") else value


def write(td: TensorDict, path: Path) -> None:
    """Write one ``.gguf`` file (memory: one tensor's chunk at a time)."""
    from gguf.constants import GGMLQuantizationType, GGUFValueType
    from gguf.gguf_writer import GGUFWriter

    path = storage.as_path(path)  # type: ignore[assignment]  # remote: the RemotePath of an atomic output
    remote = isinstance(path, storage.RemotePath)
    kvs = []
    alignment = DEFAULT_ALIGNMENT
    for key, text in td.portable_metadata.items():
        if key.startswith(META_PREFIX):
            vtype, value, item = _kv(key[len(META_PREFIX):], text, path)
            if key == META_PREFIX + "general.alignment":
                if vtype != GGUFValueType.UINT32 or not value or value & (value - 1):
                    raise WriteError(path, "metadata gguf.general.alignment must be a power of two (uint32)")
                alignment = value
            kvs.append((key[len(META_PREFIX):], value, vtype, item))
        elif key != "source.format":
            kvs.append((OTHER_PREFIX + key, text, GGUFValueType.STRING, None))
    for t in td.values():
        if len(t.shape) > MAX_DIMS:
            raise WriteError(path, f"GGUF holds at most {MAX_DIMS} dimensions, not shape {list(t.shape)}", t.name)
        block = t.dtype.block
        if t.dtype.is_quantized and block and (not t.shape or t.shape[-1] % block[0]):
            raise WriteError(path, f"{t.dtype} rows must be whole blocks of {block[0]}, "
                                   f"not shape {list(t.shape)}", t.name)
    # arch "": no general.architecture unless the metadata has one
    writer = GGUFWriter(None if remote else path, arch="")
    writer.data_alignment = alignment
    for key, value, vtype, item in kvs:
        writer.add_key_value(key, value, vtype, sub_type=item)
    for t in td.values():
        assert t.dtype.gguf is not None  # the core refused, before writing, every dtype GGUF cannot hold
        writer.add_tensor_info(t.name, t.shape, t.dtype.numpy, t.nbytes, raw_dtype=GGMLQuantizationType(t.dtype.gguf))
    if remote:  # the writer's own file is an upload (its open_output_file keeps an output already open)
        from gguf.gguf_writer import WriterState

        writer.fout = [path.open("wb")]
        writer.state = WriterState.EMPTY
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None  # opened by write_header_to_file
        out = writer.fout[0]
        writer.write_padding(out, out.tell())
        for t in td.values():  # in the order of the infos, each padded as GGUFWriter pads it
            t.copy_into(out)
            writer.write_padding(out, t.nbytes)
        out.flush()
    finally:
        writer.close()


FORMAT = Format(
    name=NAME,
    description="GGUF file (llama.cpp): F32/F16/BF16 and quantized tensors, typed key/values",
    detect=detect,
    read=read,
    writers=(Writer("", write, dtypes.held_by("gguf"), suffix=".gguf"),),
    suffixes=(".gguf",),
    checksums="",
    remote=True,
)
