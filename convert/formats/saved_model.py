"""TensorFlow SavedModel directories: their variables, read without TensorFlow; written with it.

Layout (https://www.tensorflow.org/guide/saved_model, tensorflow/core/protobuf/saved_model.proto):
``saved_model.pb`` (a ``SavedModel``: meta graphs with their tags, signatures and, for TF2,
a ``SavedObjectGraph``), ``variables/variables.index`` + ``variables.data-*`` (an ordinary
V2 checkpoint, see :mod:`convert.formats.tf_checkpoint`), ``assets/``, ``fingerprint.pb``.

Reading: the variables bundle, named as the SavedModel names its variables (TF2): each by the
``name`` its ``SavedObjectGraph`` node in ``saved_model.pb`` holds (``dense/kernel``,
``Adam/dense/kernel/m``; what ``tf.saved_model.load`` names the variable), its node matched to
the bundle's object graph node as TensorFlow's loader matches them (child by local name from
the root, slot variables by variable and slot name), else as :mod:`convert.formats.tf_checkpoint.objects` names
checkpoint variables (which also drops Keras 3 ``export``'s second copy of every variable);
or by their keys, which are the variable names (TF1 SavedModels).
``saved_model.pb`` contributes tags and signature names to the metadata only.

Writing needs TensorFlow (a SavedModel holds a graph, and only TensorFlow builds one):

* by default, a ``tf.Module`` holding one ``tf.Variable`` per tensor, named after it, saved
  with ``tf.saved_model.save``: ``tf.saved_model.load(dir).weights[name]`` gives it back;
* when the source is a TF1 checkpoint with its ``.meta`` graph and outputs are known
  (``--outputs``, or the graph's ``predict`` collection), that graph with the tensors' values
  and a ``serving_default`` signature over ``--inputs`` (default: the graph's placeholders),
  so that ``tf.saved_model.load(dir).signatures["serving_default"](x=...)`` runs the model.

TensorFlow holds every variable in memory while it saves; that is the framework's limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .. import dtypes, wire
from ..errors import UsageError, WriteError
from ..frameworks import tensorflow
from ..ir import TensorDict
from .base import Format, Writer
from .tf_checkpoint import graph as tf_graph
from .tf_checkpoint import objects
from .tf_checkpoint.bundle import write_bundle
from .tf_checkpoint.savedmodel import NAME, detect, read

# ---------------------------------------------------------------------------------------------- write

def write(td: TensorDict, path: Path, inputs: list[str] | None = None, outputs: list[str] | None = None) -> None:
    """Write a SavedModel directory at ``path`` (see module docstring)."""
    tf = tensorflow()
    meta = tf_graph.meta_graph_of(td)
    if meta and (outputs or _has_predict_collection(tf, meta)):
        _write_graph(tf, td, Path(path), meta, inputs or [], outputs or [])
    elif inputs or outputs:
        raise UsageError("--inputs/--outputs need a source with a TF1 graph (a checkpoint with its .meta file)")
    else:
        _write_variables(tf, td, Path(path))
    _fix_fingerprint_uuid(Path(path) / "fingerprint.pb")


def _write_variables(tf, td: TensorDict, path: Path) -> None:
    module = tf.Module()
    with tf.device("/cpu:0"):
        # A dict attribute: tracked by key, so the names survive in the object graph and
        # tf.saved_model.load(path).weights[name] returns the variable.
        module.weights = {name: tf.Variable(t.numpy(), name=name, trainable=t.attrs.get("role") == "weight")
                          for name, t in td.items()}
    tf.saved_model.save(module, str(path))


def _has_predict_collection(tf, meta: str) -> bool:
    graph_def = tf.compat.v1.MetaGraphDef()
    with open(meta, "rb") as f:
        graph_def.ParseFromString(f.read())
    return "predict" in graph_def.collection_def


def _write_graph(tf, td: TensorDict, path: Path, meta: str, inputs: list[str], outputs: list[str]) -> None:
    v1 = tf.compat.v1
    with tf_graph.session(td, meta, path) as (graph, sess):
        inputs, outputs = tf_graph.graph_io(graph, inputs, outputs)
        signature = v1.saved_model.predict_signature_def(
            {tf_graph.signature_key(n): graph.get_tensor_by_name(n) for n in inputs},
            {tf_graph.signature_key(n): graph.get_tensor_by_name(n) for n in outputs})
        builder = v1.saved_model.Builder(str(path))
        builder.add_meta_graph_and_variables(sess, [v1.saved_model.tag_constants.SERVING],
                                             signature_def_map={"serving_default": signature},
                                             strip_default_attrs=True)
        builder.save()


def _fix_fingerprint_uuid(fingerprint: Path) -> None:
    """Make ``fingerprint.pb``'s ``uuid`` (FingerprintDef field 7, random in TF 2.21) a function
    of the other fields (hashes of the graph, signatures, objects and variables), so that the
    same conversion gives the same bytes. TensorFlow records it and checks nothing against it."""
    if not fingerprint.is_file():
        return
    data = fingerprint.read_bytes()
    kept = b"".join(wire.tag(n, w) + (wire.encode_varint(len(v)) + bytes(v) if w == wire.BYTES else wire.encode_varint(v))
                    for n, w, v in wire.iter_fields(data) if n != 7)
    uuid = str(int(hashlib.sha256(kept).hexdigest()[:32], 16))
    fingerprint.write_bytes(kept + wire.field_bytes(7, uuid.encode()))


@contextlib.contextmanager
def saved_model_with_values(td: TensorDict, sm_dir: str) -> Iterator[Path]:
    """A temporary copy of a SavedModel whose variables hold the TensorDict's values.

    Each tensor goes back under its checkpoint key (``attrs["tf.key"]``, else its name);
    keys the TensorDict lacks keep the SavedModel's own values.
    """
    original = read(Path(sm_dir), names="keys")
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


FORMAT = Format(
    name=NAME,
    description="TensorFlow SavedModel directory (its variables)",
    detect=detect,
    read=read,
    writers=(Writer("", write, dtypes.held_by("tf")),),
    options=(
        objects.NAMES_OPTION,
        tf_graph.INPUTS_OPTION,
        tf_graph.OUTPUTS_OPTION,
    ),
    name_endings=(r"\.pb",),
    checksums="CRC-32C of every variable and of every block of the variables index",
)
