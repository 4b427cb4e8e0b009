"""Sphinx configuration of the API reference (``make docs``; ``tests/test_docs.py`` builds it with
``-W -n``: any warning, a reference that resolves to nothing among them, fails the build)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # document the checkout, installed or not

import convert  # noqa: E402

project = "convert (ckpt-convert)"
author = "the convert developers"
release = version = convert.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
html_theme = "alabaster"
html_static_path: list[str] = []
exclude_patterns = ["_build"]
# No network at build time, so no intersphinx: references to other projects' objects (numpy,
# the standard library's abstract types in signatures) cannot resolve and are not ours to check.
nitpick_ignore_regex = [
    ("py:.*", r"(np|numpy|os|collections\.abc|typing|pathlib|re|types)\..*"),
    ("py:.*", r"(Path|PathLike|Callable|Iterable|Iterator|Mapping|Sequence|BinaryIO|MappingProxyType)"),
    # a rule file's parsed rules appear in RuleSet's signature; they are the YAML's, documented there
    ("py:class", r"convert\.mapping(\.\w+)*\.(Rule|Transform|Split|Concat)"),
]
