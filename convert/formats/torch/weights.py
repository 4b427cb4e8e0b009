"""Finding the weights in a checkpoint's unpickled object (a training checkpoint nests them), and
recording what else it holds (see :mod:`convert.formats.torch`)."""

from __future__ import annotations

import json

from ...errors import ReadError
from . import torch_pickle as tp

WEIGHT_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net", "network", "module")
ROOT = "(root)"


# ---- read: finding the weights -------------------------------------------------------------------

def _is_dict(obj) -> bool:
    return isinstance(obj, dict)


def _count_tensors(obj, depth: int = 0) -> int:
    if isinstance(obj, tp.TensorRef):
        return 1
    if depth > 64:
        return 0
    if isinstance(obj, dict):
        return sum(_count_tensors(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v, depth + 1) for v in obj)
    return 0


def _follow(root, key: str, path: str):
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
    while isinstance(obj, dict) and not any(isinstance(v, tp.TensorRef) for v in obj.values()):
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
        return not isinstance(value, (tp.TensorRef, tp.Unsupported))
    except (TypeError, ValueError, RecursionError):
        return False


def _describe(value) -> str:
    if isinstance(value, tp.Unsupported):
        return value.what
    if isinstance(value, tp.TensorRef):
        return f"tensor {value.dtype.name}{list(value.shape)}"
    if isinstance(value, (dict, list, tuple)) and (n := _count_tensors(value)):
        return f"{type(value).__name__} holding {n} tensor{'s' if n != 1 else ''}"
    return type(value).__name__


def _record_rest(obj, prefix: str, extras: dict, skipped: dict, depth: int = 0):
    """Everything outside the chosen weights: JSON-able values to extras, the rest to skipped."""
    if _count_tensors(obj) == 0:
        if _jsonable(obj):
            extras[prefix] = obj
        elif isinstance(obj, (set, frozenset)) and _jsonable(sorted(obj, key=repr)):
            extras[prefix] = sorted(obj, key=repr)
        elif isinstance(obj, (tp.Device, complex, bytes, bytearray)):
            extras[prefix] = str(obj) if not isinstance(obj, (bytes, bytearray)) else obj.hex()
        elif isinstance(obj, dict) and depth < 64:
            for k, v in obj.items():
                _record_rest(v, f"{prefix}.{k}" if prefix else str(k), extras, skipped, depth + 1)
        else:
            skipped[prefix or ROOT] = _describe(obj)
    elif isinstance(obj, dict) and depth < 64 and any(_count_tensors(v) == 0 for v in obj.values()):
        for k, v in obj.items():
            _record_rest(v, f"{prefix}.{k}" if prefix else str(k), extras, skipped, depth + 1)
    else:
        skipped[prefix or ROOT] = _describe(obj) + (f" (read with --key {prefix})" if prefix else "")


def _record_siblings(root, parts: list[str], extras: dict, skipped: dict):
    obj, prefix = root, ""
    for part in parts:
        if not isinstance(obj, dict):
            return
        nxt = None
        for k, v in obj.items():
            if str(k) == part:
                nxt = v
                continue
            _record_rest(v, f"{prefix}.{k}" if prefix else str(k), extras, skipped)
        if nxt is None:
            return
        obj, prefix = nxt, f"{prefix}.{part}" if prefix else part
