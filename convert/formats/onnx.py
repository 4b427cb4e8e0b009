"""ONNX models: every weight in, weights (or a template's graph with new weights) out.

Spec: https://github.com/onnx/onnx/blob/main/docs/IR.md (the ``ModelProto`` in
onnx/onnx.proto) and https://github.com/onnx/onnx/blob/main/docs/ExternalData.md.

Reading
    Every tensor the model holds, wherever it lives:

    ========================  ==========================  =====================================
    where                     tensor name                 ``attrs["origin"]``
    ========================  ==========================  =====================================
    graph initializers        the initializer name        ``initializer``
    sparse initializers       the values tensor's name    ``sparse_initializer`` (made dense)
    ``Constant`` nodes        the node's output name      ``constant`` (``value``, ``sparse_value``,
                                                          ``value_float(s)``, ``value_int(s)``,
                                                          ``value_string(s)``)
    subgraphs of If/Loop/Scan the same rules, recursively ``subgraph:<node name>/<attribute>``
    model-local functions     ``<function>/<output>``     ``function:<domain>.<name>``
    external data             (as above)                  ``external:<file>`` (overrides the above)
    ========================  ==========================  =====================================

    ``attrs["onnx.kind"]`` keeps ``initializer`` / ``constant`` / ``sparse_initializer``
    also when ``origin`` says ``external:`` or ``subgraph:``; ``attrs["role"]`` is
    ``weight`` for initializers and ``other`` for Constant nodes (ONNX does not say
    more); ``--initializers-only`` leaves Constant nodes out. Should two tensors share a name (only possible across functions or
    malformed subgraphs), the later one is prefixed by its graph's path.

    Nothing is loaded until a writer asks, and the weights never pass through
    protobuf: the file is first walked field by field (ModelProto -> graph ->
    initializer -> raw_data) to note where each main-graph initializer's ``raw_data``
    sits, and protobuf parses the rest (the structure) once; that parsed proto stays
    referenced by the lazy tensors. So external data *and* inline raw data become
    :class:`~convert.ir.FileRegion` s (copied byte for byte, memory independent of the
    model: a 400 MB inline model reads in 88 MB peak RSS instead of 840 MB). Tensors
    elsewhere (Constant nodes, subgraphs) or in typed fields (``float_data``,
    ``int32_data`` for 16/8-bit types and bool, ``int64_data``...) become
    :class:`~convert.ir.ArraySource` s decoded by ``onnx.numpy_helper.to_array``;
    strings are taken from ``string_data`` as bytes (``to_array`` would decode UTF-8).

    Metadata: ``source.format`` = ``onnx``, ``onnx.ir_version``, ``onnx.producer``,
    ``onnx.producer_version``, ``onnx.opset`` (default domain), ``onnx.opset.<domain>``,
    ``onnx.graph_name``, and each ``metadata_props`` entry as ``onnx.meta.<key>``.

Writing without a template
    A weights-only model: a graph named ``weights`` with no nodes, one initializer per
    tensor, and every initializer also listed as a graph output (with its type and
    shape). ``onnx.checker.check_model(full_check=True)`` accepts it, and onnxruntime
    loads it and returns the weights as outputs (without outputs the checker is
    content too, but onnxruntime drops unused initializers and then refuses the
    model). IR version 10, opset 21 unless ``--opset``; producer ``convert``
    ``1`` (fixed: no timestamps, no version string that changes the bytes).
    Metadata goes to ``metadata_props`` (``onnx.meta.K`` back to ``K``; the other
    ``onnx.*`` keys describe the file being written and are not copied).

    Bytes are produced by hand in protobuf's canonical field order, so the result
    equals ``onnx.save`` of the same model, but each tensor's raw bytes are streamed
    from ``Tensor.chunks()``: memory stays of the order of one chunk, not the model.

    External data: when the numeric tensors total more than
    ``--external-data-threshold`` bytes (default 2,000,000,000: protobuf cannot
    parse a file over 2 GiB), every non-empty numeric tensor goes to one data file
    beside the model (``--external-data-name``, default ``<output name>.data``),
    tensors of 1 MiB and more at offsets aligned to 64 KiB (mmap granularity on
    every OS), the others to 64 bytes. Strings always stay inline (ONNX cannot
    store them externally). ``path`` already has its final name (convert.fileio's
    atomic writer stages the model and its data file together in a hidden folder and
    moves both into place), so the location recorded in the model stays right.
    Writing 400 MB, inline or external, peaks at 70 MB RSS.

Writing with a template (``--template graph.onnx``)
    The template's model is copied, and the initializers of its main graph (and only
    those) are replaced by the source tensors of the same names. Every template
    initializer must be present with the same dtype and shape, and every source
    tensor must be a template initializer: missing, mismatched *and extra* tensors
    are all listed in one :class:`~convert.errors.WriteError` (extra ones are an
    error because silently dropping a weight hides mapping mistakes; drop them with
    a mapping rule). Constant nodes, subgraphs, opsets, producer and metadata of the
    template are kept as they are; template tensors kept that used external data are
    loaded inline so the output does not depend on the template's files.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .. import dtypes
from ..errors import ConvertError, CorruptFileError, ReadError, UsageError, WriteError
from ..ir import ArraySource, FileRegion, Tensor, TensorDict
from ..lazy import np
from .base import Format, Option, Writer, WriteReport
from .tf_checkpoint import protowire as pw

NAME = "onnx"

IR_VERSION = 10
DEFAULT_OPSET = 21
PRODUCER_NAME = "convert"
PRODUCER_VERSION = "1"
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
_BIG_TENSOR = 1 << 20
_BIG_ALIGN = 1 << 16
_SMALL_ALIGN = 64

# Sparse tensors are made dense when read; their dense size is bounded by this floor or this many
# times the model file's size, so that a few bytes claiming a vast shape allocate nothing.
_SPARSE_FLOOR = 256 << 20
_SPARSE_RATIO = 1024

# TensorProto.DataLocation.EXTERNAL and AttributeProto.AttributeType values (onnx.proto).
_EXTERNAL = 1
_ATTR_GRAPH, _ATTR_GRAPHS = 5, 10


# --------------------------------------------------------------------------- detect

# ModelProto top-level fields -> wire type (0 varint, 2 length-delimited), onnx.proto.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
# First tag byte of a GraphProto: one of its length-delimited fields 1, 2, 5, 10..16.
_GRAPH_FIRST_TAGS = {(f << 3) | 2 for f in (1, 2, 5, 10, 11, 12, 13, 14, 15)} | {0x82}
_MAX_TOP_FIELDS = 1_000_000


def _read_varint(f) -> int | None:
    result = shift = 0
    while shift < 64:
        b = f.read(1)
        if not b:
            return None
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7
    return None


def detect(path: os.PathLike | str) -> bool:
    """True for an ONNX ``ModelProto`` file.

    Walks the top-level protobuf fields (seeking over length-delimited ones, so a
    large model costs a few reads): the file must start with ``ir_version`` (field 1,
    as every serializer writes fields in order), hold only known ModelProto fields
    with their wire types, contain a ``graph`` (field 7) that starts like a
    GraphProto, and end exactly at a field boundary. TF GraphDef/MetaGraphDef start
    with a length-delimited field 1; a SavedModel has no field 7; SSTables start
    with 0; safetensors, zips and raw data fail the field walk.
    """
    try:
        p = Path(path)
        if not p.is_file():
            return False
        size = p.stat().st_size
        if size < 4:
            return False
        with open(p, "rb") as f:
            if f.read(1) != b"\x08":
                return False
            f.seek(0)
            seen = set()
            pos = 0
            for _ in range(_MAX_TOP_FIELDS):
                if pos == size:
                    break
                key = _read_varint(f)
                if key is None:
                    return False
                field, wire = key >> 3, key & 7
                if _MODEL_FIELDS.get(field) != wire:
                    return False
                if wire == 0:
                    value = _read_varint(f)
                    if value is None or (field == 1 and not 1 <= value <= 100):
                        return False
                    pos = f.tell()
                else:
                    n = _read_varint(f)
                    if n is None:
                        return False
                    start = f.tell()
                    pos = start + n
                    if pos > size:
                        return False
                    if field == 7:
                        if n == 0:
                            return False
                        first = f.read(1)
                        if not first or first[0] not in _GRAPH_FIRST_TAGS:
                            return False
                    f.seek(pos)
                seen.add(field)
            return pos == size and 1 in seen and 7 in seen
    except OSError:
        return False


# --------------------------------------------------------------------------- read

def read(path: os.PathLike | str, *, initializers_only: bool = False) -> TensorDict:
    """Read every tensor an ONNX model holds (see the module docstring).

    Args:
        path: the ``.onnx`` file; external data files are looked up beside it.
        initializers_only: leave out the values of Constant nodes (exporters use them
            mostly for shapes and scalars), keeping (sparse) initializers of every graph.

    Returns:
        A lazy TensorDict: initializers first, then Constant nodes, in graph order,
        each graph's tensors before those of its subgraphs.

    Example:
        >>> td = read("model.onnx")  # doctest: +SKIP
        >>> td["fc.weight"].attrs["origin"]  # doctest: +SKIP
        'external:model.onnx.data'
    """
    p = Path(path)
    model, regions = _load_model(p)
    reader = _GraphReader(p)
    reader.raw_regions = regions
    reader.constants = not initializers_only
    reader.walk(model.graph, scope="", origin=None)
    for fn in model.functions:
        reader.walk_function(fn)
    return TensorDict(reader.tensors, _read_metadata(model, p))


def _load_model(p: Path):
    """The ModelProto without its main-graph initializers' ``raw_data``, and where those bytes sit.

    A model up to 2 GB may hold its weights inline; parsing it whole would need about
    twice the file in memory. Instead the file is walked field by field (ModelProto
    -> graph -> initializer -> raw_data), the raw bytes are skipped and remembered as
    (offset, length), and protobuf parses only what remains: the structure.
    """
    import onnx

    if not p.is_file():
        raise ReadError(p, "no such file" if not p.exists() else "not a file")
    try:
        stripped, regions = _strip_initializer_raw_data(p)
    except OSError as e:
        raise ReadError(p, f"cannot read: {e.strerror or e}") from None
    except _Malformed as e:
        raise CorruptFileError(p, f"not a readable ONNX model ({e})") from None
    try:
        model = onnx.ModelProto()
        model.ParseFromString(stripped)
    except Exception as e:  # protobuf DecodeError and friends: only parsing happens here
        raise CorruptFileError(p, f"not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not model.HasField("graph"):
        raise CorruptFileError(p, "not an ONNX model: no graph")
    if model.ir_version >= 3 and not model.opset_import:
        raise CorruptFileError(p, "ONNX model without opset_import (truncated file?)")
    return model, regions


class _Malformed(Exception):
    """Private: the protobuf stream is inconsistent (turned into CorruptFileError)."""


def _strip_initializer_raw_data(p: Path) -> tuple[bytes, list[tuple[int, int] | None]]:
    """The file's bytes minus field 9 (raw_data) of each main-graph initializer.

    Returns the rewritten ModelProto bytes and, per main-graph initializer in order,
    the (offset, length) of its raw_data in the file (None when it has none).
    Other fields are copied unchanged; lengths of the rewritten messages are recomputed.
    """
    size = p.stat().st_size
    regions: list[tuple[int, int] | None] = []
    with open(p, "rb", buffering=1 << 16) as f:

        def varint() -> int:
            v = _read_varint(f)
            if v is None:
                raise _Malformed(f"truncated or bad varint at byte {f.tell()}")
            return v

        def length_end() -> int:
            n = varint()
            end = f.tell() + n
            if end > size:
                raise _Malformed(f"field of {n} bytes at byte {f.tell()} runs past the end of the file (truncated?)")
            return end

        def copy_value(wire: int) -> bytes:
            if wire == 0:
                return _varint(varint())
            if wire == 1 or wire == 5:
                n = 8 if wire == 1 else 4
                data = f.read(n)
                if len(data) != n:
                    raise _Malformed("truncated fixed-size field")
                return data
            if wire == 2:
                end = length_end()
                data = f.read(end - f.tell())
                return _varint(len(data)) + data
            raise _Malformed(f"unexpected wire type {wire} at byte {f.tell()}")

        def fields_until(end: int):
            while f.tell() < end:
                key = varint()
                if key >> 3 == 0:
                    raise _Malformed(f"field number 0 at byte {f.tell()}")
                yield key
            if f.tell() != end:
                raise _Malformed(f"a field overruns its message at byte {f.tell()}")

        out = bytearray()
        for key in fields_until(size):
            if key != (7 << 3 | 2):  # ModelProto.graph
                out += _varint(key) + copy_value(key & 7)
                continue
            graph = bytearray()
            for gkey in fields_until(length_end()):
                if gkey != (5 << 3 | 2):  # GraphProto.initializer
                    graph += _varint(gkey) + copy_value(gkey & 7)
                    continue
                tensor = bytearray()
                region = None
                for tkey in fields_until(length_end()):
                    if tkey == (9 << 3 | 2):  # TensorProto.raw_data
                        end = length_end()
                        region = (f.tell(), end - f.tell())
                        f.seek(end)
                    else:
                        tensor += _varint(tkey) + copy_value(tkey & 7)
                regions.append(region)
                graph += _varint(gkey) + _varint(len(tensor)) + tensor
            out += _varint(key) + _varint(len(graph)) + graph
    return bytes(out), regions


def _read_metadata(model, p: Path) -> dict[str, str]:
    meta = {"source.format": NAME, "onnx.ir_version": str(model.ir_version)}
    if model.producer_name:
        meta["onnx.producer"] = _text(model.producer_name, p)
    if model.producer_version:
        meta["onnx.producer_version"] = _text(model.producer_version, p)
    for op in model.opset_import:
        domain = _text(op.domain, p)
        meta["onnx.opset" if domain in ("", "ai.onnx") else f"onnx.opset.{domain}"] = str(op.version)
    if model.graph.name:
        meta["onnx.graph_name"] = _text(model.graph.name, p)
    for prop in model.metadata_props:
        meta[f"onnx.meta.{_text(prop.key, p)}"] = _text(prop.value, p)
    return meta


def _text(value, p: Path) -> str:
    """A protobuf string field; upb hands invalid UTF-8 over as bytes instead of failing."""
    if isinstance(value, bytes):
        raise CorruptFileError(p, f"invalid UTF-8 in a string field: {value[:60]!r}")
    return value


class _GraphReader:
    """Collects the tensors of a graph, its Constant nodes and its subgraphs."""

    def __init__(self, path: Path):
        self.path = path
        self.base_dir = path.parent
        self.tensors: list[Tensor] = []
        self.names: set[str] = set()
        self.file_sizes: dict[Path, int] = {}
        self.raw_regions: list[tuple[int, int] | None] = []
        self.constants = True

    def walk(self, graph, scope: str, origin: str | None) -> None:
        main = not scope and origin is None
        for index, init in enumerate(graph.initializer):
            region = self.raw_regions[index] if main else None
            self.add(_text(init.name, self.path), init, scope, origin, "initializer", "weight", region)
        for sparse in graph.sparse_initializer:
            self.add_sparse(_text(sparse.values.name, self.path), sparse, scope, origin, "sparse_initializer", "weight")
        self.walk_nodes(graph.node, scope, origin)

    def walk_function(self, fn) -> None:
        scope, domain = _text(fn.name, self.path), _text(fn.domain, self.path)
        self.walk_nodes(fn.node, scope, f"function:{domain}.{scope}" if domain else f"function:{scope}",
                        prefix=f"{scope}/")

    def walk_nodes(self, nodes, scope: str, origin: str | None, prefix: str = "") -> None:
        for index, node in enumerate(nodes):
            label = _text(node.name or (node.output[0] if node.output else f"{node.op_type}_{index}"), self.path)
            if self.constants and node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                self.add_constant(prefix + _text(node.output[0], self.path), node, scope, origin)
            for attr in node.attribute:
                if attr.type == _ATTR_GRAPH or attr.HasField("g"):
                    sub = f"{label}/{_text(attr.name, self.path)}"
                    self.walk(attr.g, f"{scope}/{sub}" if scope else sub, f"subgraph:{_join(origin, sub)}")
                elif attr.type == _ATTR_GRAPHS:
                    for i, g in enumerate(attr.graphs):
                        sub = f"{label}/{_text(attr.name, self.path)}[{i}]"
                        self.walk(g, f"{scope}/{sub}" if scope else sub, f"subgraph:{_join(origin, sub)}")

    def unique(self, name: str, scope: str) -> str:
        if name in self.names and scope:
            name = f"{scope}/{name}"
        if name in self.names:
            raise CorruptFileError(self.path, "two tensors have this name", name)
        self.names.add(name)
        return name

    def add(self, name: str, proto, scope: str, origin: str | None, kind: str, role: str,
            raw_region: tuple[int, int] | None = None) -> None:
        name = self.unique(name, scope)
        dtype, shape = self.dtype_shape(proto, name)
        attrs = {"role": role, "onnx.kind": kind, "origin": origin or kind}
        if proto.data_location == _EXTERNAL:
            source, location = self.external_region(proto, name, dtype, shape)
            attrs["origin"] = f"external:{location}"
        elif raw_region is not None and dtype.kind != "string":
            offset, length = raw_region
            nbytes = math.prod(shape) * dtype.itemsize
            if length != nbytes:
                raise CorruptFileError(self.path, f"raw_data holds {length} bytes, expected {nbytes} "
                                       f"for shape {list(shape)}", name)
            source = FileRegion(str(self.path), offset, length, label=name)
        else:
            source = self.inline_source(proto, name, dtype, shape)
        self.tensors.append(Tensor(name, dtype, shape, source, attrs))

    def add_sparse(self, name: str, sparse, scope: str, origin: str | None, kind: str, role: str) -> None:
        name = self.unique(name or "sparse", scope)
        values = sparse.values
        dtype, _ = self.dtype_shape(values, name)
        shape = tuple(int(d) for d in sparse.dims)
        self.check_shape(shape, name)
        if dtype.kind == "string":
            raise ReadError(self.path, "sparse string tensors are not supported", name)
        val_dtype, val_shape = dtype, tuple(values.dims)
        dense_bytes = math.prod(shape) * dtype.itemsize
        if dense_bytes > self.max_dense_bytes():
            raise CorruptFileError(self.path, f"sparse tensor of shape {list(shape)} would take {dense_bytes:,} bytes "
                                   f"once dense, more than a model of {self.model_size():,} bytes can mean "
                                   f"(limit {self.max_dense_bytes():,})", name)
        if values.data_location == _EXTERNAL:
            val_source, _ = self.external_region(values, name, val_dtype, val_shape)
        else:
            val_source = self.inline_source(values, name, val_dtype, val_shape)
        idx_proto = sparse.indices
        idx_dtype, idx_shape = self.dtype_shape(idx_proto, name)
        if idx_proto.data_location == _EXTERNAL:
            idx_source, _ = self.external_region(idx_proto, name, idx_dtype, idx_shape)
        else:
            idx_source = self.inline_source(idx_proto, name, idx_dtype, idx_shape)
        path = self.path

        def produce():
            vals = Tensor(name, val_dtype, val_shape, val_source).numpy().reshape(-1)
            idx = Tensor(name, idx_dtype, idx_shape, idx_source).numpy().astype(np.int64)
            try:
                dense = np.zeros(shape, dtype=dtype.numpy)
            except MemoryError:
                raise ReadError(path, f"not enough memory for the dense form of shape {list(shape)}", name) from None
            try:
                if (idx < 0).any() or (idx.ndim == 2 and idx.shape[1] != len(shape)) or idx.ndim > 2:
                    raise ValueError(f"indices of shape {list(idx.shape)} do not fit shape {list(shape)}")
                if idx.ndim == 1:
                    dense.reshape(-1)[idx] = vals
                else:
                    dense[tuple(idx.T)] = vals
            except (IndexError, ValueError) as e:
                raise CorruptFileError(path, f"bad sparse tensor: {e}", name) from None
            return dense

        attrs = {"role": role, "onnx.kind": kind, "origin": origin or kind}
        self.tensors.append(Tensor(name, dtype, shape, ArraySource(produce), attrs))

    def add_constant(self, name: str, node, scope: str, origin: str | None) -> None:
        for attr in node.attribute:
            if attr.name == "value":
                return self.add(name, attr.t, scope, origin, "constant", "other")
            if attr.name == "sparse_value":
                return self.add_sparse(name, attr.sparse_tensor, scope, origin, "constant", "other")
            simple = {
                "value_float": (np.float32, lambda a: a.f, ()),
                "value_floats": (np.float32, lambda a: list(a.floats), None),
                "value_int": (np.int64, lambda a: a.i, ()),
                "value_ints": (np.int64, lambda a: list(a.ints), None),
                "value_string": (object, lambda a: a.s, ()),
                "value_strings": (object, lambda a: list(a.strings), None),
            }.get(attr.name)
            if simple is not None:
                np_type, get, shape = simple
                values = get(attr)
                if np_type is object:
                    items = [bytes(v) for v in values] if shape is None else [bytes(values)]
                    arr = np.empty(len(items), dtype=object)
                    arr[:] = items
                    arr = arr.reshape(() if shape == () else (len(items),))
                else:
                    arr = np.array(values, dtype=np_type)
                arr.setflags(write=False)
                name = self.unique(name, scope)
                attrs = {"role": "other", "onnx.kind": "constant", "origin": origin or "constant"}
                self.tensors.append(Tensor(name, dtypes.from_numpy(arr.dtype), arr.shape,
                                           ArraySource(lambda arr=arr: arr), attrs))
                return None
        raise CorruptFileError(self.path, "Constant node without a value attribute", name)

    def check_shape(self, shape: tuple[int, ...], name: str) -> None:
        """Refuse negative dimensions and shapes no array can have (see :func:`.protowire.check_shape`)."""
        if any(d < 0 for d in shape):
            raise CorruptFileError(self.path, f"negative dimension in shape {list(shape)}", name)
        try:
            pw.check_shape(shape)
        except pw.ProtoError as e:
            raise CorruptFileError(self.path, str(e), name) from None

    def model_size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def max_dense_bytes(self) -> int:
        """The largest dense form of a sparse tensor we make: a sparse model can be much smaller
        than its dense weights, but not by more than :data:`_SPARSE_RATIO` (past a floor)."""
        return max(_SPARSE_FLOOR, _SPARSE_RATIO * self.model_size())

    def dtype_shape(self, proto, name: str):
        try:
            dtype = dtypes.from_onnx(proto.data_type)
        except ConvertError:
            raise ReadError(self.path, f"unsupported ONNX data type {_onnx_type_name(proto.data_type)}", name) from None
        shape = tuple(int(d) for d in proto.dims)
        self.check_shape(shape, name)
        if proto.HasField("segment"):
            raise ReadError(self.path, "segmented tensors are not supported", name)
        return dtype, shape

    def external_file(self, location: str, name: str) -> Path:
        """The file an external-data ``location`` names, which must be a regular file inside the
        model's folder: the ONNX spec says locations are relative to it, and a model must not
        make us read anything else (``../``, an absolute path, a symbolic link leading out)."""
        rel = Path(location)
        if "\0" in location:
            raise CorruptFileError(self.path, f"external data location {location!r} holds a NUL byte", name)
        if rel.is_absolute() or ".." in rel.parts or rel.drive:
            raise CorruptFileError(self.path, f"external data location {location!r} is outside the model's folder", name)
        try:
            base = self.base_dir.resolve()
            file = (base / rel).resolve()
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
            raise CorruptFileError(self.path, f"external data location {location!r} cannot be resolved ({e})",
                                   name) from None
        if not file.is_relative_to(base):
            raise CorruptFileError(self.path, f"external data location {location!r} leads outside the model's "
                                   f"folder (to {file}) through a symbolic link", name)
        if file.exists() and not file.is_file():
            raise CorruptFileError(self.path, f"external data location {location!r} is not a file", name)
        return file

    def inline_source(self, proto, name: str, dtype, shape):
        path = self.path
        numel = math.prod(shape)
        if dtype.kind == "string":
            if len(proto.string_data) != numel:
                raise CorruptFileError(path, f"{len(proto.string_data)} strings for shape {list(shape)}", name)

            def produce_strings():
                arr = np.empty(len(proto.string_data), dtype=object)
                for i, s in enumerate(proto.string_data):
                    arr[i] = bytes(s)
                return arr.reshape(shape)
            return ArraySource(produce_strings)
        if proto.HasField("raw_data"):
            if len(proto.raw_data) != numel * dtype.itemsize:
                raise CorruptFileError(path, f"raw_data holds {len(proto.raw_data)} bytes, expected "
                                       f"{numel * dtype.itemsize} for shape {list(shape)}", name)
            return ArraySource(lambda: np.frombuffer(proto.raw_data, dtype=dtype.numpy).reshape(shape))

        def produce_typed():
            from onnx import numpy_helper

            try:
                arr = numpy_helper.to_array(proto)
            except Exception as e:  # to_array raises ValueError/TypeError on inconsistent fields
                raise CorruptFileError(path, f"cannot decode tensor data ({e})", name) from None
            return np.asarray(arr).astype(dtype.numpy, copy=False).reshape(shape)
        return ArraySource(produce_typed)

    def external_region(self, proto, name: str, dtype, shape) -> tuple[FileRegion, str]:
        info = {_text(e.key, self.path): _text(e.value, self.path) for e in proto.external_data}
        location = info.get("location", "")
        if dtype.kind == "string":
            raise CorruptFileError(self.path, "string tensor stored as external data", name)
        if not location:
            raise CorruptFileError(self.path, "external data without a location", name)
        file = self.external_file(location, name)
        nbytes = math.prod(shape) * dtype.itemsize
        try:
            offset = int(info.get("offset", 0))
            length = int(info.get("length", nbytes))
        except ValueError:
            raise CorruptFileError(self.path, f"bad external data offset/length {info}", name) from None
        if offset < 0 or length != nbytes:
            raise CorruptFileError(self.path, f"external data length {length} at offset {offset} does not fit "
                                   f"{dtype} {list(shape)} ({nbytes} bytes)", name)
        if file not in self.file_sizes:
            try:
                self.file_sizes[file] = file.stat().st_size
            except OSError:
                raise ReadError(self.base_dir / location, f"external data file of {self.path} is missing", name) from None
        if offset + length > self.file_sizes[file]:
            raise CorruptFileError(file, f"external data at offset {offset} length {length} runs past the end "
                                   f"of the file ({self.file_sizes[file]} bytes)", name)
        return FileRegion(str(file), offset, length, label=name), location


def _join(origin: str | None, sub: str) -> str:
    if origin and origin.startswith("subgraph:"):
        return f"{origin.removeprefix('subgraph:')}/{sub}"
    return sub


def _onnx_type_name(code: int) -> str:
    try:
        import onnx

        return onnx.TensorProto.DataType.Name(code)
    except Exception:  # an unknown enum value
        return str(code)


# --------------------------------------------------------------------------- write

def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(field: int, n: int) -> bytes:
    """Tag and length of a length-delimited field of ``n`` bytes."""
    return _varint((field << 3) | 2) + _varint(n)


def write(td: TensorDict, path: os.PathLike | str, *, template: str | os.PathLike | None = None,
          opset: int | None = None, external_data_threshold: int | None = None,
          external_data_name: str | None = None, graph: bool = False, inputs: list[str] | None = None,
          outputs: list[str] | None = None, check: bool = False) -> WriteReport | None:
    """Write tensors as an ONNX model (weights only, or into a template's graph).

    Args:
        td: the tensors; not modified.
        path: the ``.onnx`` file to create.
        template: an ONNX model whose main-graph initializers are replaced by ``td``.
        opset: default-domain opset of a weights-only model (not with ``template``).
        external_data_threshold: total numeric bytes above which data goes to an
            external file (default 2,000,000,000).
        external_data_name: that file's name, beside ``path`` (default ``<name>.data``).
        graph, inputs, outputs, check: convert the source's TensorFlow graph instead, see
            :func:`convert.formats.tf_graph.write_onnx`.

    Raises:
        WriteError: a template mismatch (all listed), a dtype ONNX cannot hold, an
            empty tensor name, or an I/O failure.

    Example:
        >>> write(TensorDict.from_arrays({"w": np.ones(3, np.float32)}), "w.onnx")  # doctest: +SKIP
    """
    import onnx

    out = Path(path)
    if opset is not None and not 1 <= opset <= onnx.defs.onnx_opset_version():
        raise UsageError(f"--opset must be between 1 and {onnx.defs.onnx_opset_version()} (onnx {onnx.__version__}), "
                         f"got {opset}")
    if graph:
        if template is not None:
            raise UsageError("--graph and --template exclude each other")
        from . import tf_graph

        return tf_graph.write_onnx(td, out, inputs or [], outputs or [], opset, check)
    if inputs or outputs or check:
        raise UsageError("--inputs, --outputs and --check apply to ONNX with --graph")
    threshold = EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else int(external_data_threshold)
    if threshold < 0:
        raise UsageError(f"--external-data-threshold must be >= 0, got {threshold}")
    if "" in td:
        raise WriteError(out, "ONNX cannot hold a tensor with an empty name")

    if template is not None:
        if opset is not None:
            raise UsageError("--opset does not apply with --template (the template's opsets are kept)")
        model, tensors = _template_model(td, Path(template), out)
    else:
        model, tensors = _weights_only_model(td, DEFAULT_OPSET if opset is None else int(opset))

    numeric = sum(t.nbytes for t in tensors if t.dtype.kind != "string")
    data_name = None
    if numeric > threshold:
        data_name = external_data_name or f"{out.name}.data"
        if Path(data_name).name != data_name or data_name in ("", ".", "..", out.name):
            raise UsageError(f"--external-data-name must be a plain file name other than the model's, "
                             f"got '{data_name}'")
    _emit(model, tensors, out, data_name, onnx)


def _weights_only_model(td: TensorDict, opset: int):
    import onnx

    model = onnx.ModelProto(ir_version=IR_VERSION, producer_name=PRODUCER_NAME, producer_version=PRODUCER_VERSION)
    model.opset_import.add(domain="", version=opset)
    model.graph.name = "weights"
    for t in td.values():
        vi = model.graph.output.add()
        vi.name = t.name
        tt = vi.type.tensor_type
        tt.elem_type = t.dtype.onnx
        tt.shape.SetInParent()
        for d in t.shape:
            tt.shape.dim.add().dim_value = d
    for key, value in td.portable_metadata.items():
        if key.startswith("onnx.meta."):
            key = key.removeprefix("onnx.meta.")
        elif key.startswith("onnx."):
            continue
        model.metadata_props.add(key=key, value=value)
    return model, list(td.values())


def _template_model(td: TensorDict, template: Path, out: Path):
    import onnx

    try:
        # Parsed without its initializers' raw bytes, which are about to be replaced anyway.
        tmpl, _ = _load_model(template)
    except ReadError as e:
        raise WriteError(out, f"template: {e}") from None

    problems: list[str] = []
    tensors: list[Tensor] = []
    wanted = set()
    for init in tmpl.graph.initializer:
        wanted.add(init.name)
        want_shape = tuple(int(d) for d in init.dims)
        try:
            want_dtype = dtypes.from_onnx(init.data_type).name
        except ConvertError:
            want_dtype = _onnx_type_name(init.data_type)
        t = td.get(init.name)
        if t is None:
            problems.append(f"missing '{init.name}' ({want_dtype} {list(want_shape)})")
            continue
        if t.dtype.name != want_dtype or t.shape != want_shape:
            problems.append(f"'{init.name}' is {t.dtype} {list(t.shape)}, the template wants {want_dtype} {list(want_shape)}")
            continue
        tensors.append(t)
    for name, t in td.items():
        if name not in wanted:
            problems.append(f"extra '{name}' ({t.dtype} {list(t.shape)}) is not an initializer of the template")
    if problems:
        raise WriteError(out, f"tensors do not fit template {template} ({len(problems)} problem{'s' if len(problems) > 1 else ''}; drop or rename "
                         f"with a mapping): " + "; ".join(problems))

    model = onnx.ModelProto()
    model.CopyFrom(tmpl)
    del model.graph.initializer[:]
    _inline_external(model, template)
    return model, tensors


def _inline_external(model, template: Path) -> None:
    """Load into the proto the external data of the template tensors we keep."""
    from onnx import external_data_helper

    def tensors_of(graph):
        for sp in graph.sparse_initializer:
            yield sp.values
            yield sp.indices
        yield from graph.initializer
        yield from nodes_tensors(graph.node)

    def nodes_tensors(nodes):
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from tensors_of(attr.g)
                for g in attr.graphs:
                    yield from tensors_of(g)

    all_tensors = list(tensors_of(model.graph))
    for fn in model.functions:
        all_tensors += list(nodes_tensors(fn.node))
    for t in all_tensors:
        if t.data_location == _EXTERNAL:
            try:
                external_data_helper.load_external_data_for_tensor(t, str(template.parent))
            except Exception as e:
                raise ReadError(template, f"cannot load external data of the template: {e}", t.name) from None
            del t.external_data[:]
            t.data_location = 0


def _emit(model, tensors: list[Tensor], out: Path, data_name: str | None, onnx) -> None:
    """Write ``model`` with ``tensors`` as its main graph's initializers, streaming their bytes.

    Protobuf's canonical order is kept (model fields 1-6, graph, 8+; graph fields
    node and name, initializers, 10+; tensor fields 1-8, raw_data 9, 13-14) so the
    bytes equal ``onnx.save`` of the same model.
    """
    graph_head = onnx.GraphProto()
    graph_head.node.extend(model.graph.node)
    graph_head.name = model.graph.name
    graph_tail = onnx.GraphProto()
    graph_tail.CopyFrom(model.graph)
    del graph_tail.node[:]
    graph_tail.ClearField("name")
    del graph_tail.initializer[:]
    model_head = onnx.ModelProto()
    model_tail = onnx.ModelProto()
    model_tail.CopyFrom(model)
    model_tail.ClearField("graph")
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if model.HasField(field):
            setattr(model_head, field, getattr(model, field))
            model_tail.ClearField(field)

    # Plan: each tensor's serialized header, its raw byte count, its tail (external fields).
    plans = []
    data_offset = 0
    for t in tensors:
        proto = onnx.TensorProto(name=t.name, data_type=t.dtype.onnx, dims=list(t.shape))
        if t.dtype.kind == "string":
            proto.string_data.extend(t.numpy().reshape(-1).tolist())
            plans.append((t, _ser(proto), None, b""))
            continue
        nbytes = t.nbytes
        if data_name is not None and nbytes > 0:
            align = _BIG_ALIGN if nbytes >= _BIG_TENSOR else _SMALL_ALIGN
            data_offset = -(-data_offset // align) * align
            tail = onnx.TensorProto()
            for key, value in (("location", data_name), ("offset", str(data_offset)), ("length", str(nbytes))):
                tail.external_data.add(key=key, value=value)
            tail.data_location = _EXTERNAL
            plans.append((t, _ser(proto), ("external", data_offset, nbytes), _ser(tail)))
            data_offset += nbytes
        else:
            plans.append((t, _ser(proto), ("inline", 0, nbytes), b""))

    def tensor_len(plan) -> int:
        _, head, where, tail = plan
        n = len(head) + len(tail)
        if where is not None and where[0] == "inline":
            n += len(_len_field(9, where[2])) + where[2]
        return n

    graph_head_b, graph_tail_b = _ser(graph_head), _ser(graph_tail)
    graph_len = len(graph_head_b) + len(graph_tail_b) + sum(
        len(_len_field(5, tensor_len(p))) + tensor_len(p) for p in plans)

    data_path = None if data_name is None else out.parent / data_name
    try:
        with open(out, "xb") as f:
            f.write(_ser(model_head))
            f.write(_len_field(7, graph_len))
            f.write(graph_head_b)
            for plan in plans:
                t, head, where, tail = plan
                f.write(_len_field(5, tensor_len(plan)))
                f.write(head)
                if where is not None and where[0] == "inline":
                    f.write(_len_field(9, where[2]))
                    _copy(t, f, where[2], out)
                f.write(tail)
            f.write(graph_tail_b)
            f.write(_ser(model_tail))
        if data_path is not None:
            with open(data_path, "xb") as d:
                for t, _, where, _ in plans:
                    if where is not None and where[0] == "external":
                        d.write(b"\0" * (where[1] - d.tell()))
                        _copy(t, d, where[2], data_path)
    except FileExistsError as e:
        raise WriteError(e.filename, "already exists") from None
    except OSError as e:
        raise WriteError(out, f"cannot write: {e.strerror or e}") from None


def _ser(message) -> bytes:
    return message.SerializeToString(deterministic=True)


def _copy(t: Tensor, f, nbytes: int, where: Path) -> None:
    written = 0
    for piece in t.chunks():
        if isinstance(piece, np.ndarray):
            piece = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
        f.write(piece)
        written += len(piece)
    if written != nbytes:
        raise WriteError(where, f"source produced {written} bytes, expected {nbytes}", t.name)




FORMAT = Format(
    name=NAME,
    description="ONNX model (weights: initializers, Constant nodes, subgraphs, external data)",
    detect=detect,
    read=read,
    writers=(Writer("", write, dtypes.held_by("onnx"), suffix=".onnx"),),
    options=(
        Option("--initializers-only", "read", bool,
               "ONNX: read graph initializers only (also in subgraphs), not Constant-node values"),
        Option("--template", "write", str,
               "ONNX model whose main-graph initializers are replaced by the tensors "
               "(names, dtypes and shapes must match exactly)"),
        Option("--opset", "write", int, "default-domain opset of the ONNX model (default 21; with --graph, "
               "tf2onnx's default)"),
        Option("--external-data-threshold", "write", int,
               "total tensor bytes above which ONNX data goes to an external file (default 2000000000)"),
        Option("--external-data-name", "write", str,
               "file name of the ONNX external data file, beside the model (default <output name>.data)"),
        Option("--graph", "write", bool, "convert the TensorFlow graph (TF1 checkpoint with .meta, or SavedModel) "
               "to a runnable ONNX model with tf2onnx, instead of writing weights only (needs ckpt-convert[tf])"),
        Option("--inputs", "write", list, "graph input (placeholder name) of the exported signature; repeatable"),
        Option("--outputs", "write", list, "graph output (op or tensor name) of the exported signature; repeatable"),
        Option("--check", "write", bool, "with --graph: run the ONNX model (onnxruntime) and TensorFlow on the same "
               "random inputs and fail unless they agree within 1e-5"),
    ),
    suffixes=(".onnx",),
)
