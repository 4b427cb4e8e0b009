"""Regression inputs of the coverage-guided fuzzer (tests/fuzz_coverage.py), replayed.

Every file under tests/data/fuzz/TARGET/ is an input the fuzzer kept because it reached code no
other input reached (minimized with libFuzzer's ``-merge=1``); each is read again through the same
target, under the same guards: a one-line ConvertError naming the file, or a clean read; never
another exception, a hang or a runaway allocation. Atheris is not needed to replay them.
"""

from __future__ import annotations

from pathlib import Path

import fuzz_coverage
import pytest

CASES = sorted(p for p in fuzz_coverage.DATA.glob("*/*") if p.parent.name in fuzz_coverage.TARGETS)


def test_every_target_has_a_corpus():
    assert {p.parent.name for p in CASES} == set(fuzz_coverage.TARGETS)


@pytest.mark.parametrize("case", CASES, ids=lambda p: f"{p.parent.name}/{p.name[:12]}")
def test_fuzzer_input_reads_or_fails_cleanly(case: Path, tmp_path):
    fuzz_coverage.check(case.parent.name, case.read_bytes(), tmp_path)
