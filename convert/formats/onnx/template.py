"""Writing into a template: the template's model with its main-graph initializers replaced by the
tensors of the same names (see :mod:`convert.formats.onnx`)."""

from __future__ import annotations

from pathlib import Path

from ... import dtypes
from ...errors import ReadError, UnsupportedDTypeError, WriteError
from ...ir import Tensor, TensorDict
from .reader import _EXTERNAL, _load_model, _onnx_type_name


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
        except UnsupportedDTypeError:
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
