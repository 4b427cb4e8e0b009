"""Fuzzing every parser with hypothesis: damaged copies of real files, read in full.

Each target takes seed files (written by TensorFlow, torch, onnx, Keras, NumPy and the safetensors
library, plus corpus files by other people's tools: each format's test file declares its targets and
seeds on its contract, tests/contract.py), applies 1-4 drawn mutations
(:func:`fuzzing.mutate`: bit flips, edge-value bytes, interesting integers and varints over
fields, inserts, deletes, truncation, filled runs, copies and splices from other seeds) and reads
the result in full (:func:`fuzzing.exercise`: every ``detect``, the reader, every tensor's data).
Targets whose files are guarded by checksums also get their contents damaged behind valid checksums
(table entries re-encoded, ``data.pkl`` re-zipped), so that the protobuf, bundle and pickle parsers
are reached. Any exception other than a ConvertError, a ConvertError that is not one line naming
the file, a read over 10 s or a traced allocation over the limit fails the example, and hypothesis
shrinks it to a minimal reproduction.

The normal run is deterministic (``derandomize``) with :data:`EXAMPLES` examples per target;
``CONVERT_FUZZ_EXAMPLES=20000`` (``make fuzz``) runs that many, randomly, per target, and the
counts and times are printed at the end of the module (``-s`` not needed).
"""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path

import fuzzing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import contract

LONG_RUN = "CONVERT_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("CONVERT_FUZZ_EXAMPLES", "500"))

# target: (seed names, how to damage them), declared by the formats' contracts (``FormatContract.FUZZ``)
#   raw      any of the seed's files, byte mutations
#   entries  a LevelDB table's entries mutated and the table rebuilt with valid checksums
#   pickle   the torch zip's data.pkl mutated and the zip rebuilt with valid CRCs
TARGETS = {k: v for c in contract.declared() for k, v in c.FUZZ.items()}
MAX_BYTES = {"onnx": 320 << 20}  # a sparse tensor may legitimately densify to 256 MiB (onnx._SPARSE_FLOOR)
DEFAULT_MAX_BYTES = 64 << 20

STATS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
TIMES: dict[str, float] = collections.defaultdict(float)  # reading (with tracemalloc on)
WALL: dict[str, float] = collections.defaultdict(float)  # reading, drawing, mutating, hypothesis


class _Summary:
    """A pytest plugin, registered by the fixture below, printing the counts in the terminal summary."""

    @staticmethod
    def pytest_terminal_summary(terminalreporter):
        if not STATS:
            return
        tr = terminalreporter
        tr.section(f"fuzz: {'random' if LONG_RUN else 'derandomized'}, {EXAMPLES} examples per target")
        for target, counts in STATS.items():
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "inputs")
            tr.write_line(f"{target:22s} {counts['inputs']:6d} inputs, reading {TIMES[target]:6.1f} s, "
                          f"in all {WALL[target]:6.1f} s  ({outcomes})")
        tr.write_line(f"{'total':22s} {sum(c['inputs'] for c in STATS.values()):6d} inputs, reading "
                      f"{sum(TIMES.values()):6.1f} s, in all {sum(WALL.values()):6.1f} s")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, request):
    if not request.config.pluginmanager.has_plugin("convert-fuzz-summary"):
        request.config.pluginmanager.register(_Summary(), "convert-fuzz-summary")
    return {s.name: s for s in fuzzing.session_seeds(tmp_path_factory)}


class Workbench:
    """For one target: a working copy of each seed, the files to damage, and a pool of other seeds'
    bytes to splice from."""

    def __init__(self, target: str, seeds: dict, tmp: Path):
        names, self.mode = TARGETS[target]
        self.seeds = [seeds[n] for n in names if n in seeds]
        if not self.seeds:
            pytest.skip(f"no seed for {target}")
        self.copies = {s.name: fuzzing.clone(s, tmp / s.name) for s in self.seeds}
        self.pool = [(s.root / f).read_bytes() for s in seeds.values() for f in s.files
                     if (s.root / f).stat().st_size <= 1 << 16]
        self.tables = {}
        if self.mode == "entries":
            for s in self.seeds:
                self.tables[s.name] = [(f, fuzzing.table_entries(s.root / f)) for f in s.files
                                       if (s.root / f).read_bytes().endswith(fuzzing.TABLE_MAGIC)]
        if self.mode == "pickle":
            self.records = {s.name: fuzzing.zip_records(s.path) for s in self.seeds}

    def damaged(self, draw) -> tuple:
        """(seed, file, damaged bytes), drawn."""
        seed = draw(st.sampled_from(self.seeds), label="seed")
        if self.mode == "entries":
            file, entries = draw(st.sampled_from(self.tables[seed.name]), label="file")
            return seed, file, fuzzing.mutate_table(draw, entries, self.pool)
        if self.mode == "pickle":
            records = list(self.records[seed.name])
            i = next(i for i, (name, _) in enumerate(records) if name.endswith("/data.pkl"))
            records[i] = (records[i][0], fuzzing.mutate(draw, records[i][1], self.pool))
            return seed, seed.target, fuzzing.rezip(records)
        file = draw(st.sampled_from(seed.files), label="file")
        return seed, file, fuzzing.mutate(draw, (seed.root / file).read_bytes(), self.pool)

    def read(self, target: str, seed, file: str, data: bytes) -> None:
        copy = self.copies[seed.name]
        folder = copy.parent if seed.target != "." else copy
        fuzzing.replace_file(folder / file, data)
        started = time.perf_counter()
        try:
            err = fuzzing.run_guarded(lambda: fuzzing.exercise(copy, seed.format),
                              max_bytes=MAX_BYTES.get(target, DEFAULT_MAX_BYTES))
            if err is not None:
                fuzzing.one_line_naming(err, folder)
        finally:
            TIMES[target] += time.perf_counter() - started
            fuzzing.replace_file(folder / file, (seed.root / file).read_bytes())
        STATS[target]["inputs"] += 1
        STATS[target]["read" if err is None else type(err).__name__] += 1


def _fuzz_settings():
    return settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG_RUN, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz(target, seeds, tmp_path_factory):
    started = time.perf_counter()
    bench = Workbench(target, seeds, tmp_path_factory.mktemp(f"fuzz-{target}"))

    @_fuzz_settings()
    @given(st.data())
    def run(data):
        seed, file, damaged = bench.damaged(data.draw)
        bench.read(target, seed, file, damaged)

    try:
        run()
    finally:
        WALL[target] += time.perf_counter() - started
