"""Finding the weights in a checkpoint's unpickled object (a training checkpoint nests them), and
recording what else it holds (see :mod:`convert.formats.torch`)."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from ...errors import ReadError
from . import torch_pickle as tp

WEIGHT_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net", "network", "module")
ROOT = "(root)"


# ---- read: finding the weights -------------------------------------------------------------------

def _is_dict(obj) -> bool:
    return isinstance(obj, dict)


def _count_tensors(obj, depth: int = 0) -> int:
    if isinstance(obj, tp.TENSORS):
        return 1
    if depth > 64:
        return 0
    if isinstance(obj, dict):
        return sum(_count_tensors(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v, depth + 1) for v in obj)
    return 0


def _follow(root, key: str, path: object):
    """The object at dotted path ``key``; a dict key that itself contains dots is matched whole first."""
    if key in ("", ROOT):
        return root, ROOT
    obj, parts, used = root, key.split("."), []
    while parts:
        if not isinstance(obj, (dict, list, tuple)):
            break
        for n in range(len(parts), 0, -1):
            k = ".".join(parts[:n])
            found, value = _child(obj, k)
            if found:
                obj, parts = value, parts[n:]
                used.append(k)
                break
        else:
            break
    if parts:
        where = ".".join(used) or ROOT
        keys = list(obj.keys()) if isinstance(obj, dict) else []
        raise ReadError(path, f"--key {key!r}: no entry '{parts[0]}' under {where}; "
                        f"keys there: {', '.join(map(str, keys[:20])) or '(not a dict)'}")
    return obj, key


def _child(obj, k: str):
    if isinstance(obj, dict):
        for cand in obj:
            if str(cand) == k:
                return True, obj[cand]
        return False, None
    if k.isdigit() and int(k) < len(obj):
        return True, obj[int(k)]
    return False, None


def _find_weights(root):
    """(object holding the weights, its dotted path or ROOT)."""
    obj, path = root, []
    while isinstance(obj, dict) and not any(isinstance(v, tp.TENSORS) for v in obj.values()):
        for k in WEIGHT_KEYS:
            if k in obj and isinstance(obj[k], dict) and _count_tensors(obj[k]):
                obj = obj[k]
                path.append(k)
                break
        else:
            break
    return obj, ".".join(path) or ROOT


def _flatten(obj, prefix: str, out: list, depth: int = 0):
    """(dotted name, leaf) for every leaf under ``obj``; dicts/lists/tuples are descended."""
    if depth > 64:
        raise tp.PickleFormatError("nesting deeper than 64 levels")
    if isinstance(obj, dict):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)) and _count_tensors(obj):
        items = [(str(i), v) for i, v in enumerate(obj)]
    else:
        out.append((prefix, obj))
        return
    if not items and prefix:
        out.append((prefix, obj))
    for k, v in items:
        _flatten(v, f"{prefix}.{k}" if prefix else k, out, depth + 1)


def _jsonable(value) -> bool:
    try:
        json.dumps(value, allow_nan=True)
        return not isinstance(value, (tp.TensorRef, tp.Unsupported, tp.Stub))
    except (TypeError, ValueError, RecursionError):
        return False


def _describe(value) -> str:
    if isinstance(value, tp.Unsupported):
        return value.what
    if isinstance(value, tp.TensorRef):
        return f"tensor {value.dtype.name}{list(value.shape)}"
    if isinstance(value, tp.NumpyArray):
        return value.unsupported or f"NumPy array {value.dtype}{list(value.shape)}"
    if isinstance(value, tp.StubObject):
        return f"{value.cls} object (not loaded, kept as text)"
    if isinstance(value, tp.Stub):
        return f"reference to {value.qualname} (not loaded)"
    if isinstance(value, (dict, list, tuple)) and (n := _count_tensors(value)):
        return f"{type(value).__name__} holding {n} tensor{'s' if n != 1 else ''}"
    return type(value).__name__


_NESTED = (tp.Stub, tp.StubObject, dict, list, tuple)


def _record_rest(obj, prefix: str, extras: dict, skipped: dict, depth: int = 0, stubs: Texts | None = None):
    """Everything outside the chosen weights: JSON-able values to extras, placeholders of objects not
    loaded to ``stubs`` (as text), the rest to skipped."""
    if _count_tensors(obj) == 0:
        if isinstance(obj, (tp.Stub, tp.StubObject)) and stubs is not None:
            stubs.add(prefix or ROOT, obj)
        elif _jsonable(obj):
            extras[prefix] = obj
        elif isinstance(obj, (set, frozenset)) and _jsonable(sorted(obj, key=repr)):
            extras[prefix] = sorted(obj, key=repr)
        elif isinstance(obj, (tp.Device, complex, bytes, bytearray)):
            extras[prefix] = str(obj) if not isinstance(obj, (bytes, bytearray)) else obj.hex()
        elif isinstance(obj, dict) and depth < 64:
            for k, v in obj.items():
                _record_rest(v, f"{prefix}.{k}" if prefix else str(k), extras, skipped, depth + 1, stubs)
        elif isinstance(obj, (list, tuple)) and depth < 64 and any(isinstance(v, _NESTED) for v in obj):
            for i, v in enumerate(obj):  # a list of callbacks, schedulers... each on its own
                _record_rest(v, f"{prefix}.{i}" if prefix else str(i), extras, skipped, depth + 1, stubs)
        else:
            skipped[prefix or ROOT] = _describe(obj)
    elif isinstance(obj, dict) and depth < 64 and any(_count_tensors(v) == 0 for v in obj.values()):
        for k, v in obj.items():
            _record_rest(v, f"{prefix}.{k}" if prefix else str(k), extras, skipped, depth + 1, stubs)
    else:
        skipped[prefix or ROOT] = _describe(obj) + (f" (read with --key {prefix})" if prefix else "")


def _record_siblings(root, parts: list[str], extras: dict, skipped: dict, stubs: Texts | None = None):
    obj, prefix = root, ""
    for part in parts:
        if not isinstance(obj, dict):
            return
        nxt = None
        for k, v in obj.items():
            if str(k) == part:
                nxt = v
                continue
            _record_rest(v, f"{prefix}.{k}" if prefix else str(k), extras, skipped, stubs=stubs)
        if nxt is None:
            return
        obj, prefix = nxt, f"{prefix}.{part}" if prefix else part


_TEXT_NODES = 10_000  # one placeholder's text stops after this many values
_TEXT_TOTAL = 1_000_000  # and all of a file's together (a pickle can share one object a million times)
_TEXT_DEPTH = 32


class Texts(dict):
    """Dotted path -> a placeholder as text (see :func:`as_text`), with one budget for the whole file."""

    def __init__(self):
        super().__init__()
        self.left = _TEXT_TOTAL
        self._memo: dict[int, tuple[object, str]] = {}

    def add(self, path: str, obj) -> None:
        if id(obj) not in self._memo:
            budget = min(_TEXT_NODES, max(self.left, 0))
            text, used = as_text(obj, budget)
            self.left -= used
            self._memo[id(obj)] = (obj, text)  # obj kept alive: its id stays its own
        self[path] = self._memo[id(obj)][1]


def as_text(obj, nodes: int = _TEXT_NODES) -> tuple[str, int]:
    """A placeholder (:class:`~.torch_pickle.StubObject`, :class:`~.torch_pickle.Stub`) as JSON text,
    and how many values that took: its class and what the pickle gave it, tensors described by dtype
    and shape, cycles (OmegaConf nodes point to their parent) and large or deep states cut short
    after ``nodes`` values."""
    budget = [nodes]
    on_path: set[int] = set()

    def pairs(items, depth: int) -> dict:
        out = {}
        for k, v in items:
            if budget[0] <= 0:
                out["..."] = "..."
                break
            out[str(walk(k, depth + 1))] = walk(v, depth + 1)
        return out

    def walk(o, depth: int):
        budget[0] -= 1
        if budget[0] < 0 or depth > _TEXT_DEPTH:
            return "..."
        if o is None or isinstance(o, (bool, int, float)):
            return o
        if isinstance(o, str):
            return o if len(o) <= 1000 else o[:1000] + "..."
        if isinstance(o, (bytes, bytearray)):
            return f"<{len(o)} bytes>"
        if isinstance(o, tp.Stub):
            return {"global": o.qualname}
        if isinstance(o, (tp.TensorRef, tp.NumpyArray, tp.Unsupported)):
            return f"<{_describe(o)}>"
        if not isinstance(o, (tp.StubObject, dict, list, tuple, set, frozenset)):
            return str(o)
        if id(o) in on_path:
            return "<cycle>"
        on_path.add(id(o))
        try:
            if isinstance(o, tp.StubObject):
                out: dict[str, Any] = {"class": o.cls}
                if o.args:
                    out["args"] = walk(o.args, depth + 1)
                if o.state is not None:
                    out["state"] = walk(o.state, depth + 1)
                if o.items:
                    out["items"] = walk(o.items, depth + 1)
                if o.entries:
                    out["entries"] = pairs(o.entries, depth)
                return out
            if isinstance(o, dict):
                return pairs(o.items(), depth)
            items = []
            for v in (sorted(o, key=repr) if isinstance(o, (set, frozenset)) else o):
                if budget[0] <= 0:
                    items.append("...")
                    break
                items.append(walk(v, depth + 1))
            return items
        finally:
            on_path.discard(id(o))

    text = json.dumps(walk(obj, 0), allow_nan=True, default=str)
    return text, nodes - budget[0]


def open_placeholders(root):
    """``root`` with every placeholder object replaced by a dict of what the pickle gave it: its state's
    attributes (or ``state`` for a state that is not a dict), ``args`` if it was made with arguments, its
    items by index, its entries by key.
    For a file whose tensors are all inside objects of classes convert does not load (a training
    script's own ``TrainState``): the tensors then have attribute paths. An object met again inside
    itself (a cycle) becomes None; one shared by two paths is one dict (checked for size later)."""
    memo: dict[int, object] = {}
    on_path: set[int] = set()

    def conv(o, depth: int):
        if depth > 64:
            raise tp.PickleFormatError("objects nested deeper than 64 levels")
        if isinstance(o, tp.StubObject):
            if id(o) in on_path:
                return None
            if id(o) in memo:
                return memo[id(o)]
            on_path.add(id(o))
            out: dict = {"args": conv(o.args, depth + 1)} if o.args else {}
            if isinstance(o.state, dict):
                out.update((str(k), conv(v, depth + 1)) for k, v in o.state.items())
            elif o.state is not None:
                out["state"] = conv(o.state, depth + 1)
            out.update((str(i), conv(v, depth + 1)) for i, v in enumerate(o.items))
            out.update((str(k), conv(v, depth + 1)) for k, v in o.entries)
            on_path.discard(id(o))
            memo[id(o)] = out
            return out
        if isinstance(o, (dict, list, tuple)):
            if id(o) in on_path:
                return None
            if id(o) in memo:
                return memo[id(o)]
            on_path.add(id(o))
            found: Any
            if isinstance(o, dict):
                found = type(o)() if type(o) in (dict, OrderedDict) else {}
                found.update((k, conv(v, depth + 1)) for k, v in o.items())
            else:
                found = type(o)(conv(v, depth + 1) for v in o) if type(o) in (list, tuple) else [conv(v, depth + 1) for v in o]
            on_path.discard(id(o))
            memo[id(o)] = found
            return found
        return o

    opened = conv(root, 0)
    tp.check_object_graph(opened)  # sharing inside the objects must not unfold into billions of paths
    return opened
