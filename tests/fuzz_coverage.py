"""Coverage-guided fuzzing of the binary parsers with atheris (libFuzzer for Python).

tests/test_fuzz.py mutates real files blindly (hypothesis); this drives the same readers with
coverage feedback, so that inputs reaching new branches of a parser are kept and mutated further.
One target per parser; each turns the fuzzer's bytes into files and reads them in full
(:func:`fuzzing.exercise`: every ``detect``, the reader, every tensor's data) under the same guards
(:func:`fuzzing.run_guarded`: a ConvertError naming the file, in one line, or success; no other
exception, no hang, no runaway allocation). Checksums would stop a coverage-guided fuzzer at the
first block, so the table targets recompute them (:func:`fix_table_checksums`) and the pickle
target wraps its bytes in a well-formed torch zip: the parsers behind the checksums are reached.

    make fuzz-coverage FUZZ_SECONDS=1800        # every target, in parallel, nice -n 19
    .venv/bin/python tests/fuzz_coverage.py run sstable_v1 DIR -max_total_time=60

``seed DIR`` writes each target's starting corpus (files written by convert's writers, no
framework needed, and the real files of /work/shared/corpus). What a run finds interesting and is
small is kept, minimized with libFuzzer's ``-merge=1``, under ``tests/data/fuzz/TARGET/``;
tests/test_fuzz_corpus.py replays every one of those files through the same target on every test
run (without atheris). Atheris is not a test dependency: ``make fuzz-coverage`` installs it.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DATA = HERE / "data" / "fuzz"
DATA_SHARD = bytes(range(256)) * 256  # 64 KiB that V2 index entries may point into


def fix_table_checksums(data: bytes) -> bytes:
    """``data`` with the CRC of every block a LevelDB table's footer and index name recomputed
    (whatever the handles say, as long as they lie inside the data): the table parser behind them."""
    from convert.formats.tf_checkpoint import sstable
    from convert.wire import ProtoError

    out = bytearray(data)
    if len(out) < sstable.FOOTER_SIZE:
        return bytes(out)

    def fix(handle) -> bytes | None:
        offset, size = handle
        if offset + size + sstable.TRAILER_SIZE > len(out) - sstable.FOOTER_SIZE:
            return None
        block = bytes(out[offset:offset + size + 1])
        crc = sstable.mask_crc(sstable.crc32c_extend(0, block))
        out[offset + size + 1:offset + size + 5] = crc.to_bytes(4, "little")
        return block[:-1]

    try:
        footer = bytes(out[-sstable.FOOTER_SIZE:])
        meta, pos = sstable._decode_handle(footer, 0)
        index_handle, _ = sstable._decode_handle(footer, pos)
        fix(meta)
        index = fix(index_handle)
        if index is not None and out[index_handle[0] + index_handle[1]] == sstable.NO_COMPRESSION:
            for _, value in sstable.iter_block(index):
                fix(sstable._decode_handle(value, 0)[0])
    except (ProtoError, IndexError, ValueError):
        pass  # a footer or index that does not parse: the reader says so
    return bytes(out)


def torch_zip(pickle: bytes) -> bytes:
    """A torch zip (``archive/``) around ``pickle`` as its data.pkl, with storages 0-3 of 4 KiB."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle)
        zf.writestr("archive/byteorder", "little")
        for k in range(4):
            zf.writestr(f"archive/data/{k}", DATA_SHARD[:4096])
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


# target -> (format, files: name -> bytes, from the fuzzer's input; the first names what is read)
def _one(name: str):
    return lambda data: {name: data}


TARGETS = {
    "safetensors": ("safetensors", _one("model.safetensors")),
    "onnx": ("onnx", _one("model.onnx")),
    "gguf": ("gguf", _one("model.gguf")),
    "tflite": ("tflite", _one("model.tflite")),
    "sstable_v1": ("tf-ckpt", lambda data: {"model.ckpt": fix_table_checksums(data)}),
    "sstable_v2": ("tf-ckpt", lambda data: {"model.ckpt.index": fix_table_checksums(data),
                                            "model.ckpt.data-00000-of-00001": DATA_SHARD}),
    "torch_zip": ("torch", _one("model.pt")),
    "torch_pickle": ("torch", lambda data: {"model.pt": torch_zip(data)}),
    "torch_legacy": ("torch", _one("model.pt")),
    "metagraph": (None, _one("model.ckpt.meta")),
}
"""What each target reads. ``metagraph``: a .meta graph through what the tf-ckpt writer does with it."""


def read_meta(path: Path) -> None:
    """What the tf-ckpt writer does with a source's .meta graph: its variables, and the graph for V1 and V2."""
    from convert.formats.tf_checkpoint import metagraph

    data = path.read_bytes()
    try:
        metagraph.parse(data).variables(restored=True)
        for version in (1, 2):
            metagraph.for_version(data, version)
    except (metagraph.pw.ProtoError, KeyError, IndexError, ValueError, metagraph._NotExact):
        pass  # what meta_for turns into "left out the .meta graph: ... cannot be read (...)"


def check(target: str, data: bytes, folder: Path, seconds: float = 10) -> None:
    """Read ``data`` as ``target`` does, in ``folder`` (emptied first); raise AssertionError on a bug
    (a read over ``seconds`` is one: a hang)."""
    import fuzzing

    fmt, files = TARGETS[target]
    for p in folder.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    made = files(data)
    for name, content in made.items():
        (folder / name).write_bytes(content)
    path = folder / next(iter(made))
    if target == "metagraph":
        fuzzing.run_guarded(lambda: read_meta(path), seconds=seconds)
        return
    error = fuzzing.run_guarded(lambda: fuzzing.exercise(path, fmt), seconds=seconds)
    if error is not None:
        fuzzing.one_line_naming(error, folder)


# ------------------------------------------------------------------------------------ seeds

def _samples():
    import numpy as np

    from convert.ir import Tensor, TensorDict

    arrays = {"conv1/w": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "conv1/b": np.ones(3, np.float16),
              "step": np.array(7, np.int64), "fc/mask": np.array([True, False]), "emb": np.zeros((0, 4), np.int8)}
    yield TensorDict([Tensor.from_array(k, v) for k, v in arrays.items()])
    yield TensorDict([Tensor.from_array("a.weight", np.full((4, 4), 0.5, np.float32))], {"note": "x"})


def seed(root: Path) -> None:
    """Each target's starting corpus under ``root/TARGET/``: convert's own outputs and corpus files."""
    import convert

    corpus = Path("/work/shared/corpus")
    out = {t: root / t for t in TARGETS}
    for d in out.values():
        d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, td in enumerate(_samples()):
            for fmt, name in (("safetensors", "m.safetensors"), ("onnx", "m.onnx"), ("gguf", "m.gguf"),
                              ("torch", "m.pt"), ("tf-ckpt", "v2"), ("tf-ckpt-v1", "v1")):
                try:
                    convert.write(td, tmp / f"{i}{name}", fmt, verify=False)
                except convert.ConvertError:
                    continue  # a dtype the format cannot hold
            (out["safetensors"] / f"convert{i}").write_bytes((tmp / f"{i}m.safetensors").read_bytes())
            (out["onnx"] / f"convert{i}").write_bytes((tmp / f"{i}m.onnx").read_bytes())
            if (tmp / f"{i}m.gguf").exists():
                (out["gguf"] / f"convert{i}").write_bytes((tmp / f"{i}m.gguf").read_bytes())
            pt = (tmp / f"{i}m.pt").read_bytes()
            (out["torch_zip"] / f"convert{i}").write_bytes(pt)
            with zipfile.ZipFile(io.BytesIO(pt)) as zf:
                pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
                (out["torch_pickle"] / f"convert{i}").write_bytes(zf.read(pkl))
            (out["sstable_v2"] / f"convert{i}").write_bytes(next((tmp / f"{i}v2").glob("*.index")).read_bytes())
            (out["sstable_v1"] / f"convert{i}").write_bytes((tmp / f"{i}v1" / "model.ckpt").read_bytes())
    for p in corpus.rglob("*"):
        if not p.is_file() or p.stat().st_size > 400_000:
            continue
        name = p.name
        kind = ("sstable_v2" if name.endswith(".index") else "metagraph" if name.endswith(".meta")
                else "onnx" if name.endswith(".onnx") else None)
        if kind is None and p.read_bytes()[-8:] == (0xDB4775248B80FB57).to_bytes(8, "little"):
            kind = "sstable_v1"
        if kind is None and p.suffix in (".pt", ".pth", ".ckpt"):
            kind = "torch_zip" if zipfile.is_zipfile(p) else "torch_legacy"
        if kind == "metagraph" and p.stat().st_size > 16_384:
            continue  # instrumented, a 350 KB graph takes minutes per run: the small graphs reach the same code
        if kind:
            shutil.copyfile(p, out[kind] / f"corpus-{p.parent.name[:40]}-{name}")
    try:  # TFLite: TensorFlow's converter is the only writer (when it is installed)
        import tensorflow as tf

        inp = tf.keras.Input((4,))
        model = tf.keras.Model(inp, tf.keras.layers.Dense(3)(tf.keras.layers.Dense(5, activation="relu")(inp)))
        for offset in (False, True):
            conv = tf.lite.TFLiteConverter.from_keras_model(model)
            conv._experimental_use_buffer_offset = offset  # buffers past the flatbuffer, as over 2 GB
            (out["tflite"] / f"tf-{'offset' if offset else 'inline'}").write_bytes(conv.convert())
    except ImportError:
        pass
    for t, d in out.items():  # what earlier runs kept
        if (DATA / t).is_dir():
            for p in (DATA / t).iterdir():
                shutil.copyfile(p, d / p.name)
    for t, d in out.items():
        print(f"{t}: {len(list(d.iterdir()))} seeds")


def run(target: str, argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports():
        import convert  # noqa: F401
        import convert.ir  # noqa: F401
        import convert.wire  # noqa: F401
        from convert import registry

        for info in registry.FORMATS:
            info.format  # noqa: B018 - imports (and so instruments) every adapter
        from convert.formats.tf_checkpoint import metagraph, sstable  # noqa: F401
        from convert.formats.torch import containers, torch_pickle  # noqa: F401
    folder = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))

    def one(data: bytes) -> None:
        check(target, data, folder, seconds=60)  # instrumented code under nice -n 19 runs many times slower

    # libFuzzer re-runs argv[0] through the shell for -merge=1 and -fork: the whole command
    atheris.Setup([f"{sys.executable} {Path(__file__).resolve()} run {target}", *argv], one)
    try:
        atheris.Fuzz()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


KEEP_BYTES = 8192  # what is committed: small inputs only


def keep(root: Path, targets: list[str]) -> None:
    """After ``run`` s over ``root/TARGET/``: each target's corpus (all, or ``targets``) minimized
    (libFuzzer's ``-merge=1``: the fewest inputs with the same coverage), the small ones into
    tests/data/fuzz/. A corpus input that fails the target (fixed since?) is named, not kept."""
    import subprocess

    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name in (targets or TARGETS)):
        merged = Path(tempfile.mkdtemp(prefix=f"merge-{d.name}-"))
        proc = subprocess.run([sys.executable, __file__, "run", d.name, str(merged), str(d), "-merge=1",
                               "-timeout=90"], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{d.name}: -merge=1 failed, corpus left as it was:\n" + "\n".join(
                line for line in proc.stderr.splitlines()[-30:] if not line.startswith(("#", "MERGE", "INFO"))))
            shutil.rmtree(merged)
            continue
        small = [p for p in merged.iterdir() if p.stat().st_size <= KEEP_BYTES]
        (DATA / d.name).mkdir(parents=True, exist_ok=True)
        for p in (DATA / d.name).iterdir():  # what a crash found (fixed since) stays; the rest is replaced
            if not p.name.startswith(("crash-", "timeout-", "oom-")):
                p.unlink()
        for p in small:
            shutil.copyfile(p, DATA / d.name / p.name)
        print(f"{d.name}: {len(list(d.iterdir()))} inputs, {len(list(merged.iterdir()))} after -merge=1, "
              f"{len(small)} of <= {KEEP_BYTES} bytes kept in {DATA / d.name}")
        shutil.rmtree(merged)


if __name__ == "__main__":
    if sys.argv[1:2] == ["seed"]:
        seed(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["keep"]:
        keep(Path(sys.argv[2]), sys.argv[3:])
    elif sys.argv[1:2] == ["run"]:
        run(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(__doc__)
