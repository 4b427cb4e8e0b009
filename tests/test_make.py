"""convert under `make -j` (issue 19): many pattern-rule targets written into one folder at once,
a second conversion of the same output started mid-run, and Ctrl-C.

Real GNU make, real `convert` processes, in tmp_path. Every output is read by its framework or
format library (torch, onnx, TensorFlow) and must hold its input's tensors; "no target is left
looking up to date" means that every target present is complete.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("make") is None, reason="needs make")]

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "TF_CPP_MIN_LOG_LEVEL": "3"}
STAGE = re.compile(r"\.(.+)\.convert-tmp-\d+-\d+")
STEMS = ("a", "b", "c", "d", "e", "f")

MAKEFILE = """\
CONVERT := {python} -m convert
STEMS := $(patsubst in/%.safetensors,%,$(wildcard in/*.safetensors))
TARGETS := $(foreach s,$(STEMS),out/$(s).pt out/$(s).onnx out/$(s)_ckpt)

all: $(TARGETS)

out:
\tmkdir -p out

out/%.pt: in/%.safetensors | out
\t$(CONVERT) safetensors $< --to torch -o $@ --force --quiet

out/%.onnx: in/%.safetensors | out
\t$(CONVERT) safetensors $< --to onnx -o $@ --external-data-threshold 0 --force --quiet

out/%_ckpt: in/%.safetensors | out
\t$(CONVERT) safetensors $< --to tf-ckpt -o $@ --force --quiet
"""


def targets(stem: str) -> list[str]:
    return [f"{stem}.pt", f"{stem}.onnx", f"{stem}_ckpt"]


def expected_names() -> set[str]:
    return {n for s in STEMS for n in targets(s)} | {f"{s}.onnx.data" for s in STEMS}


def make_project(folder: Path, side: int) -> Path:
    """A folder with the Makefile and six inputs of side*side float32 values."""
    from safetensors.numpy import save_file

    (folder / "in").mkdir()
    for i, stem in enumerate(STEMS):
        rng = np.random.default_rng(i)
        save_file({"w": rng.standard_normal((side, side), dtype=np.float32),
                   "b": rng.standard_normal((side,), dtype=np.float32),
                   "step": np.array([i], np.int64)}, str(folder / "in" / f"{stem}.safetensors"))
    (folder / "Makefile").write_text(MAKEFILE.format(python=sys.executable))
    return folder


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path, 1024)  # 4 MB inputs: conversions overlap


@pytest.fixture
def big_project(tmp_path):
    return make_project(tmp_path, 2048)  # 16 MB: most of a conversion is writing


def default_sigint() -> None:
    # Ctrl-C as at a terminal: a shell starts background jobs (a CI runner may be one) with SIGINT
    # ignored, which make and Python would inherit; the terminal's foreground job has it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def make(project: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(project), *args], capture_output=True, text=True, env=ENV,
                          preexec_fn=default_sigint, **kw)


def read(path: Path) -> dict[str, np.ndarray]:
    """A target as its framework reads it."""
    if path.suffix == ".pt":
        import torch

        return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
    if path.suffix == ".onnx":
        import onnx
        from onnx import numpy_helper

        return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    tf = pytest.importorskip("tensorflow")
    reader = tf.train.load_checkpoint(str(path))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}


def inputs_of(project: Path, stem: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(project / "in" / f"{stem}.safetensors"))


def holds(path: Path, want: dict[str, np.ndarray]) -> bool:
    got = read(path)
    return sorted(got) == sorted(want) and all(np.array_equal(got[k], v) and got[k].dtype == v.dtype
                                               for k, v in want.items())


def assert_all_built(project: Path) -> None:
    out = project / "out"
    assert set(os.listdir(out)) == expected_names(), sorted(set(os.listdir(out)) ^ expected_names())
    for stem in STEMS:
        want = inputs_of(project, stem)
        for t in targets(stem):
            assert holds(out / t, want), t


def staged(out: Path) -> list[str]:
    try:
        return [n for n in os.listdir(out) if STAGE.fullmatch(n)]
    except FileNotFoundError:
        return []


def wait_for(cond, timeout: float = 60.0, every: float = 0.001) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return False


def test_make_j_builds_many_targets_into_one_folder_and_rebuilds_only_what_changed(project):
    """18 targets (torch, ONNX with its data file, TF checkpoint folders) by up to 8 conversions
    at once in one folder: all complete, nothing else left; then up to date; then, every input
    touched, all rebuilt over the previous outputs (--force) at once."""
    res = make(project, "-j8", "all")
    assert res.returncode == 0, res.stderr
    assert_all_built(project)
    assert make(project, "-q", "all").returncode == 0  # up to date
    before = {n: os.stat(project / "out" / n).st_mtime_ns for n in os.listdir(project / "out")}
    res = make(project, "-j8", "all")
    assert res.returncode == 0 and "convert" not in res.stdout, res.stdout
    assert {n: os.stat(project / "out" / n).st_mtime_ns for n in os.listdir(project / "out")} == before
    later = time.time() + 2
    for stem in STEMS:
        os.utime(project / "in" / f"{stem}.safetensors", (later, later))
    res = make(project, "-j8", "all")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("-m convert") == 3 * len(STEMS)
    assert_all_built(project)


@pytest.mark.parametrize("force", [True, False], ids=["force", "no-force"])
def test_a_second_conversion_of_the_same_output_started_mid_run(project, force):
    """While make's conversion of out/c_ckpt is writing, another convert of the same output, from
    another input, starts: both end well (without --force the later one may be refused with
    'already exists'), the output is one of the two complete, and every other target is built."""
    make_proc = subprocess.Popen(["make", "-C", str(project), "-j4", "all"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=default_sigint)
    try:
        assert wait_for(lambda: any(STAGE.fullmatch(n)[1] == "c_ckpt" for n in staged(project / "out"))), \
            "make's conversion of out/c_ckpt never started"
        other = subprocess.run([sys.executable, "-m", "convert", "safetensors", str(project / "in" / "f.safetensors"),
                                "--to", "tf-ckpt", "-o", str(project / "out" / "c_ckpt"), "--quiet",
                                *(["--force"] if force else [])], capture_output=True, text=True, env=ENV)
    finally:
        out, err = make_proc.communicate(timeout=600)
    assert make_proc.returncode == 0, err
    if force:
        assert other.returncode == 0, other.stderr
    else:
        assert other.returncode == 0 or (other.returncode == 1 and "already exists" in other.stderr
                                         and other.stderr.count("\n") == 1), other.stderr
    c_ckpt = project / "out" / "c_ckpt"
    assert holds(c_ckpt, inputs_of(project, "c")) or holds(c_ckpt, inputs_of(project, "f"))
    assert set(os.listdir(project / "out")) == expected_names()
    for stem in STEMS:
        for t in targets(stem):
            if t != "c_ckpt":
                assert holds(project / "out" / t, inputs_of(project, stem)), t


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_ctrl_c_inside_make_leaves_no_target_looking_up_to_date_and_a_rerun_completes(big_project):
    """SIGINT to make's process group (what a terminal's Ctrl-C does) while two conversions write
    into the folder: make fails, every interrupted convert says so in one line and removes its
    staging folder, every target present is complete (so make is right to trust it), and the same
    make command then builds the rest.

    Two conversions writing at the same moment is a short window on a busy machine (most of a
    convert is Python's start-up), so each convert seen writing is stopped (SIGSTOP) where it is
    until a second one is; Ctrl-C then reaches both mid-write, and SIGCONT lets them handle it."""
    project = big_project
    proc = subprocess.Popen(["make", "-C", str(project), "-j2", "all"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=default_sigint,
                            start_new_session=True)
    frozen: set[int] = set()
    publishing: set[int] = set()  # converts seen past their rename: left to finish
    out = project / "out"
    try:
        def midway() -> bool:
            built = [t for s in STEMS for t in targets(s) if os.path.lexists(out / t)]
            if len(built) < 3:
                return False
            for pid, name in writing(out).items():
                if pid in frozen or pid in publishing:
                    continue
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    continue
                if not _stopped(pid):
                    continue  # it ended first
                if os.path.lexists(out / name):
                    # its output is in place already (its staging folder goes last): not mid-write,
                    # and make, interrupted, deletes the target of a job it has not seen end
                    os.kill(pid, signal.SIGCONT)
                    publishing.add(pid)
                    continue
                frozen.add(pid)
            return len(frozen) >= 2
        assert wait_for(midway), "never two conversions writing at once after the first targets"
        assert frozen == convert_pids(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        os.killpg(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "interrupted" in err and "Traceback" not in err, err
    # every convert of the group has ended (the group is empty) and cleaned up after itself
    assert wait_for(lambda: _group_gone(proc.pid), timeout=30, every=0.05)
    out = project / "out"
    assert staged(out) == [], staged(out)
    present = [t for s in STEMS for t in targets(s) if os.path.lexists(out / t)]
    missing = [t for s in STEMS for t in targets(s) if not os.path.lexists(out / t)]
    assert missing and len(present) >= 3, (present, missing)
    for t in present:  # a target make will take as up to date holds its input's tensors
        stem = t.split(".")[0].removesuffix("_ckpt")
        assert holds(out / t, inputs_of(project, stem)), t
    assert make(project, "-q", "all").returncode != 0
    res = make(project, "-j4", "all")
    assert res.returncode == 0, res.stderr
    assert_all_built(project)
    # the rerun converted exactly what was missing
    assert sorted(re.findall(r"-o (?:\S*/)?out/(\S+) ", res.stdout)) == sorted(missing)


def writing(out: Path) -> dict[int, str]:
    """pid -> output name of the converts with a staging folder in out (its name holds both)."""
    found = {}
    for n in staged(out):
        m = STAGE.fullmatch(n)
        found[int(n.rsplit("-", 2)[1])] = m[1]
    return found


def _stopped(pid: int, timeout: float = 10.0) -> bool:
    """Wait until ``pid`` is stopped (state T); False if it has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state in "TtZX":
            return state in "Tt"
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


def convert_pids(pgid: int) -> set[int]:
    """The convert processes in a process group (from /proc)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if int(fields[2]) == pgid and b"-m\0convert\0" in cmdline:
            pids.add(int(entry))
    return pids


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False
