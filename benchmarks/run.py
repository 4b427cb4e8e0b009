"""`make bench`: run every benchmarks/bench_*.py in turn (each prints its own table).

Extra arguments are passed to every script, e.g. `python benchmarks/run.py --size-mb 256`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":
    failed = 0
    for script in sorted(Path(__file__).parent.glob("bench_*.py")):
        print(f"== {script.name}", flush=True)
        failed |= subprocess.run([sys.executable, str(script), *sys.argv[1:]]).returncode != 0
        print(flush=True)
    sys.exit(1 if failed else 0)
