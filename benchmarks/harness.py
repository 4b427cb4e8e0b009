"""What the benchmarks share: timing a contender in a fresh process, and the results table.

Each contender runs in its own subprocess, so import cost and peak RSS are its own; the
input is made in a child process too (Linux passes a parent's peak RSS on to the children
it forks, so the parent must never hold the data) and read once before timing (warm cache).
A contender is a snippet of Python using SRC and DST, or None for ``cp`` of ``cp_source``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TIMED = """
import json, resource, sys, time
SRC, DST = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
{body}
print(json.dumps({{"seconds": time.perf_counter() - t0,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def run_once(body: str | None, src: Path, dst: Path, cp_source: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True) if dst.is_dir() else dst.unlink(missing_ok=True)
    if body is None:
        res = subprocess.run(["/usr/bin/time", "-f", "%e %M", "cp", str(cp_source), str(dst)],
                             capture_output=True, text=True, check=True)
        seconds, rss_kb = res.stderr.split()[-2:]
        return {"seconds": float(seconds), "rss_mb": int(rss_kb) / 1024}
    res = subprocess.run([sys.executable, "-c", TIMED.format(body=body), str(src), str(dst)],
                         capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"contender failed:\n{body}\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(script: str, title: str, make_input: Callable[[Path, int], None], runners: dict[str, str | None],
         src_name: str, dst_name: str, data_file: Callable[[Path], Path] = lambda src: src) -> None:
    """Parse ``--size-mb --repeat --dir``, make the input, time every runner, print the table."""
    ap = argparse.ArgumentParser(description=title)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--make-input", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_input:
        make_input(args.make_input, args.size_mb)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src, dst = Path(tmp) / src_name, Path(tmp) / dst_name
        subprocess.run([sys.executable, script, "--make-input", str(src), "--size-mb", str(args.size_mb)],
                       check=True, cwd=ROOT)
        data = data_file(src)
        subprocess.run(["cat", str(data)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        size = data.stat().st_size
        print(f"{title}: {size / 1e6:.0f} MB, median of {args.repeat}")
        print(f"{'contender':<20} {'seconds':>8} {'GB/s':>6} {'peak RSS MB':>12}")
        for name, body in runners.items():
            runs = [run_once(body, src, dst, data) for _ in range(args.repeat)]
            seconds = statistics.median(r["seconds"] for r in runs)
            print(f"{name:<20} {seconds:>8.2f} {size / seconds / 1e9:>6.2f} "
                  f"{statistics.median(r['rss_mb'] for r in runs):>12.0f}", flush=True)
