"""The Python API reference: every public function's example runs and prints what it says, and the
page built from the docstrings (Sphinx, docs/) builds with no warning and no broken reference."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
from pathlib import Path

import pytest

import convert
import convert.compare
import convert.mapping

ROOT = Path(__file__).resolve().parents[1]

PUBLIC = {
    "read": convert.read, "write": convert.write, "convert": convert.convert, "inspect": convert.inspect,
    "diff": convert.diff, "TensorDict": convert.TensorDict, "Tensor": convert.Tensor,
    "mapping.load": convert.mapping.load,
}


@pytest.mark.parametrize("name", list(PUBLIC))
def test_the_example_in_the_docstring_runs(name, tmp_path, monkeypatch):
    """Each example runs in a folder holding the bundled checkpoint as ``model1/``, as the page says."""
    (tmp_path / "model1").symlink_to(ROOT / "examples" / "model1", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    obj = PUBLIC[name]
    tests = [t for t in doctest.DocTestFinder(recurse=False).find(obj, name, globs={"convert": convert})
             if t.examples]
    assert tests, f"convert.{name} has no example in its docstring"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of convert.{name} failed"


def test_the_api_reference_builds_with_no_broken_reference(tmp_path):
    """``sphinx -W -n``: any warning fails, an unresolved cross-reference among them."""
    res = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-n", "--keep-going", "-q", "-b", "html",
                          str(ROOT / "docs"), str(tmp_path / "html")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"})
    assert res.returncode == 0, res.stderr
    page = (tmp_path / "html" / "api.html").read_text(encoding="utf-8")
    for name in PUBLIC:
        assert f'id="convert.{name}"' in page, name
    assert page.count('class="doctest') >= len(PUBLIC)  # the examples are on the page


def test_a_broken_reference_fails_the_build(tmp_path):
    """The check can fail: the same configuration on a page naming a function that does not exist."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "conf.py").write_text((ROOT / "docs" / "conf.py").read_text().replace(
        'os.path.abspath("..")', repr(str(ROOT))))
    (docs / "index.rst").write_text("Broken\n======\n\nSee :func:`convert.no_such_function`.\n")
    res = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-n", "-q", "-b", "html", str(docs),
                          str(tmp_path / "html")], capture_output=True, text=True)
    assert res.returncode != 0 and "convert.no_such_function" in res.stderr
