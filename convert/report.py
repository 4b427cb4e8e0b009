"""HTML reports: ``convert diff A B --report diff.html`` and ``convert inspect PATH --report page.html``.

One self-contained page each: every script and style is inline (plotly.js included), so the page
opens offline, from a CI artifact or a mail attachment, and asks nothing of the network.

* diff: a verdict, the error by layer (max and mean, absolute and relative; plotly bars), a
  histogram of the element-wise error of the worst tensors, and sortable tables of every tensor
  compared (dtype and shape mismatches highlighted) and of the names only one side has.
* inspect: totals and metadata, bytes by layer and role, each floating tensor's value range, and
  a sortable table of every tensor with its value statistics (min, max, mean, std, NaN, inf, zeros),
  which means reading every value, one tensor at a time.

The plots are plotly's (the ``report`` extra), a well-kept library whose figures zoom and show
each bar's tensor names on hover. The table sorting is a few lines of JavaScript written here:
plotly has no sortable table, and a table library would be one more script to vendor for one
click handler. Output bytes are deterministic (fixed element ids, no timestamps). Names come from
files, so every one is escaped (HTML here, JSON by plotly).
"""

from __future__ import annotations

import html
import importlib
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from . import fileio
from .compare import DiffReport, TensorDiff, errors
from .errors import MissingDependencyError, printable
from .ir import TensorDict
from .lazy import np

NEEDS = ("plotly", "report")
"""(Python module, pip extra) that the reports need."""

WORST = 5  # tensors shown in the error histogram
_BINS_PER_DECADE = 8
_LOG_MIN, _LOG_MAX = -46, 40  # log10 range of positive finite float64 errors that matter (float32 subnormals up)


def require() -> None:
    """Raise :class:`~convert.errors.MissingDependencyError` when plotly is not installed."""
    try:
        importlib.import_module(NEEDS[0])
    except ImportError:
        raise MissingDependencyError("--report", *NEEDS) from None


def check(path: os.PathLike | str, force: bool) -> None:
    """Before any work: plotly is there and ``path`` may be written."""
    require()
    fileio.check_writable(Path(path), force)


def write(path: os.PathLike | str, page: str, force: bool = False) -> None:
    """Write ``page`` atomically (never a half-written report; an existing one only with ``force``)."""
    with fileio.atomic_output(path, force=force) as tmp:
        tmp.write_text(page, encoding="utf-8")


def layer_of(name: str) -> str:
    """The layer a tensor belongs to: its name without the last ``/`` or ``.`` part
    (``conv1/w`` -> ``conv1``, ``encoder.layer.0.weight`` -> ``encoder.layer.0``)."""
    head = re.split(r"[/.](?=[^/.]*$)", name, maxsplit=1)[0]
    return head or name


# --- the diff page -------------------------------------------------------------------------

def diff_page(report: DiffReport, a: TensorDict, b: TensorDict, label_a: str = "A", label_b: str = "B") -> str:
    """The HTML page of a :class:`~convert.compare.DiffReport` of ``a`` (after its mapping) and ``b``.
    The worst tensors are read again for their error histograms."""
    verdict = "agree" if report.ok else "differ"
    compared = [t for t in report.tensors if t.max_abs is not None]
    worst = max((t.max_abs for t in compared if t.max_abs is not None), default=0.0)
    summary = (f"{len(report.tensors)} tensors compared, {len(report.differing)} differ, "
               f"{len(report.only_in_a)} only in A, {len(report.only_in_b)} only in B; "
               f"max abs error {_num(worst)} (atol {report.atol:g}, rtol {report.rtol:g})")
    sections = [
        f"<h1>convert diff: the two checkpoints <span class='verdict {verdict}'>{verdict}</span></h1>",
        _dl([("A", label_a), ("B", label_b), ("result", summary)]),
        "<h2>Error by layer</h2>",
        _layer_figure(report.tensors),
        "<h2>Error of the worst tensors</h2>",
        _histogram_figure(report, a, b),
        "<h2>Tensors compared</h2>",
        "<p>Click a column to sort. Rows whose dtype or shape differ are marked red, rows whose values "
        "differ beyond the tolerance orange.</p>",
        _diff_table(report.tensors),
    ]
    for side, names, td in (("A", report.only_in_a, a), ("B", report.only_in_b, b)):
        sections.append(f"<h2>Only in {side} ({len(names)})</h2>")
        sections.append(_only_table(names, td) if names else "<p>none</p>")
    return _page(f"convert diff: {verdict}", sections)


def layers(names: Iterable[str]) -> dict[str, list[str]]:
    """Names grouped by :func:`layer_of`, layers in natural order (``layer.2`` before ``layer.10``);
    a tensor named after another one (an optimizer slot: ``conv1/w/Adam`` beside ``conv1/w``)
    joins that tensor's layer."""
    names = list(names)
    known = set(names)
    out: dict[str, list[str]] = {}
    for n in names:
        owner = n
        for m in re.finditer(r"[/.]", n):  # the longest other tensor's name + separator that n starts with
            if n[:m.start()] in known:
                owner = n[:m.start()]
        out.setdefault(layer_of(owner), []).append(n)
    return dict(sorted(out.items(), key=lambda item: _natural(item[0])))


def _natural(text: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", text) if p]


def _axis(labels: Sequence[str], what: str) -> tuple[list[str], str]:
    """Tick labels without the prefix they all share (``bert.encoder.``), and an axis title naming it."""
    if len(labels) < 2:
        return list(labels), what
    prefix = os.path.commonprefix(list(labels))
    cut = max(prefix.rfind("/"), prefix.rfind(".")) + 1
    if cut == 0:
        return list(labels), what
    return [label[cut:] or label for label in labels], f"{what}, after {labels[0][:cut]}"


_LEGEND = {"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0}  # above the plot: clear of long tick labels


def _layer_figure(tensors: Sequence[TensorDiff]) -> str:
    import plotly.graph_objects as go

    by_name = {t.name: t for t in tensors if t.max_abs is not None}
    if not by_name:
        return "<p>No tensor could be compared by value.</p>"
    groups = layers(by_name)
    labels, x_title = _axis(list(groups), "layer (tensor names without their last part)")
    series = {}
    for key, title in (("max_abs", "max |a − b|"), ("mean_abs", "mean |a − b|"),
                       ("max_rel", "max |a − b| / |b|"), ("mean_rel", "mean |a − b| / |b|")):
        values = []
        for names in groups.values():
            if key.startswith("max"):
                values.append(max(getattr(by_name[n], key) or 0.0 for n in names))
            else:  # the layer's mean over all its elements
                size = sum(max(_numel(by_name[n]), 1) for n in names)
                values.append(sum((getattr(by_name[n], key) or 0.0) * max(_numel(by_name[n]), 1)
                                  for n in names) / size)
        series[title] = values
    positive = [v for vs in series.values() for v in vs if v and math.isfinite(v)]
    fig = go.Figure()
    hover = ["<br>".join(html.escape(printable(n)) for n in names[:20]) + (" …" if len(names) > 20 else "")
             for names in groups.values()]
    for i, (title, values) in enumerate(series.items()):
        shown = [_finite(v) if positive else v for v in values]
        text = ["inf" if not math.isfinite(v) else "" for v in values]
        fig.add_trace(go.Bar(name=title, x=labels, y=shown, text=text, customdata=hover,
                             hovertemplate="%{x}: %{y:.3g}<br>%{customdata}<extra>" + title + "</extra>",
                             visible=True if i < 2 else "legendonly"))
    fig.update_layout(barmode="group", yaxis_type="log" if positive else "linear",
                      yaxis_title="error (log scale)" if positive else "error (every value equal)",
                      xaxis_title=x_title, legend=_LEGEND)
    return _figure(fig, "layers", height=460)


def _numel(t: TensorDiff) -> int:
    return math.prod(t.shape_a)


def _finite(v: float) -> float | None:
    return v if v and math.isfinite(v) else None  # a log axis shows neither 0 nor inf


def _histogram_figure(report: DiffReport, a: TensorDict, b: TensorDict) -> str:
    import plotly.graph_objects as go

    candidates = [t for t in report.tensors  # values compared, some differ, numbers on both sides
                  if t.max_abs and "string" not in (a[t.name].dtype.kind, b[t.name].dtype.kind)]
    worst = sorted(candidates, key=lambda t: -(t.max_abs or 0.0))[:WORST]
    if not worst:
        return "<p>Every value compared is equal: there is no error to show.</p>"
    edges = np.arange(_LOG_MIN * _BINS_PER_DECADE, _LOG_MAX * _BINS_PER_DECADE + 1) / _BINS_PER_DECADE
    rows, notes = [], []
    for t in worst:
        counts = np.zeros(len(edges) - 1, dtype=np.int64)
        zero = infinite = size = 0
        for err, _, _ in errors(a[t.name], b[t.name]):
            size += err.size
            finite = np.isfinite(err)
            positive = err[finite & (err > 0)]
            infinite += int(np.count_nonzero(~finite))
            zero += int(np.count_nonzero(err == 0))
            counts += np.histogram(np.clip(np.log10(positive), _LOG_MIN, _LOG_MAX - 1e-9), bins=edges)[0]
        rows.append((t, counts, size))
        notes.append((t.name, size, zero, infinite))
    used = np.flatnonzero(sum(c for _, c, _ in rows))
    fig = go.Figure()
    if used.size:
        lo, hi = max(used[0] - 1, 0), min(used[-1] + 2, len(edges) - 1)
        centers = 10 ** ((edges[lo:hi] + edges[lo + 1:hi + 1]) / 2)
        for t, counts, size in rows:
            share = counts[lo:hi] / max(size, 1) * 100
            fig.add_trace(go.Scatter(
                x=centers.tolist(), y=share.tolist(), mode="lines", line_shape="hvh", name=t.name,
                customdata=counts[lo:hi].tolist(),
                hovertemplate="|a − b| ≈ %{x:.2g}: %{y:.2f}% (%{customdata} elements)<extra>%{fullData.name}</extra>"))
        fig.update_layout(xaxis_type="log", xaxis_title="|a − b| (log scale, 8 bins per decade)",
                          yaxis_title="share of the tensor's elements (%)", legend=_LEGEND)
        figure = _figure(fig, "histogram", height=420)
    else:
        figure = ""
    items = "".join(f"<li><code>{_h(n)}</code>: {size} elements, {zero} equal, {inf} infinite or NaN against a "
                    f"number</li>" for n, size, zero, inf in notes)
    return f"{figure}<p>The {len(worst)} tensors of largest max |a − b|:</p><ul>{items}</ul>"


def _diff_table(tensors: Sequence[TensorDiff]) -> str:
    head = ["name", "status", "dtype A", "dtype B", "shape A", "shape B", "max |a−b|", "mean |a−b|",
            "max rel", "mean rel", "elements off"]
    rows = []
    for t in tensors:
        kind = ("mismatch" if t.dtype_a != t.dtype_b or t.shape_a != t.shape_b
                else "differs" if not t.ok else "")
        dtype_cls = " class='bad'" if t.dtype_a != t.dtype_b else ""
        shape_cls = " class='bad'" if t.shape_a != t.shape_b else ""
        cells = [
            f"<td><code>{_h(t.name)}</code></td>", f"<td>{_h(t.status)}</td>",
            f"<td{dtype_cls}>{t.dtype_a}</td>", f"<td{dtype_cls}>{t.dtype_b}</td>",
            f"<td{shape_cls} data-v='{math.prod(t.shape_a)}'>{list(t.shape_a)}</td>",
            f"<td{shape_cls} data-v='{math.prod(t.shape_b)}'>{list(t.shape_b)}</td>",
            *(_num_cell(v) for v in (t.max_abs, t.mean_abs, t.max_rel, t.mean_rel)),
            _num_cell(t.mismatched if t.max_abs is not None else None, integer=True),
        ]
        rows.append(f"<tr class='{kind}'>{''.join(cells)}</tr>" if kind else f"<tr>{''.join(cells)}</tr>")
    return _table(head, rows, numeric={4, 5, 6, 7, 8, 9, 10})


def _only_table(names: Sequence[str], td: TensorDict) -> str:
    rows = [f"<tr><td><code>{_h(n)}</code></td><td>{td[n].dtype}</td>"
            f"<td data-v='{td[n].numel}'>{list(td[n].shape)}</td>{_num_cell(td[n].nbytes, integer=True)}</tr>"
            for n in names]
    return _table(["name", "dtype", "shape", "bytes"], rows, numeric={2, 3})


# --- the inspect page ----------------------------------------------------------------------

def inspect_page(info: dict, td: TensorDict) -> str:
    """The HTML page of :func:`convert.inspect`'s result ``info``, with every tensor's value
    statistics read from ``td`` (one tensor at a time)."""
    stats = {t.name: _stats(t) for t in td.values()}
    facts = [("path", str(info["path"])), ("format", info["format"]), ("tensors", str(info["count"])),
             ("bytes", f"{info['total_bytes']:,}")]
    sections = [f"<h1>convert inspect: {_h(os.path.basename(os.path.normpath(str(info['path']))))}</h1>",
                _dl(facts),
                "<h2>Bytes by layer</h2>", _bytes_figure(info["tensors"]),
                "<h2>Values of the floating tensors (optimizer state: in the table)</h2>", _values_figure(info["tensors"], stats),
                "<h2>Tensors</h2>", "<p>Click a column to sort.</p>", _inspect_table(info["tensors"], stats)]
    if info.get("metadata"):
        sections += ["<h2>Metadata</h2>", _dl(sorted(info["metadata"].items()))]
    return _page(f"convert inspect: {os.path.basename(os.path.normpath(str(info['path'])))}", sections)


def _stats(t) -> dict | None:
    """min, max, mean, std, NaN, inf and zero counts of a numeric tensor, in float64 slices."""
    if t.dtype.kind in ("string", "complex") or t.numel == 0:
        return None
    flat = t.numpy().reshape(-1)
    lo, hi, total, squares, nan, inf, zeros, finite_n = math.inf, -math.inf, 0.0, 0.0, 0, 0, 0, 0
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, flat.size, 1 << 20):
            x = flat[start:start + (1 << 20)].astype(np.float64)
            nan += int(np.count_nonzero(np.isnan(x)))
            inf += int(np.count_nonzero(np.isinf(x)))
            zeros += int(np.count_nonzero(x == 0))
            x = x[np.isfinite(x)]
            if x.size:
                lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
                total += float(x.sum())
                squares += float(np.square(x).sum())
                finite_n += x.size
    if not finite_n:
        return {"min": None, "max": None, "mean": None, "std": None, "nan": nan, "inf": inf, "zeros": zeros}
    mean = total / finite_n
    return {"min": lo, "max": hi, "mean": mean, "std": math.sqrt(max(squares / finite_n - mean * mean, 0.0)),
            "nan": nan, "inf": inf, "zeros": zeros}


def _bytes_figure(tensors: Sequence[dict]) -> str:
    import plotly.graph_objects as go

    groups = layers(t["name"] for t in tensors)
    labels, x_title = _axis(list(groups), "layer")
    by_name = {t["name"]: t for t in tensors}
    roles = list(dict.fromkeys(t.get("role", "tensor") for t in tensors))
    fig = go.Figure()
    for role in roles:
        fig.add_trace(go.Bar(name=role, x=labels, y=[
            sum(by_name[n]["bytes"] for n in names if by_name[n].get("role", "tensor") == role)
            for names in groups.values()], hovertemplate="%{x}: %{y:,} bytes<extra>" + role + "</extra>"))
    fig.update_layout(barmode="stack", yaxis_title="bytes", xaxis_title=x_title, legend=_LEGEND)
    return _figure(fig, "bytes", height=420)


def _values_figure(tensors: Sequence[dict], stats: dict) -> str:
    import plotly.graph_objects as go

    rows = [(t["name"], stats[t["name"]]) for t in tensors  # optimizer state is in the table
            if stats.get(t["name"]) and stats[t["name"]]["mean"] is not None and "float" in t["dtype"]
            and t.get("role") not in ("optimizer", "step")]
    if not rows:
        return "<p>No floating tensor.</p>"
    names, x_title = _axis([n for n, _ in rows], "tensor")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=names, y=[s["mean"] for _, s in rows], mode="markers", name="mean ± std",
                             error_y={"type": "data", "array": [s["std"] for _, s in rows]}))
    fig.add_trace(go.Scatter(x=names, y=[s["min"] for _, s in rows], mode="markers", name="min",
                             marker={"symbol": "triangle-down", "size": 6}))
    fig.add_trace(go.Scatter(x=names, y=[s["max"] for _, s in rows], mode="markers", name="max",
                             marker={"symbol": "triangle-up", "size": 6}))
    fig.update_layout(yaxis_title="value", xaxis_title=x_title, legend=_LEGEND)
    return _figure(fig, "values", height=460)


def _inspect_table(tensors: Sequence[dict], stats: dict) -> str:
    extra = [c for c in ("role", "origin") if any(c in t for t in tensors)]
    head = ["name", "dtype", "shape", "bytes", *extra, "min", "max", "mean", "std", "NaN", "inf", "zeros"]
    rows = []
    for t in tensors:
        s = stats.get(t["name"]) or {}
        bad = " class='differs'" if s.get("nan") or s.get("inf") else ""
        cells = [f"<td><code>{_h(t['name'])}</code></td>", f"<td>{t['dtype']}</td>",
                 f"<td data-v='{math.prod(t['shape'])}'>{t['shape']}</td>", _num_cell(t["bytes"], integer=True),
                 *(f"<td>{_h(str(t.get(c, '')))}</td>" for c in extra),
                 *(_num_cell(s.get(k)) for k in ("min", "max", "mean", "std")),
                 *(_num_cell(s.get(k), integer=True) for k in ("nan", "inf", "zeros"))]
        rows.append(f"<tr{bad}>{''.join(cells)}</tr>")
    first_stat = 4 + len(extra)
    return _table(head, rows, numeric={2, 3, *range(first_stat, first_stat + 7)})


# --- page parts ----------------------------------------------------------------------------

def _h(text: str) -> str:
    return html.escape(printable(text), quote=True)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _num_cell(x: float | int | None, integer: bool = False) -> str:
    if x is None:
        return "<td class='num' data-v=''>-</td>"
    if isinstance(x, float) and math.isnan(x):
        return "<td class='num' data-v=''>NaN</td>"
    shown = f"{x:,}" if integer else ("inf" if math.isinf(x) else f"{x:.3g}")
    value = "Infinity" if isinstance(x, float) and math.isinf(x) and x > 0 else repr(x)
    return f"<td class='num' data-v='{value}'>{shown}</td>"


def _table(head: Sequence[str], rows: Sequence[str], numeric: set[int]) -> str:
    ths = "".join(f"<th{' data-numeric' if i in numeric else ''}>{_h(h)}</th>" for i, h in enumerate(head))
    return f"<table class='sortable'><thead><tr>{ths}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _dl(items: Iterable[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{_h(k)}</dt><dd>{_h(str(v))}</dd>" for k, v in items) + "</dl>"


def _figure(fig, name: str, height: int) -> str:
    import plotly.io as pio

    fig.update_layout(template="plotly_white", height=height, margin={"l": 60, "r": 20, "t": 50, "b": 60})
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=f"figure-{name}",
                       config={"displaylogo": False, "responsive": True})


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1f2933; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.verdict { padding: 0.1em 0.5em; border-radius: 0.3em; color: white; }
.verdict.agree { background: #2f855a; } .verdict.differ { background: #c53030; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; } dt { font-weight: 600; }
dd { margin: 0; word-break: break-all; }
table { border-collapse: collapse; font-size: 0.85em; width: 100%; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #eee; text-align: left; }
th { cursor: pointer; background: #f4f6f8; position: sticky; top: 0; user-select: none; }
th[data-order=asc]::after { content: " \\25B2"; } th[data-order=desc]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.mismatch td { background: #fed7d7; } tr.differs td { background: #feebc8; }
td.bad { color: #9b2c2c; font-weight: 700; }
code { word-break: break-all; }
"""

# Sorts a table by the clicked column: numbers by their data-v attribute (empty last), text otherwise.
_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], numeric = th.hasAttribute("data-numeric");
    var asc = th.getAttribute("data-order") !== "asc";
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-order"); });
    th.setAttribute("data-order", asc ? "asc" : "desc");
    var key = function (row) {
      var cell = row.cells[col];
      if (!numeric) return cell.textContent;
      var v = parseFloat(cell.getAttribute("data-v"));
      return isNaN(v) ? null : v;
    };
    var rows = Array.prototype.slice.call(body.rows).map(function (r, i) { return [key(r), i, r]; });
    rows.sort(function (x, y) {
      if (x[0] === y[0]) return x[1] - y[1];
      if (x[0] === null) return 1;
      if (y[0] === null) return -1;
      var c = numeric ? x[0] - y[0] : x[0].localeCompare(y[0]);
      return (asc ? c : -c) || x[1] - y[1];
    });
    var fragment = document.createDocumentFragment();
    rows.forEach(function (r) { fragment.appendChild(r[2]); });
    body.appendChild(fragment);
  });
});
"""


def _page(title: str, sections: Sequence[str]) -> str:
    from plotly.offline import get_plotlyjs

    return ("<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
            f"<title>{_h(title)}</title>\n<style>{_STYLE}</style>\n"
            f"<script>{get_plotlyjs()}</script>\n</head>\n<body>\n" + "\n".join(sections)
            + f"\n<script>{_SCRIPT}</script>\n</body>\n</html>\n")
