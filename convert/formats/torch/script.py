"""TorchScript archives (``torch.jit.save``): their parameters and buffers by module path, without
torch and without running the code inside.

Spec: none written; the reference is torch/csrc/jit/serialization/{export_module,import}.cpp. The
archive is a torch zip file whose ``<stem>/data.pkl`` holds the module *object tree*: each module
an object of its compiled class (``__torch__.Net``, ``__torch__.torch.nn.modules.conv.Conv2d``,
mangled ``...___torch_mangle_3.Linear``), built with ``NEWOBJ`` and given its attributes by
``BUILD`` (a dict: ``training``, the tensors, the submodules...). Tensors are ordinary torch
tensors (``torch._utils._rebuild_tensor_v2`` over ``data/<key>`` storages). The restricted
unpickler turns the classes into placeholders (:class:`~.torch_pickle.StubObject`) holding those
dicts. Which attributes are parameters and which buffers the archive says only in the classes'
source, ``<stem>/code/**.py``: each class body declares ``__parameters__ = ["weight", "bias", ]`` and
``__buffers__ = [...]``. We read those two lists with :mod:`ast` (parsed, never run). ``constants.pkl``
holds the constants of the code (not part of the state_dict) and is not read.

The names are those of ``torch.jit.load(f).state_dict()``: for each module its parameters, then its
buffers, then each submodule's under ``<attribute>.``, in the order of the class's attributes.
"""

from __future__ import annotations

import ast
import zipfile
from collections import OrderedDict

from ...errors import CorruptFileError
from . import torch_pickle as tp

MAX_CODE = 64 << 20  # the source of all classes together; a real model has a few hundred KB
MAX_MODULES = 100_000


def is_script(names: set[str], prefix: str) -> bool:
    return f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names)


def code_records(zf: zipfile.ZipFile, prefix: str, path: object) -> list[str]:
    """The archive's class sources (``<stem>/code/**.py``), refused together above :data:`MAX_CODE`."""
    names = [i for i in zf.infolist() if i.filename.startswith(f"{prefix}code/") and i.filename.endswith(".py")]
    if sum(i.file_size for i in names) > MAX_CODE:
        raise CorruptFileError(path, f"the TorchScript code records hold more than {MAX_CODE >> 20} MB")
    return [i.filename for i in names]


def declared(sources: dict[str, bytes], prefix: str, path: object) -> dict[str, tuple[list[str], list[str]]]:
    """Qualified class name -> (parameter names, buffer names), from the ``code/`` sources (record name
    -> bytes): ``code/__torch__/torch/nn/modules/conv.py`` holds ``__torch__.torch.nn.modules.conv.Conv2d``."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    for name, data in sources.items():
        module = name[len(f"{prefix}code/"):-len(".py")].replace("/", ".")
        try:
            tree = ast.parse(data.decode("utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError, MemoryError) as e:
            raise CorruptFileError(path, f"TorchScript code record {name} does not parse ({type(e).__name__})") from None
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                out[f"{module}.{node.name}"] = (_names(node, "__parameters__"), _names(node, "__buffers__"))
    return out


def _names(cls: ast.ClassDef, attr: str) -> list[str]:
    for stmt in cls.body:
        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                and stmt.targets[0].id == attr):
            try:
                value = ast.literal_eval(stmt.value)
            except (ValueError, TypeError, SyntaxError, RecursionError):
                return []
            return [v for v in value if isinstance(v, str)] if isinstance(value, (list, tuple)) else []
    return []


def state_dict(root, classes: dict[str, tuple[list[str], list[str]]], path: object) -> OrderedDict:
    """The module tree under ``root`` (a placeholder of a ``__torch__`` class) as a flat state_dict:
    dotted attribute path -> tensor. A class whose source is missing gives every tensor attribute."""
    if not _is_module(root):
        raise CorruptFileError(path, "TorchScript archive whose data.pkl is not a module object")

    def parts(obj):
        attrs = obj.state if isinstance(obj.state, dict) else {}
        params, buffers = classes.get(obj.cls, (None, None))
        tensors = [(str(k), v) for k, v in attrs.items() if isinstance(v, tp.TensorRef)]
        if params is not None and buffers is not None:
            tensors = [(k, v) for k, v in tensors if k in params] + [(k, v) for k, v in tensors if k in buffers]
        return tensors, [(str(k), v) for k, v in attrs.items() if _is_module(v)]

    return _walk(root, parts, path)


def eager_state_dict(root, path: object) -> OrderedDict:
    """A placeholder of a whole pickled ``nn.Module`` (``torch.save(model)``) as ``model.state_dict()``
    names it: per module its ``_parameters``, then its ``_buffers`` but the non-persistent ones, then
    each of its ``_modules``."""

    def parts(obj):
        state = obj.state
        params, buffers, modules = (state.get(k) for k in ("_parameters", "_buffers", "_modules"))
        skip = state.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset)) else set()
        tensors = [(str(k), v) for k, v in params.items() if isinstance(v, tp.TensorRef)]
        tensors += [(str(k), v) for k, v in buffers.items() if isinstance(v, tp.TensorRef) and k not in skip]
        return tensors, [(str(k), v) for k, v in modules.items() if is_eager_module(v)]

    return _walk(root, parts, path)


def is_eager_module(obj) -> bool:
    return (isinstance(obj, tp.StubObject) and isinstance(obj.state, dict)
            and all(isinstance(obj.state.get(k), dict) for k in ("_parameters", "_buffers", "_modules")))


def unfold_modules(obj, path: object, found: dict[str, str], where: str = "", depth: int = 0):
    """``obj`` with every whole pickled ``nn.Module`` in it (at the top, or in the dicts and lists of a
    training checkpoint) replaced by its state_dict; ``found`` gets dotted path -> class name."""
    if is_eager_module(obj):
        found[where or "(root)"] = obj.cls
        return eager_state_dict(obj, path)
    if depth > 64:
        return obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list, tp.StubObject)):
                obj[k] = unfold_modules(v, path, found, f"{where}.{k}" if where else str(k), depth + 1)
    elif isinstance(obj, list):
        obj[:] = [unfold_modules(v, path, found, f"{where}.{i}" if where else str(i), depth + 1)
                  for i, v in enumerate(obj)]
    return obj


def _walk(root, parts, path: object) -> OrderedDict:
    """Pre-order, as ``Module.state_dict`` goes: a module's own tensors, then each submodule's under its
    name (a submodule reachable by two names is listed under both, as torch does)."""
    out: OrderedDict = OrderedDict()
    visits = 0

    def visit(prefix: str, obj, on_path: tuple[int, ...]):
        nonlocal visits
        visits += 1
        if visits > MAX_MODULES or len(on_path) > 200:
            raise CorruptFileError(path, f"a module tree of more than {MAX_MODULES} modules or 200 levels")
        tensors, subs = parts(obj)
        for name, value in tensors:
            out[prefix + name] = value
        for name, sub in subs:
            if id(sub) not in on_path:  # a module holding itself (a cycle): not a tree torch could save
                visit(f"{prefix}{name}.", sub, (*on_path, id(sub)))

    visit("", root, (id(root),))
    return out


def _is_module(obj) -> bool:
    return isinstance(obj, tp.StubObject) and obj.cls.startswith("__torch__.")
