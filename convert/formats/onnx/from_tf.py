"""ONNX from a TensorFlow graph (``--graph``): the graph with the TensorDict's values, frozen and
converted by tf2onnx, and with ``--check`` run by onnxruntime against TensorFlow.

Weights move without TensorFlow; a *graph* (what an ONNX model runs) can only be built, frozen and
converted by TensorFlow and tf2onnx (:mod:`convert.frameworks`). The values come from the
TensorDict being written: after ``--map``, ``--dtype`` or ``--weights-only``, not from the source
files.

Sources:

* a TF1 checkpoint with its ``.meta`` graph (``local.tf.meta_graph_path`` in the metadata; see
  :mod:`convert.formats.tf_checkpoint.graph` for its inputs and outputs);
* a SavedModel (``local.tf.saved_model_dir``): its ``serving_default`` signature, with the
  variables rewritten from the TensorDict into a temporary copy
  (:func:`convert.formats.saved_model.saved_model_with_values`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ... import frameworks
from ...errors import ReadError, UsageError, VerificationError, WriteError
from ...ir import TensorDict
from ...lazy import np
from ..base import WriteReport
from ..saved_model import saved_model_with_values
from ..tf_checkpoint.graph import graph_io, meta_graph_of, session


def input_shapes(graph, inputs: list[str], meta: str | None = None) -> dict[str, list[int | None]]:
    """Each input's shape. Placeholders of old graphs may declare none; their shape then comes
    from the ``_output_shapes`` attribute TF recorded in the ``.meta`` file (the import drops
    it), else is unknown (tf2onnx would take them as scalars)."""
    recorded = {}
    if meta:
        tf = frameworks.tensorflow()
        meta_graph = tf.compat.v1.MetaGraphDef()
        with open(meta, "rb") as f:
            meta_graph.ParseFromString(f.read())
        for node in meta_graph.graph_def.node:
            shapes = node.attr["_output_shapes"].list.shape if "_output_shapes" in node.attr else []
            if node.op == "Placeholder" and shapes and not shapes[0].unknown_rank:
                recorded[node.name + ":0"] = [None if d.size < 0 else d.size for d in shapes[0].dim]
    out = {}
    for name in inputs:
        t = graph.get_tensor_by_name(name)
        if t.shape.rank is not None:
            out[name] = t.shape.as_list()
        elif name in recorded:
            out[name] = recorded[name]
    return out


def random_feed(graph, inputs: list[str], shapes: dict[str, list[int | None]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random values of the right dtype and shape (unknown dimensions: 2) for each input; float
    scalars get 1.0, the inference value of the usual scalar inputs (dropout's keep_prob)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name in inputs:
        t = graph.get_tensor_by_name(name)
        shape = [2 if d is None else d for d in shapes.get(name, [])]
        dtype = np.dtype(t.dtype.as_numpy_dtype)
        if dtype.kind == "f" and not shape:
            feed[name] = np.ones((), dtype)
        elif dtype.kind == "f":
            feed[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feed[name] = rng.integers(0, 2, shape).astype(dtype)
        elif dtype.kind == "b":
            feed[name] = rng.integers(0, 2, shape).astype(bool)
        else:
            raise UsageError(f"--check cannot make random values for input '{name}' of dtype {dtype}")
    return feed


def check_onnx_against_tensorflow(model_path: Path, graph, sess, inputs: list[str], outputs: list[str],
                                  shapes: dict[str, list[int | None]], atol: float = 1e-5) -> float:
    """Run the ONNX model (onnxruntime) and the TF session on the same random inputs; the
    largest absolute difference, or :class:`VerificationError` when an output differs by more
    than ``atol`` times its largest magnitude (at least 1): float32 cannot do better on large
    values, so 1e-5 is absolute for outputs up to 1 and relative beyond."""
    feed = random_feed(graph, inputs, shapes)
    expected = sess.run(outputs, feed)
    got = frameworks.onnxruntime_session(model_path, "--check").run(outputs, feed)
    worst = 0.0
    for name, e, g in zip(outputs, expected, got, strict=True):
        if np.shape(e) != np.shape(g):
            raise VerificationError(model_path, f"output shape {np.shape(g)} differs from TensorFlow's "
                                                f"{np.shape(e)}", name)
        e64, g64 = np.asarray(e, np.float64), np.asarray(g, np.float64)
        diff = float(np.max(np.abs(e64 - g64))) if np.size(e) else 0.0
        scale = max(1.0, float(np.max(np.abs(e64)))) if np.size(e) else 1.0
        if not diff <= atol * scale:
            raise VerificationError(model_path, f"onnxruntime differs from TensorFlow by {diff:g} "
                                                f"(> {atol:g} x {scale:g}, the output's largest magnitude)", name)
        worst = max(worst, diff)
    return worst


def write_onnx(td: TensorDict, path: Path, inputs: list[str], outputs: list[str], opset: int | None,
               check: bool) -> WriteReport:
    """Convert the source's TensorFlow graph, with the TensorDict's values, to an ONNX model at ``path``.

    The graph is frozen (variables become constants) and converted by tf2onnx. With
    ``check``, onnxruntime and TensorFlow run it on the same random inputs and must agree
    within 1e-5. Returns what the writer reports: the output's tensors are the frozen
    graph's constants, not the TensorDict by name, so name-by-name verification does not apply.
    """
    tf = frameworks.tensorflow()
    tf2onnx = frameworks.tf2onnx()
    meta = meta_graph_of(td)
    sm_dir = td.metadata.get("local.tf.saved_model_dir")
    if meta:
        with session(td, meta, path) as (graph, sess):
            inputs, outputs = graph_io(graph, inputs, outputs)
            graph_def = graph.as_graph_def()
            for node in graph_def.node:
                # TF 2.21 freezes VariableV2 but leaves the pre-1.0 "Variable" op (same attributes) as it is
                if node.op == "Variable":
                    node.op = "VariableV2"
            frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
                sess, graph_def, [n.rsplit(":", 1)[0] for n in outputs])
            shapes = input_shapes(graph, inputs, meta)
            _save_onnx(tf2onnx, frozen, inputs, outputs, opset, path, shapes)
            worst = check_onnx_against_tensorflow(path, graph, sess, inputs, outputs, shapes) if check else None
    elif sm_dir and os.path.isdir(sm_dir):
        with saved_model_with_values(td, sm_dir) as copy:
            try:
                frozen, inputs, outputs = tf2onnx.tf_loader.from_saved_model(
                    str(copy), inputs or None, outputs or None, signatures=["serving_default"])
            except Exception as e:  # tf2onnx/TF raise many kinds; all mean the same to the user
                raise ReadError(sm_dir, f"TensorFlow cannot load this SavedModel's signature: {e}") from None
            _save_onnx(tf2onnx, frozen, inputs, outputs, opset, path, None)
            worst = None
            if check:
                graph = tf.Graph()
                with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
                    tf.import_graph_def(frozen, name="")
                    worst = check_onnx_against_tensorflow(path, graph, sess, inputs, outputs,
                                                          input_shapes(graph, inputs))
    else:
        raise UsageError("--graph needs a TensorFlow source with a graph: a TF1 checkpoint with its .meta file, "
                         "or a SavedModel")
    report: WriteReport = {"verify": False, "facts": {"graph_inputs": inputs, "graph_outputs": outputs}}
    if worst is not None:
        report["facts"]["check_max_abs_diff"] = worst
        report["checked"] = f"checked against TensorFlow (max abs diff {worst:.2g})"
    return report


def _save_onnx(tf2onnx, graph_def, inputs: list[str], outputs: list[str], opset: int | None, path: Path,
               shapes: dict[str, list[int | None]] | None) -> None:
    import onnx

    try:
        model, _ = tf2onnx.convert.from_graph_def(graph_def, input_names=inputs, output_names=outputs, opset=opset,
                                                  # a copy: tf2onnx rewrites it in place (None -> -1)
                                                  shape_override={k: list(v) for k, v in (shapes or {}).items()} or None)
    except Exception as e:  # tf2onnx raises many kinds for unsupported ops
        raise WriteError(path, f"tf2onnx cannot convert this graph: {e}") from None
    model.producer_version = model.producer_version or ""
    if model.ByteSize() > 2_000_000_000:  # protobuf's limit: weights go to an external data file
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))
