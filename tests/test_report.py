"""``convert diff --report`` and ``convert inspect --report``: the numbers on the page against NumPy
on the arrays the safetensors library wrote, the page's self-containment, and the page in a real
browser (Debian's headless Chromium driven by Playwright: no console error, no request beyond
the file itself, a screenshot that is not blank, tables that sort)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from blocking import blocker
from safetensors.numpy import save_file

from convert.cli import main

HOSTILE = "extra/</script><img src=x onerror=alert(1)>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags that work on the project machines (no network, root): see the machine notes.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    a = {
        "conv1/w": rng.normal(size=(5, 5, 3, 8)).astype(np.float32),
        "conv1/b": rng.normal(size=8).astype(np.float32),
        "conv1/w/Adam": rng.normal(size=(5, 5, 3, 8)).astype(np.float32),
        "fc1/w": rng.normal(size=(64, 10)).astype(np.float32),
        "fc1/b": rng.normal(size=10).astype(np.float32),
        "fc2/w": rng.normal(size=(10, 4)).astype(np.float64),
        "gone/w": np.ones((2, 2), np.float32),
        "global_step": np.array(190, np.int64),
    }
    b = {k: v.copy() for k, v in a.items() if k != "gone/w"}
    b["conv1/w"] = (a["conv1/w"] + rng.normal(0, 1e-3, a["conv1/w"].shape)).astype(np.float32)
    b["fc1/w"] = (a["fc1/w"] * np.float32(1 + 1e-5)).astype(np.float32)
    b["fc1/w"][0, 0] = 0.0  # a relative error against 0: inf
    b["conv1/b"] = a["conv1/b"].astype(np.float16)  # dtype differs
    b["fc1/b"] = a["fc1/b"][:5].copy()  # shape differs
    b[HOSTILE] = np.zeros(3, np.float32)
    return a, b


@pytest.fixture
def pair(tmp_path):
    a, b = arrays()
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    return tmp_path / "a.safetensors", tmp_path / "b.safetensors", a, b


class Tables(HTMLParser):
    """Every table of a page: its header and rows of (text, data-v) cells, with each row's class."""

    def __init__(self):
        super().__init__()
        self.tables: list[dict] = []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"head": [], "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append({"class": attrs.get("class") or "", "cells": []})
        elif tag in ("td", "th") and self.tables:
            self._cell = {"tag": tag, "text": "", "v": attrs.get("data-v"), "class": attrs.get("class") or ""}

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            row = self.tables[-1]["rows"][-1]
            row["cells"].append(self._cell)
            self._cell = None
        if tag == "tr" and self.tables and self.tables[-1]["rows"]:
            row = self.tables[-1]["rows"][-1]
            if row["cells"] and row["cells"][0]["tag"] == "th":
                self.tables[-1]["head"] = [c["text"] for c in row["cells"]]
                self.tables[-1]["rows"].pop()


def tables_of(page: str) -> list[dict]:
    parser = Tables()
    parser.feed(page)
    return parser.tables


def by_name(table: dict) -> dict[str, dict]:
    return {r["cells"][0]["text"]: r for r in table["rows"]}


def cell(table: dict, row: dict, column: str) -> dict:
    return row["cells"][table["head"].index(column)]


def diff_report(pair, tmp_path, name="diff.html", *extra):
    a, b = pair[0], pair[1]
    out = tmp_path / name
    assert main(["diff", str(a), str(b), "--report", str(out), "-q", *extra]) == 1  # they differ
    return out


def test_diff_report_numbers_are_numpys(pair, tmp_path):
    _, _, a, b = pair
    page = diff_report(pair, tmp_path).read_text(encoding="utf-8")
    table = tables_of(page)[0]
    rows = by_name(table)
    assert set(rows) == {n for n in a if n in b}
    for name, row in rows.items():
        x, y = a[name], b[name]
        if x.shape != y.shape:
            assert cell(table, row, "max |a−b|")["v"] == ""
            continue
        err = np.abs(x.astype(np.float64) - y.astype(np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(err == 0, 0.0, err / np.abs(y.astype(np.float64)))
        assert float(cell(table, row, "max |a−b|")["v"]) == err.max(), name
        assert math.isclose(float(cell(table, row, "mean |a−b|")["v"]), err.mean(), rel_tol=1e-12, abs_tol=1e-300)
        assert float(cell(table, row, "max rel")["v"]) == rel.max(), name
        assert int(cell(table, row, "elements off")["v"]) == np.count_nonzero(x != y), name
    assert float(cell(table, rows["fc1/w"], "max rel")["v"]) == math.inf  # 0 in B
    assert cell(table, rows["fc1/w"], "max rel")["text"] == "inf"


def test_diff_report_marks_mismatches_and_lists_one_sided_names(pair, tmp_path):
    page = diff_report(pair, tmp_path).read_text(encoding="utf-8")
    compared, only_a, only_b = tables_of(page)
    rows = by_name(compared)
    assert rows["conv1/b"]["class"] == "mismatch" and cell(compared, rows["conv1/b"], "dtype B")["class"] == "bad"
    assert cell(compared, rows["conv1/b"], "dtype B")["text"] == "float16"
    assert rows["fc1/b"]["class"] == "mismatch" and cell(compared, rows["fc1/b"], "shape B")["text"] == "[5]"
    assert rows["conv1/w"]["class"] == "differs" and rows["fc2/w"]["class"] == ""
    assert [r["cells"][0]["text"] for r in only_a["rows"]] == ["gone/w"]
    assert [r["cells"][0]["text"] for r in only_b["rows"]] == [HOSTILE]  # shown as text
    assert HOSTILE not in page and "<img" not in page


def test_report_is_one_self_contained_page_with_the_same_bytes_every_time(pair, tmp_path):
    first = diff_report(pair, tmp_path, "one.html").read_bytes()
    second = diff_report(pair, tmp_path, "two.html").read_bytes()
    assert first == second
    page = first.decode("utf-8")
    tags = [t.lower() for t in re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", page)]
    assert tags and all(t == "<script>" for t in tags), set(tags)  # every script inline, nothing linked
    assert "Plotly.newPlot" in page and "plotly.js" in page.lower()


def test_report_refuses_an_existing_file_without_force(pair, tmp_path, capsys):
    out = tmp_path / "diff.html"
    out.write_text("mine")
    assert main(["diff", str(pair[0]), str(pair[1]), "--report", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1 and out.read_text() == "mine"
    assert main(["diff", str(pair[0]), str(pair[1]), "--report", str(out), "--force", "-q"]) == 1
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_report_without_plotly_names_the_extra(pair, tmp_path):
    code = f"""
import sys
from convert.cli import main
sys.exit(main(["diff", {str(pair[0])!r}, {str(pair[1])!r}, "--report", {str(tmp_path / "r.html")!r}]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=blocker(tmp_path, ("plotly",)))
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "convert: --report needs the Python package 'plotly', which is not installed: "
        "pip install 'ckpt-convert[report]'"]
    assert not (tmp_path / "r.html").exists()


def test_inspect_report_statistics_are_numpys(pair, tmp_path, capsys):
    _, b_path, _, b = pair
    out = tmp_path / "inspect.html"
    assert main(["inspect", str(b_path), "--report", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    page = out.read_text(encoding="utf-8")
    table = tables_of(page)[0]
    rows = by_name(table)
    assert set(rows) == set(b)
    for name, arr in b.items():
        x = arr.astype(np.float64).reshape(-1)
        row = rows[name]
        assert int(cell(table, row, "bytes")["v"]) == arr.nbytes
        assert float(cell(table, row, "min")["v"]) == x.min() and float(cell(table, row, "max")["v"]) == x.max()
        assert math.isclose(float(cell(table, row, "mean")["v"]), x.mean(), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(float(cell(table, row, "std")["v"]), x.std(), rel_tol=1e-6, abs_tol=1e-12)
        assert int(cell(table, row, "zeros")["v"]) == np.count_nonzero(x == 0)


# --- in a real browser ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine: `make test` installs Debian's package when it runs "
                    "as root with apt-get (see the Makefile's browser target)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


def render(browser, path: Path, wait_for_plots: int = 0):
    """Open ``path`` in a fresh page: (page, console errors and page errors, requested URLs, screenshot)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems, requests = [], []
    page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri(), wait_until="load")
    if wait_for_plots:
        page.wait_for_function(f"document.querySelectorAll('.plotly-graph-div .main-svg').length >= {wait_for_plots}",
                               timeout=20000)
    shot = path.with_suffix(".png")
    page.screenshot(path=str(shot), full_page=True)
    return page, problems, requests, shot


def variance(png: Path) -> float:
    from PIL import Image, ImageStat

    with Image.open(png) as img:
        return ImageStat.Stat(img.convert("L")).var[0]


def test_the_browser_checks_can_fail(browser, tmp_path):
    """The two checks below can see what they look for: a script error, and a blank page."""
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><html><body><script>notDefinedAnywhere()</script></body></html>")
    page, problems, _, shot = render(browser, broken)
    page.close()
    assert any("notDefinedAnywhere" in p for p in problems)
    assert variance(shot) < 1.0


def test_diff_report_renders_in_chromium(browser, pair, tmp_path):
    _, _, a, b = pair
    out = diff_report(pair, tmp_path)
    page, problems, requests, shot = render(browser, out, wait_for_plots=2)
    try:
        assert problems == []
        assert requests == [out.as_uri()]  # self-contained: nothing else was asked for
        assert variance(shot) > 100, "the screenshot is (nearly) blank"
        assert page.locator("#figure-layers .point").count() >= 4  # bars: max and mean of at least two layers
        differing = [n for n in a if n in b and a[n].shape == b[n].shape
                     and not np.array_equal(a[n].astype(np.float64), b[n].astype(np.float64))]
        assert sorted(differing) == ["conv1/b", "conv1/w", "fc1/w"]  # conv1/b: float16 rounding
        assert page.locator("#figure-histogram .scatterlayer .trace").count() == len(differing)
        # sorting: max |a-b| descending puts NumPy's worst tensor first
        header = page.locator("table.sortable").first.locator("th", has_text="max |a−b|")
        header.click()
        header.click()
        first = page.locator("table.sortable").first.locator("tbody tr").first.locator("td").first.inner_text()
        worst = max((n for n in a if n in b and a[n].shape == b[n].shape),
                    key=lambda n: np.abs(a[n].astype(np.float64) - b[n].astype(np.float64)).max())
        assert first == worst == "fc1/w"  # its [0, 0] is 0 in B
        assert problems == []
    finally:
        page.close()


def test_inspect_report_renders_in_chromium(browser, pair, tmp_path):
    out = tmp_path / "inspect.html"
    assert main(["inspect", str(pair[0]), "--report", str(out), "-q"]) == 0
    page, problems, requests, shot = render(browser, out, wait_for_plots=2)
    try:
        assert problems == [] and requests == [out.as_uri()]
        assert variance(shot) > 100, "the screenshot is (nearly) blank"
        header = page.locator("table.sortable").first.locator("th", has_text="bytes")
        header.click()
        smallest = page.locator("table.sortable").first.locator("tbody tr").first.locator("td").first.inner_text()
        assert smallest == "global_step"  # 8 bytes
    finally:
        page.close()


def test_report_of_the_bundled_example_roundtrip_says_agree(tmp_path):
    """The page of an identical pair: the verdict, and no histogram to draw."""
    root = Path(__file__).resolve().parents[1] / "examples" / "model1"
    st = tmp_path / "m.safetensors"
    assert main(["tf-ckpt", str(root), "--to", "safetensors", "-o", str(st), "-q"]) == 0
    out = tmp_path / "same.html"
    assert main(["diff", str(root), str(st), "--report", str(out), "-q"]) == 0
    page = out.read_text(encoding="utf-8")
    assert "verdict agree" in page and "there is no error to show" in page
    assert os.path.getsize(out) < 8_000_000


def test_layers_group_slots_with_their_variable_in_natural_order():
    from convert.report import layers

    names = ["layer.10.w", "conv1/w/Adam", "layer.2.w", "conv1/w", "conv1/b", "global_step", "layer.2.b"]
    assert layers(names) == {"conv1": ["conv1/w/Adam", "conv1/w", "conv1/b"], "global_step": ["global_step"],
                             "layer.2": ["layer.2.w", "layer.2.b"], "layer.10": ["layer.10.w"]}
