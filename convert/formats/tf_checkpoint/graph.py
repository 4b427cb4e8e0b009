"""A TF1 checkpoint's ``.meta`` graph in a TensorFlow session holding a TensorDict's values, and its
inputs and outputs: what the SavedModel writer (a ``serving_default`` signature over the graph) and
the ONNX writer (``--graph``, :mod:`convert.formats.onnx.from_tf`) build on. Needs TensorFlow
(:func:`convert.frameworks.tensorflow`); nothing else in this package does.

The graph is the one ``local.tf.meta_graph_path`` in the metadata names (a checkpoint read with its
``.meta`` file); its values come from the TensorDict being written, after ``--map``, ``--dtype`` or
``--weights-only``, not from the source files. Inputs are ``--inputs`` or the graph's placeholders
(``PlaceholderWithDefault`` ops such as a dropout ``keep_prob`` keep their default); outputs are
``--outputs`` or the graph's ``predict`` collection.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ... import frameworks
from ...errors import ReadError, UsageError, WriteError
from ...ir import TensorDict
from ..base import Option

INPUTS_OPTION = Option("--inputs", "write", list, "graph input (placeholder name) of the exported signature; repeatable")
OUTPUTS_OPTION = Option("--outputs", "write", list, "graph output (op or tensor name) of the exported signature; "
                        "repeatable")


def tensor_name(name: str) -> str:
    """``fc2/add`` -> ``fc2/add:0``; ``x:0`` unchanged."""
    return name if ":" in name else name + ":0"


def signature_key(name: str) -> str:
    """``fc2/add:0`` -> ``fc2/add``."""
    return name[:-2] if name.endswith(":0") else name


def meta_graph_of(td: TensorDict) -> str | None:
    meta = td.metadata.get("local.tf.meta_graph_path")
    return meta if meta and os.path.isfile(meta) else None


@contextlib.contextmanager
def session(td: TensorDict, meta: str, path: os.PathLike | str) -> Iterator[tuple[Any, Any]]:  # tf.Graph, tf.Session
    """A TF1 session holding ``meta``'s graph with the TensorDict's values in its variables.

    Trainable variables must all be in ``td`` (listed in one error if not); others that are
    missing (optimizer slots, ``global_step`` after ``--weights-only``) start from their
    initial values, as in a freshly built graph.
    """
    tf = frameworks.tensorflow()
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default(), v1.Session(graph=graph) as sess:
        try:
            v1.train.import_meta_graph(meta, clear_devices=True)
        except Exception as e:  # TF raises many kinds here; all mean the same to the user
            raise ReadError(meta, f"TensorFlow cannot import this graph: {e}") from None
        trainable = {v.op.name for v in v1.trainable_variables()}
        variables = v1.global_variables()
        missing = [v.op.name for v in variables if v.op.name not in td and v.op.name in trainable]
        if missing:
            raise WriteError(path, f"the graph's variables have no tensor in the source: {', '.join(missing)}")
        sess.run(v1.variables_initializer([v for v in variables if v.op.name not in td]))
        for var in (v for v in variables if v.op.name in td):
            t = td[var.op.name]
            if not var.shape.is_compatible_with(t.shape):  # old graphs leave some shapes unknown
                raise WriteError(path, f"shape {list(t.shape)} does not fit the graph's {var.shape}", t.name)
            var.load(t.numpy(), sess)
        yield graph, sess


def graph_io(graph, inputs: list[str], outputs: list[str]) -> tuple[list[str], list[str]]:
    """Input and output tensor names: as given, else the placeholders the outputs depend on
    and the ``predict`` collection."""
    outputs = [tensor_name(n) for n in outputs] or [t.name for t in graph.get_collection("predict")]
    if not outputs:
        raise UsageError("name the graph's outputs with --outputs (it has no 'predict' collection)")
    _check_names(graph, outputs)
    inputs = [tensor_name(n) for n in inputs] or \
        [op.outputs[0].name for op in _ancestors(graph, outputs) if op.type == "Placeholder"]
    _check_names(graph, inputs)
    return inputs, outputs


def _check_names(graph, names: list[str]) -> None:
    for n in names:
        try:
            graph.get_tensor_by_name(n)
        except (KeyError, ValueError) as e:
            raise UsageError(f"the graph has no tensor '{n}' ({e})") from None


def _ancestors(graph, outputs: list[str]) -> list:
    """The ops the outputs depend on, in graph order (a training graph's ``labels`` placeholder is not one)."""
    seen, todo = set(), [graph.get_tensor_by_name(tensor_name(n)).op for n in outputs]
    while todo:
        op = todo.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        todo.extend(t.op for t in op.inputs)
        todo.extend(op.control_inputs)
    return [op for op in graph.get_operations() if op.name in seen]
