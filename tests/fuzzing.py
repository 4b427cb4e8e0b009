"""Shared helpers of tests/test_hostile.py and tests/test_fuzz.py: seed files and the reading harness.

Seeds are real files: written here by the frameworks themselves (TensorFlow's ``SaveV2``/``Save``/
``SaveSlices`` ops and ``tf.saved_model.save``, ``torch.save`` in both layouts, ``onnx.save``, the
``safetensors`` library) and copied from ``/work/shared/corpus`` (files written by other people's
tools). A seed is a folder; ``target`` is what is handed to the reader and ``files`` are the files a
test may damage (one at a time).

:func:`exercise` is what "reading" means in these tests: every adapter's ``detect`` (which must
answer True/False, never raise), then the reader with the format named explicitly, then every
tensor's data, both as ``numpy()`` and as raw ``chunks()`` (readers are lazy: a header can be fine
and the data broken). Anything but a :class:`~convert.errors.ConvertError` escaping is a bug;
:func:`run_guarded` adds a wall-clock limit (SIGALRM) and a memory limit (tracemalloc peak, plus
``RLIMIT_AS`` as a safety net so that a runaway allocation fails fast instead of swapping).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import tracemalloc
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import convert
from convert import registry
from convert.errors import ConvertError

CORPUS = Path("/work/shared/corpus")

# --------------------------------------------------------------------------------------- seeds


@dataclass(frozen=True)
class Seed:
    """A readable checkpoint in its own folder ``root``."""

    name: str
    format: str  # registry name, passed explicitly to convert.read
    root: Path
    target: str  # relative to root: what the reader is given ("." for the folder itself)
    files: tuple[str, ...]  # relative to root: the files a test may damage
    checksummed: tuple[str, ...] = ()
    """Files whose every byte is covered by a checksum the reader verifies (a flip must be detected;
    in a LevelDB table, every byte but the footer's zero padding)."""
    metadata_only: tuple[str, ...] = ()
    """Files that only feed metadata (``saved_model.pb``, ``fingerprint.pb``): damage may go unseen."""

    @property
    def path(self) -> Path:
        return self.root / self.target


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def _tf_seeds(root: Path) -> list[Seed]:
    """V2 bundle (every common dtype, a string tensor, a partitioned variable), V1 file (the same
    through the V1 ``Save``/``SaveSlices`` ops) and a small TF2 SavedModel, all written by TensorFlow."""
    tf = _tf()
    seeds = []
    values = {
        "dense/kernel": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        "dense/bias": np.array([1.5, -2.0, 0.0, np.inf], np.float32),
        "global_step": np.int64(190),
        "embed/half": np.arange(6, dtype=np.float16).reshape(2, 3),
        "ints": np.array([-3, 0, 7, 2**31 - 1], np.int32),
        "flags": np.array([True, False, True]),
        "names": np.array([b"alpha", b"", b"\x00\xffbinary"], dtype=object),
    }

    def const(arr):
        if arr.dtype == object:
            return tf.constant(arr.tolist(), dtype=tf.string)
        return tf.constant(arr)

    part = np.arange(24, dtype=np.float32).reshape(6, 4)
    names = sorted(values)
    with tf.device("/cpu:0"):
        d = root / "tf_v2"
        d.mkdir()
        tf.raw_ops.SaveV2(prefix=str(d / "model.ckpt"),
                          tensor_names=[*names, "part", "part"],
                          shape_and_slices=[""] * len(names) + ["6 4 0,4:-", "6 4 4,2:-"],
                          tensors=[const(values[n]) for n in names] + [const(part[:4]), const(part[4:])])
        seeds.append(Seed("tf_v2", "tf-ckpt", d, "model.ckpt.index",
                          ("model.ckpt.index", "model.ckpt.data-00000-of-00001"),
                          checksummed=("model.ckpt.index", "model.ckpt.data-00000-of-00001")))
        d = root / "tf_v1"
        d.mkdir()
        v1_names = [n for n in names if n != "names"]  # keep strings in the V1 seed too, below
        tf.raw_ops.SaveSlices(filename=str(d / "model.ckpt"),
                              tensor_names=[*v1_names, "names", "part", "part"],
                              shapes_and_slices=[""] * len(v1_names) + ["", "6 4 0,4:-", "6 4 4,2:-"],
                              data=[const(values[n]) for n in v1_names] + [const(values["names"]),
                                                                            const(part[:4]), const(part[4:])])
        seeds.append(Seed("tf_v1", "tf-ckpt", d, "model.ckpt", ("model.ckpt",), checksummed=("model.ckpt",)))

    d = root / "saved_model"
    module = tf.Module()
    with tf.device("/cpu:0"):
        module.w = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="w")
        module.b = tf.Variable(np.array([0.5, -1.0], np.float64), name="b")
        module.step = tf.Variable(np.int64(7), name="step")
    tf.saved_model.save(module, str(d))
    files = tuple(sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()))
    seeds.append(Seed("saved_model", "saved-model", d, ".", files,
                      checksummed=tuple(f for f in files if f.startswith("variables/")),
                      metadata_only=("fingerprint.pb", "saved_model.pb")))
    return seeds


def _torch_seeds(root: Path) -> list[Seed]:
    """torch.save in the zip layout (a training checkpoint: nested state_dict, bfloat16, a transposed
    view, tied weights, an int64 buffer) and in the legacy pickle-stream layout; a Lightning-style
    checkpoint and a TorchScript archive."""
    import argparse

    import torch

    torch.manual_seed(0)
    w = torch.randn(4, 3)
    state = {
        "state_dict": {
            "fc.weight": w, "fc.bias": torch.arange(4, dtype=torch.float32),
            "emb.weight": torch.randn(5, 2).to(torch.bfloat16), "tied.weight": w,
            "proj.weight_t": torch.randn(3, 5).t(), "bn.num_batches_tracked": torch.tensor(12),
            "mask": torch.tensor([True, False, True]),
        },
        "epoch": 3, "lr": 0.01,
    }
    seeds = []
    for name, kw in (("torch_zip", {}), ("torch_legacy", {"_use_new_zipfile_serialization": False})):
        d = root / name
        d.mkdir()
        torch.save(state, d / "model.pt", **kw)
        seeds.append(Seed(name, "torch", d, "model.pt", ("model.pt",)))
    # a Lightning-style checkpoint: objects read as placeholders (argparse.Namespace, a function), NumPy arrays
    lightning = {**state, "hyper_parameters": {"args": argparse.Namespace(lr=0.1, layers=[4, 3]),
                                                "loss": torch.nn.functional.mse_loss,
                                                "weights": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    # a TorchScript archive: the module tree as placeholders, the classes' source beside it
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Flatten(), torch.nn.Linear(3, 2))
    for name, save in (("torch_lightning", lambda p: torch.save(lightning, p)),
                       ("torch_script", lambda p: torch.jit.save(torch.jit.script(net), str(p)))):
        d = root / name
        d.mkdir()
        save(d / "model.pt")
        seeds.append(Seed(name, "torch", d, "model.pt", ("model.pt",)))
    return seeds


def _onnx_seeds(root: Path) -> list[Seed]:
    """onnx.save of a model with raw and typed initializers, a string, a sparse initializer, a
    Constant node and an If subgraph; and the same model with its data external."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    b = helper.make_tensor("b", TensorProto.INT64, [3], [1, -2, 3])  # typed field, not raw_data
    s = helper.make_tensor("s", TensorProto.STRING, [2], [b"x", b"yz"])
    h = numpy_helper.from_array(np.array([1.0, 2.5], np.float16), "h")
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([5.0, 6.0], np.float32), "sp"),
                                       numpy_helper.from_array(np.array([1, 7], np.int64), "sp_idx"), [2, 4])
    c = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array([9.0], np.float32)))
    then_g = helper.make_graph([helper.make_node("Constant", [], ["t"], value_floats=[1.0, 2.0])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_g = helper.make_graph([helper.make_node("Constant", [], ["e"], value_floats=[3.0, 4.0])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    cond = helper.make_node("If", ["flag"], ["out"], then_branch=then_g, else_branch=else_g, name="branch")
    graph = helper.make_graph([c, cond], "g", [helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])],
                              initializer=[w, b, s, h], sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fuzz")
    seeds = []
    d = root / "onnx_inline"
    d.mkdir()
    onnx.save(model, str(d / "model.onnx"))
    seeds.append(Seed("onnx_inline", "onnx", d, "model.onnx", ("model.onnx",)))
    d = root / "onnx_external"
    d.mkdir()
    onnx.save(model, str(d / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    seeds.append(Seed("onnx_external", "onnx", d, "model.onnx", ("model.onnx", "model.onnx.data")))
    return seeds


def _keras_seeds(root: Path) -> list[Seed]:
    """Keras 3 (TF backend) after one training step: a .keras zip, a .weights.h5, legacy HDF5
    (Keras 3's legacy saving) and sharded weights; none if Keras is not installed."""
    try:
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        import keras
    except ImportError:
        return []
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
                              keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((2, 6), np.float32), np.zeros((2, 2), np.float32), epochs=1, verbose=0)
    seeds = []
    for name, target, save in (("keras_zip", "m.keras", model.save), ("keras_weights", "m.weights.h5", model.save_weights),
                               ("keras_legacy", "m.h5", model.save)):
        d = root / name
        d.mkdir()
        save(d / target)
        seeds.append(Seed(name, "keras", d, target, (target,)))
    d = root / "keras_sharded"
    d.mkdir()
    model.save_weights(d / "model.weights.json", max_shard_size=0.0000005)
    seeds.append(Seed("keras_sharded", "keras", d, "model.weights.json",
                      tuple(sorted(p.name for p in d.iterdir()))))
    return seeds


def _safetensors_seeds(root: Path) -> list[Seed]:
    """safetensors.numpy.save_file: one file with metadata, and a two-shard folder with its index."""
    import json

    from safetensors.numpy import save_file

    arrays = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "a.bias": np.array([1, 2], np.int64),
              "scalar": np.array(3.5, np.float64), "flags": np.array([True, False]),
              "empty": np.zeros((0, 3), np.float16)}
    seeds = []
    d = root / "safetensors"
    d.mkdir()
    save_file(arrays, str(d / "model.safetensors"), metadata={"format": "np", "note": "seed"})
    seeds.append(Seed("safetensors", "safetensors", d, "model.safetensors", ("model.safetensors",)))
    d = root / "safetensors_sharded"
    d.mkdir()
    save_file({"a.weight": arrays["a.weight"]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"a.bias": arrays["a.bias"]}, str(d / "model-00002-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": 40},
        "weight_map": {"a.weight": "model-00001-of-00002.safetensors", "a.bias": "model-00002-of-00002.safetensors"}}))
    seeds.append(Seed("safetensors_sharded", "safetensors", d, ".",
                      ("model.safetensors.index.json", "model-00001-of-00002.safetensors")))
    return seeds


# Small real files from the corpus (other people's tools and TF/torch versions).
_CORPUS_SEEDS = [
    # name, format, folder in the corpus, target, damageable files, checksummed files
    ("corpus_v1", "tf-ckpt", "tensorflow+serving@1bdd3499f1fe/tensorflow_serving/session_bundle/testdata/"
     "half_plus_two/00000123", "export-00000-of-00001", ("export-00000-of-00001",), ("export-00000-of-00001",)),
    ("corpus_v1_tf012", "tf-ckpt", "Gknoblau+nxt-tensorflow@cd0f217b6bd9", "video_weights.ckpt",
     ("video_weights.ckpt",), ("video_weights.ckpt",)),
    ("corpus_v2", "tf-ckpt", "tensorflow+serving@f83efeee8d20/tensorflow_serving/servables/tensorflow/testdata/"
     "half_plus_two/00000123", "export.index", ("export.index", "export.data-00000-of-00001"),
     ("export.index", "export.data-00000-of-00001")),
    ("corpus_saved_model", "saved-model", "tensorflow+serving@9d981c5c2708/tensorflow_serving/servables/tensorflow/"
     "testdata/saved_model_half_plus_two_tf2_cpu/00000123", ".",
     ("saved_model.pb", "variables/variables.index", "variables/variables.data-00000-of-00001"),
     ("variables/variables.index", "variables/variables.data-00000-of-00001")),
    ("corpus_onnx_external", "onnx", "keanulim+tensor-inference-engine@e9fc79a8c608", "toy.onnx",
     ("toy.onnx", "toy.onnx.data"), ()),
    ("corpus_torch_legacy", "torch", "JockWang+little-pytorch@e78235369526", "model.ckpt", ("model.ckpt",), ()),
    ("corpus_torch_zip", "torch", "Hardlygo+pytorch_mnist@b3b18bfb98b7", "model.ckpt", ("model.ckpt",), ()),
]


def _corpus_seeds(root: Path) -> list[Seed]:
    seeds = []
    for name, fmt, folder, target, files, summed in _CORPUS_SEEDS:
        src = CORPUS / folder
        if not (src / target).exists():
            continue
        d = root / name
        if name == "corpus_onnx_external":  # only the toy model and its data, not the folder's others
            d.mkdir()
            for f in files:
                shutil.copyfile(src / f, d / f)
        else:
            shutil.copytree(src, d)
        for p in d.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)  # the corpus is read-only; our copies are not
        seeds.append(Seed(name, fmt, d, target, files, summed,
                          metadata_only=("saved_model.pb",) if fmt == "saved-model" else ()))
    return seeds


GENERATED = ("safetensors", "safetensors_sharded", "onnx_inline", "onnx_external", "torch_zip", "torch_legacy",
             "torch_lightning", "torch_script", "tf_v2", "tf_v1", "saved_model", "keras_zip", "keras_weights",
             "keras_legacy", "keras_sharded")
SEED_NAMES = GENERATED + tuple(c[0] for c in _CORPUS_SEEDS)
"""The seeds made here, known without writing them; :func:`seed_names` adds those the formats' test
files declare (``FormatContract.SEEDS``)."""


def seed_names() -> tuple[str, ...]:
    """Every seed's name, known without writing them (for parametrizing tests)."""
    import contract

    return SEED_NAMES + tuple(n for c in contract.declared() for n in c.SEEDS)


def _declared_seeds(root: Path) -> list[Seed]:
    import contract

    seeds = [s for c in contract.declared() for s in c.make_seeds(root)]
    assert sorted(s.name for s in seeds) == sorted(n for c in contract.declared() for n in c.SEEDS)
    return seeds

_CACHE: dict[str, list[Seed]] = {}


def make_seeds(root: Path) -> list[Seed]:
    """Every seed, written under ``root`` (once per process: TensorFlow is slow to import)."""
    key = str(root)
    if key not in _CACHE:
        root.mkdir(parents=True, exist_ok=True)
        seeds = [*_safetensors_seeds(root), *_onnx_seeds(root), *_torch_seeds(root), *_tf_seeds(root),
                 *_keras_seeds(root), *_corpus_seeds(root), *_declared_seeds(root)]
        for seed in seeds:  # every seed must read cleanly, or the tests below prove nothing
            exercise(seed.path, seed.format)
        _CACHE[key] = seeds
    return _CACHE[key]


_SHARED_ROOT: list[Path] = []


def session_seeds(tmp_path_factory) -> list[Seed]:
    """The seeds, written once per pytest session whichever test file asks first."""
    if not _SHARED_ROOT:
        _SHARED_ROOT.append(tmp_path_factory.mktemp("seeds"))
    return make_seeds(_SHARED_ROOT[0])


# --------------------------------------------------------------------------------------- reading

def detect_all(path: Path) -> None:
    """Every adapter's ``detect`` must answer a bool and never raise."""
    for info in registry.FORMATS:
        answer = info.format.detect(path)
        assert isinstance(answer, bool), f"{info.name}.detect returned {answer!r}"


def read_all(path: Path, fmt: str | None) -> int:
    """Read with ``fmt`` (None: detect) and every tensor's data three ways (``numpy()``, ``chunks()``,
    :func:`convert.ir.digest`); returns the bytes read."""
    from convert.ir import digest

    td = convert.read(path, fmt)
    total = 0
    for t in td.values():
        arr = t.numpy()
        total += arr.size
        if t.dtype.kind != "string":
            for piece in t.chunks():
                total += len(piece)
        digest(t)  # inspect --verify's way: a memory map where the bytes sit raw in the file
    return total


def exercise(path: Path, fmt: str | None) -> int:
    detect_all(path)
    return read_all(path, fmt)


# --------------------------------------------------------------------------------------- guards

class Hang(Exception):
    """Raised by the SIGALRM handler: a reader took longer than the limit."""


class MemoryBlowUp(Exception):
    """A reader's traced allocations peaked above the limit."""


@contextmanager
def time_limit(seconds: float):
    fired = []

    def on_alarm(signum, frame):
        fired.append(True)
        raise Hang(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if fired:  # the Hang was raised where Python drops exceptions (a gc callback): still a hang
        raise Hang(f"took more than {seconds} s")


def _vm_size() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def address_space_headroom(extra: int):
    """Cap the process's address space at its current size + ``extra`` bytes, so that a runaway
    allocation fails at once (MemoryError) rather than swapping the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size() + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def run_guarded(fn: Callable[[], object], *, seconds: float = 10.0, max_bytes: int = 64 << 20,
                headroom: int = 1 << 30) -> BaseException | None:
    """Run ``fn``; return the ConvertError it raised (None if it returned).

    Fails (raises AssertionError) when it raises anything else, takes more than ``seconds``,
    allocates more than ``max_bytes`` (tracemalloc peak) or ran out of memory on the way (a
    MemoryError hidden inside a ConvertError counts: that is an allocation a header asked for).
    """
    started = tracemalloc.is_tracing()
    if not started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    error: BaseException | None = None
    try:
        with address_space_headroom(headroom), time_limit(seconds):
            fn()
    except ConvertError as e:
        error = e
    except Hang as e:
        raise AssertionError(f"hang: {e}") from None
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        if not started:
            tracemalloc.stop()
    if error is not None and any(isinstance(x, (MemoryError, Hang)) for x in _chain(error)):
        raise AssertionError(f"a ConvertError hides {type(error.__context__).__name__}: {error}") from error
    if peak > max_bytes:
        raise AssertionError(f"memory blow-up: {peak / 2**20:.1f} MiB traced (limit {max_bytes / 2**20:.0f} MiB)"
                             + (f"; ended with {error}" if error else ""))
    return error


def one_line_naming(error: BaseException, where: Path) -> None:
    """The error names a file inside ``where`` (the damaged checkpoint's folder) and is one line of
    printable text: what it quotes from the file (tensor names, keys) is escaped."""
    msg = str(error)
    assert str(where) in msg, f"message does not name the file: {msg!r}"
    assert msg.isprintable(), f"message is not one line of printable text: {msg!r}"


def clone(seed: Seed, dest: Path) -> Path:
    """A copy of a seed's folder at ``dest`` (hard links for the files: cheap; damage only through
    :func:`replace_file`, which writes a new file instead of writing through the link)."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(seed.root, dest, copy_function=link)
    return dest / seed.target


def replace_file(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


# --------------------------------------------------------------------------------------- hand-built bytes
# Independent of convert's own encoders: the hostile files of test_hostile.py are spelled out here
# from the published formats (protobuf wire format, LevelDB table format).

def varint(n: int) -> bytes:
    """Protobuf base-128 varint (a negative int as its 64-bit two's complement, as protobuf does)."""
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb_varint(num: int, value: int) -> bytes:
    return varint(num << 3) + varint(value)


def pb_bytes(num: int, value: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(value)) + value


def pb_fixed32(num: int, value: int) -> bytes:
    return varint(num << 3 | 5) + value.to_bytes(4, "little")


def masked_crc(data: bytes) -> int:
    import google_crc32c

    c = google_crc32c.value(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def table_block(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A LevelDB block with a restart point at every entry (no prefix sharing)."""
    body, restarts = bytearray(), []
    for key, value in entries:
        restarts.append(len(body))
        body += varint(0) + varint(len(key)) + varint(len(value)) + key + value
    for r in restarts or [0]:
        body += r.to_bytes(4, "little")
    body += len(restarts or [0]).to_bytes(4, "little")
    return bytes(body)


def with_trailer(block: bytes, ctype: int = 0) -> bytes:
    return block + bytes([ctype]) + masked_crc(block + bytes([ctype])).to_bytes(4, "little")


TABLE_MAGIC = (0xDB4775248B80FB57).to_bytes(8, "little")


def sstable(entries: list[tuple[bytes, bytes]], *, index_handle: tuple[int, int] | None = None,
            data_handle: tuple[int, int] | None = None) -> bytes:
    """A one-data-block table holding ``entries`` (sorted by the caller); the handles can be forged."""
    data = table_block(entries)
    out = bytearray(with_trailer(data))
    meta_at = len(out)
    out += with_trailer(table_block([]))
    last = entries[-1][0] if entries else b""
    dh = data_handle or (0, len(data))
    index = table_block([(last + b"\xff", varint(dh[0]) + varint(dh[1]))])
    index_at = len(out)
    out += with_trailer(index)
    ih = index_handle or (index_at, len(index))
    footer = varint(meta_at) + varint(len(table_block([]))) + varint(ih[0]) + varint(ih[1])
    out += footer.ljust(40, b"\x00") + TABLE_MAGIC
    return bytes(out)


# --------------------------------------------------------------------------------------- mutations

INTERESTING = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**40, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
"""Numbers that find off-by-one and overflow bugs when written over a length, count, offset or size."""

OPS = ("flip", "set_byte", "int_le", "int_varint", "insert", "delete", "truncate", "fill", "copy_within", "splice")


def mutate(draw, blob: bytes, pool: list[bytes]) -> bytes:
    """``blob`` with 1 to 4 mutations drawn with ``draw`` (hypothesis's ``data.draw``): bit flips, bytes
    set to edge values, little-endian ints and varints of :data:`INTERESTING` numbers written over
    fields, inserted and deleted runs, truncation, runs zeroed or set to 0xFF, a run copied elsewhere
    in the file, or spliced in from another seed file (``pool``)."""
    from hypothesis import strategies as st

    b = bytearray(blob)
    for _ in range(draw(st.integers(1, 4), label="mutations")):
        op = draw(st.sampled_from(OPS), label="op")
        pos = draw(st.integers(0, max(len(b) - 1, 0)), label="pos")
        if op == "flip" and b:
            b[pos] ^= 1 << draw(st.integers(0, 7), label="bit")
        elif op == "set_byte" and b:
            b[pos] = draw(st.sampled_from((0x00, 0xFF, 0x7F, 0x80, 0x01)) | st.integers(0, 255), label="byte")
        elif op == "int_le":
            width = draw(st.sampled_from((1, 2, 4, 8)), label="width")
            value = draw(st.sampled_from(INTERESTING), label="value") % (1 << (8 * width))
            b[pos:pos + width] = value.to_bytes(width, "little")
        elif op == "int_varint":
            value = varint(draw(st.sampled_from(INTERESTING + (-1,)), label="value"))
            if draw(st.booleans(), label="replace"):
                b[pos:pos + len(value)] = value
            else:
                b[pos:pos] = value
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=16), label="bytes")
        elif op == "delete":
            del b[pos:pos + draw(st.integers(1, 64), label="length")]
        elif op == "truncate":
            del b[pos:]
        elif op == "fill":
            n = draw(st.integers(1, 64), label="length")
            b[pos:pos + n] = bytes([draw(st.sampled_from((0x00, 0xFF)), label="fill")]) * len(b[pos:pos + n])
        elif op == "copy_within" and b:
            src = draw(st.integers(0, len(b) - 1), label="src")
            b[pos:pos] = b[src:src + draw(st.integers(1, 64), label="length")]
        elif op == "splice" and pool:
            other = draw(st.sampled_from(pool), label="other")
            if other:
                src = draw(st.integers(0, len(other) - 1), label="src")
                chunk = other[src:src + draw(st.integers(1, 128), label="length")]
                b[pos:pos + len(chunk)] = chunk
    return bytes(b)


def table_entries(path: Path) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of a LevelDB table (to damage its contents behind valid checksums)."""
    from convert.formats.tf_checkpoint.sstable import TableReader

    return [(k, bytes(v)) for k, v in TableReader(path).items()]


def mutate_table(draw, entries: list[tuple[bytes, bytes]], pool: list[bytes]) -> bytes:
    """A table of ``entries`` with one entry's value (mostly) or key mutated, or an entry dropped or
    duplicated under another key, rebuilt with correct block checksums: this reaches the protobuf
    and bundle parsers behind the checksums, which plain byte damage almost never gets past."""
    from hypothesis import strategies as st

    entries = list(entries)
    i = draw(st.integers(0, len(entries) - 1), label="entry")
    key, value = entries[i]
    what = draw(st.sampled_from(("value", "value", "value", "key", "drop", "clone")), label="change")
    if what == "value":
        entries[i] = (key, mutate(draw, value, pool))
    elif what == "key":
        entries[i] = (mutate(draw, key, pool), value)
    elif what == "drop":
        del entries[i]
    else:
        entries.append((mutate(draw, key, pool), value))
    unique = dict(sorted(entries))
    return sstable(sorted(unique.items()))


def zip_records(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def rezip(records: list[tuple[str, bytes]]) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            zf.writestr(name, data)
    return buf.getvalue()
