"""``--template PATH`` for TF checkpoint output: write weights under an existing TF1 graph's names.

PATH is a checkpoint folder (with its ``checkpoint`` state file), a prefix, an ``.index``, a
``.meta`` graph (with or without a checkpoint beside it) or a SavedModel. Its variables (names,
dtypes, shapes, roles; from the checkpoint when there is one, else from the variables the graph's
saver restores) are what the output's names are resolved against, by :mod:`convert.template`.
The template's graph (the ``.meta``, or the SavedModel's meta graph with a saver) replaces the
source's, so that ``import_meta_graph`` + ``saver.restore(sess, latest_checkpoint(out))`` works
on the output folder; optimizer slots and step counters the source lacks are named in a note
(restore the weights with ``Saver(var_list=...)``), or written from the template's checkpoint
with ``--template-fill``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

from ...dtypes import from_tf
from ...errors import ConvertError, ReadError, UsageError, WriteError
from ...ir import Source, Tensor, TensorDict
from ...template import Resolution, resolve
from ..base import Option
from . import metagraph, savedmodel
from .reading import detect, locate, read
from .roles import role_of

OPTIONS = (
    Option("--template", "write", str, "resolve the tensors' names against an existing model and write into "
           "its graph: tf-ckpt: a checkpoint folder, prefix, .meta or SavedModel (exact name, then TF naming "
           "conventions w/kernel, b/bias..., then a unique shape in the same scope); onnx: a model whose "
           "main-graph initializers are replaced"),
    Option("--template-fill", "write", bool, "tf-ckpt with --template: write the template's own values for the "
           "optimizer slots and step counters the source lacks"),
)

GRAPH_KEYS = ("local.tf.meta_graph_path", "local.tf.meta_graph_saved_model")
TEMPLATE_KEY = "local.tf.template"


class _GraphOnly(Source):
    """A variable known from a graph with no checkpoint: it has no value to fill with."""

    def __init__(self, template: str, name: str):
        self.template, self.name = template, name

    def array(self, dtype: object, shape: object) -> NoReturn:
        raise ConvertError(f"template {self.template} is a graph without a checkpoint: no value for '{self.name}'")

    def chunks(self, nbytes: int, size: int = 0) -> NoReturn:
        self.array(None, None)  # raises


def accepts_template(path: os.PathLike | str) -> bool:
    """Whether ``path`` is something :func:`read_template` reads (cheap, never raises)."""
    p = Path(path)
    return detect(p) or savedmodel.detect(p) or (p.is_file() and p.name.endswith(".meta"))


def read_template(path: os.PathLike | str) -> TensorDict:
    """The template's variables, lazily, with ``attrs["role"]``; its graph in the metadata."""
    p = Path(path)
    if savedmodel.detect(p):
        td = savedmodel.read(p)
        return td.replace(metadata={**td.metadata, "local.tf.meta_graph_saved_model": td.metadata["local.tf.saved_model_dir"]})
    if p.is_file() and p.name.endswith(".meta"):
        try:
            locate(p)
        except ReadError:
            return _graph_variables(p)
    return read(p)


def _graph_variables(p: Path) -> TensorDict:
    """A ``.meta`` alone: the variables its saver restores, without values."""
    try:
        variables = metagraph.parse(p.read_bytes()).variables(restored=True)
    except OSError as e:
        raise ReadError(p, f"cannot read: {e.strerror}") from None
    except (metagraph.pw.ProtoError, UnicodeDecodeError) as e:
        raise ReadError(p, f"not a MetaGraphDef ({e})") from None
    tensors = []
    for name, (dtype, shape) in variables.items():
        if metagraph._PART.search(name) or shape is None or None in shape or dtype is None:
            raise ReadError(p, f"graph variable '{name}' has no static whole shape (partitioned?); "
                            "give the template's checkpoint instead")
        try:
            tensors.append(Tensor(name, from_tf(dtype), shape, _GraphOnly(str(p), name), {"role": role_of(name)}))
        except ConvertError as e:
            raise ReadError(p, f"graph variable '{name}': {e}") from None
    return TensorDict(tensors, {"local.tf.meta_graph_path": str(p.resolve()), "local.tf.graph_only": "1"})


def prepare(td: TensorDict, template: str | os.PathLike | None = None, template_fill: bool = False,
            object_graph: bool = False, **_: object) -> tuple[TensorDict, Resolution | None]:
    """``td`` resolved against the template (see the module docstring) and the resolution; ``td``
    itself when there is no template, or when it was resolved against this one already."""
    if template is None:
        if template_fill:
            raise UsageError("--template-fill needs --template")
        return td, None
    if object_graph:
        raise UsageError("--template writes into a TF1 graph's names; it does not go with --object-graph")
    if td.metadata.get(TEMPLATE_KEY) == os.fspath(template):
        return td, None
    try:
        tmpl = read_template(template)
    except ReadError as e:
        raise WriteError(None, f"template: {e}") from None
    if template_fill and tmpl.metadata.get("local.tf.graph_only"):
        raise UsageError(f"--template-fill needs the template's values: {template} is a graph without a checkpoint")
    out, resolution = resolve(td, tmpl, path=None, template_name=os.fspath(template), fill=template_fill)
    metadata = {k: v for k, v in td.metadata.items() if k not in GRAPH_KEYS}
    metadata.update({k: v for k, v in tmpl.metadata.items() if k in GRAPH_KEYS})
    metadata[TEMPLATE_KEY] = os.fspath(template)
    return out.replace(metadata=metadata), resolution
