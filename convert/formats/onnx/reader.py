"""Reading an ONNX model: every tensor it holds, lazily (see :mod:`convert.formats.onnx`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ... import dtypes, storage
from ...errors import CorruptFileError, ReadError, UnsupportedDTypeError
from ...ir import ArraySource, FileRegion, Tensor, TensorDict
from ...lazy import np
from ...wire import ProtoError, check_shape
from .walk import _Malformed, _strip_initializer_raw_data

NAME = "onnx"

# Sparse tensors are made dense when read; their dense size is bounded by this floor or this many
# times the model file's size, so that a few bytes claiming a vast shape allocate nothing.
_SPARSE_FLOOR = 256 << 20
_SPARSE_RATIO = 1024

# TensorProto.DataLocation.EXTERNAL and AttributeProto.AttributeType values (onnx.proto).
_EXTERNAL = 1
_ATTR_GRAPH, _ATTR_GRAPHS = 5, 10


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
    p: Path = storage.as_path(path)  # type: ignore[assignment]  # a RemotePath for a URL (convert.storage)
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
        # where each tensor outside the main graph's initializers lives in the model: the
        # TensorProto (subgraph initializer, Constant ``value``), the SparseTensorProto, or the
        # (node, attribute) of a Constant's other forms; a template write puts new values there
        self.places: dict[str, object] = {}

    def walk(self, graph, scope: str, origin: str | None) -> None:
        main = not scope and origin is None
        for index, init in enumerate(graph.initializer):
            region = self.raw_regions[index] if main else None
            self.add(_text(init.name, self.path), init, scope, origin, "initializer", "weight", region)
            if not main:
                self.places[self.tensors[-1].name] = init
        for sparse in graph.sparse_initializer:
            self.add_sparse(_text(sparse.values.name, self.path), sparse, scope, origin, "sparse_initializer", "weight")
            self.places[self.tensors[-1].name] = sparse
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
            source = storage.region(self.path, offset, length, label=name)
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
                self.add(name, attr.t, scope, origin, "constant", "other")
                self.places[self.tensors[-1].name] = attr.t
                return None
            if attr.name == "sparse_value":
                self.add_sparse(name, attr.sparse_tensor, scope, origin, "constant", "other")
                self.places[self.tensors[-1].name] = attr.sparse_tensor
                return None
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
                                           ArraySource(lambda arr=arr: arr), attrs))  # type: ignore[misc]  # the default argument binds the loop's value; mypy cannot infer such lambdas
                self.places[name] = (node, attr)
                return None
        raise CorruptFileError(self.path, "Constant node without a value attribute", name)

    def check_shape(self, shape: tuple[int, ...], name: str) -> None:
        """Refuse negative dimensions and shapes no array can have (see :func:`convert.check_shape`)."""
        if any(d < 0 for d in shape):
            raise CorruptFileError(self.path, f"negative dimension in shape {list(shape)}", name)
        try:
            check_shape(shape)
        except ProtoError as e:
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
        except UnsupportedDTypeError:
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
        if isinstance(self.base_dir, storage.RemotePath):  # no symbolic links in object storage
            return self.base_dir / rel.as_posix()
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
            except (OSError, ReadError):  # ReadError: a remote object's
                raise ReadError(self.base_dir / location, f"external data file of {self.path} is missing", name) from None
        if offset + length > self.file_sizes[file]:
            raise CorruptFileError(file, f"external data at offset {offset} length {length} runs past the end "
                                   f"of the file ({self.file_sizes[file]} bytes)", name)
        return storage.region(file, offset, length, label=name), location


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
