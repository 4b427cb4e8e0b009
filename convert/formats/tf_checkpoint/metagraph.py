"""Carrying a ``.meta`` graph (``MetaGraphDef``) over to a converted checkpoint, only when it fits.

``saver = tf.compat.v1.train.import_meta_graph(meta); saver.restore(sess, latest)`` works on a
converted checkpoint only if (a) every variable of the graph is in it, with the graph's dtype
and shape, and (b) the graph's saver can read the checkpoint's version: a ``LEGACY``/``V1``
``SaverDef`` restores with ``RestoreSlice``, which reads V1 files only (``RestoreV2`` reads both).

(a) is checked without TensorFlow, from the fields of tensorflow/core/protobuf/meta_graph.proto,
graph.proto, node_def.proto and attr_value.proto decoded with :mod:`.protowire`::

    MetaGraphDef { GraphDef graph_def = 2; SaverDef saver_def = 3; }
    SaverDef     { CheckpointFormatVersion version = 7; }       // LEGACY 0, V1 1, V2 2
    GraphDef     { repeated NodeDef node = 1; }
    NodeDef      { string name = 1; string op = 2; map<string, AttrValue> attr = 5; }
    AttrValue    { DataType type = 6; TensorShapeProto shape = 7; }

(b), when the versions differ, needs TensorFlow: the graph is imported and exported again
with a new saver of the right version. A graph that does not fit is left out, with a note
saying why, rather than copied as a trap.
"""

from __future__ import annotations

import re

from ...dtypes import from_tf
from ...errors import MissingDependencyError, UnsupportedDTypeError, pip_install
from ...ir import TensorDict
from . import protowire as pw

_VARIABLE_OPS = {"Variable", "VariableV2", "VarHandleOp"}
_PART = re.compile(r"/part_\d+$")  # a partitioned variable's pieces; the checkpoint holds the whole


def _fields(buf) -> dict[int, list]:
    """{field number: [values]}: memoryviews for length-delimited fields, ints for the others."""
    out: dict[int, list] = {}
    for num, _, val in pw.iter_fields(buf):
        out.setdefault(num, []).append(val)
    return out


def _last_message(fields: dict[int, list], num: int):
    """The last length-delimited value of field ``num`` (b"" when there is none): what protobuf
    keeps of a non-repeated message or string field. A value of another wire type is skipped."""
    for val in reversed(fields.get(num, [])):
        if not isinstance(val, int):
            return val
    return b""


def _messages(fields: dict[int, list], num: int) -> list:
    return [v for v in fields.get(num, []) if not isinstance(v, int)]


def _last_int(fields: dict[int, list], num: int, default: int | None = 0) -> int | None:
    for val in reversed(fields.get(num, [])):
        if isinstance(val, int):
            return val
    return default


def _text(fields: dict[int, list], num: int) -> str:
    return bytes(_last_message(fields, num)).decode("utf-8", "replace")


def _shape(buf) -> tuple[int | None, ...] | None:
    """A TensorShapeProto; None for unknown rank, None dims for unknown sizes."""
    f = _fields(buf)
    if _last_int(f, 3):
        return None
    dims = []
    for dim in _messages(f, 2):
        size = pw.signed64(_last_int(_fields(dim), 1))
        dims.append(None if size < 0 else size)
    return tuple(dims)


def read_meta(data: bytes) -> tuple[int, dict[str, tuple[int | None, tuple | None]]]:
    """The saver's version and the graph's variables: name -> (TF dtype number, shape).

    Raises :class:`~.protowire.ProtoError` when ``data`` is not a protobuf message.
    """
    meta = _fields(data)
    version = _last_int(_fields(_last_message(meta, 3)), 7)
    variables = {}
    for graph in _messages(meta, 2):
        for node_buf in _messages(_fields(graph), 1):
            node = _fields(node_buf)
            if _text(node, 2) not in _VARIABLE_OPS:
                continue
            attrs = {}
            for entry in _messages(node, 5):
                e = _fields(entry)
                attrs[_text(e, 1)] = _fields(_last_message(e, 2))
            dtype = _last_int(attrs.get("dtype", {}), 6, None)
            shape_field = _messages(attrs.get("shape", {}), 7)
            shape = _shape(shape_field[-1]) if shape_field else None
            variables[_text(node, 1)] = (dtype, shape)
    return version, variables


def misfits(td: TensorDict, variables: dict[str, tuple[int | None, tuple | None]]) -> list[str]:
    """What in the graph's variables the TensorDict does not hold as the graph expects."""
    out = []
    for name, (dtype, shape) in variables.items():
        base = _PART.sub("", name)
        if base not in td:
            out.append(f"{name} (missing)")
            continue
        t = td[base]
        try:
            graph_dtype = None if dtype is None else from_tf(dtype)
        except UnsupportedDTypeError:
            graph_dtype = None  # a dtype of no checkpoint (resource...): nothing to compare
        if graph_dtype is not None and graph_dtype != t.dtype:
            out.append(f"{name} ({t.dtype}, the graph has {graph_dtype})")
        elif base == name and shape is not None and (len(shape) != len(t.shape) or any(
                d is not None and d != s for d, s in zip(shape, t.shape, strict=True))):
            out.append(f"{name} ({list(t.shape)}, the graph has {[d if d is not None else '?' for d in shape]})")
    return out


def meta_for(td: TensorDict, version: int) -> tuple[bytes | None, str | None]:
    """The ``.meta`` bytes to write beside a version-``version`` checkpoint of ``td`` (or None),
    and a note when the source's graph is left out or rewritten."""
    path = td.metadata.get("local.tf.meta_graph_path")
    if not path:
        return None, None
    try:
        with open(path, "rb") as f:
            data = f.read()
        saver_version, variables = read_meta(data)
    except (OSError, pw.ProtoError, KeyError, IndexError, ValueError) as e:
        return None, f"left out the .meta graph: {path} cannot be read ({e})"
    bad = misfits(td, variables)
    if bad:
        return None, (f"left out the .meta graph: its variables do not match the checkpoint's tensors: "
                      f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}")
    if version == 2 and saver_version in (0, 1):
        try:
            return _with_saver(path, version), "rewrote the .meta graph's saver for V2 (it read V1 files only)"
        except MissingDependencyError:
            return None, ("left out the .meta graph: its saver reads V1 checkpoints only; "
                          f"{pip_install('tf')} to have it rewritten for V2, or write tf-ckpt-v1")
        except Exception as e:  # TensorFlow cannot import the graph: say so, keep the checkpoint
            return None, f"left out the .meta graph: its V1 saver could not be rewritten ({' '.join(str(e).split())})"
    return data, None


def _with_saver(meta: str, version: int) -> bytes:
    """The graph of ``meta`` exported again with a new saver writing/reading ``version``."""
    from ...frameworks import tensorflow

    v1 = tensorflow().compat.v1
    graph = v1.Graph()
    with graph.as_default():
        v1.train.import_meta_graph(meta)
        saver = v1.train.Saver(write_version=v1.train.SaverDef.V2 if version == 2 else v1.train.SaverDef.V1)
        return v1.train.export_meta_graph(saver_def=saver.as_saver_def(), graph=graph).SerializeToString()
