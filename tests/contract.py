"""The contract every format adapter meets (DESIGN.md §5).

A format joins in one line: subclass :class:`FormatContract`, set ``FORMAT`` and give
``oracle_read(path) -> {name: ndarray}``, which reads an output with the format's own
framework or library (never with convert)::

    class TestSafetensorsContract(FormatContract):
        FORMAT = "safetensors"
        def oracle_read(self, path): ...

What it checks: round trip of sample TensorDicts (every dtype the format holds,
scalars, empty tensors, names with ``/`` and ``.``, non-contiguous inputs) checked by
the oracle bit for bit; ``detect`` accepts its own output and rejects every other
format's; the input is not mutated; identical bytes on rerun; truncated and corrupted
files give a ConvertError; an existing output is not overwritten; a failed write
leaves nothing behind; dtypes the format cannot hold are refused before writing.

The oracles are reachable from other suites (``tests/test_matrix.py`` checks every conversion with
its target's oracle): a subclass registers itself for its destination (``FORMAT``, a writer id
included: ``tf-ckpt-v1``), and :func:`oracle` finds it, importing the format's test file on first
use. That file is ``tests/test_<adapter module>.py`` (``convert.formats.tf_checkpoint`` ->
``test_tf_checkpoint.py``), the one place a format's tests live.

The shared damage suites collect what a contract declares (:func:`declared`): ``SEEDS`` written by
``make_seeds`` (real files, cut, flipped and refilled by ``tests/test_hostile.py`` and fuzzed by
``tests/test_fuzz.py``), ``FUZZ`` targets over them, and ``HOSTILE`` hand-built files that must be
refused at little memory cost.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import convert
from convert import dtypes, registry
from convert.errors import ConvertError, WriteError
from convert.ir import ArraySource, BytesSource, Tensor, TensorDict


def sample_array(dt: dtypes.DType, shape=(2, 3)) -> np.ndarray:
    """Values that exercise a dtype: extremes, NaN/inf/-0 for floats, odd bytes for strings."""
    n = int(np.prod(shape))
    if dt.kind == "string":
        pool = [b"", b"hello", b"\x00\xff\xfe binary", "unicod\u00e9".encode(), b"x" * 300, b"/a.b"]
        return np.array([pool[i % len(pool)] for i in range(n)], dtype=object).reshape(shape)
    if dt.kind == "bool":
        return (np.arange(n) % 3 == 0).reshape(shape)
    if dt.kind in ("int", "uint"):
        info = np.iinfo(dt.numpy)
        vals = [info.min, info.max, 0, 1, info.max // 3, info.min // 7 if dt.kind == "int" else 7]
        return np.array([vals[i % len(vals)] for i in range(n)], dtype=dt.numpy).reshape(shape)
    if dt.kind == "complex":
        return (np.arange(n) * (1.5 - 2.25j) + (0.5 + 1j)).astype(dt.numpy).reshape(shape)
    finfo = ml_dtypes.finfo(dt.numpy)
    special = [float(finfo.max), float(finfo.tiny), -0.0, float("nan"), -1.5, 2.0]
    if dt.name not in ("float8_e4m3fn", "float4_e2m1fn"):  # no infinity (where there is none, the cast decides)
        special[2] = float("-inf")
    return np.array([special[i % len(special)] for i in range(n)], dtype=np.float64).astype(dt.numpy).reshape(shape)


def same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality (NaN-safe), dtype and shape included."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "O":
        return [bytes(x) for x in a.reshape(-1)] == [bytes(x) for x in b.reshape(-1)]
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def sample_tensor(dt: dtypes.DType, name: str) -> Tensor:
    """A tensor of any dtype of the table: from :func:`sample_array`, or, for GGML's quantized types
    (which no array makes), two rows of two blocks of deterministic random bytes."""
    if not dt.is_quantized:  # packed dtypes: an even last dimension (torch holds them as pairs)
        return Tensor.from_array(name, sample_array(dt, (2, 4) if dt.block else (2, 3)))
    elements, size = dt.block
    data = random.Random(dt.name).randbytes(4 * size)
    return Tensor(name, dt, (2, 2 * elements), BytesSource(data))


def samples() -> dict[str, TensorDict]:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    return {
        "every_dtype": TensorDict([sample_tensor(dt, f"dtype/{dt.name}") for dt in dtypes.TABLE],
                                  {"user.note": "hello"}),
        "shapes": TensorDict.from_arrays({
            "scalar_f32": np.float32(3.25), "scalar_i64": np.int64(-7), "empty_2d": np.zeros((0, 3), np.float32),
            "empty_1d": np.zeros((0,), np.int32), "rank4": np.arange(120, dtype=np.float32).reshape(2, 3, 4, 5),
        }),
        "names": TensorDict.from_arrays({
            "conv1/w": np.ones((3, 3, 1, 2), np.float32), "layer.0/attn.q": np.full((2,), 2, np.float32),
            "a.b.c": np.float32(1), "model/layer_with_weights-0/kernel": np.zeros((2, 2), np.float32),
        }),
        "non_contiguous": TensorDict([
            Tensor("transposed", dtypes.FLOAT32, (6, 4), ArraySource(lambda: base.T)),
            Tensor("strided", dtypes.FLOAT32, (2, 3), ArraySource(lambda: base[::2, ::2])),
        ]),
    }


def _tree_bytes(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return {"": path.read_bytes()}


def _largest_file(path: Path) -> Path:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return max(files, key=lambda p: p.stat().st_size)


def destination(name: str) -> str:
    """A destination's one spelling, ``FORMAT:WRITER`` (``tf-ckpt-v1`` -> ``tf-ckpt:v1``; ``npz`` -> ``npz:``;
    a format that is only read: ``dcp:``)."""
    info, writer_id = registry.target(name)
    return f"{info.name}:{info.format.writer(writer_id).id if info.format.writers else ''}"


CONTRACTS: dict[str, type[FormatContract]] = {}
"""Each destination's :class:`FormatContract` subclass, registered when its test file is imported."""


def contract_of(name: str) -> type[FormatContract]:
    """The contract class of a destination, importing its format's test file when needed (which may
    skip the caller: ``pytest.importorskip`` of the framework the oracle needs)."""
    key = destination(name)
    if key not in CONTRACTS:
        importlib.import_module("test_" + registry.get(name).module.rsplit(".", 1)[1])
    if key not in CONTRACTS:
        raise LookupError(f"no FormatContract subclass has FORMAT {name!r} (the format's test file declares one)")
    return CONTRACTS[key]


def declared() -> list[type[FormatContract]]:
    """The contract of every format whose test file imports here (one that needs a framework which is
    not installed skips itself: then its seeds and cases are not collected), each once."""
    for info in registry.FORMATS:
        module = "test_" + info.module.rsplit(".", 1)[1]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
        except pytest.skip.Exception:
            pass
    return list(dict.fromkeys(CONTRACTS.values()))


def oracle(name: str) -> Callable[[Path], dict[str, np.ndarray]]:
    """``oracle_read`` of a destination: its output read by the format's own library."""
    return contract_of(name)().oracle_read


class FormatContract:
    FORMAT: str = ""
    SKIP_DTYPES: tuple[str, ...] = ()
    """Dtypes the format holds but the oracle cannot read back (say why where you set it)."""

    SEEDS: tuple[str, ...] = ()
    """Names of the seed checkpoints this format gives the shared damage suites (each a folder that
    :meth:`make_seeds` writes; names unique across formats)."""
    CHECKSUMMED: tuple[tuple[str, str], ...] = ()
    """(seed, file) pairs of ``SEEDS`` whose every byte is covered by a checksum the reader verifies
    (``Seed.checksummed``, known without writing the seeds): every flipped bit must be detected."""
    FUZZ: dict[str, tuple[tuple[str, ...], str]] = {}
    """Fuzz targets of ``tests/test_fuzz.py``: name -> (seed names, how files are damaged: ``raw``,
    ``entries`` or ``pickle``, see there)."""
    HOSTILE: dict[str, Callable[[Path], tuple[Path, type[ConvertError], str | None]]] = {}
    """Hand-built hostile inputs: name -> ``build(folder) -> (path, error class, regex of its message)``;
    ``tests/test_hostile.py`` reads each in full and expects that error, in one line naming the file,
    at a few MB of traced memory."""

    @classmethod
    def make_seeds(cls, root: Path) -> list:
        """The seeds named in ``SEEDS`` as ``fuzzing.Seed`` s, written by the format's own library
        under ``root`` (one folder each)."""
        return []

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.FORMAT:
            CONTRACTS[destination(cls.FORMAT)] = cls

    def oracle_read(self, path: Path) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # helpers -----------------------------------------------------------------------------------------
    @property
    def info(self) -> registry.FormatInfo:
        return registry.get(self.FORMAT)

    @property
    def writer(self):
        return registry.writer(self.FORMAT)[1]

    def output(self, tmp_path: Path, stem: str = "out") -> Path:
        return tmp_path / (stem + self.writer.suffix)

    def holdable(self, td: TensorDict) -> TensorDict:
        return td.replace(t for t in td.values() if self.writer.holds(t.dtype) and t.dtype.name not in self.SKIP_DTYPES)

    def written(self, tmp_path: Path, td: TensorDict, stem: str = "out") -> Path:
        out = self.output(tmp_path, stem)
        convert.write(td, out, self.FORMAT)
        return out

    # the contract ------------------------------------------------------------------------------------
    @pytest.mark.parametrize("sample", list(samples()))
    def test_round_trip_checked_by_oracle(self, tmp_path, sample):
        td = self.holdable(samples()[sample])
        out = self.written(tmp_path, td)
        expected = td.to_numpy()
        got = self.oracle_read(out)
        assert set(got) == set(expected)
        for name, arr in expected.items():
            assert same_values(got[name], arr), name
        back = convert.read(out, self.FORMAT)
        assert list(back) == list(td) or set(back) == set(td)
        for name, arr in expected.items():
            assert same_values(back[name].numpy(), arr), name

    def test_detect_accepts_own_output(self, tmp_path):
        out = self.written(tmp_path, self.holdable(samples()["names"]))
        assert self.info.format.detect(out)

    def test_detect_rejects_other_formats(self, tmp_path, foreign_outputs):
        detect = self.info.format.detect
        others = [f for f in registry.FORMATS if f.module != self.info.module and f.format.writers
                  and not registry.missing(f, "write")]
        for other in others:
            assert not detect(foreign_outputs[other.name]), f"{self.FORMAT} claims a {other.name} output"
        junk = tmp_path / "junk.bin"
        junk.write_bytes(random.Random(0).randbytes(4096))
        empty = tmp_path / "empty"
        empty.write_bytes(b"")
        folder = tmp_path / "emptydir"
        folder.mkdir()
        for p in (junk, empty, folder):
            assert not detect(p), p

    def test_input_not_mutated(self, tmp_path):
        arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32)}
        copies = {k: v.copy() for k, v in arrays.items()}
        td = TensorDict.from_arrays(arrays, {"k": "v"})
        tensors_before = {k: (t, t.source) for k, t in td.items()}
        self.written(tmp_path, td)
        assert {k: (t, t.source) for k, t in td.items()} == tensors_before
        assert dict(td.metadata) == {"k": "v"}
        for k in arrays:
            assert same_values(arrays[k], copies[k])

    def test_same_bytes_on_rerun(self, tmp_path):
        td = self.holdable(samples()["every_dtype"])
        a = self.written(tmp_path, td, "a")
        b = self.written(tmp_path, td, "b")
        assert _tree_bytes(a) == _tree_bytes(b)

    def _read_all(self, path: Path) -> None:
        for t in convert.read(path, self.FORMAT).values():
            t.numpy()

    def test_truncated_file_is_a_convert_error(self, tmp_path):
        out = self.written(tmp_path, self.holdable(samples()["shapes"]))
        victim = _largest_file(out)
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
        with pytest.raises(ConvertError):
            self._read_all(out)

    def test_corrupted_file_is_a_convert_error(self, tmp_path):
        out = self.written(tmp_path, self.holdable(samples()["shapes"]))
        victim = _largest_file(out)
        data = bytearray(victim.read_bytes())
        data[: min(64, len(data))] = b"\xff" * min(64, len(data))  # an endless varint, a huge length...
        victim.write_bytes(bytes(data))
        with pytest.raises(ConvertError):
            self._read_all(out)

    def test_existing_output_is_not_overwritten(self, tmp_path):
        td = samples()["names"]
        out = self.output(tmp_path)
        out.write_bytes(b"precious")
        with pytest.raises(WriteError):
            convert.write(td, out, self.FORMAT)
        assert out.read_bytes() == b"precious"
        convert.write(td, out, self.FORMAT, force=True)
        assert self.oracle_read(out).keys() == set(td)

    def test_failed_write_leaves_nothing(self, tmp_path):
        def boom():
            raise ConvertError("source exploded")
        td = TensorDict([Tensor.from_array("ok", np.ones(3, np.float32)),
                         Tensor("bad", dtypes.FLOAT32, (3,), ArraySource(boom))])
        with pytest.raises(ConvertError, match="exploded"):
            convert.write(td, self.output(tmp_path), self.FORMAT)
        assert list(tmp_path.iterdir()) == []

    def test_unholdable_dtypes_refused_before_writing(self, tmp_path):
        unholdable = [dt for dt in dtypes.TABLE if not self.writer.holds(dt)]
        if not unholdable:
            pytest.skip(f"{self.FORMAT} holds every dtype")
        td = TensorDict([sample_tensor(dt, f"t_{dt.name}") for dt in unholdable])
        with pytest.raises(WriteError) as e:
            convert.write(td, self.output(tmp_path), self.FORMAT)
        for dt in unholdable:
            assert f"t_{dt.name}" in str(e.value)
        assert list(tmp_path.iterdir()) == []
