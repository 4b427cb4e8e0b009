"""NumPy, loaded on first use.

Importing NumPy takes ~0.15 s on the project machines, half of a cold ``convert inspect``,
which reads only headers and never needs it. Modules take ``np`` from here; the real module
is loaded the first time one of its attributes is used, and is then the ordinary ``numpy``
module (``import numpy`` anywhere gets the same object).
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING


def lazy_module(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:  # pragma: no cover - numpy is a dependency
        raise ImportError(f"No module named '{name}'")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


if TYPE_CHECKING:  # the type checker sees the real module and its annotations
    import numpy as np
else:
    np = lazy_module("numpy")
