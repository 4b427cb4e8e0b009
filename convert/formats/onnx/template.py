"""Writing into a template: the template's model with its main-graph initializers replaced by the
tensors, resolved onto the initializers' names by :mod:`convert.template`, and the values of its
Constant nodes and subgraphs replaced by the tensors of their names (see :mod:`convert.formats.onnx`)."""

from __future__ import annotations

import os
from pathlib import Path

from ... import dtypes
from ...errors import ConvertError, ReadError, UnsupportedDTypeError, UsageError, WriteError
from ...ir import Source, Tensor, TensorDict
from ...lazy import np
from ...template import Resolution, resolve
from .reader import _EXTERNAL, _GraphReader, _load_model, _onnx_type_name
from .walk import detect


def accepts_template(path: os.PathLike | str) -> bool:
    """An ONNX model can be a ``--template``."""
    return detect(path)


class _TemplateInitializer(Source):
    """A template initializer: only its name, dtype and shape take part (its value is replaced)."""

    def array(self, dtype, shape):
        raise ConvertError("an ONNX template's initializers are replaced, never copied")


def _resolved(td: TensorDict, template: Path, out: Path | None):
    """The template model (parsed without its initializers' raw bytes, which are about to be
    replaced), ``td`` resolved against it, the resolution, and the tensors that go back to
    places other than the main graph's initializers, with those places.

    A tensor named as :func:`.reader.read` names one of the template's Constant-node values,
    subgraph initializers or function constants goes back there (exact names only: those are
    the graph's own values, so a source without them keeps the template's). The others are
    resolved by :func:`convert.template.resolve` against the main-graph initializers (every one
    is a weight: none may be missing)."""
    try:
        tmpl, regions = _load_model(template)
        reader = _GraphReader(template)
        reader.raw_regions = regions
        reader.walk(tmpl.graph, scope="", origin=None)
        for fn in tmpl.functions:
            reader.walk_function(fn)
    except ReadError as e:
        raise WriteError(out, f"template: {e}") from None
    variables, problems, placed = [], [], []
    for init in tmpl.graph.initializer:
        shape = tuple(int(d) for d in init.dims)
        try:
            variables.append(Tensor(init.name, dtypes.from_onnx(init.data_type), shape, _TemplateInitializer(),
                                    {"role": "weight"}))
        except UnsupportedDTypeError:
            problems.append(f"missing '{init.name}' ({_onnx_type_name(init.data_type)} {list(shape)}, a dtype "
                            "convert cannot write)")
    own = {t.name: t for t in reader.tensors}
    for t in td.values():
        if t.name in reader.places:
            want = own[t.name]
            if (t.dtype, t.shape) != (want.dtype, want.shape):
                problems.append(f"'{t.name}' is {t.dtype} {list(t.shape)}, the template's {want.attrs['onnx.kind']} "
                                f"is {want.dtype} {list(want.shape)}")
            placed.append((t, reader.places[t.name], want))
    rest = td.replace([t for t in td.values() if t.name not in reader.places])
    resolved, resolution = resolve(rest, TensorDict(variables), path=out, template_name=os.fspath(template),
                                   optional=lambda t: False, problems=problems)
    return tmpl, resolved, resolution, placed


def prepare(td: TensorDict, template: str | os.PathLike | None = None, graph: bool = False,
            **_: object) -> tuple[TensorDict, Resolution | None]:
    """``td`` resolved against ``template``, as :func:`.writer.write` will write it (the main-graph
    initializers, then the values that go back to Constant nodes and subgraphs), and the
    resolution; ``(td, None)`` without a template."""
    if template is None:
        return td, None
    if graph:
        raise UsageError("--graph and --template exclude each other")
    _, resolved, resolution, placed = _resolved(td, Path(template), None)
    return resolved.replace([*resolved.values(), *(t for t, _, _ in placed)]), resolution


def _template_model(td: TensorDict, template: Path, out: Path):
    """The template's model holding ``td``'s values where they go, without main-graph initializers,
    and the tensors to write as those initializers."""
    import onnx

    model, resolved, _, placed = _resolved(td, template, out)
    for t, place, template_value in placed:
        _put(t, place, template_value, onnx)
    del model.graph.initializer[:]
    _inline_external(model, template)
    return model, list(resolved.values())


def _put(t: Tensor, place, template_value: Tensor, onnx) -> None:
    """Store ``t``'s value in the template's proto, in the form the template had there."""
    if isinstance(place, onnx.TensorProto):
        _fill(place, t)
        return
    if isinstance(place, onnx.SparseTensorProto):
        _fill_sparse(place, t, template_value)
        return
    _, attr = place
    arr = t.numpy()
    if attr.name == "value_float":
        attr.f = float(arr)
    elif attr.name == "value_int":
        attr.i = int(arr)
    elif attr.name == "value_string":
        attr.s = bytes(arr.reshape(-1)[0])
    else:
        field = {"value_floats": "floats", "value_ints": "ints", "value_strings": "strings"}[attr.name]
        values = getattr(attr, field)
        del values[:]
        if field == "strings":
            values.extend(bytes(v) for v in arr.reshape(-1))
        else:
            values.extend(arr.reshape(-1).tolist())


def _fill_sparse(sparse, t: Tensor, template_value: Tensor) -> None:
    """A sparse tensor holding ``t``: the template's own when the values are the same (its bytes
    are kept), else ``t``'s non-zero entries, with linear indices (the values keep their name)."""
    arr = np.ascontiguousarray(t.numpy())
    if arr.tobytes() == np.ascontiguousarray(template_value.numpy()).tobytes():
        return
    flat = arr.reshape(-1)
    index = np.flatnonzero(flat)
    name = sparse.values.name
    sparse.values.Clear()
    _fill(sparse.values, Tensor.from_array(name, flat[index]))
    sparse.values.name = name
    sparse.indices.Clear()
    _fill(sparse.indices, Tensor.from_array("", index.astype(np.int64)))


def _fill(proto, t: Tensor) -> None:
    """``proto`` (its name kept) holding ``t``: raw little-endian bytes, strings in ``string_data``."""
    for field in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data",
                  "raw_data", "external_data", "data_location", "dims", "data_type"):
        proto.ClearField(field)
    proto.data_type = t.dtype.onnx
    proto.dims.extend(t.shape)
    arr = t.numpy()
    if t.dtype.kind == "string":
        proto.string_data.extend(bytes(v) for v in arr.reshape(-1))
    else:
        proto.raw_data = np.ascontiguousarray(arr).tobytes()


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
