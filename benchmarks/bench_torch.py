"""Read + write a ~1 GB PyTorch state_dict: convert's torch adapter against torch.load/torch.save.

Usage: python benchmarks/bench_torch.py [--size-mb 1024] [--repeat 3] [--dir DIR]

Each run starts from a file torch.save wrote (64 float32 tensors plus a few small ones)
and produces a new ``.pt``:

* ours:  convert.formats.torch.read + write (lazy reads, storages streamed one by one)
* torch: torch.load(weights_only=True) + torch.save
* torch mmap: torch.load(weights_only=True, mmap=True) + torch.save

Each is run in a fresh subprocess (so import cost and peak RSS are per run); the
table gives the median wall time and the median peak RSS. The page cache is warm
for every contender (the input is read once before timing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUNNERS = {
    "ours": """
from convert.formats import torch as pt
pt.write(pt.read(SRC), DST)
""",
    "torch": """
import torch
torch.save(torch.load(SRC, weights_only=True), DST)
""",
    "torch mmap": """
import torch
torch.save(torch.load(SRC, weights_only=True, mmap=True), DST)
""",
}

TIMED = """
import json, resource, sys, time
SRC, DST = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
{body}
elapsed = time.perf_counter() - t0
print(json.dumps({{"seconds": elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def make_input(path: Path, size_mb: int) -> None:
    import torch

    n_big = 64
    per = size_mb * (1 << 20) // n_big // 4
    sd = {f"layer{i}.weight": torch.randn(per // 1024, 1024) for i in range(n_big)}
    sd.update({f"layer{i}.bias": torch.randn(1024) for i in range(n_big)})
    sd["embed.weight"] = sd["layer0.weight"]  # one tied pair
    torch.save(sd, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src = Path(tmp) / "input.pt"
        # in a child process: Linux passes a parent's peak RSS on to its children
        subprocess.run([sys.executable, "-c", f"import bench_torch; bench_torch.make_input(__import__('pathlib').Path({str(src)!r}), {args.size_mb})"],
                       check=True, cwd=Path(__file__).parent)
        with open(src, "rb") as f:  # warm the page cache
            while f.read(64 << 20):
                pass
        size = src.stat().st_size
        print(f"input: {src.stat().st_size / 1e9:.2f} GB, {args.repeat} runs each, median shown")
        print(f"{'contender':<12} {'seconds':>8} {'GB/s':>6} {'peak RSS MB':>12}")
        for name, body in RUNNERS.items():
            secs, rss = [], []
            for i in range(args.repeat):
                dst = Path(tmp) / f"out-{i}.pt"
                out = subprocess.run([sys.executable, "-c", TIMED.format(body=body), str(src), str(dst)],
                                     capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
                if out.returncode:
                    raise SystemExit(f"{name} failed:\n{out.stderr}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                secs.append(r["seconds"])
                rss.append(r["peak_rss_mb"])
                dst.unlink()
            med = statistics.median(secs)
            print(f"{name:<12} {med:>8.2f} {size / med / 1e9:>6.2f} {statistics.median(rss):>12.0f}")


if __name__ == "__main__":
    main()
