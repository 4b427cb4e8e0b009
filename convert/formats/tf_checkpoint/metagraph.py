"""Carrying a ``.meta`` graph (``MetaGraphDef``) over to a converted checkpoint, decided from the graph.

``saver = tf.compat.v1.train.import_meta_graph(meta); saver.restore(sess, latest)`` works on a
converted checkpoint only if (a) every variable of the graph is in it, with the graph's dtype
and shape, and (b) the ops the saver restores with read the checkpoint's version. (b) is a
property of the graph, not of ``SaverDef.version``, which only says how the graph *saves*:

* every ``Saver`` since TF 1.0, ``write_version=V1`` included, restores with ``RestoreV2``,
  which reads V1 and V2 files alike;
* LEGACY savers from before 1.0 restore with ``RestoreSlice`` (one op per variable, scalar
  ``tensor_name``/``shape_and_slice`` inputs), which reads V1 files only.

So the op types reachable from ``saver_def.restore_op_name`` (through data and ``^control``
inputs) decide. Writing V2:

* a RestoreV2 graph is carried over; if it saves V1 (``SaveSlices`` on the saver's filename, the
  unsharded V1 saver), that one node becomes ``SaveV2`` (same inputs; attr ``T`` is ``dtypes``)
  and ``SaverDef.version`` becomes V2, so that a later ``saver.save`` writes V2 and
  ``max_to_keep`` deletes V2 files: the graph ``Saver(write_version=V2)`` builds. A sharded V1
  save side (``ShardedFilename`` + ``SaveSlices`` per device) has no one-node V2 counterpart
  (V2 shards are merged by ``MergeV2Checkpoints``): it is kept, ``version`` with it, and a
  note says that the graph restores V2 and still saves V1.
* a RestoreSlice graph is rewritten exactly when each ``RestoreSlice`` reads a ``Const`` name
  and slice used by nothing else: the node becomes ``RestoreV2`` (``dt`` -> ``dtypes: [dt]``,
  ``preferred_shard`` dropped: V2 has no shards to prefer) and its two constants become
  1-element vectors; its save side is treated as above. Otherwise the graph is left out with a
  note saying which node prevents it.

Writing V1, every graph is carried over as it is (both restore ops read V1). Everything not
named above is copied byte for byte, ``meta_info_def.stripped_op_list`` included (it still
lists the old ops; ``import_meta_graph`` uses it only to drop default-valued attrs of the
nodes whose op it lists). TensorFlow is never needed: with or without it the bytes are the same.

Fields used (tensorflow/core/protobuf/meta_graph.proto, saver.proto; core/framework/graph.proto,
node_def.proto, attr_value.proto, tensor.proto, tensor_shape.proto), decoded and re-encoded with
:mod:`convert.wire` and :mod:`.protowire` (TensorFlow's generated classes ship only inside ``tensorflow``)::

    MetaGraphDef { GraphDef graph_def = 2; SaverDef saver_def = 3; }
    SaverDef     { string filename_tensor_name = 1; string save_tensor_name = 2;
                   string restore_op_name = 3; CheckpointFormatVersion version = 7; } // LEGACY 0, V1 1, V2 2
    GraphDef     { repeated NodeDef node = 1; }
    NodeDef      { string name = 1; string op = 2; repeated string input = 3; map<string, AttrValue> attr = 5; }
    AttrValue    { ListValue list = 1 { repeated DataType type = 6; repeated TensorShapeProto shape = 7; };
                   DataType type = 6; TensorShapeProto shape = 7; TensorProto tensor = 8; }
    TensorProto  { DataType dtype = 1; TensorShapeProto tensor_shape = 2; repeated bytes string_val = 8; }

A SavedModel's ``saved_model.pb`` (``SavedModel { repeated MetaGraphDef meta_graphs = 2; }``)
supplies its first meta graph with a saver, when a template is a SavedModel.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import overload

from ... import wire
from ...dtypes import from_tf
from ...errors import UnsupportedDTypeError
from ...ir import TensorDict
from . import protowire as pw
from .roles import role_of

_VARIABLE_OPS = {"Variable", "VariableV2", "VarHandleOp"}
_PART = re.compile(r"/part_\d+$")  # a partitioned variable's pieces; the checkpoint holds the whole
RESTORE_READS_V1_AND_V2 = ("RestoreV2",)
RESTORE_READS_V1_ONLY = ("RestoreSlice", "Restore")
_SAVE_OPS = ("SaveV2", "SaveSlices", "Save")
_DT_STRING = 7
_OPTIONAL_ROLES = ("optimizer", "step")


def _fields(buf: wire.Bytes) -> dict[int, list]:
    """{field number: [values]}: memoryviews for length-delimited fields, ints for the others."""
    out: dict[int, list] = {}
    for num, _, val in pw.iter_fields(buf):
        out.setdefault(num, []).append(val)
    return out


def _last_message(fields: dict[int, list], num: int) -> wire.Bytes:
    """The last length-delimited value of field ``num`` (b"" when there is none): what protobuf
    keeps of a non-repeated message or string field. A value of another wire type is skipped."""
    for val in reversed(fields.get(num, [])):
        if not isinstance(val, int):
            return val
    return b""


def _messages(fields: dict[int, list], num: int) -> list:
    return [v for v in fields.get(num, []) if not isinstance(v, int)]


@overload
def _last_int(fields: dict[int, list], num: int, default: int = 0) -> int: ...
@overload
def _last_int(fields: dict[int, list], num: int, default: None) -> int | None: ...
def _last_int(fields: dict[int, list], num: int, default: int | None = 0) -> int | None:
    for val in reversed(fields.get(num, [])):
        if isinstance(val, int):
            return val
    return default


def _text(fields: dict[int, list], num: int) -> str:
    return bytes(_last_message(fields, num)).decode("utf-8", "replace")


def _shape(buf: wire.Bytes) -> tuple[int | None, ...] | None:
    """A TensorShapeProto; None for unknown rank, None dims for unknown sizes."""
    f = _fields(buf)
    if _last_int(f, 3):
        return None
    dims = []
    for dim in _messages(f, 2):
        size = pw.signed64(_last_int(_fields(dim), 1))
        dims.append(None if size < 0 else size)
    return tuple(dims)


# ------------------------------------------------------------------ the graph, parsed

@dataclass
class Node:
    """A NodeDef: its name, op, inputs (``name``, ``name:1``, ``^name``) and attrs (fields of each AttrValue)."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, dict[int, list]]
    raw: memoryview  # the NodeDef's bytes


@dataclass
class MetaGraph:
    """What a ``.meta`` holds that decides whether it can restore a checkpoint."""

    data: bytes
    saver: dict[int, list] | None  # SaverDef fields, None when the graph has no saver
    nodes: dict[str, Node] = field(default_factory=dict)
    single_graph: bool = True  # one graph_def and one saver_def field, as every serializer writes

    @property
    def version(self) -> int:
        return _last_int(self.saver or {}, 7)

    def saver_name(self, num: int) -> str:
        return _text(self.saver or {}, num)

    def reachable(self, root: str) -> list[Node]:
        """The nodes ``root`` depends on, itself included, through data and control inputs."""
        out, seen, stack = [], set(), [_node_name(root)]
        while stack:
            name = stack.pop()
            if name in seen or name not in self.nodes:
                continue
            seen.add(name)
            node = self.nodes[name]
            out.append(node)
            stack.extend(_node_name(i) for i in reversed(node.inputs))
        return out

    def variables(self, restored: bool = False) -> dict[str, tuple[int | None, tuple | None]]:
        """The graph's variables: name -> (TF dtype number, shape). With ``restored``, only those
        its saver restores (a saver's ``var_list`` may leave some out), when it has a saver."""
        nodes: Iterable[Node] = self.nodes.values()
        if restored and self.saver is not None and self.saver_name(3) in self.nodes:
            nodes = self.reachable(self.saver_name(3))
        out = {}
        for node in nodes:
            if node.op not in _VARIABLE_OPS:
                continue
            dtype = _last_int(node.attrs.get("dtype", {}), 6, None)
            shape_field = _messages(node.attrs.get("shape", {}), 7)
            out[node.name] = (dtype, _shape(shape_field[-1]) if shape_field else None)
        return out


def _node_name(ref: str) -> str:
    """``^a/b`` or ``a/b:1`` -> ``a/b``."""
    return ref.lstrip("^").split(":")[0]


def parse(data: bytes) -> MetaGraph:
    """Parse a MetaGraphDef's saver and nodes. Raises :class:`~.protowire.ProtoError` when
    ``data`` is not a protobuf message."""
    meta = _fields(data)
    savers = _messages(meta, 3)
    graphs = _messages(meta, 2)
    mg = MetaGraph(bytes(data), _fields(savers[-1]) if savers else None,
                   single_graph=len(graphs) <= 1 and len(savers) <= 1)
    for graph in graphs:
        for node_buf in _messages(_fields(graph), 1):
            node = _fields(node_buf)
            attrs = {}
            for entry in _messages(node, 5):
                e = _fields(entry)
                attrs[_text(e, 1)] = _fields(_last_message(e, 2))
            name = _text(node, 1)
            mg.nodes[name] = Node(name, _text(node, 2), [bytes(i).decode("utf-8", "replace") for i in _messages(node, 3)],
                                  attrs, node_buf)
    return mg


def read_meta(data: bytes) -> tuple[int, dict[str, tuple[int | None, tuple | None]]]:
    """The saver's version and the graph's variables: name -> (TF dtype number, shape).

    Raises :class:`~.protowire.ProtoError` when ``data`` is not a protobuf message.
    """
    mg = parse(data)
    return mg.version, mg.variables()


def misfits(td: TensorDict, variables: dict[str, tuple[int | None, tuple | None]]) -> list[str]:
    """What in the graph's variables the TensorDict does not hold as the graph expects."""
    return [f"{name} ({why})" for name, why in _misfits(td, variables)]


def _misfits(td: TensorDict, variables: dict[str, tuple[int | None, tuple | None]]) -> list[tuple[str, str]]:
    out = []
    for name, (dtype, shape) in variables.items():
        base = _PART.sub("", name)
        if base not in td:
            out.append((name, "missing"))
            continue
        t = td[base]
        try:
            graph_dtype = None if dtype is None else from_tf(dtype)
        except UnsupportedDTypeError:
            graph_dtype = None  # a dtype of no checkpoint (resource...): nothing to compare
        if graph_dtype is not None and graph_dtype != t.dtype:
            out.append((name, f"{t.dtype}, the graph has {graph_dtype}"))
        elif base == name and shape is not None and (len(shape) != len(t.shape) or any(
                d is not None and d != s for d, s in zip(shape, t.shape, strict=True))):
            out.append((name, f"{list(t.shape)}, the graph has {[d if d is not None else '?' for d in shape]}"))
    return out


# ------------------------------------------------------------------ deciding, rewriting

def restore_ops(mg: MetaGraph) -> list[Node]:
    """The restore ops (``RestoreV2``, ``RestoreSlice``, ``Restore``) the saver's restore op runs."""
    known = RESTORE_READS_V1_AND_V2 + RESTORE_READS_V1_ONLY
    return [n for n in mg.reachable(mg.saver_name(3)) if n.op in known]


def save_ops(mg: MetaGraph) -> list[Node]:
    """The save ops (``SaveV2``, ``SaveSlices``, ``Save``) the saver's save tensor runs."""
    return [n for n in mg.reachable(mg.saver_name(2)) if n.op in _SAVE_OPS]


class _NotExact(Exception):
    """Private: why a graph cannot be rewritten exactly (the text goes into the note)."""


def for_version(data: bytes, version: int) -> tuple[bytes, str | None]:
    """The ``.meta`` bytes that restore a version-``version`` checkpoint, and a note when they
    differ from ``data`` or keep a V1 save side (see the module docstring).

    Raises:
        _NotExact: the graph cannot restore V2 and cannot be rewritten exactly (or its saver's
            restore op reaches no restore op this module knows).
        ProtoError: ``data`` is not a protobuf message.
    """
    mg = parse(data)
    if mg.saver is None or version != 2:
        return data, None  # no saver: import_meta_graph makes a V2 one; V1: every restore op reads it
    ops = restore_ops(mg)
    if not ops:
        if mg.version == 2:
            return data, None
        raise _NotExact(f"its saver's restore op '{mg.saver_name(3)}' runs no RestoreV2 or RestoreSlice op, "
                        "so whether it reads V2 files cannot be told")
    legacy = [n for n in ops if n.op in RESTORE_READS_V1_ONLY]
    if not legacy and mg.version == 2:
        return data, None
    if not mg.single_graph:
        raise _NotExact("it holds more than one graph_def or saver_def field, which is not edited")
    replaced = _restore_v2_edits(mg, legacy) if legacy else {}
    done = [f"its {len(legacy)} RestoreSlice ops (a pre-1.0 saver: V1 files only) as RestoreV2"] if legacy else []
    v1_saves = [n for n in save_ops(mg) if n.op != "SaveV2"]
    filename = _node_name(mg.saver_name(1))
    new_version = 2
    if v1_saves and all(n.op == "SaveSlices" and n.inputs and _node_name(n.inputs[0]) == filename
                        for n in v1_saves):
        for n in v1_saves:
            replaced[n.name] = _edit_node(n, op="SaveV2", rename_attrs={"T": "dtypes"})
        done.append("its SaveSlices save op as SaveV2 and its saver's version as V2 (so saver.save writes V2, "
                    "as in a V2 Saver's graph)")
    elif v1_saves:  # a sharded V1 save side: kept whole, with the version that says how it saves
        new_version = mg.version
        done.append(f"kept its sharded V1 save side ({', '.join(sorted({n.op for n in v1_saves}))} per shard "
                    "has no one-op V2 counterpart): saver.save in it still writes V1")
    else:
        done.append("set its saver's version to V2 (it saves with SaveV2)")
    how = "rewrote the pre-1.0 .meta graph for V2 checkpoints" if legacy else \
        "carried the .meta graph over (its saver restores with RestoreV2, which reads V2)"
    return _rebuild(mg, replaced, new_version), f"{how}: {'; '.join(done)}"


def _restore_v2_edits(mg: MetaGraph, legacy: list[Node]) -> dict[str, bytes]:
    """New NodeDef bytes turning each RestoreSlice into RestoreV2 (see the module docstring)."""
    consumers: dict[str, set[str]] = {}
    for node in mg.nodes.values():
        for ref in node.inputs:
            if not ref.startswith("^"):
                consumers.setdefault(_node_name(ref), set()).add(node.name)
    restoring = {n.name for n in legacy}
    out: dict[str, bytes] = {}
    for node in legacy:
        if node.op != "RestoreSlice":
            raise _NotExact(f"node '{node.name}' is a {node.op} op (TF before 0.10), which has no "
                            "shape_and_slice input to become RestoreV2's")
        data_inputs = [i for i in node.inputs if not i.startswith("^")]
        dt = _last_int(node.attrs.get("dt", {}), 6, None)
        if len(data_inputs) != 3 or dt is None:
            raise _NotExact(f"RestoreSlice node '{node.name}' does not have the 3 inputs and the dt attr of that op")
        for ref in data_inputs[1:]:
            const = mg.nodes.get(_node_name(ref))
            if const is None or const.op != "Const" or ref.split(":")[1:] not in ([], ["0"]):
                raise _NotExact(f"input '{ref}' of RestoreSlice node '{node.name}' is not a Const node")
            others = consumers.get(const.name, set()) - restoring
            if others:
                raise _NotExact(f"Const node '{const.name}' feeds {', '.join(sorted(others))} besides "
                                "RestoreSlice, so it cannot become a vector")
            if const.name not in out:
                out[const.name] = _vector_const(const)
        out[node.name] = _edit_node(node, op="RestoreV2", drop_attrs=("dt", "preferred_shard"),
                                    add_attrs={"dtypes": pw.field_bytes(1, pw.field_bytes(6, wire.encode_varint(dt)))})
    return out


def _vector_const(const: Node) -> bytes:
    """A scalar string Const as a 1-element vector (RestoreV2's names and slices are vectors)."""
    tensor = _messages(const.attrs.get("value", {}), 8)
    if len(tensor) != 1:
        raise _NotExact(f"Const node '{const.name}' holds no tensor value")
    tp = _fields(tensor[0])
    shapes = _messages(tp, 2)
    if _last_int(tp, 1) != _DT_STRING or len(_messages(tp, 8)) != 1 or (shapes and _shape(shapes[-1]) != ()):
        raise _NotExact(f"Const node '{const.name}' is not one scalar string")
    vector = pw.field_bytes(2, pw.encode_shape((1,)))
    new_tensor, placed = b"", False
    for num, _, _, raw in wire.iter_raw_fields(tensor[0]):
        if num == 2:
            if not placed:
                new_tensor += vector
                placed = True
            continue
        if num > 2 and not placed:
            new_tensor += vector
            placed = True
        new_tensor += bytes(raw)
    if not placed:
        new_tensor += vector
    edits = {"value": pw.field_bytes(8, new_tensor)}
    if "_output_shapes" in const.attrs:
        edits["_output_shapes"] = pw.field_bytes(1, pw.field_bytes(7, pw.encode_shape((1,))))
    return _edit_node(const, replace_attrs=edits)


def _edit_node(node: Node, op: str | None = None, drop_attrs: tuple[str, ...] = (),
               rename_attrs: dict[str, str] | None = None, add_attrs: dict[str, bytes] | None = None,
               replace_attrs: dict[str, bytes] | None = None) -> bytes:
    """The NodeDef with another op and edited attrs (AttrValue bytes); other fields copied as
    they are. Map entries are written in key order, as TensorFlow's deterministic serializer does."""
    rename_attrs, add_attrs, replace_attrs = rename_attrs or {}, add_attrs or {}, replace_attrs or {}
    head, entries, tail = b"", [], b""
    for num, _, val, raw in wire.iter_raw_fields(node.raw):
        if num == 2 and op is not None:
            head += pw.field_bytes(2, op.encode())
        elif num == 5:
            e = _fields(val)
            key = _text(e, 1)
            if key in drop_attrs:
                continue
            value = replace_attrs.get(key, bytes(_last_message(e, 2)))
            entries.append((rename_attrs.get(key, key), value))
        elif entries or num > 5:
            tail += bytes(raw)
        else:
            head += bytes(raw)
    entries += list(add_attrs.items())
    body = b"".join(pw.field_bytes(5, pw.field_bytes(1, k.encode()) + pw.field_bytes(2, v))
                    for k, v in sorted(entries))
    return head + body + tail


def _rebuild(mg: MetaGraph, nodes: dict[str, bytes], version: int) -> bytes:
    """The MetaGraphDef with some NodeDefs replaced and the saver's version set; every other field
    keeps its bytes."""
    out = b""
    for num, _, val, raw in wire.iter_raw_fields(mg.data):
        if num == 2 and nodes:
            graph = b""
            for gnum, _, gval, graw in wire.iter_raw_fields(val):
                name = _text(_fields(gval), 1) if gnum == 1 else None
                graph += pw.field_bytes(1, nodes[name]) if name in nodes else bytes(graw)
            out += pw.field_bytes(2, graph)
        elif num == 3 and version != mg.version:
            saver = b"".join(bytes(r) for n, _, _, r in wire.iter_raw_fields(val) if n != 7)
            out += pw.field_bytes(3, saver + pw.field_varint(7, version))
        else:
            out += bytes(raw)
    return out


# ------------------------------------------------------------------ what the writer calls

def meta_bytes(td: TensorDict) -> tuple[bytes | None, str | None]:
    """The source's (or template's) graph: the ``.meta`` file ``local.tf.meta_graph_path`` names, or
    the first meta graph with a saver in the SavedModel ``local.tf.meta_graph_saved_model`` names;
    and where it came from. (None, None) when there is none."""
    path = td.metadata.get("local.tf.meta_graph_path")
    if path:
        with open(path, "rb") as f:
            return f.read(), path
    sm = td.metadata.get("local.tf.meta_graph_saved_model")
    if sm:
        pb = os.path.join(sm, "saved_model.pb")
        with open(pb, "rb") as f:
            data = f.read()
        for num, wt, val in pw.iter_fields(data):
            if num == 2 and wt == pw.BYTES and _messages(_fields(val), 3):
                return bytes(val), pb
    return None, None


def meta_for(td: TensorDict, version: int, partial: bool = False) -> tuple[bytes | None, str | None]:
    """The ``.meta`` bytes to write beside a version-``version`` checkpoint of ``td`` (or None),
    and a note when the source's graph is left out, rewritten or restores more than ``td`` holds.

    With ``partial`` (a ``--template`` graph), variables of the optimizer or step roles that ``td``
    lacks do not leave the graph out: they are named in the note (its saver restores the weights
    with ``Saver(var_list=...)``, or all of them after ``--template-fill``).
    """
    try:
        data, where = meta_bytes(td)
        if data is None:
            return None, None
        variables = parse(data).variables(restored=True)
    except (OSError, pw.ProtoError, KeyError, IndexError, ValueError) as e:
        where = td.metadata.get("local.tf.meta_graph_path") or td.metadata.get("local.tf.meta_graph_saved_model")
        return None, f"left out the .meta graph: {where} cannot be read ({e})"
    misfits = _misfits(td, variables)
    lacking = [name for name, why in misfits if partial and why == "missing" and role_of(name) in _OPTIONAL_ROLES]
    bad = [f"{name} ({why})" for name, why in misfits if name not in lacking]
    if bad:
        return None, (f"left out the .meta graph: its variables do not match the checkpoint's tensors: "
                      f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}")
    notes = []
    if lacking:
        notes.append(f"the .meta graph's saver also restores {len(lacking)} optimizer/step variables this "
                     f"checkpoint lacks ({', '.join(lacking[:4])}{' ...' if len(lacking) > 4 else ''}): restore the "
                     "weights with tf.compat.v1.train.Saver(var_list=...), or write them from the template "
                     "with --template-fill")
    try:
        out, note = for_version(data, version)
    except _NotExact as e:
        return None, (f"left out the .meta graph ({where}): its saver cannot read V2 checkpoints and cannot be "
                      f"rewritten exactly: {e}; write tf-ckpt-v1 to keep the graph")
    except (pw.ProtoError, UnicodeDecodeError, ValueError) as e:
        return None, f"left out the .meta graph: {where} cannot be read ({e})"
    if note:
        notes.insert(0, note)
    return out, "; ".join(notes) or None
