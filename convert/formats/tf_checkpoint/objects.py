"""TF2 object-based checkpoint names (``tf.train.Checkpoint``, Keras, SavedModel variables).

Such a checkpoint's keys are paths through the object graph
(``model/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE``); the names people
know (``seq/conv/kernel``) live only in the scalar string tensor
``_CHECKPOINTABLE_OBJECT_GRAPH``, a ``TrackableObjectGraph``
(tensorflow/core/protobuf/trackable_object_graph.proto)::

    TrackableObjectGraph { repeated TrackableObject nodes = 1; }
    TrackableObject {
      repeated ObjectReference children = 1;        // { int32 node_id = 1; string local_name = 2; }
      repeated SerializedTensor attributes = 2;     // { string name = 1; string full_name = 2; string checkpoint_key = 3; }
      repeated SlotVariableReference slot_variables = 3;
                 // { int32 original_variable_node_id = 1; string slot_name = 2; int32 slot_variable_node_id = 3; }
    }

Decoded by hand with :mod:`.protowire` for the same reason as the other messages: TF's
classes ship only inside ``tensorflow``.

Naming: a variable's name in a SavedModel's ``SavedObjectGraph`` (when reading a SavedModel),
else its ``full_name``; for a slot variable without either,
``<its variable's name>/<slot name>``; otherwise the key with ``/.ATTRIBUTES/...`` cut
and the key escaping (``.S`` for ``/``, ``..`` for ``.``) undone. Keras 3 ``model.export``
saves each variable twice under the same full name: when every name has exactly two copies
(same dtype, shape and stored crc32c), the copy whose key comes first is kept and the dropped
keys are reported. Otherwise variables that share a name (TF's default ``Variable``, two
metrics' ``count``) are distinct, and each is named by its object path.
An object's other attributes are named by its path (the root's, whose path is empty, by its key).
``OBJECT_CONFIG_JSON`` attributes (TF 1.x wrote one for every object with a ``get_config``, so
tf.keras ``save_weights`` checkpoints of TF 1.x hold one per layer, optimizer and model) are the objects'
configurations, not weights: they go to the metadata as ``tf.object_config.<object path>``
(``tf.object_config`` for the root), the JSON text as TF stored it.
Roles: variables reached from the root without passing through an ``optimizer`` edge are
weights; the others, and slot variables, are optimizer state; ``save_counter`` and
iteration counters are steps.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

from ... import wire
from ...errors import CorruptFileError
from ...ir import Tensor
from ...lazy import np
from ...wire import ProtoError
from ..base import Option

NAMES_OPTION = Option("--names", "read", str, "TF2 object-based checkpoints: name tensors by the variables' names "
                      "(readable, the default) or by the raw checkpoint keys (keys)", choices=("readable", "keys"))

GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_ATTR_SUFFIX = re.compile(r"/\.ATTRIBUTES/[^/]+$")
CONFIG_ATTRIBUTE = "OBJECT_CONFIG_JSON"
CONFIG_METADATA = "tf.object_config"
_STEP_LOCAL_NAMES = {"save_counter", "iterations", "_iterations", "iter", "step", "global_step"}


@dataclass
class _Node:
    children: list[tuple[int, str]] = field(default_factory=list)
    attributes: list[tuple[str, str, str]] = field(default_factory=list)  # (name, full_name, checkpoint_key)
    slots: list[tuple[int, str, int]] = field(default_factory=list)  # (original node, slot name, slot node)


def _text(buf: wire.Bytes) -> str:
    return bytes(buf).decode("utf-8", "replace")


def _sub_fields(buf: wire.Bytes) -> tuple[dict[int, int], dict[int, str]]:
    """The varint and the string fields of a small message (the last of each number wins, as in
    protobuf); a field of the wrong wire type is ignored, as protobuf does with unknown fields."""
    ints: dict[int, int] = {}
    texts: dict[int, str] = {}
    for k, w, x in wire.iter_fields(buf):
        if w == wire.VARINT:
            ints[k] = wire.signed64(x)
        elif w == wire.BYTES:
            texts[k] = _text(x)
    return ints, texts


def parse_object_graph(data: bytes) -> list[_Node]:
    """Decode a serialized ``TrackableObjectGraph``, or the structure of a SavedModel's
    ``SavedObjectGraph`` (its ``SavedObject`` s number children and slot variables alike)."""
    nodes = []
    for num, wt, val in wire.iter_fields(data):
        if num != 1 or wt != wire.BYTES:
            continue
        node = _Node()
        for n, w, v in wire.iter_fields(val):
            if w != wire.BYTES or n not in (1, 2, 3):  # a SavedObject's other fields are not ours
                continue
            ints, texts = _sub_fields(v)
            if n == 1:
                node.children.append((ints.get(1, 0), texts.get(2, "")))
            elif n == 2:
                node.attributes.append((texts.get(1, ""), texts.get(2, ""), texts.get(3, "")))
            elif n == 3:
                node.slots.append((ints.get(1, 0), texts.get(2, ""), ints.get(3, 0)))
        nodes.append(node)
    return nodes


def unescape_key(key: str) -> str:
    """``model/dense/.ATTRIBUTES/VARIABLE_VALUE`` -> ``model/dense``; ``a.Sb..c`` -> ``a/b.c``."""
    path = _ATTR_SUFFIX.sub("", key)
    return re.sub(r"\.(S|\.)", lambda m: "/" if m.group(1) == "S" else ".", path)


def _model_nodes(nodes: list[_Node]) -> set[int]:
    """Nodes reachable from the root without passing through an ``optimizer`` edge."""
    if not nodes:
        return set()
    seen, todo = {0}, deque([0])
    while todo:
        for child, local in nodes[todo.popleft()].children:
            if local in ("optimizer", "_optimizer") or child in seen or not 0 <= child < len(nodes):
                continue
            seen.add(child)
            todo.append(child)
    return seen


def _same_objects(nodes: list[_Node], saved: list[_Node]) -> dict[int, int]:
    """Checkpoint node -> SavedObjectGraph node, matched as TensorFlow's loader restores: from the
    roots, child by local name, and slot variables by their variable and slot name."""
    match, todo = {0: 0}, deque([0])
    while todo:
        i = todo.popleft()
        j = match[i]
        if not 0 <= j < len(saved):
            continue
        theirs = {local: child for child, local in saved[j].children}
        for child, local in nodes[i].children:
            if child not in match and local in theirs and 0 <= child < len(nodes):
                match[child] = theirs[local]
                todo.append(child)
    for i, node in enumerate(nodes):
        if i in match and 0 <= match[i] < len(saved):
            slots = {(orig, name): slot for orig, name, slot in saved[match[i]].slots}
            for orig, name, slot in node.slots:
                if orig in match and (match[orig], name) in slots and 0 <= slot < len(nodes):
                    match.setdefault(slot, slots[(match[orig], name)])
    return match


def readable(tensors: list[Tensor], path: str, saved: tuple[list[_Node], list[str]] | None = None
             ) -> tuple[list[Tensor], list[str], dict[str, str]]:
    """Rename object-graph keys to the variables' names and set their roles.

    ``saved``: a SavedModel's ``SavedObjectGraph`` (its structure, and a name or "" per node):
    the names it gives the variables come before the checkpoint's full names.

    ``tensors`` come in key order; the result keeps that order, without the object
    graph tensor itself, without Keras 3 ``export``'s second copies (see the module
    docstring), whose keys are returned as the second item, and without the objects'
    ``OBJECT_CONFIG_JSON`` strings, returned as metadata entries, the third item.
    Without an object graph the tensors are returned unchanged.
    """
    graph = next((t for t in tensors if t.name == GRAPH_KEY and t.dtype.kind == "string" and t.numel == 1), None)
    if graph is None:
        return tensors, [], {}
    try:
        nodes = parse_object_graph(graph.numpy().reshape(-1)[0])
    except (ProtoError, IndexError, ValueError) as e:
        raise CorruptFileError(path, f"object graph cannot be decoded ({e})", GRAPH_KEY) from None
    model = _model_nodes(nodes)
    local_names: dict[int, set[str]] = {}
    for node in nodes:
        for child, local in node.children:
            local_names.setdefault(child, set()).add(local)
    slot_of = {slot: (orig, name) for node in nodes for orig, name, slot in node.slots}
    full_names = {i: a[1] for i, node in enumerate(nodes) for a in node.attributes if a[0] == "VARIABLE_VALUE"}
    if saved is not None:
        saved_nodes, saved_names = saved
        for i, j in _same_objects(nodes, saved_nodes).items():
            if i in full_names and 0 <= j < len(saved_names) and saved_names[j]:
                full_names[i] = saved_names[j]
    by_key: dict[str, tuple[str, str]] = {}
    config_keys: set[str] = set()
    for i, node in enumerate(nodes):
        for attr_name, _, key in node.attributes:
            if attr_name == CONFIG_ATTRIBUTE:
                config_keys.add(key)
            if attr_name != "VARIABLE_VALUE":
                name = unescape_key(key) or key
            elif full_names.get(i):
                name = full_names[i]
            elif i in slot_of and full_names.get(slot_of[i][0]):
                name = f"{full_names[slot_of[i][0]]}/{slot_of[i][1]}"
            else:
                name = unescape_key(key)
            if local_names.get(i, set()) & _STEP_LOCAL_NAMES or name.endswith("/iteration"):
                role = "step"
            elif i in model and i not in slot_of:
                role = "weight"
            else:
                role = "optimizer"
            by_key[key] = (name, role)
    configs: dict[str, str] = {}
    for t in tensors:
        if t.name in config_keys and t.dtype.kind == "string" and t.shape == ():
            obj = unescape_key(t.name)
            configs[f"{CONFIG_METADATA}.{obj}" if obj else CONFIG_METADATA] = _text(t.numpy().reshape(-1)[0])
    named = [(t, *by_key.get(t.name, (t.name, t.attrs.get("role", "weight")))) for t in tensors
             if t.name != GRAPH_KEY and not (t.name in config_keys and t.dtype.kind == "string" and t.shape == ())]
    groups: dict[str, list[Tensor]] = {}
    for t, name, _ in named:
        groups.setdefault(name, []).append(t)
    # Keras 3 export saves every variable twice: each name then has exactly two copies, and the
    # second is dropped. Anywhere else, variables that share a name (TF's default "Variable",
    # two metrics' "count") are distinct, however equal their values: each is named by its path.
    copies = all(len(g) == 2 and _same_data(*g) for g in groups.values()) and len(named) > len(groups)
    out, dropped, taken = [], [], set()
    for t, name, role in named:
        group = groups[name]
        if copies and t is group[1]:
            dropped.append(t.name)
            continue
        final = name if len(group) == 1 or copies else unescape_key(t.name)
        if final in taken:  # only a malformed graph (or keys) can give two tensors one name: keep the key
            final = t.name
        if final in taken:
            raise CorruptFileError(path, f"the object graph gives two tensors the name {final!r} "
                                   "(read with --names keys)", GRAPH_KEY)
        taken.add(final)
        out.append(Tensor(final, t.dtype, t.shape, t.source, {**t.attrs, "role": role, "tf.key": t.name}))
    return out, dropped, configs


def _same_data(a: Tensor, b: Tensor) -> bool:
    """Same dtype, shape and stored checksum: a second copy, told without reading the data."""
    ca, cb = getattr(a.source, "crc32c", None), getattr(b.source, "crc32c", None)
    return (a.dtype, a.shape) == (b.dtype, b.shape) and ca is not None and ca == cb


OBJECT_GRAPH_OPTION = Option("--object-graph", "write", bool, "tf-ckpt: write a TF2 object-based checkpoint "
                             "(tf.train.Checkpoint): each name's '/' parts become nested objects")


def _escape(local_name: str) -> str:
    """Key escaping of one path element, as TensorFlow's trackable saver does."""
    return local_name.replace(".", "..").replace("/", ".S")


def object_based(tensors: list[Tensor], path: str) -> list[Tensor]:
    """The tensors of a TF2 object-based checkpoint holding ``tensors``: each under the key
    of its object path (``conv1/w`` -> ``conv1/w/.ATTRIBUTES/VARIABLE_VALUE``, the variable
    ``w`` of the object ``conv1`` of the root), plus the ``_CHECKPOINTABLE_OBJECT_GRAPH``
    describing that tree, with each variable's ``full_name`` its tensor name.

    ``tf.train.Checkpoint(conv1=module_with_w).restore(prefix)`` then finds each value. As
    ``tf.train.Checkpoint.save`` does, a ``save_counter`` (int64, 1) is added unless there is one,
    so that even ``status.assert_consumed()`` passes.
    """
    from ...errors import WriteError

    if any(t.name == GRAPH_KEY or "/.ATTRIBUTES/" in t.name for t in tensors):
        raise WriteError(path, "the tensors already carry object-graph keys (read with --names keys); "
                               "write them without --object-graph")
    if not any(t.name == "save_counter" for t in tensors):
        tensors = [*tensors, Tensor.from_array("save_counter", np.int64(1), {"role": "step"})]
    children: list[dict[str, int]] = [{}]  # node id -> {local name: child id}; node 0 is the root
    variable_of: dict[int, Tensor] = {}
    for t in tensors:
        parts = t.name.split("/")
        if any(p == "" for p in parts):
            raise WriteError(path, "an object path cannot have an empty part", t.name)
        node = 0
        for part in parts:
            if node in variable_of:
                raise WriteError(path, f"'{variable_of[node].name}' is a variable and cannot hold other objects "
                                       "(optimizer slots such as 'w/Adam'? leave them out with --weights-only)", t.name)
            if part not in children[node]:
                children[node][part] = len(children)
                children.append({})
            node = children[node][part]
        if children[node] or node in variable_of:
            raise WriteError(path, "this name is also a path to other objects", t.name)
        variable_of[node] = t
    keys: dict[int, str] = {}
    for node, kids in enumerate(children):  # parents come before their children: keys build up
        for local, child in kids.items():
            base = keys.get(node)
            keys[child] = _escape(local) if base is None else f"{base}/{_escape(local)}"
    graph = bytearray()
    out = []
    for node, kids in enumerate(children):
        body = b"".join(wire.field_bytes(1, wire.field_varint(1, child) + wire.field_bytes(2, local.encode()))
                        for local, child in kids.items())
        if node in variable_of:
            t = variable_of[node]
            key = f"{keys[node]}/.ATTRIBUTES/VARIABLE_VALUE"
            body += wire.field_bytes(2, wire.field_bytes(1, b"VARIABLE_VALUE") + wire.field_bytes(2, t.name.encode())
                                   + wire.field_bytes(3, key.encode()))
            out.append(Tensor(key, t.dtype, t.shape, t.source, t.attrs))
        graph += wire.field_bytes(1, body)
    out.append(Tensor.from_array(GRAPH_KEY, np.array(bytes(graph), dtype=object), {"role": "other"}))
    return sorted(out, key=lambda t: t.name.encode())
