"""convert batch: many conversions in one command (issue 17).

Sources are TensorFlow checkpoints written by TensorFlow (tf.compat.v1 Saver); every output is
read by the safetensors library and compared with TensorFlow's reading of its source. Runs are
real ``python -m convert batch`` processes: 200 jobs on two local workers, rerun (all skipped),
a local Ray cluster (``ray.init(num_cpus=2)``) whose busy worker is SIGKILLed mid-run, and a
batch SIGKILLed as a whole and rerun.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from convert import batch
from convert.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "TF_CPP_MIN_LOG_LEVEL": "2"}

# Writes runs/runNNN/ (a V2 checkpoint of step 100+N and its 'checkpoint' state file) with
# tf.compat.v1.train.Saver, values drawn from a seed per run; one graph for all of them.
_MAKE_RUNS = """
import sys, numpy as np, tensorflow as tf
root, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tf.compat.v1.disable_eager_execution()
w = tf.compat.v1.Variable(np.zeros((size, 64), np.float32), name="dense/kernel")
b = tf.compat.v1.Variable(np.zeros(64, np.float32), name="dense/bias")
step = tf.compat.v1.train.get_or_create_global_step()
pw, pb, ps = (tf.compat.v1.placeholder(v.dtype.base_dtype, v.shape) for v in (w, b, step))
assign = tf.group(w.assign(pw), b.assign(pb), step.assign(ps))
saver = tf.compat.v1.train.Saver(max_to_keep=1)
with tf.compat.v1.Session() as sess:
    sess.run(tf.compat.v1.global_variables_initializer())
    for i in range(count):
        rng = np.random.default_rng(i)
        sess.run(assign, {pw: rng.standard_normal((size, 64)).astype(np.float32),
                          pb: rng.standard_normal(64).astype(np.float32), ps: 100 + i})
        saver.set_last_checkpoints_with_time([])  # each run folder keeps its own checkpoint and state
        saver.save(sess, f"{root}/run{i:03d}/model.ckpt", global_step=100 + i)
print("ok")
"""


def _make_runs(root: Path, count: int, size: int) -> Path:
    res = subprocess.run([sys.executable, "-c", _MAKE_RUNS, str(root), str(count), str(size)],
                         capture_output=True, text=True, env=ENV, timeout=600)
    if res.returncode != 0:
        pytest.skip(f"TensorFlow could not write the checkpoints: {res.stderr[-500:]}")
    return root


@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tf):
    """200 small training runs (one checkpoint each, 8 KB of weights)."""
    return _make_runs(tmp_path_factory.mktemp("runs"), 200, 32)


@pytest.fixture(scope="module")
def few_runs(tmp_path_factory, tf):
    """3 tiny runs, for the quick tests (read-only)."""
    return _make_runs(tmp_path_factory.mktemp("fewruns"), 3, 8)


@pytest.fixture(scope="module")
def big_runs(tmp_path_factory, tf):
    """40 runs of 4 MB each: jobs long enough to be killed in the middle of one."""
    return _make_runs(tmp_path_factory.mktemp("bigruns"), 40, 16384)


def _batch(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convert", "batch", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _oracle_equal(tf, out: Path, src_prefix: str) -> None:
    """The output, read by the safetensors library, holds what TensorFlow reads from the source."""
    got = safetensors.numpy.load_file(str(out))
    reader = tf.train.load_checkpoint(src_prefix)
    names = set(reader.get_variable_to_shape_map())
    assert set(got) == names, f"{out}: {sorted(got)} != {sorted(names)}"
    for name in names:
        want = np.asarray(reader.get_tensor(name))
        assert got[name].dtype == want.dtype and np.array_equal(got[name], want), f"{out}: {name}"


def _stray(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if ".convert-tmp-" in p.name or p.name.endswith("journal.json"))


@pytest.mark.slow
def test_200_checkpoints_converted_then_skipped(tf, runs, tmp_path):
    out = tmp_path / "out"
    pattern, template = str(runs / "*" / "checkpoint"), str(out / "{run}" / "{step}.safetensors")
    first = _batch(pattern, "--to", "safetensors", "-o", template, "--workers", "2", "--json")
    assert first.returncode == 0, first.stderr
    recs = _records(first.stdout)
    assert len(recs) == 200 and {r["status"] for r in recs} == {"done"}
    assert all(r["verified"] and r["bytes"] == (32 * 64 + 64) * 4 + 8 and r["seconds"] >= 0 for r in recs)
    for i in range(200):
        _oracle_equal(tf, out / f"run{i:03d}" / f"{100 + i}.safetensors", str(runs / f"run{i:03d}" / f"model.ckpt-{100 + i}"))
    assert _stray(out) == []

    again = _batch(pattern, "--to", "safetensors", "-o", template, "--workers", "2", "--json")
    assert again.returncode == 0, again.stderr
    assert [r["status"] for r in _records(again.stdout)] == ["skipped"] * 200

    # a source that changed (a training run rewrote its checkpoint) is converted again, alone
    data = runs / "run007" / "model.ckpt-107.data-00000-of-00001"
    os.utime(data, ns=(time.time_ns(), time.time_ns()))
    third = _batch(pattern, "--to", "safetensors", "-o", template, "--workers", "2", "--json")
    statuses = {r["source"].split("/")[-2]: r["status"] for r in _records(third.stdout)}
    assert third.returncode == 0 and statuses.pop("run007") == "done" and set(statuses.values()) == {"skipped"}
    # different options are another output's content: redone
    fourth = _batch(pattern, "--to", "safetensors", "-o", template, "--workers", "2", "--json",
                    "--exclude", "global_step")
    assert {r["status"] for r in _records(fourth.stdout)} == {"done"}
    assert "global_step" not in safetensors.numpy.load_file(str(out / "run000" / "100.safetensors"))


def test_jobs_file_failures_are_one_line_and_the_others_complete(tf, few_runs, tmp_path):
    runs = few_runs
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        "defaults:\n  to: safetensors\n"
        "jobs:\n"
        f"  - {{source: {runs}/run000, output: out/a.safetensors}}\n"
        f"  - {{source: {runs}/missing, output: out/b.safetensors}}\n"
        f"  - {{source: {runs}/run002, output: out/c, options: {{max_shard_size: 1KB}}, exclude: [global_step]}}\n")
    res = _batch("--jobs", str(jobs), "--workers", "2", "--json")
    assert res.returncode == 1
    recs = {r["job"]: r for r in _records(res.stdout)}
    assert [recs[k]["status"] for k in "123"] == ["done", "failed", "done"]
    assert f"{runs}/missing" in recs["2"]["error"] and "\n" not in recs["2"]["error"]
    _oracle_equal(tf, tmp_path / "out" / "a.safetensors", str(runs / "run000" / "model.ckpt-100"))
    shards = sorted((tmp_path / "out" / "c").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "out" / "c" / "model.safetensors.index.json").exists()
    merged = {k: v for s in shards for k, v in safetensors.numpy.load_file(str(s)).items()}
    reader = tf.train.load_checkpoint(str(runs / "run002" / "model.ckpt-102"))
    assert set(merged) == {"dense/kernel", "dense/bias"}
    assert all(np.array_equal(merged[k], reader.get_tensor(k)) for k in merged)

    lines = tmp_path / "jobs.jsonl"
    lines.write_text('# one job a line\n' + json.dumps({"source": str(runs / "run001"), "to": "torch",
                                                         "output": "out/d.pt"}) + "\n")
    res = _batch("--jobs", str(lines), "--json", "--workers", "1")
    assert res.returncode == 0 and _records(res.stdout)[0]["status"] == "done", res.stderr
    import torch

    state = torch.load(tmp_path / "out" / "d.pt", weights_only=True)  # relative to the jobs file's folder
    want = tf.train.load_checkpoint(str(runs / "run001" / "model.ckpt-101"))
    assert all(np.array_equal(state[k].numpy(), want.get_tensor(k)) for k in ("dense/kernel", "dense/bias"))


def test_an_output_it_did_not_make_is_refused_unless_forced(few_runs, tmp_path):
    runs = few_runs
    out = tmp_path / "out"
    out.mkdir()
    (out / "run000.safetensors").write_bytes(b"someone else's file")
    args = (str(runs / "run000"), "--to", "safetensors", "-o", str(out / "{name}.safetensors"), "--json")
    res = _batch(*args)
    assert res.returncode == 1 and "no record of convert batch" in _records(res.stdout)[0]["error"]
    assert (out / "run000.safetensors").read_bytes() == b"someone else's file"
    res = _batch(*args, "--force")
    assert res.returncode == 0 and _records(res.stdout)[0]["status"] == "done"
    assert set(safetensors.numpy.load_file(str(out / "run000.safetensors"))) == {"dense/kernel", "dense/bias",
                                                                                "global_step"}


def test_pattern_placeholders(few_runs, tmp_path):
    runs = few_runs
    jobs = batch.jobs_from_pattern(str(runs / "run*" / "checkpoint"), "safetensors",
                                   str(tmp_path / "o" / "{1}-{run}-{stem}-{step}.st"))
    assert [(Path(j.source).name, Path(j.output).name) for j in jobs] == [
        ("model.ckpt-100.index", "000-run000-model.ckpt-100-100.st"),
        ("model.ckpt-101.index", "001-run001-model.ckpt-101-101.st"),
        ("model.ckpt-102.index", "002-run002-model.ckpt-102-102.st")]
    latest = batch.jobs_from_pattern(str(runs / "*"), "safetensors", str(tmp_path / "o" / "{name}.st"))
    assert [Path(j.source).name for j in latest] == ["run000", "run001", "run002"]
    with pytest.raises(UsageError, match=r"unknown placeholder \{nope\}"):
        batch.jobs_from_pattern(str(runs / "*"), "safetensors", "o/{nope}")
    with pytest.raises(UsageError, match="two jobs write"):
        batch.jobs_from_pattern(str(runs / "*"), "safetensors", str(tmp_path / "same.st"))
    with pytest.raises(UsageError, match="matches nothing"):
        batch.jobs_from_pattern(str(tmp_path / "none-*"), "safetensors", "o/{1}")
    res = _batch(str(runs / "*"), "--to", "safetensors", "-o", "o/{nope}")
    assert res.returncode == 2 and res.stderr.count("\n") == 1


def test_jobs_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "jobs.jsonl"
    bad.write_text('{"source": "a", "to": "safetensors"}\n{"source": "b", "too": "x"}\n')
    with pytest.raises(UsageError, match=r"jobs.jsonl:2: unknown key\(s\) too"):
        batch.jobs_from_file(bad)
    bad.write_text('{"source": "a"}\n')
    with pytest.raises(UsageError, match="'to' is missing"):
        batch.jobs_from_file(bad)


def _busy_ray_worker() -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ray::run_job"):
            return int(pid)
    return None


@pytest.mark.slow
def test_ray_worker_killed_mid_run(tf, big_runs, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        address = ray.get_runtime_context().gcs_address
        out = tmp_path / "out"
        proc = subprocess.Popen([sys.executable, "-m", "convert", "batch", str(big_runs / "*" / "checkpoint"),
                                 "--to", "safetensors", "-o", str(out / "{run}.safetensors"), "--ray", address,
                                 "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**ENV, "RAY_AUTH_MODE": "token"})
        killed = None
        deadline = time.monotonic() + 240
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            pid = _busy_ray_worker()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = pid
            time.sleep(0.005)
        stdout, stderr = proc.communicate(timeout=600)
        assert killed is not None, "no busy Ray worker was found to kill"
        assert proc.returncode == 0, stderr[-2000:]
        recs = _records(stdout)
        assert len(recs) == 40 and {r["status"] for r in recs} == {"done"}, recs
        for i in range(40):
            _oracle_equal(tf, out / f"run{i:03d}.safetensors", str(big_runs / f"run{i:03d}" / f"model.ckpt-{100 + i}"))
        assert _stray(out) == []
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
            [f"run{i:03d}.safetensors" for i in range(40)]
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_batch_killed_as_a_whole_then_rerun(tf, big_runs, tmp_path):
    out = tmp_path / "out"
    args = [str(big_runs / "*" / "checkpoint"), "--to", "safetensors", "-o", str(out / "{run}.safetensors"),
            "--workers", "2", "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "convert", "batch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if out.is_dir() and sum(1 for p in out.glob("run*.safetensors")) >= 8:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    # the workers got SIGTERM as their parent died (communicate() returned once they had exited),
    # and removed their partial outputs
    assert _stray(out) == []
    finished = sorted(p.name for p in out.glob("run*.safetensors"))
    assert 8 <= len(finished) < 40, finished
    for name in finished:  # what is there is whole, and has its record
        i = int(name[3:6])
        _oracle_equal(tf, out / name, str(big_runs / f"run{i:03d}" / f"model.ckpt-{100 + i}"))
        assert (out / f".{name}.convert-batch.json").exists()
    rerun = _batch(*args)
    assert rerun.returncode == 0, rerun.stderr
    statuses = {Path(r["output"]).name: r["status"] for r in _records(rerun.stdout)}
    assert sorted(n for n, s in statuses.items() if s == "skipped") == finished
    assert sum(s == "done" for s in statuses.values()) == 40 - len(finished)
    for i in range(40):
        _oracle_equal(tf, out / f"run{i:03d}.safetensors", str(big_runs / f"run{i:03d}" / f"model.ckpt-{100 + i}"))
    assert _stray(out) == []


def test_one_progress_bar_at_a_terminal_only(few_runs, tmp_path):
    from test_cli import _under_a_terminal

    seen = _under_a_terminal(["batch", str(few_runs / "*"), "--to", "safetensors", "-o",
                              str(tmp_path / "a" / "{name}.safetensors"), "--workers", "1"], 0)
    assert b"\x1b[" in seen and b"converting" in seen and b"batch: 3 done, 0 skipped, 0 failed" in seen
    res = _batch(str(few_runs / "*"), "--to", "safetensors", "-o", str(tmp_path / "b" / "{name}.safetensors"))
    assert res.returncode == 0 and res.stderr.count("\n") == 1 and "\x1b[" not in res.stderr
    assert res.stderr.startswith("batch: 3 done, 0 skipped, 0 failed")
