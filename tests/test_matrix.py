"""Every ordered pair of destinations (formats with writers, each writer id) over the contract's sample
TensorDicts (``tests/contract.py``), each result read by the target's own library (its contract's
``oracle_read``, found through :func:`contract.oracle`).

For a pair, each sample is written in the source format (what that format holds of it), converted
with ``convert.convert`` to the target, and then:

* when the target cannot hold some of it, the conversion fails before writing anything, with one
  line naming the tensors: that line is asserted, word for word, against ``docs/matrix.md``; the
  conversion is run again leaving those tensors out (``--exclude``), as the line suggests;
* what was written is read by the target's oracle and must equal the sample bit for bit;
* the table row (what the pair cannot carry, the error, what becomes of the metadata) must be the
  one in ``docs/matrix.md``, which this test writes when ``CONVERT_WRITE_MATRIX=1`` (run the whole
  file then, slow pairs included: ``pytest tests/test_matrix.py``).

A new format needs nothing here: its registry row makes its pairs (a writer that ``needs_template``
is left out: it writes only into a given model), its test file's contract gives the
oracle; only ``docs/matrix.md`` is regenerated. Pairs with SavedModel (TensorFlow writes and loads a
model for each) are ``slow``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import convert
from convert import registry
from convert.errors import ConvertError, WriteError

from contract import contract_of, destination, oracle, same_values, samples

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "matrix.md"
REGENERATE = os.environ.get("CONVERT_WRITE_MATRIX") == "1"
SLOW = ("saved-model",)

DESTINATIONS = [info.name if w is info.format.writers[0] else f"{info.name}:{w.id}"
                for info in registry.FORMATS for w in info.format.writers if not w.needs_template]
PAIRS = [(a, b) for a in DESTINATIONS for b in DESTINATIONS if a != b]
COLUMNS = ("from", "to", "cannot carry", "the error the user gets (every_dtype sample)", "other samples", "metadata")


def _param(a: str, b: str):
    slow = any(registry.get(x).name in SLOW for x in (a, b))
    return pytest.param(a, b, id=f"{a}->{b}", marks=[pytest.mark.slow] if slow else [])


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """Each sample written once per source destination (what that destination holds of it)."""
    root = tmp_path_factory.mktemp("matrix")
    made: dict[tuple[str, str], Path] = {}

    def get(dest: str, sample: str) -> Path:
        if (dest, sample) not in made:
            info, writer = registry.writer(dest)
            if registry.missing(info, "write") or registry.missing(info, "read"):
                pytest.skip(f"{info.name} needs {registry.missing(info, 'write') + registry.missing(info, 'read')}")
            td = samples()[sample]
            td = td.replace(t for t in td.values() if writer.holds(t.dtype))
            path = root / f"{destination(dest).replace(':', '_')}-{sample}{writer.suffix}"
            convert.write(td, path, dest)
            made[(dest, sample)] = path
        return made[(dest, sample)]
    return get


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _line(cells) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _doc_lines() -> dict[tuple[str, str], str]:
    if not DOC.exists():
        return {}
    rows = {}
    for line in DOC.read_text("utf-8").splitlines():
        if line.startswith("| ") and not line.startswith(("| from ", "|---")):
            cells = re.split(r"(?<!\\) \| ", line[2:-2])
            rows[(cells[0], cells[1])] = line
    return rows


ROWS: dict[tuple[str, str], str] = {}


def _convert(src: Path, out: Path, dst: str, exclude=()) -> dict:
    return convert.convert(src, out, to=dst, exclude=exclude)["outputs"][0]


def _message(e: ConvertError, src: Path, out: Path) -> str:
    return str(e).replace(str(out), "OUT").replace(str(src), "IN")


def _check_values(out: Path, dst: str, expected: dict, what: str) -> None:
    got = oracle(dst)(out)
    skipped = set(contract_of(dst).SKIP_DTYPES)
    missing = {n for n in expected if n not in got and str(expected[n].dtype) not in skipped}
    assert not missing, f"{what}: the oracle does not find {sorted(missing)}"
    assert set(got) <= set(expected), f"{what}: the oracle finds more than was written: {sorted(set(got) - set(expected))}"
    for name, arr in got.items():
        assert same_values(arr, expected[name]), f"{what}: {name}"


@pytest.mark.parametrize("src_dest,dst", [_param(a, b) for a, b in PAIRS])
def test_pair(src_dest, dst, sources, tmp_path):
    info, writer = registry.writer(dst)
    if registry.missing(info, "write"):
        pytest.skip(f"writing {info.name} needs {registry.missing(info, 'write')}")
    oracle(dst)  # the target's test file (and framework) first: a missing framework skips here
    cannot, error, others, metadata = "", "", [], ""
    for sample in samples():
        src = sources(src_dest, sample)
        read = convert.read(src)
        refused = [t for t in read.values() if not writer.holds(t.dtype)]
        out = tmp_path / f"{sample}{writer.suffix or '.out'}"
        what = f"{src_dest} -> {dst}, {sample}"
        exclude = ()
        try:
            summary = _convert(src, out, dst)
            assert not refused, f"{what}: {[t.name for t in refused]} were written although {dst} cannot hold them"
        except WriteError as e:
            message = _message(e, src, out)
            assert refused, f"{what}: {message}"
            assert "\n" not in message and not out.exists()
            if sample == "every_dtype":
                cannot, error = ", ".join(sorted({t.dtype.name for t in refused})), f"`{message}`"
            else:
                others.append(f"{sample}: `{message}`")
            exclude = [f"^{re.escape(t.name)}$" for t in refused]
            summary = _convert(src, out, dst, exclude)
        expected = {n: t.numpy() for n, t in samples()[sample].items() if n in read and not any(
            re.match(p, n) for p in exclude)}
        assert summary["verified"] or summary.get("checked"), what
        _check_values(out, dst, expected, what)
        if sample == "every_dtype":
            kept = convert.read(out).metadata.get("user.note") == "hello" if "user.note" in read.metadata else None
            noted = [n for n in summary["notes"] if "metadata" in n]
            metadata = ("not in the source" if kept is None else "kept" if kept
                        else f"left out, noted: \"{noted[0]}\"" if noted else "left out silently")
    row = _line([src_dest, dst, cannot or "-", error or "-", "; ".join(others) or "ok", metadata])
    ROWS[(src_dest, dst)] = row
    if not REGENERATE:
        doc = _doc_lines()
        assert (src_dest, dst) in doc, f"docs/matrix.md has no row for {src_dest} -> {dst} (CONVERT_WRITE_MATRIX=1)"
        assert row == doc[(src_dest, dst)]


HEADER = """# What each conversion carries

Generated by `tests/test_matrix.py` (rewrite it with `CONVERT_WRITE_MATRIX=1 pytest tests/test_matrix.py`),
which checks every row: each ordered pair of destinations (a format's writer; `tf-ckpt:v1` is
`tf-ckpt-v1`) over the sample checkpoints of `tests/contract.py` (`every_dtype`: one tensor of each
dtype of the table, with metadata `user.note`; `shapes`: scalars, empty and rank-4 tensors; `names`:
names with `/` and `.`; `non_contiguous`: transposed and strided arrays), each written in the source
format (what it holds of them), converted, and read by the target format's own library.

* **cannot carry**: the dtypes of the source the target cannot hold. The conversion then stops before
  writing anything, with the one line in the next column (`OUT` is the output path); converting again
  with `--exclude` for those tensors (or `--dtype float32` where the line offers it) writes the rest.
* **other samples**: `ok` when scalars, empty tensors, names and strided arrays all arrive intact.
* **metadata**: what becomes of the source's metadata (`user.note`).
"""


def test_write_or_check_matrix_doc():
    """Runs last: with CONVERT_WRITE_MATRIX=1 writes docs/matrix.md from the rows; otherwise checks
    that the doc has exactly one row per pair (each pair's test checks its row)."""
    keys = set(PAIRS)
    if REGENERATE:
        assert set(ROWS) == keys, f"run every pair to regenerate ({len(keys - set(ROWS))} missing)"
        body = [_line(COLUMNS), "|" + "---|" * len(COLUMNS)] + [ROWS[k] for k in PAIRS]
        DOC.write_text(HEADER + "\n" + "\n".join(body) + "\n", "utf-8")
    assert set(_doc_lines()) == keys
