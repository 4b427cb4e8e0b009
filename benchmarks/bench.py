"""`make bench`: convert's speed and memory against `cp` of the same bytes and against the script
a user would otherwise write with the frameworks, on a ~2 GB checkpoint of ~200 float32 tensors.

Usage: python benchmarks/bench.py [--size-mb 2048] [--repeat 5] [--dir DIR] [--json PATH]
                                  [--only NAME ...] [--curve 512,1024,2048,4096]
                                  [--batch-runs 200] [--hf-gb 1,16]

Every contender is a command run in a fresh process (import cost included); its wall time is
measured around the process and its peak RSS is the child's ru_maxrss. ``cp`` is the floor of
any conversion; ``cp+fsync`` is the same copy made durable, as convert's outputs are (written,
verified, fsynced, then renamed into place); ``--no-verify`` is convert without reading its
output back, to show what verification costs. The inputs are made first,
in a child process, with TensorFlow / PyTorch / the safetensors library as writers when installed
(otherwise with convert's own writers, and the framework contenders are skipped), and read once
so every contender starts from a warm page cache. Repetitions are interleaved: each round runs
every contender of a scenario once, so a slow moment of the machine hits all of them alike.
The table gives medians; ``--json`` (default benchmarks/results/latest.json) keeps every run.

The remote scenarios (``--remote-mb``, needs moto and s3fs) start a local S3 server (moto's, on
127.0.0.1, in a process of its own) and time S3 -> S3 conversions of a safetensors object against a plain
s3fs copy of the same bytes through the client (``fs.open`` read in 16 MiB pieces, written as a
multipart upload of 64 MiB parts: what any S3 -> S3 tool must at least do) and against a
server-side ``fs.copy`` (no byte leaves the server: no conversion can reach it), in MB/s of the
input. convert also reads its output back remotely to verify it (``--no-verify`` shows the cost).

Two scenarios run only when asked. ``--batch-runs N`` (``--only batch``): N small TF checkpoints
-> safetensors with ``convert batch`` on 1 and 2 local workers and on a 2-CPU Ray cluster that
the bench starts on 127.0.0.1 (in a process of its own) and stops, against a shell loop running
``convert`` once per checkpoint; in jobs per second. ``--hf-gb 1,16`` (``--only hf``): a Hugging
Face style model of 4 bf16 safetensors shards (Llama-3-8B's tensors at 16 GB, the same 291
tensors narrower at smaller sizes) -> torch shards (``convert batch`` over the shards) and ->
tf-ckpt (``--split shards``, 1 worker and ``--worker 0/2`` + ``1/2``), against the durable floor
and the scripts a user would otherwise write; every output is removed after its run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CONVERT = [PY, "-m", "convert"]
FRAMEWORKS = ("tensorflow", "torch", "onnx", "onnxruntime", "tf2onnx", "safetensors")
N_TENSORS = 200


# ---- inputs (made in a child process: the driver never holds tensor data) -------------------------

def tensor_sizes(total_bytes: int, n: int = N_TENSORS) -> list[tuple[int, int]]:
    """``n`` float32 shapes (rows, 1024) of mixed sizes summing to about ``total_bytes``: a few big
    embedding-like tensors, many mid-sized kernels and a tail of small ones, as real models have."""
    weights = [8.0 if i % 50 == 0 else 1.0 if i % 5 else 0.05 for i in range(n)]
    scale = total_bytes / 4096 / sum(weights)
    return [(max(1, round(w * scale)), 1024) for w in weights]


def arrays(total_bytes: int, n: int = N_TENSORS):
    import numpy as np

    rng = np.random.default_rng(0)
    for i, shape in enumerate(tensor_sizes(total_bytes, n)):
        yield f"block_{i:03d}/kernel", rng.standard_normal(shape, dtype=np.float32)


def have(module: str) -> bool:
    import importlib.util

    return sys.modules.get(module, True) is not None and importlib.util.find_spec(module) is not None


def make(kind: str, out: Path, size_mb: int) -> None:
    """Write input ``kind`` at ``out``: v2 (folder), v1 (file), st (file), pt (file)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    total = size_mb << 20
    if kind in ("v2", "v1") and have("tensorflow"):
        import tensorflow as tf

        names, tensors = zip(*((n, tf.constant(a)) for n, a in arrays(total)), strict=True)
        if kind == "v2":
            out.mkdir(parents=True)
            tf.raw_ops.SaveV2(prefix=str(out / "model.ckpt-1"), tensor_names=list(names),
                              shape_and_slices=[""] * len(names), tensors=list(tensors))
            (out / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-1"\n')
        else:
            tf.raw_ops.Save(filename=str(out), tensor_names=list(names), data=list(tensors))
    elif kind == "st" and have("safetensors"):
        from safetensors.numpy import save_file

        save_file(dict(arrays(total)), str(out))
    elif kind == "pt" and have("torch"):
        import torch

        torch.save({n: torch.from_numpy(a) for n, a in arrays(total)}, str(out))
    else:  # convert's own writers, streaming one tensor at a time
        import convert
        from convert.ir import ArraySource, Tensor, TensorDict

        fmt = {"v2": "tf-ckpt", "v1": "tf-ckpt-v1", "st": "safetensors", "pt": "torch"}[kind]
        import numpy as np

        def lazy(i: int, shape: tuple[int, int]) -> Tensor:
            produce = lambda: np.random.default_rng(i).standard_normal(shape, dtype=np.float32)  # noqa: E731
            return Tensor(f"block_{i:03d}/kernel", convert.dtypes.by_name("float32"), shape, ArraySource(produce))
        td = TensorDict(lazy(i, s) for i, s in enumerate(tensor_sizes(total)))
        convert.write(td, out, fmt, verify=False)


def many_arrays(n: int):
    """``n`` small float32 tensors named as a TF1 Saver names them (``layer123/sub4/w``): two of
    three 800-vectors, one of three 20x40 kernels, 3.2 KB each."""
    import numpy as np

    for i in range(n):
        shape = (800,) if i % 3 else (20, 40)
        yield f"layer{i // 12}/sub{i % 12 // 3}/{'wbm'[i % 3]}", np.full(shape, i % 1000, np.float32)


def make_many(kind: str, out: Path, n: int) -> None:
    """Write the ``n``-tensor input ``kind`` (v2n, stn, ptn). V2: convert's own writer, whose bytes
    are TF's (tests/test_tf_checkpoint.py checks that) -- a TF Saver takes minutes for 50,000 variables."""
    if kind == "stn" and have("safetensors"):
        from safetensors.numpy import save_file

        save_file(dict(many_arrays(n)), str(out))
    elif kind == "ptn" and have("torch"):
        import torch

        torch.save({k: torch.from_numpy(a) for k, a in many_arrays(n)}, str(out))
    else:
        import convert
        from convert.ir import Tensor, TensorDict

        fmt = {"v2n": "tf-ckpt", "stn": "safetensors", "ptn": "torch"}[kind]
        convert.write(TensorDict(Tensor.from_array(k, a) for k, a in many_arrays(n)), out, fmt, verify=False)
        if kind == "v2n":
            (out / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')


def data_file(kind: str, path: Path) -> Path:
    return next(path.glob("*.data-*")) if kind in ("v2", "v2n") else path


# ---- contenders --------------------------------------------------------------------------------

TF = "import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\nimport numpy as np, tensorflow as tf\n"
TF_READ = ("r = tf.train.load_checkpoint({src!r})\n"
           "arrays = {{k: r.get_tensor(k) for k in r.get_variable_to_shape_map()}}\n")
TF_SAVE = ("names = sorted(arrays)\n"
           "tf.raw_ops.SaveV2(prefix=os.path.join({dst!r}, 'model.ckpt'), tensor_names=names,\n"
           "                  shape_and_slices=[''] * len(names), tensors=[tf.constant(arrays[n]) for n in names])\n")


@dataclass
class Scenario:
    name: str
    src: str                 # input kind: v2, v1, st, pt; v2n, stn, ptn: the --many-tensor inputs
    ours: list[str]          # convert arguments; {src} and {dst} are filled in
    framework: str | None    # Python snippet of the script a user would write; {src}, {dst}
    needs: tuple[str, ...]   # modules the framework script imports
    dst: str                 # output name
    targets: dict = field(default_factory=dict)  # x_durable (at most), rss_mb (under), x_framework (at least)
    peers: dict = field(default_factory=dict)    # other tools a user would pick: name -> (snippet, needs)


# the scripts a user would write instead, shared by the 2 GB and the many-tensor scenarios
V2_TO_ST = (TF + TF_READ.replace("{src!r}", "tf.train.latest_checkpoint({src!r})")
            + "from safetensors.numpy import save_file\nsave_file(arrays, {dst!r})\n")
PT_TO_ST = ("import torch\nfrom safetensors.torch import save_file\n"
            "save_file(torch.load({src!r}, weights_only=True), {dst!r})\n")
ST_TO_PT = "import torch\nfrom safetensors.torch import load_file\ntorch.save(load_file({src!r}), {dst!r})\n"
LIST_VARIABLES = TF + "for name, shape in tf.train.list_variables({src!r}): print(name, shape)\n"
HUB_SAVE = ("import torch, huggingface_hub, os\nos.mkdir({dst!r})\n"
            "huggingface_hub.save_torch_state_dict(torch.load({src!r}, weights_only=True), {dst!r}, "
            "max_shard_size='100GB')\n")

SCENARIOS = [
    Scenario("tf-ckpt V2 -> safetensors", "v2", ["tf-ckpt", "{src}", "--to", "safetensors", "-o", "{dst}"],
             V2_TO_ST, ("tensorflow", "safetensors"), "out.safetensors", {"x_durable": 1.10, "rss_mb": 100, "x_framework": 5}),
    Scenario("safetensors -> tf-ckpt V2", "st", ["safetensors", "{src}", "--to", "tf-ckpt", "-o", "{dst}"],
             TF + "from safetensors.numpy import load_file\narrays = load_file({src!r})\nos.mkdir({dst!r})\n"
             + TF_SAVE, ("tensorflow", "safetensors"), "out-ckpt", {"x_durable": 1.15, "rss_mb": 100}),
    Scenario("tf-ckpt V1 -> V2", "v1", ["tf-ckpt", "{src}", "--to", "tf-ckpt", "-o", "{dst}"],
             TF + TF_READ + "os.mkdir({dst!r})\n" + TF_SAVE, ("tensorflow",), "out-ckpt", {"x_durable": 1.30}),
    Scenario("torch -> safetensors", "pt", ["torch", "{src}", "--to", "safetensors", "-o", "{dst}"],
             PT_TO_ST, ("torch", "safetensors"), "out.safetensors", {"x_durable": 1.20, "x_framework": 2},
             {"hub": (HUB_SAVE, ("torch", "huggingface_hub"))}),
    Scenario("safetensors -> torch", "st", ["safetensors", "{src}", "--to", "torch", "-o", "{dst}"],
             ST_TO_PT, ("torch", "safetensors"), "out.pt", {"x_durable": 1.20, "x_framework": 2}),
    Scenario("inspect (cold start)", "v2", ["inspect", "{src}", "--json"],
             LIST_VARIABLES, ("tensorflow",), "", {"seconds": 0.3}),
    # --many small tensors (TF1 Saver style): per-tensor costs
    Scenario("many: tf-ckpt V2 -> safetensors", "v2n", ["tf-ckpt", "{src}", "--to", "safetensors", "-o", "{dst}"],
             V2_TO_ST, ("tensorflow", "safetensors"), "out.safetensors", {"x_durable": 3.0, "rss_mb": 150, "x_framework": 15}),
    Scenario("many: safetensors -> tf-ckpt V2", "stn", ["safetensors", "{src}", "--to", "tf-ckpt", "-o", "{dst}"],
             None, (), "out-ckpt", {"x_durable": 6.0, "rss_mb": 150}),
    Scenario("many: tf-ckpt V2 -> V1", "v2n", ["tf-ckpt", "{src}", "--to", "tf-ckpt-v1", "-o", "{dst}"],
             None, (), "out.ckpt", {"x_durable": 6.0, "rss_mb": 150}),
    Scenario("many: tf-ckpt V2 -> torch", "v2n", ["tf-ckpt", "{src}", "--to", "torch", "-o", "{dst}"],
             None, (), "out.pt", {"x_durable": 6.0, "rss_mb": 150}),
    Scenario("many: torch -> safetensors", "ptn", ["torch", "{src}", "--to", "safetensors", "-o", "{dst}"],
             PT_TO_ST, ("torch", "safetensors"), "out.safetensors", {"x_durable": 6.0, "rss_mb": 150},
             {"hub": (HUB_SAVE, ("torch", "huggingface_hub"))}),
    Scenario("many: safetensors -> torch", "stn", ["safetensors", "{src}", "--to", "torch", "-o", "{dst}"],
             ST_TO_PT, ("torch", "safetensors"), "out.pt", {"x_durable": 6.0, "rss_mb": 150}),
    Scenario("many: inspect", "v2n", ["inspect", "{src}", "--json"],
             LIST_VARIABLES, ("tensorflow",), "", {"seconds": 0.5, "rss_mb": 150}),
]


def run(cmd: list[str], dst: Path | None, cwd: Path = ROOT, env: dict | None = None) -> dict:
    """Run ``cmd`` in a fresh process; its wall seconds and peak RSS (MB)."""
    if dst is not None:
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink(missing_ok=True)
    os.sync()  # every contender starts with no dirty pages of the one before waiting to be written
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    return {"seconds": seconds, "rss_mb": usage.ru_maxrss / 1024}


def contenders(sc: Scenario, src: Path, dst: Path, also: dict[str, Path]) -> dict[str, list[str] | None]:
    fill = lambda a: a.format(src=str(src), dst=str(dst))  # noqa: E731
    data = str(data_file(sc.src, src))
    out = {"cp": ["cp", data, str(dst)] if sc.dst else None,
           # the durable floor: the copy, then its data and its folder entry on disk, as convert's outputs are
           "cp+sync": ["sh", "-c", 'cp "$0" "$1" && sync "$1" "$2"', data, str(dst), str(dst.parent)] if sc.dst else None,
           "convert": [*CONVERT, *map(fill, sc.ours), *(["-q"] if sc.dst else [])],
           "--no-verify": [*CONVERT, *map(fill, sc.ours), "-q", "--no-verify"] if sc.dst else None,
           "framework": None}
    for label in also:  # another tree's convert (an earlier commit) on the same inputs, in the same rounds
        out[f"@{label}"] = [*CONVERT, *map(fill, sc.ours), *(["-q"] if sc.dst else [])]
    if sc.framework and all(have(m) for m in sc.needs):
        out["framework"] = [PY, "-c", sc.framework.format(src=str(src), dst=str(dst))]
    for name, (snippet, needs) in sc.peers.items():
        if all(have(m) for m in needs):
            out[name] = [PY, "-c", snippet.format(src=str(src), dst=str(dst))]
    return out


def judge(sc: Scenario, row: dict) -> list[str]:
    """Each target of the scenario, met or missed, in words (on the medians and, after the slash, the fastest runs)."""
    t, verdicts = sc.targets, []
    ok = lambda good: "ok" if good else "MISSED"  # noqa: E731
    if "x_durable" in t and row.get("x_durable") is not None:
        verdicts.append(f"{ok(row['x_durable'] <= t['x_durable'])}/{ok(row['x_durable_min'] <= t['x_durable'])}: "
                        f"<= {t['x_durable']}x cp+sync")
    if "rss_mb" in t:
        verdicts.append(f"{ok(row['rss_mb'] < t['rss_mb'])}: RSS < {t['rss_mb']} MB")
    if "x_framework" in t and row.get("x_framework") is not None:
        verdicts.append(f"{ok(row['x_framework'] >= t['x_framework'])}: >= {t['x_framework']}x faster than the framework")
    if "seconds" in t:
        verdicts.append(f"{ok(row['seconds'] < t['seconds'])}/{ok(row['min'] < t['seconds'])}: < {t['seconds']} s")
    return verdicts


def frameworks_imported_by_inspect(src: Path) -> list[str]:
    code = ("import sys, contextlib, io\nfrom convert.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['inspect', sys.argv[1]])\n"
            f"print(','.join(m for m in {FRAMEWORKS!r} if m in sys.modules))")
    res = subprocess.run([PY, "-c", code, str(src)], capture_output=True, text=True, cwd=ROOT, check=True)
    return [m for m in res.stdout.strip().split(",") if m]


def memory_curve(tmp: Path, sizes_mb: list[int]) -> list[dict]:
    """Peak RSS of tf-ckpt V2 -> safetensors as the checkpoint grows (inputs by convert's own writer)."""
    points = []
    for mb in sizes_mb:
        src, dst = tmp / f"curve-{mb}", tmp / f"curve-{mb}.safetensors"
        subprocess.run([PY, __file__, "--make", "v2-own", str(src), "--size-mb", str(mb)], check=True, cwd=ROOT)
        subprocess.run(["cat", str(data_file("v2", src))], stdout=subprocess.DEVNULL, check=True)
        r = run([*CONVERT, "tf-ckpt", str(src), "--to", "safetensors", "-o", str(dst), "-q"], dst)
        points.append({"size_mb": mb, "seconds": round(r["seconds"], 3), "rss_mb": round(r["rss_mb"], 1)})
        print(f"  {mb:>6} MB  {r['seconds']:6.2f} s  peak RSS {r['rss_mb']:6.1f} MB", flush=True)
        shutil.rmtree(src)
        dst.unlink()
    return points


def tensor_curve(tmp: Path, counts: list[int]) -> list[dict]:
    """Seconds and peak RSS of tf-ckpt V2 -> safetensors (and of inspect) as the tensor count grows
    (3.2 KB tensors, convert's own writer): the slope is the per-tensor cost."""
    points = []
    for n in counts:
        src, dst = tmp / f"tcurve-{n}", tmp / f"tcurve-{n}.safetensors"
        subprocess.run([PY, __file__, "--make", "v2n", str(src), "--many", str(n)], check=True, cwd=ROOT)
        subprocess.run(["cat", str(data_file("v2n", src))], stdout=subprocess.DEVNULL, check=True)
        conv = [run([*CONVERT, "tf-ckpt", str(src), "--to", "safetensors", "-o", str(dst), "-q"], dst) for _ in range(3)]
        insp = [run([*CONVERT, "inspect", str(src), "--json"], None) for _ in range(3)]
        c, i = min(conv, key=lambda r: r["seconds"]), min(insp, key=lambda r: r["seconds"])
        points.append({"tensors": n, "seconds": round(c["seconds"], 3), "rss_mb": round(c["rss_mb"], 1),
                       "inspect_seconds": round(i["seconds"], 3), "inspect_rss_mb": round(i["rss_mb"], 1)})
        print(f"  {n:>7} tensors  convert {c['seconds']:6.2f} s  {c['rss_mb']:6.1f} MB   "
              f"inspect {i['seconds']:6.2f} s  {i['rss_mb']:6.1f} MB", flush=True)
        shutil.rmtree(src)
        dst.unlink()
    for a, b in zip(points, points[1:], strict=False):
        b["us_per_tensor"] = round((b["seconds"] - a["seconds"]) / (b["tensors"] - a["tensors"]) * 1e6, 1)
        b["inspect_us_per_tensor"] = round((b["inspect_seconds"] - a["inspect_seconds"])
                                           / (b["tensors"] - a["tensors"]) * 1e6, 1)
    print("  slope (µs per tensor): " + ", ".join(f"{p['tensors']}: convert {p['us_per_tensor']}, inspect "
                                                 f"{p['inspect_us_per_tensor']}" for p in points[1:]))
    return points


REMOTE_SCENARIOS = [("remote: safetensors -> safetensors", "safetensors", "out.safetensors"),
                    ("remote: safetensors -> tf-ckpt V2", "tf-ckpt", "out-ckpt"),
                    ("remote: safetensors -> torch", "torch", "out.pt")]
S3FS = "import json, sys, s3fs\nfs = s3fs.S3FileSystem(**json.loads(sys.argv[1]))\n"
STREAM_COPY = S3FS + ("with fs.open(sys.argv[2], 'rb', block_size=16 << 20) as f, "
                      "fs.open(sys.argv[3], 'wb', block_size=64 << 20) as g:\n"
                      "    while piece := f.read(16 << 20):\n        g.write(piece)\n")
SERVER_COPY = S3FS + "fs.copy(sys.argv[2], sys.argv[3])\n"


def remote_scenarios(tmp: Path, size_mb: int, repeat: int) -> list[dict]:
    """S3 -> S3 on a local moto server: MB/s of convert against s3fs copies of the same bytes."""
    if not (have("moto") and have("s3fs")):
        print("remote scenarios skipped: they need moto and s3fs (pip install 'ckpt-convert[test]')")
        return []
    import socket

    import s3fs

    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # its own process: not a child of a driver holding the objects (a fork's RSS counts in the child's)
    server = subprocess.Popen([PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = []
    try:
        options = {"key": "bench", "secret": "bench-secret", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        for attempt in range(100):  # until the server listens
            try:
                fs.mkdir("bench")
                break
            except Exception:
                if attempt == 99:
                    raise
                time.sleep(0.1)
        local = tmp / "remote.safetensors"
        subprocess.run([PY, __file__, "--make", "st", str(local), "--size-mb", str(size_mb)], check=True, cwd=ROOT)
        # uploaded by a child: the driver stays small (a fork's RSS counts in its children's peak)
        subprocess.run([PY, "-c", S3FS + "fs.put(sys.argv[2], sys.argv[3])\n", json.dumps(options), str(local),
                        "bench/model.safetensors"], check=True)
        nbytes = local.stat().st_size
        local.unlink()
        opts = json.dumps(options)
        src = "s3://bench/model.safetensors"
        print(f"\nremote: S3 -> S3 on a local moto server, {nbytes / 1e6:.0f} MB safetensors input, "
              f"median of {repeat}")
        for name, to, dst_name in REMOTE_SCENARIOS:
            dst = f"s3://bench/{dst_name}"
            conv = [*CONVERT, "safetensors", src, "--to", to, "-o", dst, "-q", "--storage-options", opts]
            cmds = {"s3fs copy (stream)": [PY, "-c", STREAM_COPY, opts, src, "s3://bench/copy.safetensors"],
                    "s3fs copy (server)": [PY, "-c", SERVER_COPY, opts, src, "s3://bench/copy.safetensors"],
                    "convert": conv, "--no-verify": [*conv, "--no-verify"]}
            runs: dict[str, list[dict]] = {k: [] for k in cmds}
            for _ in range(repeat):
                for label, cmd in cmds.items():
                    for stale in (dst, "s3://bench/copy.safetensors"):
                        if fs.exists(stale):
                            fs.rm(stale, recursive=True)
                    fs.invalidate_cache()
                    runs[label].append(run(cmd, None))
            med = {k: {"seconds": statistics.median(r["seconds"] for r in rs),
                       "rss_mb": statistics.median(r["rss_mb"] for r in rs)} for k, rs in runs.items()}
            for label, m in med.items():
                m["mb_per_s"] = nbytes / 1e6 / m["seconds"]
                ratio = m["seconds"] / med["s3fs copy (stream)"]["seconds"]
                print(f"{name if label == 'convert' else '':<36} {label:<20} {m['seconds']:7.2f} s "
                      f"{m['mb_per_s']:7.1f} MB/s  {ratio:5.2f}x stream copy  RSS {m['rss_mb']:6.0f} MB", flush=True)
            out.append({"name": name, "input_bytes": nbytes, "median": med, "runs": runs})
    finally:
        server.terminate()
        server.wait()
    return out


# ---- many conversions: `convert batch` on local workers and on Ray (issue 17) -------------------

def make_runs(root: Path, n: int) -> None:
    """``n`` small training runs, one TF V2 checkpoint each (8 KB of weights, as tests/test_batch.py's
    ``runs``), written by convert's own writer (whose bytes are TF's; no TensorFlow needed)."""
    import numpy as np

    import convert
    from convert.ir import Tensor, TensorDict

    root.mkdir(parents=True)
    for i in range(n):
        rng, run_dir = np.random.default_rng(i), root / f"run{i:03d}"
        td = TensorDict([Tensor.from_array("dense/kernel", rng.standard_normal((32, 64), dtype=np.float32)),
                         Tensor.from_array("dense/bias", rng.standard_normal(64, dtype=np.float32)),
                         Tensor.from_array("global_step", np.array(100 + i, np.int64))])
        convert.write(td, run_dir, "tf-ckpt", verify=False)
        if not (run_dir / "checkpoint").exists():
            (run_dir / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')


# A local Ray cluster of 2 CPUs on this machine, in a process of its own (Ray 2.x binds its GCS to the
# machine's own interface address, not 127.0.0.1, even when asked with _node_ip_address; nothing
# leaves the machine): it prints the GCS address,
# runs until its stdin closes, then shuts the cluster down (every raylet, GCS and worker with it).
RAY_HEAD = ("import sys, ray\n"
            "ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)\n"
            "print(ray.get_runtime_context().gcs_address, flush=True)\n"
            "sys.stdin.read()\nray.shutdown()\n")


class RayCluster:
    """``with RayCluster() as address``: started on this machine, always stopped, never left running."""

    def __enter__(self) -> str:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([PY, "-c", RAY_HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        address = (self.proc.stdout.readline() if self.proc.stdout else "").strip()
        if ":" not in address:
            self.__exit__()
            raise SystemExit(f"the local Ray cluster did not start (address {address!r})")
        self.started_s = time.perf_counter() - t0
        return address

    def __exit__(self, *exc) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait()


def batch_scenario(tmp: Path, n: int, repeat: int) -> dict:
    """``n`` small TF checkpoints -> safetensors: ``convert batch`` with 1 and 2 local workers and on
    a local 2-CPU Ray cluster, against a shell loop running ``convert`` once per checkpoint; jobs/s."""
    runs_dir, out = tmp / "runs", tmp / "batch-out"
    subprocess.run([PY, __file__, "--make", "runs", str(runs_dir), "--batch-runs", str(n)], check=True, cwd=ROOT)
    subprocess.run(["sh", "-c", 'cat "$0"/*/* > /dev/null', str(runs_dir)], check=True)  # warm page cache
    batch = [*CONVERT, "batch", str(runs_dir / "*" / "checkpoint"), "--to", "safetensors",
             "-o", str(out / "{run}.safetensors"), "-q"]
    loop = ["sh", "-c", 'mkdir -p "$1" && for d in "$0"/run*; do "$2" -m convert tf-ckpt "$d" --to safetensors '
            '-o "$1/${d##*/}.safetensors" -q || exit 1; done', str(runs_dir), str(out), PY]
    ray_ok = have("ray")
    cmds = {"batch --workers 1": [*batch, "--workers", "1"], "batch --workers 2": [*batch, "--workers", "2"]}
    if ray_ok:
        cmds["batch --ray (2 CPUs)"] = []  # filled in once the cluster's address is known
    cmds["shell loop"] = loop
    results: dict = {"name": f"batch: {n} tf-ckpt -> safetensors", "jobs": n, "runs": {k: [] for k in cmds}}
    print(f"\nbatch: {n} small TF V2 checkpoints -> safetensors, {repeat} interleaved rounds")
    cluster = RayCluster() if ray_ok else contextlib.nullcontext("")
    with cluster as address:
        if ray_ok:
            cmds["batch --ray (2 CPUs)"] = [*batch, "--ray", address]
            results["ray_start_s"] = round(cluster.started_s, 2)  # type: ignore[union-attr]
            print(f"  local Ray cluster on {address} (2 CPUs), started in {cluster.started_s:.1f} s")  # type: ignore[union-attr]
        env = {**os.environ, "RAY_AUTH_MODE": "token"}  # how a CLI process joins a token-auth cluster (DESIGN.md)
        for _ in range(repeat):
            for name, cmd in cmds.items():
                r = run(cmd, out, env=env)
                made = len(list(out.glob("*.safetensors")))
                if made != n:
                    raise SystemExit(f"{name}: {made} outputs, not {n}")
                results["runs"][name].append(r)
            shutil.rmtree(out)
    shutil.rmtree(runs_dir)
    med = {}
    for name, rs in results["runs"].items():
        secs = [r["seconds"] for r in rs]
        med[name] = {"seconds": statistics.median(secs), "min": min(secs),
                     "jobs_per_s": n / statistics.median(secs), "jobs_per_s_best": n / min(secs),
                     "rss_mb": statistics.median(r["rss_mb"] for r in rs)}
    results["median"] = med
    loop_s = med["shell loop"]["seconds"]
    print(f"  {'contender':<22} {'median s':>9} {'fastest s':>9} {'jobs/s':>8} {'best':>8} {'x loop':>7} {'RSS MB':>7}")
    for name, m in med.items():
        print(f"  {name:<22} {m['seconds']:9.2f} {m['min']:9.2f} {m['jobs_per_s']:8.1f} {m['jobs_per_s_best']:8.1f} "
              f"{loop_s / m['seconds']:6.1f}x {m['rss_mb']:7.0f}", flush=True)
    return results


# ---- a Hugging Face style sharded model, tens of GB (issue 18) ------------------------------------

def llama_shapes(total_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of a Llama-3-8B-shaped model (32 layers, GQA 4:1, MLP 3.5x, vocabulary 31.3x the
    width) whose width is picked so that its bf16 bytes come to about ``total_bytes``: width 4096
    (Llama-3-8B itself, 16 GB) for 16 GB, 1024 for 1 GB. 291 tensors at every size."""
    params_per_h2 = 2 * 31.3 + 32 * 13  # embeddings + lm_head, and 32 layers of 13 h^2 each
    h = max(512, round((total_bytes / 2 / params_per_h2) ** 0.5 / 512) * 512)  # whole 128-wide KV heads
    vocab, kv, mlp = round(h * 31.3125), h // 4, h * 7 // 2
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(32):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "mlp.down_proj.weight", (h, mlp)),
                   (p + "mlp.gate_proj.weight", (mlp, h)), (p + "mlp.up_proj.weight", (mlp, h)),
                   (p + "post_attention_layernorm.weight", (h,)), (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.o_proj.weight", (h, h)), (p + "self_attn.q_proj.weight", (h, h)),
                   (p + "self_attn.v_proj.weight", (kv, h))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def make_hf(out: Path, size_mb: int) -> None:
    """``size_mb`` (10^6 bytes) of a Hugging Face sharded folder (``model-0000K-of-00004.safetensors`` + ``model.safetensors.index.json``)
    of random finite bf16 values, by convert's own streaming writer: one tensor in memory at a time."""
    import numpy as np

    import convert
    from convert.ir import ArraySource, Tensor, TensorDict

    bf16 = convert.dtypes.by_name("bfloat16")

    def lazy(i: int, name: str, shape: tuple[int, ...]) -> Tensor:
        def produce():  # bit patterns of bf16 values in +-[2^-8, 2^-7): finite, no NaN; fast to make
            bits = np.random.default_rng(i).integers(0, 1 << 16, size=shape, dtype=np.uint16)
            return ((bits & np.uint16(0x807F)) | np.uint16(0x3B80)).view(bf16.numpy)
        return Tensor(name, bf16, shape, ArraySource(produce))
    td = TensorDict(lazy(i, n, s) for i, (n, s) in enumerate(llama_shapes(size_mb * 10**6)))
    limit = td.nbytes // 4 + td.nbytes // 40  # 4 shards, as HF's 5 GB limit gives Llama-3-8B
    convert.write(td, out, "safetensors", verify=False, max_shard_size=str(limit))
    h, vocab = td["model.norm.weight"].shape[0], td["lm_head.weight"].shape[0]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": h * 7 // 2, "num_hidden_layers": 32, "num_attention_heads": h // 128,
              "num_key_value_heads": h // 512, "vocab_size": vocab, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5, "max_position_embeddings": 8192}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # what from_pretrained needs


TORCH_PER_SHARD = ("import glob, os, sys, torch\nfrom safetensors.torch import load_file\nos.mkdir(sys.argv[2])\n"
                   "for f in sorted(glob.glob(os.path.join(sys.argv[1], '*.safetensors'))):\n"
                   "    stem = os.path.basename(f).removesuffix('.safetensors')\n"
                   "    torch.save(load_file(f), os.path.join(sys.argv[2], stem + '.bin'))\n")
HUB_SHARDED = ("import glob, os, sys, torch, huggingface_hub\nfrom safetensors.torch import load_file\n"
               "state = {}\nfor f in sorted(glob.glob(os.path.join(sys.argv[1], '*.safetensors'))):\n"
               "    state.update(load_file(f))\n"
               "os.mkdir(sys.argv[2])\n"
               "huggingface_hub.save_torch_state_dict(state, sys.argv[2], safe_serialization=False, "
               "max_shard_size=sys.argv[3])\n")

# What a transformers user types: the model class reads the shards and writes torch shards with an index
# (save_pretrained shards with huggingface_hub's split_torch_state_dict_into_shards). The whole model is in memory.
TRANSFORMERS_SAVE = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
                     "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16)\n"
                     "model.save_pretrained(sys.argv[2], safe_serialization=False, max_shard_size=sys.argv[3])\n")
WHOLE_MODEL_PEERS = ("hub save_torch_state_dict", "transformers save_pretrained")


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("MemAvailable:"))


def hf_contenders(src: Path, dst: Path, shards: list[Path], limit: str) -> dict[str, dict[str, list[str]]]:
    """Per target, the contenders: the durable floor (once, or two copies at a time), convert with 1
    and 2 workers the way the tool offers each (``convert batch`` over the shards for torch, which
    has no sharded writer; ``--split shards`` with ``--worker I/2`` for tf-ckpt), and the peers."""
    s = [str(p) for p in shards]
    floor = {"cp+sync": ["sh", "-c", 'mkdir "$0" && cp "$@" "$0"/ && sync "$0"/* "$0"', str(dst), *s],
             "cp+sync 2 at once": ["sh", "-c", 'mkdir "$0" && { cp "$1" "$3" "$0"/ & cp "$2" "$4" "$0"/ & wait; } '
                                   '&& sync "$0"/* "$0"', str(dst), *s]}
    batch = [*CONVERT, "batch", str(src / "*.safetensors"), "--to", "torch", "-o", str(dst / "{stem}.bin"), "-q"]
    torch_side = {**floor, "batch --workers 1": [*batch, "--workers", "1"],
                  "batch --workers 2": [*batch, "--workers", "2"]}
    if have("torch") and have("safetensors"):
        torch_side["torch.save(load_file) per shard"] = [PY, "-c", TORCH_PER_SHARD, str(src), str(dst)]
        if have("huggingface_hub"):
            torch_side["hub save_torch_state_dict"] = [PY, "-c", HUB_SHARDED, str(src), str(dst), limit]
        if have("transformers"):
            torch_side["transformers save_pretrained"] = [PY, "-c", TRANSFORMERS_SAVE, str(src), str(dst), limit]
    split = [*CONVERT, "safetensors", str(src), "--to", "tf-ckpt", "-o", str(dst), "-q", "--split", "shards"]
    tf_side = {**floor, "convert (one output shard)": [*CONVERT, "safetensors", str(src), "--to", "tf-ckpt",
                                                       "-o", str(dst), "-q"],
               "--split shards, 1 worker": split,
               "--split shards, 2 workers": ["sh", "-c", '"$@" --worker 0/2 & a=$!; "$@" --worker 1/2 & b=$!; '
                                             'wait $a && wait $b', "sh", *split]}
    return {"-> torch shards": torch_side, "-> tf-ckpt": tf_side}


def hf_scenario(tmp: Path, size_gb: int, repeat: int, keep: tuple[str, ...] = ()) -> dict:
    """A Hugging Face style model of 4 bf16 safetensors shards -> torch shards and -> tf-ckpt, against
    the durable floor (cp + sync of the same bytes), with 1 and 2 workers, peers side by side."""
    free = shutil.disk_usage(tmp).free
    note = ""
    if size_gb >= 16 and free < 50e9:  # source + one output + headroom for the people sharing the disk
        note = f"only {free / 1e9:.0f} GB free (< 50 GB): 8 GB instead of {size_gb} GB"
        size_gb = 8
        print(f"\nhf: {note}")
    src, dst = tmp / f"hf-{size_gb}g", tmp / "hf-out"
    t0 = time.perf_counter()
    subprocess.run([PY, __file__, "--make", "hf", str(src), "--size-mb", str(size_gb * 1000)], check=True, cwd=ROOT)
    shards = sorted(src.glob("*.safetensors"))
    nbytes = sum(p.stat().st_size for p in shards)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    limit = index["metadata"]["total_size"] // 4 + index["metadata"]["total_size"] // 40
    print(f"\nhf: {len(shards)} shards, {nbytes / 1e9:.2f} GB bf16, {len(index['weight_map'])} tensors "
          f"(made in {time.perf_counter() - t0:.0f} s, {free / 1e9:.0f} GB free), {repeat} interleaved rounds")
    out: dict = {"name": f"hf: {size_gb} GB, 4 safetensors shards", "size_gb": size_gb, "input_bytes": nbytes,
                 "shard_bytes": [p.stat().st_size for p in shards], "tensors": len(index["weight_map"]),
                 "disk_free_gb": round(free / 1e9), "note": note, "targets": {}}
    try:
        for target, cmds in hf_contenders(src, dst, shards, f"{limit // 1000 + 1}KB").items():
            if keep:  # --hf-only: the floor and the contenders named
                cmds = {k: v for k, v in cmds.items() if k == "cp+sync" or any(w in k for w in keep)}
            runs: dict[str, list[dict]] = {k: [] for k in cmds}
            for _ in range(repeat):
                for name, cmd in list(cmds.items()):
                    # a peer holding the whole model runs only with room to spare: 4 other people share this machine
                    if name in WHOLE_MODEL_PEERS and mem_available() < nbytes * 1.2 + (3 << 30):
                        print(f"  {name}: left out, {mem_available() / 1e9:.1f} GB available is under "
                              f"1.2x the model + 3 GB", flush=True)
                        out.setdefault("left_out", []).append(f"{target}: {name}")
                        del cmds[name], runs[name]
                        continue
                    r = run(cmd, dst)
                    if "torch" in target and name.startswith("batch"):  # every shard converted
                        assert len(list(dst.glob("*.bin"))) == len(shards), name
                    runs[name].append(r)
                    shutil.rmtree(dst)  # one output on disk at a time
            med = {k: {"seconds": statistics.median(r["seconds"] for r in rs), "min": min(r["seconds"] for r in rs),
                       "rss_mb": max(r["rss_mb"] for r in rs)} for k, rs in runs.items()}
            floor, floor_min = med["cp+sync"]["seconds"], med["cp+sync"]["min"]
            print(f"  {target}\n  {'contender':<34} {'median s':>9} {'fastest s':>9} {'x sync med':>10} "
                  f"{'x sync min':>10} {'GB/s best':>9} {'peak RSS MB':>11}")
            for name, m in med.items():
                m["x_durable"], m["x_durable_min"] = m["seconds"] / floor, m["min"] / floor_min
                print(f"  {name:<34} {m['seconds']:9.2f} {m['min']:9.2f} {m['x_durable']:10.2f} "
                      f"{m['x_durable_min']:10.2f} {nbytes / 1e9 / m['min']:9.2f} {m['rss_mb']:11.0f}", flush=True)
            out["targets"][target] = {"median": med, "runs": runs}
    finally:
        shutil.rmtree(src)
        if dst.exists():
            shutil.rmtree(dst)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--many", type=int, default=50_000, help="tensors of the 'many:' scenarios' inputs")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "latest.json")
    ap.add_argument("--only", nargs="*", help="scenarios whose name contains one of these words")
    ap.add_argument("--curve", default="512,1024,2048,4096", help="sizes (MB) for the memory curve; '' skips it")
    ap.add_argument("--tensor-curve", default="1000,10000,50000,100000",
                    help="tensor counts for the per-tensor curve; '' skips it")
    ap.add_argument("--also", nargs="*", default=[], metavar="LABEL=TREE",
                    help="also time the convert of another source tree (e.g. a worktree of an earlier commit) "
                         "in the same rounds, as contender @LABEL")
    ap.add_argument("--remote-mb", type=int, default=512,
                    help="size of the remote (local S3 server) scenarios' input; 0 skips them")
    ap.add_argument("--batch-runs", type=int, default=0, metavar="N",
                    help="the batch scenario: N small TF checkpoints through `convert batch` (1, 2 workers, Ray) "
                         "and a shell loop; 0 (the default) skips it; e.g. 200")
    ap.add_argument("--hf-gb", default="", metavar="GB,...",
                    help="the sharded-model scenario at these sizes (e.g. 1,16): 4 bf16 safetensors shards -> torch "
                         "shards and -> tf-ckpt; needs about 2x the size free on --dir's disk (16 GB runs only "
                         "with >= 50 GB free, else 8 GB); '' (the default) skips it")
    ap.add_argument("--hf-only", nargs="*", default=[], metavar="WORD",
                    help="the sharded-model scenario's contenders whose name holds one of these words "
                         "(cp+sync is always run), e.g. batch split")
    ap.add_argument("--make", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        kind, path = args.make
        if kind == "runs":
            make_runs(Path(path), args.batch_runs)
            return
        if kind == "hf":
            make_hf(Path(path), args.size_mb)
            return
        if kind in ("v2n", "stn", "ptn"):
            make_many(kind, Path(path), args.many)
            return
        if kind == "v2-own":  # the memory curve's inputs: no framework, so sizes beyond RAM are cheap to make
            sys.modules["tensorflow"] = None  # type: ignore[assignment]
            kind = "v2"
        make(kind, Path(path), args.size_mb)
        return
    also = {label: Path(tree).resolve() for label, tree in (a.split("=", 1) for a in args.also)}
    chosen = [s for s in SCENARIOS if not args.only or any(w.lower() in s.name.lower() for w in args.only)]
    # Bytecode, as `pip install` leaves it for every installed package (the frameworks' included):
    # without it each run would compile convert's sources (~0.09 s) when PYTHONDONTWRITEBYTECODE is set.
    import compileall

    for tree in (ROOT, *also.values()):
        compileall.compile_dir(tree / "convert", quiet=1)
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()},
               "size_mb": args.size_mb, "repeat": args.repeat, "many": args.many,
               "also": {k: str(v) for k, v in also.items()}, "scenarios": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        inputs = {}
        names = {"v2": "ckpt", "v1": "model.ckpt", "st": "model.safetensors", "pt": "model.pt",
                 "v2n": "many-ckpt", "stn": "many.safetensors", "ptn": "many.pt"}
        for kind in sorted({s.src for s in chosen}):
            size = args.size_mb // 2 if kind == "v1" else args.size_mb  # the V1 case is 1 GB
            inputs[kind] = tmp / names[kind]
            t0 = time.perf_counter()
            subprocess.run([PY, __file__, "--make", kind, str(inputs[kind]), "--size-mb", str(size),
                            "--many", str(args.many)], check=True, cwd=ROOT)
            subprocess.run(["cat", str(data_file(kind, inputs[kind]))], stdout=subprocess.DEVNULL, check=True)
            print(f"made {kind} input in {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"\n{'scenario':<33} {'contender':<12} {'median':>7} {'fastest':>7} {'x cp':>6} "
              f"{'x sync':>6} {'x sync':>6} {'speedup':>8} {'RSS MB':>7}  targets (median/fastest)")
        print(f"{'':<33} {'':<12} {'s':>7} {'s':>7} {'med':>6} {'med':>6} {'min':>6}")
        for sc in chosen:
            src, dst = inputs[sc.src], tmp / (sc.dst or "unused")
            cmds = {k: v for k, v in contenders(sc, src, dst, also).items() if v is not None}
            runs: dict[str, list[dict]] = {k: [] for k in cmds}
            for _ in range(args.repeat):
                for name, cmd in list(cmds.items()):
                    tree = also.get(name[1:]) if name.startswith("@") else None
                    env = {**os.environ, "PYTHONPATH": str(tree)} if tree else None
                    try:
                        runs[name].append(run(cmd, dst if sc.dst else None, cwd=tree or ROOT, env=env))
                    except SystemExit as e:
                        if name == "convert":
                            raise
                        print(f"{'':<33} {name}: {str(e).splitlines()[-1][:150]} -- left out", flush=True)
                        del cmds[name], runs[name]
            med = {k: {"seconds": statistics.median(r["seconds"] for r in rs),
                       "min": min(r["seconds"] for r in rs),
                       "rss_mb": statistics.median(r["rss_mb"] for r in rs)} for k, rs in runs.items()}
            row = dict(med["convert"])
            row["x_cp"] = row["seconds"] / med["cp"]["seconds"] if "cp" in med else None
            if "cp+sync" in med:
                row["x_durable"] = row["seconds"] / med["cp+sync"]["seconds"]
                row["x_durable_min"] = row["min"] / med["cp+sync"]["min"]
            row["x_framework"] = med["framework"]["seconds"] / row["seconds"] if "framework" in med else None
            verdicts = judge(sc, row)
            for name in cmds:
                m = med[name]
                x_cp = f"{m['seconds'] / med['cp']['seconds']:6.2f}" if "cp" in med else f"{'':>6}"
                x_d = (f"{m['seconds'] / med['cp+sync']['seconds']:6.2f} {m['min'] / med['cp+sync']['min']:6.2f}"
                       if "cp+sync" in med else f"{'':>13}")
                speed = f"{med['framework']['seconds'] / m['seconds']:7.1f}x" if "framework" in med else f"{'':>8}"
                print(f"{sc.name if name == 'convert' else '':<33} {name:<12} {m['seconds']:7.2f} {m['min']:7.2f} "
                      f"{x_cp} {x_d} {speed} {m['rss_mb']:7.0f}  {'; '.join(verdicts) if name == 'convert' else ''}",
                      flush=True)
            if sc.src.endswith("n"):
                per = {k: round(m["min"] / args.many * 1e6, 1) for k, m in med.items()}
                print(f"{'':<33} µs per tensor (fastest run / {args.many}): "
                      + ", ".join(f"{k} {v}" for k, v in per.items()), flush=True)
            entry = {"name": sc.name, "input_bytes": sum(p.stat().st_size for p in ([src] if src.is_file()
                                                                                   else src.iterdir())),
                     "median": med, "runs": runs, "targets": sc.targets, "verdicts": verdicts}
            if sc.name.startswith("inspect"):
                entry["frameworks_imported"] = frameworks_imported_by_inspect(src)
                print(f"{'':<33} frameworks imported by convert inspect: {entry['frameworks_imported'] or 'none'}")
            results["scenarios"].append(entry)
        for kind in list(inputs):  # free the disk first
            p = inputs.pop(kind)
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if args.remote_mb and (not args.only or any(w.lower() in "remote" for w in args.only)):
            results["remote"] = remote_scenarios(tmp, args.remote_mb, args.repeat)
        wanted = lambda word: not args.only or any(w.lower() in word for w in args.only)  # noqa: E731
        if args.batch_runs and wanted("batch"):
            results["batch"] = batch_scenario(tmp, args.batch_runs, args.repeat)
        for gb in (int(g) for g in args.hf_gb.split(",") if g and wanted("hf")):
            results.setdefault("hf", []).append(hf_scenario(tmp, gb, args.repeat, tuple(args.hf_only)))
        if args.tensor_curve:
            print("\ntensor curve: tf-ckpt V2 -> safetensors and inspect, fastest of 3, by tensor count")
            results["tensor_curve"] = tensor_curve(tmp, [int(n) for n in args.tensor_curve.split(",")])
        if args.curve:
            print("\nmemory curve: tf-ckpt V2 -> safetensors, peak RSS by checkpoint size")
            results["memory_curve"] = memory_curve(tmp, [int(s) for s in args.curve.split(",")])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
