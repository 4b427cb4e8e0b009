"""What a new user meets first: `make demo` on the core install, the names to install and run
(`pip install ckpt-convert`, `convert`, `ckpt-convert`, `python -m convert`), `convert --version`,
and no framework's log line in our output."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from blocking import blocker

import convert
from convert.errors import MissingDependencyError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
def test_the_distribution_is_named_apart_from_the_package():
    meta = importlib.metadata.metadata("ckpt-convert")
    assert meta["Name"] == "ckpt-convert" and meta["Version"] == convert.__version__
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")
               if e.value.startswith("convert.")}
    assert scripts == {"convert": "convert.cli:main", "ckpt-convert": "convert.cli:main"}
    extras = set(meta.get_all("Provides-Extra"))
    assert {"tf", "torch", "onnx", "keras", "gguf", "remote", "ray", "report", "all"} <= extras
    assert str(MissingDependencyError("writing saved-model", "tensorflow", "tf")) == (
        "writing saved-model needs the Python package 'tensorflow', which is not installed: "
        "pip install 'ckpt-convert[tf]'")


def test_every_way_to_run_it_prints_the_same_version_report():
    runs = [[str(BIN / "convert"), "--version"], [str(BIN / "ckpt-convert"), "--version"],
            [sys.executable, "-m", "convert", "--version"], [str(BIN / "convert"), "-V"]]
    outs = [subprocess.run(r, capture_output=True, text=True, check=True).stdout for r in runs]
    assert outs[0] and all(o == outs[0] for o in outs)
    assert outs[0].splitlines()[0].startswith(f"convert {convert.__version__} (pip install ckpt-convert;")


def test_version_lists_the_optional_dependencies_found(tmp_path):
    res = subprocess.run([str(BIN / "convert"), "--version", "--json"], capture_output=True, text=True, check=True)
    found = {r["module"]: r for r in json.loads(res.stdout)["optional"]}
    assert found["tensorflow"]["version"] == importlib.metadata.version("tensorflow-cpu")
    assert found["tensorflow"]["extra"] == "tf" and "writing saved-model" in found["tensorflow"]["for"]
    assert found["onnxruntime"]["version"] == importlib.metadata.version("onnxruntime")
    assert found["plotly"] == {"module": "plotly", "extra": "report", "version": importlib.metadata.version("plotly"),
                               "for": ["--report"]}
    res = subprocess.run([str(BIN / "convert"), "--version"], capture_output=True, text=True, check=True,
                         env=blocker(tmp_path, ("tensorflow", "plotly")))
    lines = {line.split()[0]: line for line in res.stdout.splitlines()[2:]}
    assert lines["tensorflow"].endswith("not installed: pip install 'ckpt-convert[tf]'")
    assert lines["plotly"].endswith("not installed: pip install 'ckpt-convert[report]'")
    assert lines["onnxruntime"].endswith(importlib.metadata.version("onnxruntime"))


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_the_demo_needs_no_framework(tmp_path):
    """`make demo`'s commands, run by this environment's convert with every framework (and plotly)
    unimportable: each step passes, and the round trips compare equal."""
    out = tmp_path / "out"
    venv = Path(sys.prefix)
    res = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "demo", f"DEMO_VENV={venv}", f"OUT={out}",
                          "-o", f"{venv}/.installed-stamp"], capture_output=True, text=True,
                         env=blocker(tmp_path), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("): agree") == 3
    assert "tensorflow [tf]" in res.stdout and "not installed: pip install 'ckpt-convert[tf]'" in res.stdout
    for name in ("model1.safetensors", "model1-roundtrip", "model1-migrated", "model1.pt", "model1-from-torch"):
        assert (out / name).exists(), name
    logs = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith(("wrote ", "note: "))
            and "is ignored" not in line]  # pip's words about this machine's index setup, when it installs
    assert logs == []


def test_a_quiet_import_drops_what_the_import_printed_unless_it_failed(tmp_path):
    (tmp_path / "chatty.py").write_text("import os\nos.write(2, b'I0000 port.cc:153] oneDNN custom operations\\n')\n"
                                        "os.write(1, b'to stdout too\\n')\nprint('and from Python')\n")
    (tmp_path / "broken.py").write_text("import os\nos.write(2, b'why it broke\\n')\nraise ImportError('broken')\n")
    code = f"""
import sys
sys.path.insert(0, {str(tmp_path)!r})
from convert.frameworks import import_quietly
print("before", flush=True)
m = import_quietly("chatty")
print("after", m.__name__, flush=True)
try:
    import_quietly("broken")
except ImportError as e:
    print("raised", e, flush=True)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "before\nafter chatty\nraised broken\n"
    assert res.stderr == "why it broke\n"


def test_no_framework_log_line_reaches_our_output(tmp_path):
    """Features that import TensorFlow, tf2onnx and onnxruntime print our lines only (TF 2.21 prints
    'oneDNN custom operations are on' from C++ at import, whatever TF_CPP_MIN_LOG_LEVEL says)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    runs = [["tf-ckpt", ROOT / "examples" / "model1", "--to", "saved-model", "-o", tmp_path / "sm"],
            ["tf-ckpt", ROOT / "examples" / "model1", "--to", "onnx", "--graph", "--check", "-o", tmp_path / "m.onnx"]]
    for argv in runs:
        res = subprocess.run([str(BIN / "convert"), *map(str, argv)], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        assert res.stdout == ""
        lines = res.stderr.splitlines()
        assert lines and all(line.startswith(("wrote ", "note: ")) for line in lines), lines
