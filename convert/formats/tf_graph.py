"""TensorFlow graphs with the IR's values: the part of conversion that truly needs TensorFlow.

Weights move without TensorFlow; a *graph* (what a SavedModel signature or an ONNX model
runs) can only be built, frozen and converted by TensorFlow and tf2onnx. This module is
used by the SavedModel writer (graph export with a ``serving_default`` signature) and by
the ONNX writer (``--graph``, through tf2onnx), so both take values from the TensorDict
being written: after ``--map``, ``--dtype`` or ``--weights-only``, not from the source files.

Sources:

* a TF1 checkpoint with its ``.meta`` graph (``local.tf.meta_graph_path`` in the metadata):
  inputs are ``--inputs`` or the graph's placeholders (``PlaceholderWithDefault`` ops such
  as a dropout ``keep_prob`` keep their default); outputs are ``--outputs`` or the
  graph's ``predict`` collection;
* a SavedModel (``local.tf.saved_model_dir``): its ``serving_default`` signature, with the
  variables rewritten from the TensorDict into a temporary copy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConvertError, MissingDependencyError, UsageError, VerificationError, WriteError
from ..ir import TensorDict
from ..lazy import np
from ..quiet import import_quietly
from .base import WriteReport


def tensorflow():
    """TensorFlow, imported quietly: its C++ and Python logs would bury our one-line messages."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        tf = import_quietly("tensorflow")  # its C++ prints at import time, whatever the level says
    except ImportError:
        raise MissingDependencyError("building a TensorFlow graph", "tensorflow", "tf") from None
    tf.get_logger().setLevel(logging.ERROR)
    tf.autograph.set_verbosity(0)
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    return tf


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
def session(td: TensorDict, meta: str, path: os.PathLike | str) -> Iterator[tuple[object, object]]:
    """A TF1 session holding ``meta``'s graph with the TensorDict's values in its variables.

    Trainable variables must all be in ``td`` (listed in one error if not); others that are
    missing (optimizer slots, ``global_step`` after ``--weights-only``) start from their
    initial values, as in a freshly built graph.
    """
    tf = tensorflow()
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default(), v1.Session(graph=graph) as sess:
        try:
            v1.train.import_meta_graph(meta, clear_devices=True)
        except Exception as e:  # TF raises many kinds here; all mean the same to the user
            raise ConvertError(f"{meta}: TensorFlow cannot import this graph: {e}") from None
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


def input_shapes(graph, inputs: list[str], meta: str | None = None) -> dict[str, list[int | None]]:
    """Each input's shape. Placeholders of old graphs may declare none; their shape then comes
    from the ``_output_shapes`` attribute TF recorded in the ``.meta`` file (the import drops
    it), else is unknown (tf2onnx would take them as scalars)."""
    recorded = {}
    if meta:
        tf = tensorflow()
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


@contextlib.contextmanager
def saved_model_with_values(td: TensorDict, sm_dir: str) -> Iterator[Path]:
    """A temporary copy of a SavedModel whose variables hold the TensorDict's values.

    Each tensor goes back under its checkpoint key (``attrs["tf.key"]``, else its name);
    keys the TensorDict lacks keep the SavedModel's own values.
    """
    from . import saved_model
    from .tf_checkpoint.bundle import write_bundle

    original = saved_model.read(Path(sm_dir), names="keys")
    by_key = {t.attrs.get("tf.key", t.name): t for t in td.values()}
    unknown = [t.name for k, t in by_key.items() if k not in original]
    if unknown:
        raise WriteError(sm_dir, f"tensors that are not variables of the SavedModel: {', '.join(unknown)}")
    for key, t in by_key.items():
        o = original[key]
        if (o.dtype, o.shape) != (t.dtype, t.shape):
            raise WriteError(sm_dir, f"{t.dtype} {list(t.shape)} does not fit the SavedModel's "
                                     f"{o.dtype} {list(o.shape)}", t.name)
    with tempfile.TemporaryDirectory(prefix="convert-sm-") as tmp:
        copy = Path(tmp) / "saved_model"
        shutil.copytree(sm_dir, copy, ignore=shutil.ignore_patterns("variables"))
        (copy / "variables").mkdir()
        write_bundle([by_key[k].renamed(k) if k in by_key else t for k, t in original.items()],
                     str(copy / "variables" / "variables"))
        yield copy


def check_onnx_against_tensorflow(model_path: Path, graph, sess, inputs: list[str], outputs: list[str],
                                  shapes: dict[str, list[int | None]], atol: float = 1e-5) -> float:
    """Run the ONNX model (onnxruntime) and the TF session on the same random inputs; the
    largest absolute difference, or :class:`VerificationError` when an output differs by more
    than ``atol`` times its largest magnitude (at least 1): float32 cannot do better on large
    values, so 1e-5 is absolute for outputs up to 1 and relative beyond."""
    try:
        ort = import_quietly("onnxruntime")
    except ImportError:
        raise MissingDependencyError("--check", "onnxruntime", "onnx") from None
    feed = random_feed(graph, inputs, shapes)
    expected = sess.run(outputs, feed)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings would bury our one-line messages
    so = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    got = so.run(outputs, feed)
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


def _tf2onnx():
    try:
        tf2onnx = import_quietly("tf2onnx")
    except ImportError:
        raise MissingDependencyError("converting a TensorFlow graph to ONNX", "tf2onnx", "tf") from None
    return tf2onnx


def write_onnx(td: TensorDict, path: Path, inputs: list[str], outputs: list[str], opset: int | None,
               check: bool) -> WriteReport:
    """Convert the source's TensorFlow graph, with the TensorDict's values, to an ONNX model at ``path``.

    The graph is frozen (variables become constants) and converted by tf2onnx. With
    ``check``, onnxruntime and TensorFlow run it on the same random inputs and must agree
    within 1e-5. Returns what the writer reports: the output's tensors are the frozen
    graph's constants, not the TensorDict by name, so name-by-name verification does not apply.
    """
    tf = tensorflow()
    tf2onnx = _tf2onnx()
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
                raise ConvertError(f"{sm_dir}: TensorFlow cannot load this SavedModel's signature: {e}") from None
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
        raise ConvertError(f"tf2onnx cannot convert this graph: {e}") from None
    model.producer_version = model.producer_version or ""
    if model.ByteSize() > 2_000_000_000:  # protobuf's limit: weights go to an external data file
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))
