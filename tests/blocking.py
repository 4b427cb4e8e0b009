"""Child processes on a machine without a framework (the developers' guide: a feature claimed
"without TensorFlow/torch" is tested in a subprocess where that import fails)."""

from __future__ import annotations

import os
from pathlib import Path

FRAMEWORKS = ("tensorflow", "tf2onnx", "torch", "onnxruntime", "transformers", "keras", "tf_keras", "plotly")


def blocker(folder: Path, modules=FRAMEWORKS, env: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose Python processes cannot import ``modules`` (a sitecustomize on
    PYTHONPATH marks them absent, as if not installed: ``import`` raises ModuleNotFoundError and
    ``importlib.util.find_spec`` says None): ``env`` (default: this process's environment) with the
    sitecustomize's folder first on its PYTHONPATH. In the child,
    ``sys.modules.get(name) is None`` holds until the end if nothing imported ``name`` after all."""
    site = folder / "blocked-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        f"for name in {list(modules)!r}:\n"
        "    sys.modules[name] = None  # import raises ImportError; find_spec says absent\n")
    base = os.environ if env is None else env
    path = os.pathsep.join(p for p in (str(site), base.get("PYTHONPATH", "")) if p)
    return {**base, "PYTHONPATH": path}
