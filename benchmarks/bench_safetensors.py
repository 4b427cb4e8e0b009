"""Convert a ~1 GB safetensors file: convert (streaming, byte copies) against the safetensors library and cp.

Usage: python benchmarks/bench_safetensors.py [--size-mb 1024] [--repeat 3] [--dir DIR]

Contenders, each in a fresh subprocess (import cost and peak RSS per run, page cache warm):

* cp:               copying the file (the floor for any conversion that writes every byte)
* ours:             convert.convert(src, dst, to="safetensors") with verification (reads the output back)
* ours --no-verify: the same without verification
* ours sharded:     into a Hugging Face folder of 256 MB shards
* library:          safetensors.numpy.load_file + save_file (whole checkpoint in memory)

The table gives median wall seconds and median peak RSS (MB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUNNERS = {
    "cp": None,
    "ours": "import convert; convert.convert(SRC, DST, to='safetensors')",
    "ours --no-verify": "import convert; convert.convert(SRC, DST, to='safetensors', verify=False)",
    "ours sharded": "import convert; convert.convert(SRC, DST, to='safetensors', write_opts={'max_shard_size': '256MB'})",
    "library": "from safetensors.numpy import load_file, save_file; save_file(load_file(SRC), DST)",
}

TIMED = """
import json, resource, sys, time
SRC, DST = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
{body}
print(json.dumps({{"seconds": time.perf_counter() - t0,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def make_input(path: Path, size_mb: int) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    n = 64
    per = size_mb * (1 << 20) // n // 4
    rng = np.random.default_rng(0)
    save_file({f"layer{i}/weight": rng.standard_normal(per, dtype=np.float32) for i in range(n)}, str(path))


def run_once(name: str, src: Path, dst: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True) if dst.is_dir() else dst.unlink(missing_ok=True)
    if RUNNERS[name] is None:
        res = subprocess.run(["/usr/bin/time", "-f", "%e %M", "cp", str(src), str(dst)],
                             capture_output=True, text=True, check=True)
        seconds, rss_kb = res.stderr.split()[-2:]
        return {"seconds": float(seconds), "rss_mb": int(rss_kb) / 1024}
    code = TIMED.format(body=RUNNERS[name])
    res = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--make-input", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_input:
        make_input(args.make_input, args.size_mb)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src, dst = Path(tmp) / "in.safetensors", Path(tmp) / "out.safetensors"
        # Both in child processes: Linux carries a parent's peak RSS into the children it forks,
        # so the parent must never hold the data itself.
        subprocess.run([sys.executable, __file__, "--make-input", str(src), "--size-mb", str(args.size_mb)],
                       check=True, cwd=ROOT)
        subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        print(f"safetensors, {src.stat().st_size / 1e6:.0f} MB, 64 tensors, median of {args.repeat}")
        print(f"{'contender':<18} {'seconds':>8} {'peak RSS MB':>12}")
        for name in RUNNERS:
            runs = [run_once(name, src, dst) for _ in range(args.repeat)]
            print(f"{name:<18} {statistics.median(r['seconds'] for r in runs):>8.2f} "
                  f"{statistics.median(r['rss_mb'] for r in runs):>12.0f}")


if __name__ == "__main__":
    main()
