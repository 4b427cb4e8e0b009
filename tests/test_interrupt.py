"""Interrupted and competing writes (issue 9).

Whatever stops a conversion -- SIGKILL at any moment, SIGTERM or Ctrl-C, a full disk -- and
whatever runs beside it -- another conversion into the same output -- the output path holds
nothing, the previous output byte for byte, or the new output complete, never a partial or
mixed one. "Complete" means byte-identical to a reference conversion that the frameworks
(safetensors, torch, onnx, TensorFlow) read back equal to the input. Staging folders that a
SIGKILL leaves behind are removed by the next conversion into the same folder, which also
finishes or undoes a publication the kill cut in half.

Every conversion here is a real ``python -m convert`` process killed by a real signal:

* at every step of the write-and-publish sequence: the conversion (``_STEPPER``, forked from a
  warm server for speed, or run alone) counts the calls that change the file system (open,
  mkdir, rename, renameat2, link, unlink, rmdir) once ``atomic_output`` is entered and sends
  itself the signal at the N-th; N takes every value, so the kill lands before and after each
  rename, in the writer, the verification, the clean-up and the next run's recovery (also
  through the fallback used where renameat2 is missing);
* at moments spread over the run of a ~160 MB conversion (the slow sweep);
* under RLIMIT_FSIZE and on a full tmpfs;
* racing another conversion, started together or stopped at each step of its publication.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import convert
from convert import fileio

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
STAGE = re.compile(r"\..+\.convert-tmp-(\d+)-\d+")


@dataclass(frozen=True)
class Case:
    fmt: str
    out: str
    extra: tuple[str, ...] = ()
    companions: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """What one output is made of in its folder: the output, then its companion files."""
        return (self.out, *self.companions)


CASES = {
    "safetensors": Case("safetensors", "out.safetensors"),
    "tf-ckpt": Case("tf-ckpt", "out_ckpt"),  # a folder
    "torch": Case("torch", "out.pt"),
    "onnx": Case("onnx", "out.onnx"),
    # the model and its external data file: two names that must change together
    "onnx-external": Case("onnx", "out.onnx", ("--external-data-threshold", "0"), ("out.onnx.data",)),
}


def argv(case: Case, src: Path, out_dir: Path, force: bool = False) -> list[str]:
    return ["auto", str(src), "--to", case.fmt, "-o", str(out_dir / case.out), "-q",
            *case.extra, *(["--force"] if force else [])]


def cli(case: Case, src: Path, out_dir: Path, force: bool = False) -> list[str]:
    return [sys.executable, "-m", "convert", *argv(case, src, out_dir, force)]


# --- digests and states -------------------------------------------------------------------

def tree_digest(path: Path) -> str | None:
    """sha256 over a file's bytes, or over a folder's names and file bytes; None when absent."""
    if not os.path.lexists(path):
        return None
    h = hashlib.sha256()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            rel = os.path.relpath(root, path)
            h.update(f"dir {rel}\n".encode())
            for name in sorted(files):
                h.update(f"file {rel}/{name}\n".encode())
                h.update(_file_digest(Path(root) / name))
    else:
        h.update(b"file\n" + _file_digest(path))
    return h.hexdigest()


def _file_digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 22):
            h.update(piece)
    return h.digest()


def state(case: Case, folder: Path) -> tuple[str | None, ...]:
    return tuple(tree_digest(folder / n) for n in case.names)


def litter(case: Case, folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n not in case.names)


def put(case: Case, ref: Path, folder: Path) -> None:
    """Make ``folder`` hold exactly the output in ``ref`` (or nothing when ref is None)."""
    for n in os.listdir(folder):
        fileio.remove(folder / n)
    if ref is None:
        return
    for n in case.names:
        if (ref / n).is_dir():
            shutil.copytree(ref / n, folder / n)
        else:
            shutil.copyfile(ref / n, folder / n)


def nothing(case: Case) -> tuple[None, ...]:
    return (None,) * len(case.names)


def assert_valid_state(case: Case, folder: Path, new: tuple, old: tuple | None, *, settled: bool) -> tuple:
    """The output in ``folder`` is the new one, the old one, or absent -- before recovery an
    absent output may have companions of either lying beside it (a kill between two renames).
    ``settled``: after recovery/clean-up, when only complete states are allowed."""
    got = state(case, folder)
    allowed = {new, nothing(case)} if old is None else {new, old}
    if not settled:
        allowed.add(nothing(case))
    if got in allowed:
        return got
    assert not settled and got[0] is None, f"mixed or partial output: {got} not in {allowed}"
    for i, d in enumerate(got[1:], 1):  # companions of an output not (yet/any more) in place
        assert d in (None, new[i], None if old is None else old[i]), f"companion {case.names[i]} is partial"
    return got


# --- inputs, references and the frameworks as oracles ------------------------------------------

def make_input(path: Path, n: int, shape: tuple[int, ...], seed: int) -> Path:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    arrays = {f"layer{i}/w": rng.standard_normal(shape, dtype=np.float32) for i in range(n)}
    arrays["step"] = np.array([seed], np.int64)
    save_file(arrays, str(path))
    return path


def read_back(case: Case, path: Path) -> dict[str, np.ndarray]:
    """Read an output with its own framework, not with convert."""
    if case.fmt == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    if case.fmt == "torch":
        import torch

        return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
    if case.fmt == "onnx":
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))  # loads the external data file beside it
        return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    if case.fmt == "tf-ckpt":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        tf = pytest.importorskip("tensorflow")
        reader = tf.train.load_checkpoint(str(path))
        return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}
    raise AssertionError(case.fmt)


def assert_holds(case: Case, path: Path, src: Path) -> None:
    from safetensors.numpy import load_file

    want = load_file(str(src))
    got = read_back(case, path)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and np.array_equal(got[k], v), k


class Refs:
    """Reference outputs, one per (case, input): a plain uninterrupted conversion, checked once by
    the framework; later outputs are compared with them byte for byte."""

    def __init__(self, root: Path):
        self.root = root
        self._made: dict[tuple[str, str], tuple[Path, tuple]] = {}

    def get(self, key: str, src: Path) -> tuple[Path, tuple]:
        """(folder holding the output, its state)."""
        if (key, src.name) not in self._made:
            case = CASES[key]
            folder = self.root / f"{key}-{src.stem}"
            folder.mkdir(parents=True)
            res = subprocess.run(cli(case, src, folder), capture_output=True, text=True, env=ENV)
            assert res.returncode == 0, res.stderr
            assert_holds(case, folder / case.out, src)
            assert litter(case, folder) == []
            self._made[key, src.name] = (folder, state(case, folder))
        return self._made[key, src.name]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    inputs = root / "inputs"
    inputs.mkdir()
    small = make_input(inputs / "small.safetensors", 6, (64, 128), seed=1)       # 200 KB
    small_old = make_input(inputs / "small_old.safetensors", 3, (32, 64), seed=2)
    medium_a = make_input(inputs / "medium_a.safetensors", 24, (256, 1024), seed=3)  # 25 MB
    medium_b = make_input(inputs / "medium_b.safetensors", 24, (256, 1024), seed=4)
    return {"root": root, "small": small, "small_old": small_old, "medium_a": medium_a, "medium_b": medium_b,
            "refs": Refs(root / "refs")}


@pytest.fixture
def work(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


# --- the step runner ------------------------------------------------------------------------

# run(step, signame, fallback, argv) runs `convert` and sends the process SIG<signame> at the
# N-th call that changes the file system (open, mkdir, rename, renameat2, link, unlink, rmdir)
# while atomic_output is active, counting a call only the first time its stack (every frame's
# code and line) is seen (N = 0: never); it returns the exit status and the count. Counting
# stacks rather than calls keeps the sweep short -- a writer opening its input for each tensor
# is one kill point, not a hundred -- while the same function called from two places (the
# companion's rename, then the output's) is two.
_STEPPER = r"""
import builtins, contextlib, os, signal, sys
from convert import cli, fileio

# Ctrl-C as at a terminal: a shell starts background jobs (a CI runner may be one) with SIGINT
# ignored, and Python then installs no KeyboardInterrupt handler.
signal.signal(signal.SIGINT, signal.default_int_handler)

_CHANGING = {id(f) for f in (builtins.open, os.mkdir, os.rename, os.replace, os.link, os.unlink, os.remove,
                             os.rmdir)}
_RENAMEAT2 = fileio._renameat2.__code__
_real_atomic_output = fileio.atomic_output

def run(step, signame, fallback, argv):
    if fallback:  # the path taken where renameat2 is missing (not Linux, or a file system without it)
        fileio._renameat2_function = lambda: None
    sig, seen = getattr(signal, "SIG" + signame), set()

    def hook(frame, event, arg):
        if not ((event == "c_call" and id(arg) in _CHANGING) or (event == "call" and frame.f_code is _RENAMEAT2)):
            return
        site = []
        while frame is not None:
            site.append((frame.f_code, frame.f_lineno))
            frame = frame.f_back
        site = tuple(site)
        if site not in seen:
            seen.add(site)
            if len(seen) == step:
                os.kill(os.getpid(), sig)

    @contextlib.contextmanager
    def watched(*args, **kwargs):
        sys.setprofile(hook)
        try:
            with _real_atomic_output(*args, **kwargs) as tmp:
                yield tmp
        finally:
            sys.setprofile(None)

    fileio.atomic_output = watched
    return cli.main(argv), len(seen)
"""

# One process: python -c _RUNNER STEP SIGNAME FALLBACK ARGV... (prints the count).
_RUNNER = _STEPPER + r"""
code, count = run(int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4:])
print(count)
sys.exit(code)
"""

# A fork server for the long sweeps: imports once, then forks a child per request (a JSON line
# [step, signame, fallback, argv, stderr_path]) and answers [pid, returncode, count].
_SERVER = _STEPPER + r"""
import json
from convert import registry
for name in ("safetensors", "tf-ckpt", "torch", "onnx"):
    registry.get(name).format
import onnx  # imported by the onnx writer
for line in sys.stdin:
    step, signame, fallback, argv, err = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            code, count = run(step, signame, fallback, argv)
            with open(err + ".count", "w") as f:
                f.write(str(count))
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    try:
        with open(err + ".count") as f:
            count = int(f.read())
        os.unlink(err + ".count")
    except OSError:
        count = None
    print(json.dumps([pid, returncode, count]), flush=True)
"""


def runner(step: int, signame: str, args: list[str], fallback: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _RUNNER, str(step), signame, "1" if fallback else "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


@dataclass
class Run:
    pid: int
    returncode: int
    count: int | None
    stderr: str


class Forker:
    def __init__(self, tmp: Path):
        self.err = tmp / "stderr"
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=ENV)

    def run(self, step: int, signame: str, args: list[str], fallback: bool = False) -> Run:
        self.proc.stdin.write(json.dumps([step, signame, fallback, args, str(self.err)]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        pid, returncode, count = json.loads(line)
        return Run(pid, returncode, count, self.err.read_text())

    def steps_of(self, args: list[str], fallback: bool = False) -> int:
        """How many kill points a run has; the run itself must succeed."""
        r = self.run(0, "KILL", args, fallback)
        assert r.returncode == 0, r.stderr
        return r.count

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


@pytest.fixture(scope="module")
def forker(tmp_path_factory):
    f = Forker(tmp_path_factory.mktemp("forker"))
    yield f
    f.close()


def steps_of(args: list[str], fallback: bool = False) -> int:
    p = runner(0, "KILL", args, fallback)
    out, err = p.communicate()
    assert p.returncode == 0, err
    return int(out.split()[-1])


def recover_and_check(case: Case, folder: Path, new: tuple, old: tuple | None) -> tuple:
    """What the next conversion into ``folder`` does first (remove_stale_stages): after it the
    output is complete (new, or old when there was one, else nothing) and nothing else is left."""
    fileio.remove_stale_stages(folder)
    got = assert_valid_state(case, folder, new, old, settled=True)
    assert litter(case, folder) == []
    return got


# --- SIGKILL / SIGTERM / SIGINT at every step ---------------------------------------------------

STEP_SWEEP = [
    pytest.param("safetensors", False, False, id="safetensors-new"),
    pytest.param("safetensors", True, False, id="safetensors-force"),
    pytest.param("tf-ckpt", False, False, id="tf-ckpt-new"),
    pytest.param("tf-ckpt", True, False, id="tf-ckpt-force"),
    pytest.param("torch", True, False, id="torch-force"),
    pytest.param("onnx", True, False, id="onnx-force"),
    pytest.param("onnx-external", False, False, id="onnx-external-new"),
    pytest.param("onnx-external", True, False, id="onnx-external-force"),
    pytest.param("safetensors", True, True, id="safetensors-force-fallback"),
    pytest.param("tf-ckpt", True, True, id="tf-ckpt-force-fallback"),
    pytest.param("onnx-external", True, True, id="onnx-external-force-fallback"),
    # link(2) then unlink(2) for each new file: killed between them, the staged name and the
    # published one are the same file, which recovery must not take for an old one
    pytest.param("onnx-external", False, True, id="onnx-external-new-fallback"),
]


@pytest.mark.parametrize("key, previous, fallback", STEP_SWEEP)
def test_sigkill_at_every_step_leaves_old_or_new_and_the_next_run_cleans_up(data, forker, work, key, previous,
                                                                             fallback):
    """SIGKILL before each step. A single-rename publication (renameat2) leaves the old output or
    the new one at every moment; a multi-rename one (a companion file, or the fallback's folder
    swap) may leave no output until the next conversion puts the old one back. Every kill
    leaves at most its own staging folder, which the next conversion removes; then the same
    command succeeds (without --force when it had none: no orphan blocks it)."""
    case = CASES[key]
    atomic = not (fallback or case.companions)
    _, new = data["refs"].get(key, data["small"])
    old_dir, old = data["refs"].get(key, data["small_old"]) if previous else (None, None)
    args = argv(case, data["small"], work, force=previous)
    put(case, old_dir, work)
    n = forker.steps_of(args, fallback)
    assert state(case, work) == new and litter(case, work) == []
    seen = set()
    for step in range(1, n + 1):
        put(case, old_dir, work)
        p = forker.run(step, "KILL", args, fallback)
        assert p.returncode == -signal.SIGKILL, (step, p.stderr)
        assert_valid_state(case, work, new, old, settled=atomic)
        assert all(STAGE.fullmatch(x) and STAGE.fullmatch(x)[1] == str(p.pid) for x in litter(case, work)), \
            (step, litter(case, work))
        seen.add(recover_and_check(case, work, new, old))
        if state(case, work) != new:  # and the same command now succeeds, without --force if it had none
            convert.convert(data["small"], work / case.out, to=case.fmt, force=previous,
                            write_opts={"external_data_threshold": 0} if case.companions else None)
            assert state(case, work) == new and litter(case, work) == []
    # the sweep did hit both sides of the publication
    assert seen == ({new, old} if previous else {new, nothing(case)})


@pytest.mark.parametrize("key, previous", [("tf-ckpt", True), ("onnx-external", True), ("safetensors", False)])
@pytest.mark.parametrize("signame", ["TERM", "INT"])
def test_sigterm_and_ctrl_c_at_every_step_clean_up_completely(data, forker, work, key, previous, signame):
    """The handlers raise; publication and clean-up hold them back until done, so whatever the
    moment, the output is complete (old or new) and nothing at all is left beside it."""
    case = CASES[key]
    _, new = data["refs"].get(key, data["small"])
    old_dir, old = data["refs"].get(key, data["small_old"]) if previous else (None, None)
    args = argv(case, data["small"], work, force=previous)
    put(case, old_dir, work)
    n = forker.steps_of(args)
    seen = set()
    for step in range(1, n + 1):
        put(case, old_dir, work)
        p = forker.run(step, signame, args)
        assert p.returncode == 128 + getattr(signal, "SIG" + signame), (step, p.stderr)
        assert p.stderr.count("\n") == 1 and "interrupted" in p.stderr, p.stderr
        seen.add(assert_valid_state(case, work, new, old, settled=True))
        assert litter(case, work) == [], (step, litter(case, work))
    # a signal during the publication lets it finish (then the process ends as the signal says)
    assert seen == ({new, old} if previous else {new, nothing(case)})


# --- full disk ----------------------------------------------------------------------------

def _limited(n: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))


def assert_clean_failure(res: subprocess.CompletedProcess, out: Path, problem: str) -> None:
    assert res.returncode == 1, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr and "internal error" not in res.stderr, \
        res.stderr
    assert str(out) in res.stderr and problem in res.stderr, res.stderr


@pytest.mark.parametrize("key", list(CASES))
def test_file_size_limit_gives_one_line_and_no_output(data, work, key):
    """RLIMIT_FSIZE makes writes fail with EFBIG (CPython ignores SIGXFSZ) at several sizes, down
    to one byte short of the largest file; with --force the previous output stays as it was."""
    case = CASES[key]
    ref_dir, _ = data["refs"].get(key, data["medium_a"])
    old_dir, old = data["refs"].get(key, data["small_old"])
    largest = max(p.stat().st_size for n in case.names for p in ([ref_dir / n] if (ref_dir / n).is_file()
                                                                  else (ref_dir / n).rglob("*")))
    for limit, previous in [(0, False), (4096, True), (largest // 2, False), (largest - 1, True)]:
        put(case, old_dir if previous else None, work)
        res = subprocess.run(cli(case, data["medium_a"], work, force=previous), capture_output=True, text=True,
                             env=ENV, preexec_fn=_limited(limit))
        assert_clean_failure(res, work / case.out, "too large")
        assert state(case, work) == (old if previous else nothing(case)), limit
        assert litter(case, work) == [], (limit, litter(case, work))


@pytest.fixture
def small_fs(tmp_path):
    """A 20 MB tmpfs (root only; skipped where mounting is not permitted)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("key", ["safetensors", "tf-ckpt", "onnx-external"])
def test_full_file_system_gives_one_line_and_no_output(data, small_fs, key):
    """25 MB into a 20 MB file system: ENOSPC, nothing left; with --force, over a previous output
    (which the new one, staged beside it, cannot replace), the previous output stays intact."""
    case = CASES[key]
    old_dir, old = data["refs"].get(key, data["small_old"])
    for previous in (False, True):
        put(case, old_dir if previous else None, small_fs)
        res = subprocess.run(cli(case, data["medium_a"], small_fs, force=previous), capture_output=True, text=True,
                             env=ENV)
        assert_clean_failure(res, small_fs / case.out, "No space left on device")
        assert state(case, small_fs) == (old if previous else nothing(case))
        assert litter(case, small_fs) == []
    usage = shutil.disk_usage(small_fs)
    assert usage.used < 2 << 20, "space was not given back"


# --- two conversions, one output ----------------------------------------------------------------

@pytest.mark.parametrize("key", ["safetensors", "tf-ckpt", "onnx-external"])
@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_two_conversions_racing_for_one_output(data, work, key, force):
    """Started together on inputs of the same size: the output is exactly one of the two (as
    each writes it alone, checked by the framework); without --force exactly one succeeds and
    the other says "already exists"."""
    case = CASES[key]
    refs = {src: data["refs"].get(key, data[src])[1] for src in ("medium_a", "medium_b")}
    for _ in range(3):
        put(case, None, work)
        procs = {src: subprocess.Popen(cli(case, data[src], work, force), stderr=subprocess.PIPE, text=True, env=ENV)
                 for src in refs}
        codes = {src: (p.wait(), p.stderr.read()) for src, p in procs.items()}
        for p in procs.values():
            p.stderr.close()
        got = state(case, work)
        assert got in refs.values(), "a mix of the two outputs"
        winner = next(src for src, ref in refs.items() if ref == got)
        assert_holds(case, work / case.out, data[winner])
        assert litter(case, work) == []
        if force:
            assert all(code == 0 for code, _ in codes.values()), codes
        else:
            assert sorted(code for code, _ in codes.values()) == [0, 1], codes
            loser_code, loser_err = next(c for src, c in codes.items() if c[0] == 1)
            assert "already exists" in loser_err and loser_err.count("\n") == 1, loser_err
            assert codes[winner][0] == 0


# --- staging folders left by killed conversions ---------------------------------------------------

def _wait_stopped(p: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{p.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.005)
    raise AssertionError("the conversion did not stop")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_stale_staging_is_removed_and_a_live_one_is_kept(data, work):
    case, other = CASES["tf-ckpt"], CASES["safetensors"]
    # a conversion that is alive, stopped after creating its staging folder
    paused = runner(2, "STOP", argv(other, data["small"], work))
    try:
        _wait_stopped(paused)
        (live,) = litter(case, work)
        assert STAGE.fullmatch(live)[1] == str(paused.pid)
        # a conversion killed while writing (its writer has created the output folder and a file in it);
        # it does not touch the live one
        killed = runner(4, "KILL", argv(case, data["small"], work))
        killed.communicate()
        assert killed.returncode == -signal.SIGKILL
        (dead,) = set(litter(case, work)) - {live}
        assert STAGE.fullmatch(dead)[1] == str(killed.pid) and os.listdir(work / dead) == [case.out]
        assert os.listdir(work / dead / case.out)
        # a staging folder whose PID now belongs to some other live program (ours), unlocked: kept
        # while recent (its owner could be between mkdir and lock), removed once old
        reused_new = work / f".x.convert-tmp-{os.getpid()}-900"
        reused_old = work / f".x.convert-tmp-{os.getpid()}-901"
        reused_new.mkdir()
        reused_old.mkdir()
        os.utime(reused_old, (time.time() - 2 * fileio.STALE_AFTER,) * 2)
        # a file that merely looks like one is not ours to delete
        (work / ".y.convert-tmp-1-1").write_text("not a staging folder")
        # the next conversion into the folder (the killed one's command, again, without --force)
        res = subprocess.run(cli(case, data["small"], work), capture_output=True, text=True, env=ENV)
        assert res.returncode == 0, res.stderr
        assert state(case, work) == data["refs"].get("tf-ckpt", data["small"])[1]
        assert sorted(litter(case, work)) == sorted([live, reused_new.name, ".y.convert-tmp-1-1"])
    finally:
        paused.send_signal(signal.SIGCONT)
        out, err = paused.communicate()
    assert paused.returncode == 0, err
    assert tree_digest(work / other.out) == data["refs"].get("safetensors", data["small"])[1][0]
    assert sorted(litter(case, work)) == sorted([other.out, reused_new.name, ".y.convert-tmp-1-1"])


def test_a_publication_cut_in_half_is_undone_by_the_next_run_even_if_it_is_killed_too(data, forker, work):
    """ONNX with external data over a previous output is several renames (old model away, data
    file swapped, new model in). Killed in between, the output path holds no model; the next
    conversion first puts the old pair back (checked by onnx). That recovery is itself killed at
    each of its steps: the one after it still ends with the old pair or the new one."""
    case = CASES["onnx-external"]
    _, new = data["refs"].get("onnx-external", data["small"])
    old_dir, old = data["refs"].get("onnx-external", data["small_old"])
    args = argv(case, data["small"], work, force=True)
    put(case, old_dir, work)
    n = forker.steps_of(args)
    halfway = {}
    for step in range(1, n + 1):
        put(case, old_dir, work)
        forker.run(step, "KILL", args)
        got = state(case, work)
        recovered = recover_and_check(case, work, new, old)
        if got[0] is None:
            halfway[got] = step
            assert recovered == old
            assert_holds(case, work / case.out, data["small_old"])
    # the old model moved away, with the old data file still there, and with the new one
    assert set(halfway) == {(None, old[1]), (None, new[1])}, halfway
    worst = halfway[None, new[1]]
    put(case, old_dir, work)
    forker.run(worst, "KILL", args)
    assert state(case, work) == (None, new[1])
    m = forker.steps_of(args)  # the next run from there: recovers, then converts
    for step in range(1, m + 1):
        put(case, old_dir, work)
        forker.run(worst, "KILL", args)
        assert forker.run(step, "KILL", args).returncode == -signal.SIGKILL
        assert_valid_state(case, work, new, old, settled=False)
        recover_and_check(case, work, new, old)


# --- slow: kills spread over a large conversion, and races stopped at each step -------------------

@pytest.fixture(scope="module")
def big(data):
    return make_input(data["root"] / "inputs" / "big.safetensors", 160, (256, 1024), seed=5)  # 168 MB


def _start_and_kill(cmd: list[str], folder: Path, after_start: float | None,
                    after_stage: float | None) -> tuple[int, float]:
    """Run ``cmd`` and SIGKILL it ``after_start`` seconds after starting it, or ``after_stage``
    seconds after its staging folder appears (unless it ends sooner); return its PID and how
    long it ran after its staging folder appeared."""
    p = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=ENV)
    staged = None
    if after_start is not None:
        time.sleep(after_start)
    else:
        while p.poll() is None and not any(STAGE.fullmatch(x) for x in os.listdir(folder)):
            time.sleep(0.001)
        staged = time.perf_counter()
        try:
            p.wait(timeout=after_stage)
        except subprocess.TimeoutExpired:
            pass
    p.kill()
    p.wait()
    return p.pid, (time.perf_counter() - staged if staged else 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["safetensors", "tf-ckpt", "torch", "onnx"])
def test_sigkill_at_moments_spread_over_a_large_conversion(data, big, work, key):
    """A 168 MB conversion killed at 12 moments: 2 during start-up (one at once), 10 spread from
    the creation of its staging folder to past its end (writing, verifying, publishing, cleaning
    up), with no previous output and over one (--force); each state is checked, then recovered as
    the next run would."""
    case = CASES[key]
    _, new = data["refs"].get(key, big)
    old_dir, old = data["refs"].get(key, data["small_old"])
    put(case, None, work)
    _, writing = _start_and_kill(cli(case, big, work), work, None, 60.0)  # to its end: how long it writes
    assert state(case, work) == new
    moments = [(0.0, None), (0.1, None)] + [(None, f * writing) for f in np.linspace(0, 1.1, 10)]
    outcomes = []
    for previous in (False, True):
        for after_start, after_stage in moments:
            put(case, old_dir if previous else None, work)
            pid, _ = _start_and_kill(cli(case, big, work, force=previous), work, after_start, after_stage)
            got = assert_valid_state(case, work, new, old if previous else None, settled=False)
            left = litter(case, work)
            assert all(STAGE.fullmatch(x) and STAGE.fullmatch(x)[1] == str(pid) for x in left), left
            outcomes.append(("new" if got == new else "old" if got == old else "nothing", bool(left)))
            recover_and_check(case, work, new, old if previous else None)
    # kills landed before the end, mid-write (a staging folder was left) and after the end
    assert {("new", False), ("nothing", True), ("old", True)} <= set(outcomes), outcomes


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_a_race_at_every_step_of_a_publication(data, work, force):
    """Conversion A (ONNX with external data: several renames) is stopped at each of its steps
    while B converts another input into the same output, then A goes on: the result is one
    complete output (A's or B's, model and data file together, checked by onnx), and without
    --force exactly one of them succeeds. When A is stopped inside its publication, B waits for
    it (the folder lock)."""
    case = CASES["onnx-external"]
    srcs = {"a": data["small"], "b": data["small_old"]}
    ref = {k: data["refs"].get("onnx-external", src)[1] for k, src in srcs.items()}
    args_a = argv(case, srcs["a"], work, force)
    n = steps_of(args_a)
    blocked = 0
    for step in range(1, n + 1):
        put(case, None, work)
        a = runner(step, "STOP", args_a)
        _wait_stopped(a)
        b = subprocess.Popen(cli(case, srcs["b"], work, force), stderr=subprocess.PIPE, text=True, env=ENV)
        try:
            b.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            blocked += 1
        a.send_signal(signal.SIGCONT)
        _, err_a = a.communicate()
        _, err_b = b.communicate()
        got = state(case, work)
        assert got in ref.values(), (step, "mixed output")
        winner = "a" if got == ref["a"] else "b"
        assert_holds(case, work / case.out, srcs[winner])
        assert litter(case, work) == [], (step, litter(case, work))
        if force:
            assert (a.returncode, b.returncode) == (0, 0), (step, err_a, err_b)
        else:
            assert sorted([a.returncode, b.returncode]) == [0, 1], (step, err_a, err_b)
            assert "already exists" in (err_a if a.returncode else err_b)
            assert {"a": a.returncode, "b": b.returncode}[winner] == 0
    assert blocked, "B never waited for A's publication"
