"""Convert a ~1 GB V2 checkpoint written by TensorFlow to safetensors: ours against TF and cp.

Usage: python benchmarks/bench_tf_checkpoint.py [--size-mb 1024] [--repeat 3] [--dir DIR]

Contenders, each in a fresh subprocess (import cost and peak RSS included, page cache warm):

* cp:                 copying the checkpoint's data file (the floor for any conversion)
* ours read:          our reader streaming every tensor's bytes, crc32c checked (no output)
* ours:               convert.convert(dir, to="safetensors"), with verification (reads the output back)
* ours --no-verify:   the same without verification
* tf read:            tf.train.load_checkpoint + get_tensor for every tensor (no output)
* tf -> safetensors:  the framework-based script: get_tensor loop, then safetensors.numpy.save_file

The input is 16 float32 variables written by TensorFlow's SaveV2 into a temporary folder.
The table gives median wall seconds and median peak RSS (MB). Not run by the tests.
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
    "ours read": ("from convert.formats import tf_checkpoint\n"
                  "for t in tf_checkpoint.read(SRC).values():\n"
                  "    for _ in t.chunks(): pass"),
    "ours": "import convert; convert.convert(SRC, DST, to='safetensors')",
    "ours --no-verify": "import convert; convert.convert(SRC, DST, to='safetensors', verify=False)",
    "tf read": ("import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\n"
                "import tensorflow as tf\n"
                "r = tf.train.load_checkpoint(tf.train.latest_checkpoint(SRC))\n"
                "for k in r.get_variable_to_shape_map(): r.get_tensor(k)"),
    "tf -> safetensors": ("import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\n"
                          "import numpy as np, tensorflow as tf\n"
                          "from safetensors.numpy import save_file\n"
                          "r = tf.train.load_checkpoint(tf.train.latest_checkpoint(SRC))\n"
                          "save_file({k: np.ascontiguousarray(r.get_tensor(k)) "
                          "for k in r.get_variable_to_shape_map()}, DST)"),
}

TIMED = """
import json, resource, sys, time
SRC, DST = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
{body}
print(json.dumps({{"seconds": time.perf_counter() - t0,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

N_TENSORS = 16
PREFIX = "model.ckpt-1"


def make_input(d: Path, size_mb: int) -> None:
    """16 float32 variables totalling ~size_mb, saved by TF's SaveV2, plus a 'checkpoint' file."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    rows = max(1, size_mb * (1 << 20) // 4 // N_TENSORS // 1024)
    rng = np.random.default_rng(0)
    names = [f"layer_{i:02d}/kernel" for i in range(N_TENSORS)]
    d.mkdir(parents=True, exist_ok=True)
    tensors = [tf.constant(rng.standard_normal((rows, 1024), dtype=np.float32)) for _ in names]
    tf.raw_ops.SaveV2(prefix=str(d / PREFIX), tensor_names=names, shape_and_slices=[""] * N_TENSORS,
                      tensors=tensors)
    (d / "checkpoint").write_text(f'model_checkpoint_path: "{PREFIX}"\n')


def run_once(name: str, src: Path, dst: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True) if dst.is_dir() else dst.unlink(missing_ok=True)
    if RUNNERS[name] is None:
        data = src / f"{PREFIX}.data-00000-of-00001"
        res = subprocess.run(["/usr/bin/time", "-f", "%e %M", "cp", str(data), str(dst)],
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
        src, dst = Path(tmp) / "ckpt", Path(tmp) / "out.safetensors"
        # In a child process: the parent must not hold the data (children inherit its peak RSS).
        subprocess.run([sys.executable, __file__, "--make-input", str(src), "--size-mb", str(args.size_mb)],
                       check=True, cwd=ROOT)
        data = src / f"{PREFIX}.data-00000-of-00001"
        subprocess.run(["cat", str(data)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        print(f"TF V2 checkpoint, {data.stat().st_size / 1e6:.0f} MB, {N_TENSORS} tensors, median of {args.repeat}")
        print(f"{'contender':<18} {'seconds':>8} {'peak RSS MB':>12}")
        for name in RUNNERS:
            runs = [run_once(name, src, dst) for _ in range(args.repeat)]
            print(f"{name:<18} {statistics.median(r['seconds'] for r in runs):>8.2f} "
                  f"{statistics.median(r['rss_mb'] for r in runs):>12.0f}", flush=True)


if __name__ == "__main__":
    main()
