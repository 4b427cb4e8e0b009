"""Power cuts at every point of every writer's output (issue 19).

A real ``convert`` process runs once under ``strace`` (see :mod:`powercut` for the recording
and the persistence model); then for every prefix of its file-system operations, every disk
state a power cut at that point may leave is constructed, and:

* the output path holds the previous output, nothing, or the new output, byte for byte --
  never a partial or mixed one (for an output with companion files, or a folder replaced
  where ``renameat2`` is missing, the output may be missing with either's companions beside
  it: the next conversion puts the previous output back). The new and previous outputs are
  read by the framework or the format's own library (safetensors, TensorFlow, torch, onnx, gguf, NumPy, h5py)
  and must hold the tensors written;
* each distinct state (what the next conversion can observe: the outputs and any staging
  folder's journal, old outputs and staged names) is put on disk, and there: the output is
  read by the framework; what the next conversion does first (``remove_stale_stages``)
  leaves the new or the previous output complete (nothing only when there was none before)
  and no staging folder; and the next ``convert`` run itself, a real process, succeeds with
  the new output and leaves nothing else;
* states in which that recovery had to move outputs back are the start of a second
  recording -- the next run, cut by a power failure in turn -- checked the same way.

The inode numbers a journal records survive a real power cut; a state put on disk gets new
ones, so each journal's identities are translated to the new files (same model inode).

``make crash`` runs the same sweep at length: every allowed subset of up to 16 pending changes
(10 here), and the next run cut wherever a staging folder with a journal is left (up to 50).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from convert import fileio

import powercut

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "TF_CPP_MIN_LOG_LEVEL": "3"}
STAGE = re.compile(r"\..+\.convert-tmp-(\d+)-\d+")
JOURNAL, OLD = fileio._JOURNAL, fileio._OLD
FULL = os.environ.get("CONVERT_CRASH_FULL") == "1"
CAP = 16 if FULL else 10
REPORT = os.environ.get("CONVERT_CRASH_REPORT")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

why_not = powercut.strace_works()
pytestmark = pytest.mark.skipif(why_not is not None, reason=why_not or "")

# The traced conversion: `convert` itself, optionally with renameat2 taken away (the path used
# where it is missing: not Linux, or a file system without it).
LAUNCH = r"""
import sys
from convert import cli, fileio
if sys.argv[1] == "1":
    fileio._renameat2_function = lambda: None
sys.exit(cli.main(sys.argv[2:]))
"""

# A fork server for the next runs: imports once, forks a real `convert` per request
# ([argv, fallback, stderr path] -> exit status).
SERVER = r"""
import json, os, sys
from convert import cli, fileio, registry
for info in registry.FORMATS:
    info.format  # imports the adapter
import onnx, safetensors
if sys.argv[1] == "1":
    import tensorflow
for line in sys.stdin:
    argv, fallback, err = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            if fallback:
                fileio._renameat2_function = lambda: None
            code = cli.main(argv)
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


class Server:
    def __init__(self, tmp: Path, tf: bool):
        self.err = tmp / "stderr"
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, "1" if tf else "0"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=ENV)

    def run(self, argv: list[str], fallback: bool) -> tuple[int, str]:
        self.proc.stdin.write(json.dumps([argv, fallback, str(self.err)]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line), self.err.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# --- writers, inputs, oracles ----------------------------------------------------------------

@dataclass(frozen=True)
class Writer:
    fmt: str
    out: str
    extra: tuple[str, ...] = ()
    companions: tuple[str, ...] = ()
    source: str = "tensors"  # "tensors": a safetensors file; "steps": a TF Saver folder with 3 steps
    folder: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return (self.out, *self.companions)


WRITERS = {
    "safetensors": Writer("safetensors", "out.safetensors"),
    "safetensors-shards": Writer("safetensors", "out_shards", ("--max-shard-size", "40KB"), folder=True),
    "tf-ckpt": Writer("tf-ckpt", "out_ckpt", folder=True),
    "tf-ckpt-v1": Writer("tf-ckpt-v1", "out_v1", folder=True),
    "tf-ckpt-all-steps": Writer("tf-ckpt", "out_steps", ("--all-steps",), source="steps", folder=True),
    "torch": Writer("torch", "out.pt"),
    "onnx": Writer("onnx", "out.onnx"),
    "onnx-external": Writer("onnx", "out.onnx", ("--external-data-threshold", "0"), ("out.onnx.data",)),
    "saved-model": Writer("saved-model", "out_sm", folder=True),
    "gguf": Writer("gguf", "out.gguf"),
    "npz": Writer("npz", "out.npz"),
    "keras": Writer("keras", "out.weights.h5"),
    "keras-legacy": Writer("keras-legacy", "out.h5"),
}


def make_tensors(path: Path, seed: int, big: bool) -> Path:
    """A safetensors input; ``big`` adds a 1.25 MiB tensor (copied with copy_file_range)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    arrays = {"conv/w": rng.standard_normal((64, 128) if big else (16, 32), dtype=np.float32),
              "conv/b": rng.standard_normal((16,), dtype=np.float32),
              "step": np.array([seed], np.int64)}
    if big:
        arrays["dense/w"] = rng.standard_normal((512, 640), dtype=np.float32)
    save_file(arrays, str(path))
    return path


def make_steps(folder: Path, tf) -> Path:
    """A tf.compat.v1 Saver folder: 3 retained steps of two variables and a global step."""
    g = tf.Graph()
    with g.as_default():
        w = tf.compat.v1.Variable(np.arange(24, dtype=np.float32).reshape(4, 6), name="w")
        b = tf.compat.v1.Variable(np.zeros(6, np.float32), name="b")
        gs = tf.compat.v1.train.get_or_create_global_step()
        step = tf.group(w.assign_add(tf.ones_like(w)), b.assign_sub(tf.ones_like(b) * 0.5), gs.assign_add(1))
        saver = tf.compat.v1.train.Saver(max_to_keep=3)
        with tf.compat.v1.Session(graph=g) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for _ in range(3):
                sess.run(step)
                saver.save(sess, str(folder / "model"), global_step=gs)
    return folder


def oracle(key: str, path: Path) -> dict[str, np.ndarray]:
    """The output as the framework / the format's library reads it (never convert)."""
    w = WRITERS[key]
    if w.fmt == "safetensors":
        from safetensors.numpy import load_file

        if not w.folder:
            return load_file(str(path))
        index = json.loads((path / "model.safetensors.index.json").read_text())
        out = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(load_file(str(path / shard)))
        assert sorted(out) == sorted(index["weight_map"])
        return out
    if w.fmt == "torch":
        import torch

        return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
    if w.fmt.startswith("keras"):  # h5py, as the format's contract reads it
        from contract import oracle as contract_oracle

        return contract_oracle(w.fmt)(path)
    if w.fmt == "gguf":
        import gguf

        return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    if w.fmt == "npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if w.fmt == "onnx":
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))  # external data too
        return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    import tensorflow as tf

    if w.fmt == "saved-model":
        loaded = tf.saved_model.load(str(path))
        return {name: np.asarray(v.numpy()) for name, v in loaded.weights.items()}
    state = tf.train.get_checkpoint_state(str(path))
    out = {}
    for prefix in state.all_model_checkpoint_paths:
        reader = tf.train.load_checkpoint(os.path.join(str(path), os.path.basename(prefix)))
        for name in reader.get_variable_to_shape_map():
            out[f"{os.path.basename(prefix)}:{name}" if w.source == "steps" else name] = reader.get_tensor(name)
    return out


def source_values(src: Path, kind: str) -> dict[str, np.ndarray]:
    if kind == "tensors":
        from safetensors.numpy import load_file

        return load_file(str(src))
    import tensorflow as tf

    out = {}
    for prefix in tf.train.get_checkpoint_state(str(src)).all_model_checkpoint_paths:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            out[f"{os.path.basename(prefix)}:{name}"] = reader.get_tensor(name)
    return out


def assert_same_values(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: tensors {sorted(got)} != {sorted(want)}"
    for k, v in want.items():
        g = np.asarray(got[k])
        assert g.shape == v.shape and g.dtype == v.dtype and np.array_equal(g, v), f"{what}: {k} differs"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("powercut-inputs")
    return {"new": make_tensors(root / "new.safetensors", 1, big=True),
            "old": make_tensors(root / "old.safetensors", 2, big=False), "root": root}


@pytest.fixture(scope="module")
def steps(inputs):
    tf = pytest.importorskip("tensorflow")
    folder = inputs["root"] / "steps"
    folder.mkdir()
    return make_steps(folder, tf)


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory):
    """Where crash states are put: a tmpfs when one can be mounted (root), else a temporary folder."""
    root = tmp_path_factory.mktemp("powercut-states")
    mounted = (os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(root)], capture_output=True).returncode == 0)
    try:
        yield root
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    made: dict[bool, Server] = {}

    def get(tf: bool) -> Server:
        if tf not in made:
            made[tf] = Server(tmp_path_factory.mktemp("server"), tf)
        return made[tf]
    yield get
    for s in made.values():
        s.close()


# --- what the checks look at -------------------------------------------------------------------

def files_under(img: powercut.Image, node: int) -> list[int]:
    if img.kind[node] == "f":
        return [node]
    return [n for _, n in img.walk(node) if img.kind[n] == "f"]


def stages(img: powercut.Image) -> Iterable[tuple[str, int]]:
    for name, n in sorted(img.entries[img.root].items()):
        if STAGE.fullmatch(name) and img.kind[n] == "d":
            yield name, n


def relevant(img: powercut.Image, names: tuple[str, ...]) -> list[int]:
    """The files whose bytes the checks or the next run's recovery read: the outputs, and in a
    staging folder with a journal, the journal, the old outputs moved aside and the staged names."""
    top = img.entries[img.root]
    out = [f for n in names if n in top for f in files_under(img, top[n])]
    for _, stage in stages(img):
        entries = img.entries[stage]
        if JOURNAL in entries:
            out += files_under(img, entries[JOURNAL])
            out += [f for n in (*names, OLD) if n in entries for f in files_under(img, entries[n])]
    return out


def projection(img: powercut.Image, names: tuple[str, ...]) -> tuple[str | None, ...]:
    return tuple(img.digest(img.lookup(n)) for n in names)


def observable(img: powercut.Image, names: tuple[str, ...]) -> tuple:
    """All that the next conversion's recovery can see in a state (file identities included)."""
    out = []
    for name, n in sorted(img.entries[img.root].items()):
        if name in names:
            out.append(("out", name, n, img.digest(n)))
        elif STAGE.fullmatch(name) and img.kind[n] == "d":
            e = img.entries[n]
            journal = img.digest(e[JOURNAL]) if JOURNAL in e else None
            staged = tuple((x, e[x], img.digest(e[x]) if journal else None) for x in (*names, OLD) if x in e)
            old = tuple((p, c, img.digest(c)) for p, c in img.walk(e[OLD])) if journal and OLD in e else ()
            out.append(("stage", name, journal, staged, old, bool(set(e) - {*names, JOURNAL, OLD})))
        else:
            out.append(("other", name, n, img.digest(n)))
    return tuple(out)


def put_state(img: powercut.Image, dest: Path, rec: powercut.Recording) -> None:
    """Put a crash state on disk, translating each journal's file identities to the new inodes
    (a journal there before the run names inodes as they were then; one the run wrote, as after)."""
    ids = powercut.materialize(img, dest)
    for name, stage in stages(img):
        j = img.entries[stage].get(JOURNAL)
        if j is None or img.kind[j] != "f":
            continue
        path = dest / name / JOURNAL
        real_ids = rec.initial_ids if j in rec.initial.kind else rec.final_ids
        try:
            journal = json.loads(path.read_text("utf-8"))
            new = journal["new"]
            assert isinstance(new, dict)
        except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
            continue  # torn: the next run must cope with it as it is
        for k, ident in new.items():
            model = real_ids.get(tuple(ident)) if isinstance(ident, list) else None
            new[k] = list(ids[model]) if model in ids else [0, 0]
        path.write_text(json.dumps(journal), "utf-8")


def on_disk(folder: Path, names: tuple[str, ...]) -> tuple[tuple[str | None, ...], list[str]]:
    img, _ = powercut.snapshot(folder)
    return projection(img, names), sorted(n for n in os.listdir(folder) if n not in names)


# --- the sweep ---------------------------------------------------------------------------------

@dataclass
class Expect:
    names: tuple[str, ...]
    new: tuple
    old: tuple | None         # the previous output, None when there was none
    atomic: bool              # one rename: the output is never missing when there was one
    values: dict[tuple, tuple[str, dict]]  # projection -> (writer to read it as, the tensors it must hold)

    @property
    def nothing(self) -> tuple:
        return (None,) * len(self.names)

    def visible_ok(self, got: tuple) -> bool:
        allowed = {self.new, self.old if self.old is not None else self.nothing}
        if not self.atomic:
            allowed.add(self.nothing)
        if got in allowed:
            return True
        return (not self.atomic and got[0] is None
                and all(d in (None, self.new[i], None if self.old is None else self.old[i])
                        for i, d in enumerate(got[1:], 1)))

    def describe(self, got: tuple) -> str:
        """("new", "old", None...) for a projection: which output each name holds."""
        def one(i, d):
            if d is None:
                return "nothing"
            return "new" if d == self.new[i] else "old" if self.old is not None and d == self.old[i] else "PARTIAL"
        return "(" + ", ".join(f"{n}: {one(i, d)}" for i, (n, d) in enumerate(zip(self.names, got, strict=True))) + ")"

    def settled_ok(self, got: tuple) -> bool:
        return got in {self.new, self.old if self.old is not None else self.nothing}


@dataclass
class Tally:
    ops: int = 0
    points: int = 0
    states: int = 0
    distinct: int = 0
    next_runs: int = 0
    nested: int = 0
    bounded: int = 0
    bad: int = 0


def sweep(rec: powercut.Recording, key: str, expect: Expect, scratch: Path, rerun, verified: set,
          tally: Tally, nested=None) -> list[str]:
    """Check every crash state of ``rec``; return what was wrong (empty when all is well)."""
    crashes = powercut.Crashes(rec, cap=CAP)
    names = expect.names
    problems: list[str] = []
    distinct: dict[tuple, powercut.CrashState] = {}
    tally.ops += len(rec.ops)
    tally.points += len(rec.ops) + 1
    for st in crashes.states(lambda img: relevant(img, names)):
        tally.states += 1
        got = projection(st.image, names)
        if not expect.visible_ok(got):
            tally.bad += 1
            problems.append(f"{st}: partial or mixed output {expect.describe(got)}")
            continue
        distinct.setdefault((got, observable(st.image, names)), st)
    tally.distinct += len(distinct)
    tally.bounded += crashes.bounded_points
    reran: set = set()
    for i, ((got, _), st) in enumerate(distinct.items()):
        tag = f"{st}"
        d = scratch / f"s{i}"
        put_state(st.image, d, rec)
        try:
            links = tuple(os.lstat(p).st_nlink for n in names if os.path.lexists(d / n)
                          for p in ([d / n] if not (d / n).is_dir() else sorted((d / n).rglob("*"))))
            if got[0] is not None and (got, links) not in verified:
                oracle_key, values = expect.values[got]  # read by the framework or the format's library
                try:
                    assert_same_values(oracle(oracle_key, d / names[0]), values, "")
                except Exception as e:  # noqa: BLE001 - whatever the framework says is the finding
                    tally.bad += 1
                    problems.append(f"{tag}: {expect.describe(got)} but {oracle_key} cannot read it: {e}")
                    continue
                verified.update({got, (got, links)})
            # what the next conversion does first
            fileio.remove_stale_stages(d)
            settled, litter = on_disk(d, names)
            if not expect.settled_ok(settled) or litter:
                tally.bad += 1
                problems.append(f"{tag}: after the next run's recovery {expect.describe(settled)}, left {litter}")
                continue
            # the next run, cut in turn: where its recovery moves outputs back (and, at length,
            # wherever it has a journal to read)
            if nested is not None and (settled != got or (FULL and any(
                    JOURNAL in st.image.entries[n] for _, n in stages(st.image)))):
                nested(st.image)
            # the next conversion itself, from the crash state, once per state its recovery leaves
            after = tree_key(d)
            if after in reran:
                continue
            reran.add(after)
            d2 = scratch / f"r{i}"
            put_state(st.image, d2, rec)
            code, err = rerun(d2, got[0] is not None)  # the same command; --force if the output is there
            tally.next_runs += 1
            final, litter = on_disk(d2, names)
            if code != 0 or final != expect.new or litter:
                tally.bad += 1
                problems.append(f"{tag}: the next convert run exited {code} ({err.strip()}), output "
                                f"{expect.describe(final)}, left {litter}")
        finally:
            for x in (d, scratch / f"r{i}"):
                shutil.rmtree(x, ignore_errors=True)
    return problems


def tree_key(folder: Path) -> tuple:
    """A folder's whole state: names, kinds, bytes, and which names are the same file."""
    img, _ = powercut.snapshot(folder)
    first: dict[int, str] = {}
    out = []
    for p, n in img.walk():
        first.setdefault(n, p)
        out.append((p, img.kind[n], first[n], None if img.kind[n] == "d" else img.digest(n)))
    return tuple(out)


def listing(rec: powercut.Recording) -> str:
    return "\n".join(f"  {op}" for op in rec.ops if op.kind != "data")


def argv_for(w: Writer, src: Path, out_dir: Path, force: bool) -> list[str]:
    return ["auto", str(src), "--to", w.fmt, "-o", str(out_dir / w.out), "-q", *w.extra,
            *(["--force"] if force else [])]


SCENARIOS = [
    pytest.param("safetensors", False, False, id="safetensors-new"),
    pytest.param("safetensors", True, False, id="safetensors-force"),
    pytest.param("safetensors-shards", False, False, id="safetensors-shards-new", marks=pytest.mark.slow),
    pytest.param("safetensors-shards", True, False, id="safetensors-shards-force", marks=pytest.mark.slow),
    pytest.param("tf-ckpt", False, False, id="tf-ckpt-new", marks=pytest.mark.slow),
    pytest.param("tf-ckpt", True, False, id="tf-ckpt-force", marks=pytest.mark.slow),
    pytest.param("tf-ckpt-v1", False, False, id="tf-ckpt-v1-new", marks=pytest.mark.slow),
    pytest.param("tf-ckpt-v1", True, False, id="tf-ckpt-v1-force", marks=pytest.mark.slow),
    pytest.param("tf-ckpt-all-steps", False, False, id="tf-ckpt-all-steps-new", marks=pytest.mark.slow),
    pytest.param("tf-ckpt-all-steps", True, False, id="tf-ckpt-all-steps-force", marks=pytest.mark.slow),
    pytest.param("torch", False, False, id="torch-new", marks=pytest.mark.slow),
    pytest.param("torch", True, False, id="torch-force", marks=pytest.mark.slow),
    pytest.param("onnx", False, False, id="onnx-new", marks=pytest.mark.slow),
    pytest.param("onnx", True, False, id="onnx-force", marks=pytest.mark.slow),
    pytest.param("onnx-external", False, False, id="onnx-external-new"),
    pytest.param("onnx-external", True, False, id="onnx-external-force", marks=pytest.mark.slow),
    pytest.param("saved-model", False, False, id="saved-model-new", marks=pytest.mark.slow),
    pytest.param("saved-model", True, False, id="saved-model-force", marks=pytest.mark.slow),
    pytest.param("gguf", False, False, id="gguf-new", marks=pytest.mark.slow),
    pytest.param("gguf", True, False, id="gguf-force", marks=pytest.mark.slow),
    pytest.param("npz", False, False, id="npz-new", marks=pytest.mark.slow),
    pytest.param("npz", True, False, id="npz-force", marks=pytest.mark.slow),
    pytest.param("keras", False, False, id="keras-new", marks=pytest.mark.slow),
    pytest.param("keras", True, False, id="keras-force", marks=pytest.mark.slow),
    pytest.param("keras-legacy", False, False, id="keras-legacy-new", marks=pytest.mark.slow),
    pytest.param("keras-legacy", True, False, id="keras-legacy-force", marks=pytest.mark.slow),
    # where renameat2 is missing: link(2) for a new file, two renames to replace a folder
    pytest.param("safetensors", False, True, id="safetensors-new-fallback", marks=pytest.mark.slow),
    pytest.param("safetensors", True, True, id="safetensors-force-fallback", marks=pytest.mark.slow),
    pytest.param("tf-ckpt", True, True, id="tf-ckpt-force-fallback", marks=pytest.mark.slow),
    pytest.param("onnx-external", False, True, id="onnx-external-new-fallback", marks=pytest.mark.slow),
    pytest.param("onnx-external", True, True, id="onnx-external-force-fallback", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("key, previous, fallback", SCENARIOS)
def test_power_cut_at_every_point_leaves_old_or_new_and_the_next_run_completes(
        request, inputs, servers, scratch_root, tmp_path, key, previous, fallback):
    started = time.perf_counter()
    scratch = scratch_root / request.node.callspec.id
    scratch.mkdir()
    w = WRITERS[key]
    if w.fmt == "saved-model" or w.source == "steps" or w.fmt.startswith("tf-ckpt"):
        pytest.importorskip("tensorflow")
    src = request.getfixturevalue("steps") if w.source == "steps" else inputs["new"]
    work = tmp_path / "work"
    work.mkdir()
    old_values, old_key = None, key
    if previous:  # the previous output: the other input converted plainly
        old_key = "tf-ckpt" if w.source == "steps" else key
        res = subprocess.run([sys.executable, "-m", "convert", *argv_for(WRITERS[old_key], inputs["old"], work,
                                                                         False)],
                             capture_output=True, text=True, env=ENV)
        assert res.returncode == 0, res.stderr
        if old_key != key:
            os.rename(work / WRITERS[old_key].out, work / w.out)
        old_values = oracle(old_key, work / w.out)
        assert_same_values(old_values, source_values(inputs["old"], "tensors"), "previous output")
    argv = [sys.executable, "-c", LAUNCH, "1" if fallback else "0", *argv_for(w, src, work, previous)]
    rec = powercut.record(argv, work, cwd=tmp_path, env=ENV)
    assert rec.returncode == 0, rec.stderr
    new_values = source_values(src, w.source)
    assert_same_values(oracle(key, work / w.out), new_values, "the recorded conversion's output")
    names = w.names
    new = projection(rec.final, names)
    old = projection(rec.initial, names) if previous else None
    expect = Expect(names, new, old, atomic=not (w.companions or (fallback and previous and w.folder)),
                    values={new: (key, new_values), **({old: (old_key, old_values)} if previous else {})})
    server = servers(w.fmt == "saved-model")

    def rerun(folder: Path, force: bool):
        return server.run(argv_for(w, src, folder, previous or force), fallback)

    tally = Tally()
    verified: set = set()
    nested_problems: list[str] = []

    def nested(img: powercut.Image) -> None:
        """The next run, started from a state its recovery must repair, cut by a power failure in turn."""
        if tally.nested >= (50 if FULL else 3):
            return
        tally.nested += 1
        folder = tmp_path / f"next{tally.nested}"
        folder.mkdir()
        put_state(img, folder / "work", rec)
        again = [sys.executable, "-c", LAUNCH, "1" if fallback else "0", *argv_for(w, src, folder / "work", True)]
        rec2 = powercut.record(again, folder / "work", cwd=folder, env=ENV)
        assert rec2.returncode == 0, rec2.stderr
        assert projection(rec2.final, names) == new
        (scratch / folder.name).mkdir()
        found = sweep(rec2, key, expect, scratch / folder.name, rerun, verified, tally, nested=None)
        if found:
            nested_problems.extend(f"next run: {p}" for p in found[:6])
            nested_problems.append("the next run's operations (data left out):\n" + listing(rec2))

    problems = sweep(rec, key, expect, scratch, rerun, verified, tally, nested=nested)
    seconds = time.perf_counter() - started
    line = (f"{request.node.callspec.id}: {tally.ops} operations, {tally.points} crash points "
            f"({tally.bounded} explored bounded), {tally.states} crash states ({tally.distinct} distinct, "
            f"{tally.next_runs} next runs, {tally.nested} next runs cut), {tally.bad} bad, {seconds:.1f} s")
    print(line)
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps({"id": request.node.callspec.id, **tally.__dict__, "seconds": round(seconds, 1)}) + "\n")
    if problems or nested_problems or tally.bad:
        pytest.fail(f"{line}\n" + "\n".join(problems[:12] + nested_problems)
                    + f"\nthe recorded operations (data left out):\n{listing(rec)}", pytrace=False)
    # the sweep did see both sides of the publication
    assert new in verified and (not previous or old in verified), line


# --- the harness itself: it must find what a missing fsync allows -------------------------------

UNSAFE_FILE = """
import os
with open("w/.tmp", "wb") as f:
    f.write(b"x" * 10000)
    f.write(b"y" * 10000)
os.rename("w/.tmp", "w/out")
"""
SAFE_FILE = """
import os
with open("w/.tmp", "wb") as f:
    f.write(b"x" * 10000)
    f.write(b"y" * 10000)
    f.flush()
    os.fsync(f.fileno())
os.rename("w/.tmp", "w/out")
fd = os.open("w", os.O_RDONLY)
os.fsync(fd)
"""
# A model and the data file it reads, published by two renames in one folder (as convert did
# before the companions were fsynced ahead of the model); with "SYNC" the folder is fsynced between.
TWO_FILES = """
import os, sys
for name in ("data", "model"):
    with open(f"w/.{name}", "wb") as f:
        f.write(name.encode() * 1000)
        f.flush()
        os.fsync(f.fileno())
os.rename("w/.data", "w/data")
if sys.argv[1] == "SYNC":
    fd = os.open("w", os.O_RDONLY); os.fsync(fd); os.close(fd)
os.rename("w/.model", "w/model")
fd = os.open("w", os.O_RDONLY)
os.fsync(fd)
"""


def _bad_states(tmp_path: Path, code: str, names: tuple[str, ...], allowed, *args: str) -> tuple[int, int]:
    (tmp_path / "w").mkdir(parents=True)
    rec = powercut.record([sys.executable, "-c", code, *args], tmp_path / "w", cwd=tmp_path)
    assert rec.returncode == 0, rec.stderr
    final = projection(rec.final, names)
    states = bad = 0
    for st in powercut.Crashes(rec).states(lambda img: [n for x in names if (n := img.lookup(x)) is not None]):
        states += 1
        bad += projection(st.image, names) not in allowed(final)
    return states, bad


def test_the_harness_finds_a_rename_before_fsync_and_passes_the_fixed_program(tmp_path):
    """Without the fsync, a power cut may leave "out" empty, half written or torn: found; with
    it (and the folder's fsync), "out" is absent or complete in every state."""
    states, bad = _bad_states(tmp_path / "a", UNSAFE_FILE, ("out",), lambda final: {(None,), final})
    assert bad > 0 and states > bad
    states, bad = _bad_states(tmp_path / "b", SAFE_FILE, ("out",), lambda final: {(None,), final})
    assert bad == 0 and states > 10


def test_the_harness_finds_two_renames_persisted_out_of_order(tmp_path):
    """The model must never be there without its data file: two renames in one folder without an
    fsync between them may be persisted in either order (not on ext4; allowed by POSIX)."""
    def allowed(final):
        return {(None, None), (None, final[1]), final}
    _, bad = _bad_states(tmp_path / "a", TWO_FILES, ("model", "data"), allowed, "NOSYNC")
    assert bad > 0
    _, bad = _bad_states(tmp_path / "b", TWO_FILES, ("model", "data"), allowed, "SYNC")
    assert bad == 0


def test_the_recorder_refuses_what_it_cannot_see(tmp_path):
    """Writes through a shared writable memory map never appear as system calls: refused, not
    silently modelled as absent."""
    (tmp_path / "w").mkdir()
    code = ("import mmap\nwith open('w/f', 'wb+') as f:\n    f.truncate(4096)\n"
            "    m = mmap.mmap(f.fileno(), 4096)\n    m[:5] = b'hello'\n    m.close()\n")
    with pytest.raises(powercut.Unsupported, match="memory map"):
        powercut.record([sys.executable, "-c", code], tmp_path / "w", cwd=tmp_path)
