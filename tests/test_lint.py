"""The static checks of `make lint` that CI runs too (CI runs `make test` only): mypy over the
package, which checks every adapter's FORMAT against the contract of convert/formats/base.py,
and the import layers of pyproject.toml ([tool.importlinter]), checked by lint-imports.

Each check is also shown to fail on a broken case, so that a passing run means something.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def test_mypy_passes_over_the_package():
    r = _run(sys.executable, "-m", "mypy")  # [tool.mypy] in pyproject.toml: files = convert
    assert r.returncode == 0, f"mypy found type errors (make lint):\n{r.stdout}{r.stderr}"


def test_mypy_refuses_an_adapter_whose_functions_do_not_fit_the_contract(tmp_path):
    # detect takes a Path and returns a bool (base.Detect); a write that takes no path does not fit base.Write.
    program = ("from pathlib import Path\n"
               "from convert.formats.base import Format, Writer, holds_all\n"
               "def detect(path: Path) -> str: return ''\n"
               "def write(td: object) -> None: ...\n"
               "FORMAT = Format('x', 'y', detect, None, writers=(Writer('', write, holds_all),))\n")
    (tmp_path / "bad_adapter.py").write_text(program)
    r = _run(sys.executable, "-m", "mypy", str(tmp_path / "bad_adapter.py"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'Argument 3 to "Format" has incompatible type' in r.stdout, r.stdout
    assert 'Argument 2 to "Writer" has incompatible type' in r.stdout, r.stdout


def test_every_adapter_function_is_annotated_so_that_mypy_checks_it():
    """mypy takes an unannotated function as fitting any Protocol: the contract check means
    something only if what each FORMAT hands the core is annotated, every parameter and the result."""
    import inspect

    from convert import registry

    untyped = []
    for info in registry.FORMATS:
        fmt = info.format
        functions = {"detect": fmt.detect, "read": fmt.read, "expand": fmt.expand}
        for w in fmt.writers:
            for hook in ("write", "series", "prepare", "takes_template", "read_back"):
                functions[f"writer {w.id!r} {hook}"] = getattr(w, hook)
            if w.shards is not None:
                for hook in ("shard_name", "write_shard", "commit"):
                    functions[f"writer {w.id!r} shards.{hook}"] = getattr(w.shards, hook)
        for what, fn in functions.items():
            if fn is None:
                continue
            sig = inspect.signature(fn)
            bare = [p for p, v in sig.parameters.items()
                    if v.annotation is inspect.Parameter.empty and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
            if bare or sig.return_annotation is inspect.Signature.empty:
                untyped.append(f"{info.name} {what} ({fn.__module__}.{fn.__qualname__}): "
                               f"{'parameters ' + ', '.join(bare) if bare else ''} "
                               f"{'no return type' if sig.return_annotation is inspect.Signature.empty else ''}")
    assert not untyped, "annotate these (convert/formats/base.py):\n" + "\n".join(untyped)


def test_import_layers_and_no_cycles():
    r = _run(str(BIN / "lint-imports"), "--no-cache", "--no-logo")
    assert r.returncode == 0, f"lint-imports: an import breaks the layers of pyproject.toml:\n{r.stdout}{r.stderr}"
    assert "Contracts: 2 kept, 0 broken." in r.stdout, r.stdout


def _cycles(package: str) -> list[list[str]]:
    """The import cycles between modules (strongly connected components), imports inside functions
    included; unlike import-linter's contracts, a module importing its own package counts too."""
    import grimp

    graph = grimp.build_graph(package, cache_dir=None)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []
    for start in sorted(edges):  # Tarjan's algorithm, iteratively
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    work.append((w, iter(edges[w])))
                elif w in stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_between_modules():
    assert _cycles("convert") == []


def test_the_cycle_check_finds_cycles_inside_functions_and_through_a_package(tmp_path):
    # two cycles that import-linter's contracts miss: one made by an import inside a function, and
    # one through a package's own __init__ (a submodule importing its package)
    shutil.copytree(ROOT / "convert", tmp_path / "convert", ignore=shutil.ignore_patterns("__pycache__"))
    tfc = tmp_path / "convert" / "formats" / "tf_checkpoint"
    for name, line in (("roles.py", "from . import reading"), ("metagraph.py", "from . import FORMAT")):
        (tfc / name).write_text((tfc / name).read_text() + f"\n\ndef _late():\n    {line}  # noqa\n")
    program = ("import json, runpy, sys\n"
               f"sys.path.insert(0, {str(tmp_path)!r})\n"
               f"print(json.dumps(runpy.run_path({__file__!r})['_cycles']('convert')))\n")
    r = _run(sys.executable, "-c", program, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(r.stdout)) == [  # the package imports templates, which imports metagraph
        ["convert.formats.tf_checkpoint", "convert.formats.tf_checkpoint.metagraph", "convert.formats.tf_checkpoint.templates"],
        ["convert.formats.tf_checkpoint.reading", "convert.formats.tf_checkpoint.roles"]]


def test_import_layers_refuse_a_lower_layer_importing_a_higher_one(tmp_path):
    shutil.copytree(ROOT / "convert", tmp_path / "convert", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    ir = tmp_path / "convert" / "ir.py"
    ir.write_text(ir.read_text() + "\n\ndef _late():\n    from . import api  # noqa\n")
    r = _run(str(BIN / "lint-imports"), "--no-cache", "--no-logo", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "convert.ir -> convert.api" in r.stdout, r.stdout
