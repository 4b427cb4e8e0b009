"""Writing into a template: the template's model with its main-graph initializers replaced by the
tensors, resolved onto the initializers' names by :mod:`convert.template` (see :mod:`convert.formats.onnx`)."""

from __future__ import annotations

import os
from pathlib import Path

from ... import dtypes
from ...errors import ConvertError, ReadError, UnsupportedDTypeError, UsageError, WriteError
from ...ir import Source, Tensor, TensorDict
from ...template import Resolution, resolve
from .reader import _EXTERNAL, _load_model, _onnx_type_name
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
    replaced) and ``td`` resolved against its main-graph initializers by
    :func:`convert.template.resolve` (every one is a weight: none may be missing)."""
    try:
        tmpl, _ = _load_model(template)
    except ReadError as e:
        raise WriteError(out, f"template: {e}") from None
    variables, problems = [], []
    for init in tmpl.graph.initializer:
        shape = tuple(int(d) for d in init.dims)
        try:
            variables.append(Tensor(init.name, dtypes.from_onnx(init.data_type), shape, _TemplateInitializer(),
                                    {"role": "weight"}))
        except UnsupportedDTypeError:
            problems.append(f"missing '{init.name}' ({_onnx_type_name(init.data_type)} {list(shape)}, a dtype "
                            "convert cannot write)")
    resolved, resolution = resolve(td, TensorDict(variables), path=out, template_name=os.fspath(template),
                                   optional=lambda t: False, problems=problems)
    return tmpl, resolved, resolution


def prepare(td: TensorDict, template: str | os.PathLike | None = None, graph: bool = False,
            **_: object) -> tuple[TensorDict, Resolution | None]:
    """``td`` resolved against ``template``'s initializers, as :func:`.writer.write` will write it,
    and the resolution; ``(td, None)`` without a template."""
    if template is None:
        return td, None
    if graph:
        raise UsageError("--graph and --template exclude each other")
    _, resolved, resolution = _resolved(td, Path(template), None)
    return resolved, resolution


def _template_model(td: TensorDict, template: Path, out: Path):
    import onnx

    tmpl, resolved, _ = _resolved(td, template, out)
    model = onnx.ModelProto()
    model.CopyFrom(tmpl)
    del model.graph.initializer[:]
    _inline_external(model, template)
    return model, list(resolved.values())


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
