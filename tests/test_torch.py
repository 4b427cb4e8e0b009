"""The PyTorch adapter, with torch itself as the oracle (it writes the inputs and reads our outputs)."""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import re
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from blocking import blocker
from fuzzing import SMALL, Seed, clone, corpus_seed, exercise, one_line_naming, replace_file, run_guarded

import convert
from convert.errors import ConvertError, CorruptFileError, ReadError, WriteError
from convert.formats import torch as pt
from convert.ir import ArraySource, FileRegion, Tensor, TensorDict, digest

from contract import FormatContract
from oracles import torch_to_numpy

torch = pytest.importorskip("torch")

# every dtype torch and the IR share, with the IR's NumPy dtype
DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "bool": np.bool_, "complex64": np.complex64, "complex128": np.complex128,
}


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A torch tensor's values as NumPy, bit for bit (torch's .numpy() lacks bf16/float8)."""
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    np_dtype = np.dtype(DTYPES[str(t.dtype).removeprefix("torch.")])
    if t.numel() == 0:
        return np.zeros(tuple(t.shape), np_dtype)
    raw = t.reshape(-1).view(torch.uint8).numpy()
    return np.frombuffer(raw.tobytes(), dtype=np_dtype).reshape(tuple(t.shape))


def random_bits(dtype, shape, seed=0) -> np.ndarray:
    """Arbitrary bit patterns (NaN payloads, negative zero...) of a dtype."""
    np_dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=n * np_dtype.itemsize, dtype=np.uint8)
    if np_dtype == np.bool_:
        raw = raw & 1
    return raw.view(np_dtype).reshape(shape)


def to_torch(arr: np.ndarray) -> torch.Tensor:
    name = next(k for k, v in DTYPES.items() if np.dtype(v) == arr.dtype)
    dt = getattr(torch, name)
    flat = torch.frombuffer(bytearray(arr.tobytes()) or bytearray(1), dtype=torch.uint8)[: arr.nbytes]
    return flat.view(dt).reshape(arr.shape).clone()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def assert_matches_torch_load(path, td: TensorDict, **load_kw):
    ref = torch.load(path, weights_only=True, map_location="cpu", **load_kw)
    assert list(td) == list(ref)
    for name, t in td.items():
        assert t.dtype.torch == str(ref[name].dtype).removeprefix("torch."), name
        assert same_bits(t.numpy(), as_numpy(ref[name])), name


# ---- seeds of the damage suites (tests/test_hostile.py, tests/test_fuzz.py) ------------------------

def _seeds(root: Path) -> list[Seed]:
    """torch.save in the zip layout (a training checkpoint: nested state_dict, bfloat16, a transposed
    view, tied weights, an int64 buffer) and in the legacy pickle-stream layout; a Lightning-style
    checkpoint and a TorchScript archive."""
    import argparse

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
        d.mkdir(parents=True)
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


_CORPUS_SEEDS = (("corpus_torch_legacy", "JockWang+little-pytorch@e78235369526"),
                 ("corpus_torch_zip", "Hardlygo+pytorch_mnist@b3b18bfb98b7"))  # other people's files: name, folder


# ---- hostile files, by hand (collected by tests/test_hostile.py) ----------------------------------

TB = 1 << 20  # a dimension: two of them make 4 TB of float32


def _zip(path: Path, records: dict[str, bytes], compress: dict[str, int] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in records.items():
            zf.writestr(name, data, compress_type=(compress or {}).get(name, zipfile.ZIP_STORED))
    return path


def _lie_about_size(data: bytes, member: str, size: int) -> bytes:
    """Rewrite a record's compressed and uncompressed sizes in the zip's central directory."""
    out = bytearray(data)
    pos = out.find(b"PK\x01\x02")
    while pos >= 0:
        name_len = struct.unpack_from("<H", out, pos + 28)[0]
        if out[pos + 46:pos + 46 + name_len] == member.encode():
            struct.pack_into("<II", out, pos + 20, size, size)
        pos = out.find(b"PK\x01\x02", pos + 4)
    return bytes(out)


def _tensor_pickle(numel: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """The data.pkl torch.save writes for {'w': tensor}: _rebuild_tensor_v2 over a FloatStorage, by hand."""
    def ints(values):
        return b"(" + b"".join(b"J" + struct.pack("<i", v) if v < 1 << 31 else b"\x8a\x08" + v.to_bytes(8, "little")
                               for v in values) + b"t"
    return (b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n("
            b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
            + b"J" + struct.pack("<i", numel) + b"tQ" + b"K\x00" + ints(shape) + ints(stride)
            + b"\x89ccollections\nOrderedDict\n)RtRs.")


def _torch_zip(path: Path, pkl: bytes, storage: bytes = b"\0" * 16) -> Path:
    return _zip(path, {"m/data.pkl": pkl, "m/byteorder": b"little", "m/data/0": storage, "m/version": b"3\n"})


def _legacy(path: Path, root: bytes, keys: bytes = b"\x80\x02]q\x00X\x01\x00\x00\x000a.", tail: bytes = b"") -> Path:
    """A legacy torch file: magic number, protocol version, sys info, ``root``, storage keys, ``tail``."""
    head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    path.write_bytes(head + root + keys + tail)
    return path


def _zip_case(name: str, pkl: bytes, message: str, lie: tuple[str, int] | None = None):
    def build(folder: Path):
        path = _torch_zip(folder / name, pkl)
        if lie:  # a record claiming 4 GB (stored: its bytes would lie past the end of the file)
            path.write_bytes(_lie_about_size(path.read_bytes(), *lie))
        return path, CorruptFileError, message
    return build


def _unknown_compression(folder: Path):
    """A storage record whose compression method is unknown: found when its data is read."""
    path = _zip(folder / "c.pt", {"m/data.pkl": _tensor_pickle(4, (4,), (1,)), "m/byteorder": b"little",
                                  "m/data/0": b"\0" * 16}, compress={"m/data/0": zipfile.ZIP_DEFLATED})
    data = bytearray(path.read_bytes())
    for sig, at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # method 8 (deflate) -> 99 in both headers
        pos = data.find(sig)
        while pos >= 0:
            if struct.unpack_from("<H", data, pos + at)[0] == 8:
                struct.pack_into("<H", data, pos + at, 99)
            pos = data.find(sig, pos + 4)
    path.write_bytes(bytes(data))
    return path, CorruptFileError, "damaged zip record"


def _legacy_case(tail: bytes, message: str):
    return lambda folder: (_legacy(folder / "m.pt", _tensor_pickle(4, (4,), (1,)), tail=tail), CorruptFileError, message)


def _escaped_storage_key(folder: Path):
    """A storage key holding a terminal escape: quoted escaped, the message one printable line."""
    pkl = _tensor_pickle(4, (4,), (1,)).replace(b"X\x01\x00\x00\x000X\x03", b"X\x01\x00\x00\x00\x1bX\x03")
    return _zip(folder / "m.pt", {"m/data.pkl": pkl, "m/byteorder": b"little"}), CorruptFileError, "is missing"


HOSTILE = {
    "tensor_of_4_tb_over_16_bytes": _zip_case("m.pt", _tensor_pickle(4, (TB, TB), (TB, 1)),
                                              "tensor needs 4398046511104 bytes of storage '0', which holds 16"),
    "shape_beyond_any_array": _zip_case("m.pt", _tensor_pickle(4, (0, 1 << 62, 4), (1, 1, 1)), "too large for any array"),
    "storage_record_claims_4_gb": _zip_case("m.pt", _tensor_pickle(4, (4,), (1,)),
                                            "ends past the end|zip record m/data/0 claims", lie=("m/data/0", 0xFFFFFFF0)),
    # zipfile would ask the file for all of it in one read (1 GB allocated)
    "data_pkl_record_claims_4_gb": _zip_case("m.pt", _tensor_pickle(4, (4,), (1,)), "zip record m/data.pkl claims",
                                             lie=("m/data.pkl", 0xFFFFFFF0)),
    "broadcast_view_of_4_bytes_claiming_4_tb": _zip_case("b.pt", _tensor_pickle(4, (TB, TB), (0, 0)), "would expand to"),
    "storage_compression_unknown": _unknown_compression,
    "legacy_storage_size_2_62": _legacy_case(struct.pack("<q", 1 << 62), "ends past the end"),
    "legacy_storage_size_negative": _legacy_case(struct.pack("<q", -4) + b"\0" * 16, "ends past the end"),
    "legacy_storage_truncated": _legacy_case(b"\x04", "truncated"),
    "storage_key_with_a_terminal_escape": _escaped_storage_key,
}


class TestTorchContract(FormatContract):
    FORMAT = "torch"
    SEEDS = ("torch_zip", "torch_legacy", "torch_lightning", "torch_script", "corpus_torch_legacy", "corpus_torch_zip")
    # pickle: the zip's data.pkl mutated and the zip rebuilt with valid CRCs
    FUZZ = {
        "torch_zip": (("torch_zip", "corpus_torch_zip"), "raw"),
        "torch_zip_pickle": (("torch_zip", "corpus_torch_zip"), "pickle"),
        "torch_legacy": (("torch_legacy", "corpus_torch_legacy"), "raw"),
        "torch_lightning_pickle": (("torch_lightning",), "pickle"),
        "torch_script": (("torch_script",), "raw"),
        "torch_script_pickle": (("torch_script",), "pickle"),
    }
    HOSTILE = HOSTILE

    @classmethod
    def make_seeds(cls, root):
        return [*_seeds(root), *(s for name, folder in _CORPUS_SEEDS
                                 for s in corpus_seed(root, name, "torch", folder, "model.ckpt", ("model.ckpt",)))]

    def oracle_read(self, path):
        return {k: torch_to_numpy(v) for k, v in torch.load(path, weights_only=True).items()}


# ---- reading what torch writes -------------------------------------------------------------------

@pytest.fixture(scope="module")
def all_dtypes():
    return {name: random_bits(dt, (3, 5), seed=i) for i, (name, dt) in enumerate(DTYPES.items())}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_dtype_torch_to_us_bit_exact(tmp_path, all_dtypes, legacy):
    sd = OrderedDict((k, to_torch(v)) for k, v in all_dtypes.items())
    if legacy:  # the legacy writer has no storage class for these
        for k in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
            del sd[k]
    path = tmp_path / "m.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    assert pt.detect(path)
    td = pt.read(path)
    assert td.metadata["torch.layout"] == ("legacy" if legacy else "zip")
    assert_matches_torch_load(path, td)
    for name, t in td.items():
        assert isinstance(t.source, FileRegion), name  # contiguous: read straight from the file
        assert same_bits(t.numpy(), all_dtypes[name]), name


def test_every_dtype_us_to_torch_bit_exact(tmp_path, all_dtypes):
    arrays = {**all_dtypes, "scalar": np.float32(2.5), "empty": np.zeros((0, 4), np.int16)}
    path = tmp_path / "out.pt"
    pt.write(TensorDict.from_arrays(arrays), path)
    for kw in ({}, {"mmap": True}):
        ref = torch.load(path, weights_only=True, **kw)
        assert list(ref) == list(arrays)
        for name, arr in arrays.items():
            assert same_bits(as_numpy(ref[name]), np.asarray(arr)), name
    # and back through us
    back = pt.read(path)
    for name, arr in arrays.items():
        assert same_bits(back[name].numpy(), np.asarray(arr)), name


def test_archive_prefix_and_other_stems(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, buf)  # a file object: top folder "archive/"
    p = tmp_path / "weights.bin"
    p.write_bytes(buf.getvalue())
    assert zipfile.ZipFile(p).namelist()[0] == "archive/data.pkl"
    td = pt.read(p)
    assert_matches_torch_load(p, td)
    q = tmp_path / "some.name.pth"
    torch.save({"w": torch.ones(2)}, q)  # top folder from the file name
    assert_matches_torch_load(q, pt.read(q))


def test_views_offsets_strides_conj_neg(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    sd = {
        "row_slice": base[2:4],            # storage offset
        "transposed": base.t(),            # non-contiguous
        "strided": base[1::2, 3::3],       # offset + steps
        "expanded": torch.arange(3.0).expand(4, 3),  # stride 0
        "column": base[:, 7],
        "whole": base,
        "conj": z.conj(),                  # conj bit, resolved on read
        "neg": torch.tensor([1.5, -2.0])._neg_view(),  # neg bit
        "scalar_view": base[5, 9],
    }
    path = tmp_path / "views.pt"
    torch.save(sd, path)
    td = pt.read(path)
    assert_matches_torch_load(path, td)
    assert isinstance(td["transposed"].source, ArraySource)
    assert isinstance(td["row_slice"].source, FileRegion)
    # every view of the one storage knows the others
    assert set(json.loads(td["transposed"].attrs["torch.shared_with"])) == {
        "row_slice", "strided", "column", "whole", "scalar_view"}
    assert "torch.shared_with" not in td["expanded"].attrs


def test_tied_weights_read_and_written_shared(tmp_path):
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # tied, as in language models
    sd = OrderedDict([("emb.weight", emb.weight.data), ("head.weight", head.weight.data), ("other", torch.ones(2))])
    src = tmp_path / "tied.pt"
    torch.save(sd, src)
    td = pt.read(src)
    assert json.loads(td["emb.weight"].attrs["torch.shared_with"]) == ["head.weight"]
    assert td["emb.weight"].source is td["head.weight"].source
    assert_matches_torch_load(src, td)
    out = tmp_path / "tied_out.pt"
    pt.write(td, out)
    ref = torch.load(out, weights_only=True)
    assert ref["emb.weight"].data_ptr() == ref["head.weight"].data_ptr()  # still one storage
    assert torch.equal(ref["head.weight"], emb.weight.data)
    assert len([n for n in zipfile.ZipFile(out).namelist() if "/data/" in n]) == 2

    # through the pipeline (each tensor passes through a recording source for verification), and
    # renamed by a mapping: still one storage
    piped = tmp_path / "tied_piped.pt"
    rules = tmp_path / "rename.yaml"
    rules.write_text("schema: 1\nunmatched: keep\nrules:\n  - match: 'emb\\.weight'\n    to: tok.weight\n")
    ticks: list[tuple[int, int]] = []
    convert.convert(src, piped, to="torch", maps=[str(rules)], progress=lambda done, total: ticks.append((done, total)))
    assert ticks[-1] == (ticks[-1][1], sum(t.nbytes for t in td.values()))  # the tied bytes count for both names
    ref = torch.load(piped, weights_only=True)
    assert ref["tok.weight"].data_ptr() == ref["head.weight"].data_ptr()
    assert torch.equal(ref["tok.weight"], emb.weight.data) and torch.equal(ref["other"], torch.ones(2))
    assert len([n for n in zipfile.ZipFile(piped).namelist() if "/data/" in n]) == 2


def test_legacy_layout_values_and_views(tmp_path):
    base = torch.arange(20, dtype=torch.int64).reshape(4, 5)
    sd = OrderedDict(a=base, b=base.t(), c=base[1:3, 2:], d=torch.tensor(True))
    path = tmp_path / "legacy.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:2] == b"\x80\x02"
    td = pt.read(path)
    assert td.metadata["torch.layout"] == "legacy"
    assert_matches_torch_load(path, td)


def test_parameters_and_keep_vars(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    path = tmp_path / "params.pt"
    torch.save(model.state_dict(keep_vars=True), path)  # nn.Parameter objects: _rebuild_parameter
    td = pt.read(path)
    assert_matches_torch_load(path, td)
    assert td["1.num_batches_tracked"].dtype.name == "int64"


# ---- training checkpoints ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def training_ckpt(tmp_path_factory):
    model = torch.nn.DataParallel(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    ckpt = {"epoch": 7, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
            "loss": 0.25, "hparams": {"lr": 0.01, "name": "mlp", "layers": [4, 3, 2]},
            "device": torch.device("cpu"), "tags": {"a", "b"}}
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save(ckpt, path)
    return path, model


def test_training_checkpoint_finds_weights(training_ckpt):
    path, model = training_ckpt
    td = pt.read(path)
    md = td.metadata
    assert md["torch.key"] == "model_state_dict"
    assert md["torch.stripped_prefix"] == "module."
    assert list(td) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for name, t in td.items():
        assert same_bits(t.numpy(), as_numpy(model.module.state_dict()[name]))
        assert t.attrs["role"] == "weight"
    assert md["torch.extra.epoch"] == "7"
    assert json.loads(md["torch.extra.loss"]) == 0.25
    assert json.loads(md["torch.extra.hparams"]) == {"lr": 0.01, "name": "mlp", "layers": [4, 3, 2]}
    assert md["torch.extra.device"] == "cpu"
    assert json.loads(md["torch.extra.tags"]) == ["a", "b"]
    assert json.loads(md["torch.extra.optimizer_state_dict.param_groups"])[0]["lr"] == 0.01
    skipped = json.loads(md["torch.skipped"])
    assert "optimizer_state_dict.state" in skipped and "12 tensors" in skipped["optimizer_state_dict.state"]
    # the weights load back into the unwrapped module
    out = path.parent / "weights.pt"
    pt.write(td, out)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert torch.equal(fresh[2].weight, model.module[2].weight)


def test_training_checkpoint_key_option(training_ckpt):
    path, _ = training_ckpt
    td = pt.read(path, key="optimizer_state_dict.state")
    assert td.metadata["torch.key"] == "optimizer_state_dict.state"
    assert "0.exp_avg" in td and td["0.exp_avg"].attrs["role"] == "optimizer"
    ref = torch.load(path, weights_only=True)["optimizer_state_dict"]["state"]
    assert same_bits(td["1.exp_avg_sq"].numpy(), as_numpy(ref[1]["exp_avg_sq"]))
    kept = pt.read(path, keep_prefix=True)
    assert "module.0.weight" in kept and "torch.stripped_prefix" not in kept.metadata
    whole = pt.read(path, key="")
    assert whole.metadata["torch.key"] == "(root)" and "model_state_dict.module.0.weight" in whole
    with pytest.raises(ReadError, match="no entry 'nope'.*model_state_dict"):
        pt.read(path, key="nope")
    via_api = convert.read(path, key="optimizer_state_dict.state")  # the option reaches the adapter
    assert via_api.metadata["torch.key"] == "optimizer_state_dict.state"


def test_lightning_style_and_nested(tmp_path):
    lin = torch.nn.Linear(2, 2)
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in lin.state_dict().items()}, "global_step": 120,
                "hyper_parameters": {"lr": 1e-3}, "optimizer_states": [{"state": {}, "param_groups": []}]}, path)
    td = pt.read(path)
    assert td.metadata["torch.key"] == "state_dict"
    assert list(td) == ["model.weight", "model.bias"]
    assert td.metadata["torch.extra.global_step"] == "120"
    assert "torch.skipped" not in td.metadata  # the optimizer entry holds no tensors: kept as JSON
    nested = tmp_path / "nested.pt"
    torch.save({"model": {"state_dict": lin.state_dict()}, "epoch": 1}, nested)
    assert pt.read(nested).metadata["torch.key"] == "model.state_dict"
    single = tmp_path / "tensor.pt"
    torch.save(torch.arange(4), single)
    assert list(pt.read(single)) == ["tensor"]


# ---- safety --------------------------------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_zip(path: Path, payload: object):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("model/data.pkl", pickle.dumps(payload, protocol=2))
        zf.writestr("model/byteorder", "little")
        zf.writestr("model/version", "3\n")
    path.write_bytes(buf.getvalue())


def _evil_legacy(path: Path, payload: object):
    with open(path, "wb") as f:
        for obj in (pt.MAGIC_NUMBER, pt.PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(obj, f, protocol=2)
        pickle.dump(payload, f, protocol=2)
        pickle.dump([], f, protocol=2)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("nested", [False, True], ids=["top", "inside_state_dict"])
def test_code_in_pickle_is_refused_and_never_runs(tmp_path, layout, nested):
    marker = tmp_path / "pwned"
    evil = _Evil(marker)
    payload = {"weight": evil} if nested else evil
    path = tmp_path / "evil.pt"
    (_evil_zip if layout == "zip" else _evil_legacy)(path, payload)
    assert pickle.dumps(evil, protocol=2).find(b"system") > 0
    assert pt.detect(path)
    with pytest.raises(ReadError, match=r"refused to load global '(posix|os)\.system'") as err:
        pt.read(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the oracle refuses it too
        torch.load(path, weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("global_name", ["builtins\neval", "builtins\ngetattr", "subprocess\nPopen",
                                         "torch\nload", "numpy.core.multiarray\n_reconstruct"])
def test_other_globals_refused(tmp_path, global_name):
    path = tmp_path / "g.pt"
    data = b"\x80\x02c" + global_name.encode() + b"\n)R."
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a/data.pkl", data)
    path.write_bytes(buf.getvalue())
    with pytest.raises(ReadError, match="refused to load global"):
        pt.read(path)


def test_whole_pickled_module_reads_as_its_state_dict(tmp_path):
    """torch.save(model): the classes are placeholders (never imported), the tensors its state_dict
    (more in test_torch_training.py)."""
    path = tmp_path / "model.pt"
    lin = torch.nn.Linear(2, 2)
    torch.save(lin, path)
    td = pt.read(path)
    assert json.loads(td.metadata["torch.pickled_modules"]) == {"(root)": "torch.nn.modules.linear.Linear"}
    assert list(td) == ["weight", "bias"]
    for name, t in td.items():
        assert same_bits(t.numpy(), as_numpy(lin.state_dict()[name])), name


def test_build_and_newobj_on_foreign_objects_refused(tmp_path):
    # BUILD on a class object (setattr on it) and NEWOBJ are not part of any state_dict
    for data in (b"\x80\x02ccollections\nOrderedDict\n}X\x01\x00\x00\x00aK\x01sb.",
                 b"\x80\x02ccollections\nOrderedDict\n)\x81."):
        path = tmp_path / "b.pt"
        _raw_zip(path, data)
        with pytest.raises(CorruptFileError, match="not a torch state_dict pickle"):
            pt.read(path)


def _raw_zip(path: Path, pkl: bytes):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a/data.pkl", pkl)
    path.write_bytes(buf.getvalue())


# ---- corruption ----------------------------------------------------------------------------------

def _read_all(path):
    td = pt.read(path)
    for t in td.values():
        digest(t)


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    sd = {"a": torch.arange(100, dtype=torch.float32).reshape(10, 10), "b": torch.ones(7, dtype=torch.int16)}
    sd["t"] = sd["a"].t()
    torch.save(sd, d / "zip.pt")
    torch.save(sd, d / "legacy.pt", _use_new_zipfile_serialization=False)
    return d


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_truncated_files_give_convert_errors(tmp_path, good_files, kind):
    data = (good_files / f"{kind}.pt").read_bytes()
    for cut in sorted({1, 10, 40, 100, 300, len(data) // 2, len(data) - 200, len(data) - 30, len(data) - 1}):
        p = tmp_path / f"cut{cut}.pt"
        p.write_bytes(data[:cut])
        with pytest.raises(ConvertError) as err:
            _read_all(p)
        assert str(p) in str(err.value)


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_corrupted_pickle_gives_convert_errors(tmp_path, good_files, kind):
    data = bytearray((good_files / f"{kind}.pt").read_bytes())
    start = data.find(b"\x80\x02", 20 if kind == "legacy" else 0)
    rng = np.random.default_rng(1)
    for i in range(40):
        bad = bytearray(data)
        for pos in rng.integers(start, start + 300, size=3):
            bad[pos] ^= int(rng.integers(1, 256))
        p = tmp_path / f"bad{i}.pt"
        p.write_bytes(bytes(bad))
        try:
            _read_all(p)
        except ConvertError as e:
            assert str(p) in str(e)
        # (a flip inside a string may leave a readable file; what matters is no other exception)


def test_storage_too_small_is_reported(tmp_path):
    sd = {"a": torch.arange(10.0)}
    path = tmp_path / "small.pt"
    torch.save(sd, path)
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    key = next(n for n in members if "/data/" in n)
    members[key] = members[key][:8]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n, b in members.items():
            zf.writestr(n, b)
    path.write_bytes(buf.getvalue())
    with pytest.raises(CorruptFileError, match="storage '0' holds 8 bytes, expected 40"):
        pt.read(path)


# ---- detect --------------------------------------------------------------------------------------

def test_detect_rejects_others(tmp_path, good_files):
    assert pt.detect(good_files / "zip.pt") and pt.detect(good_files / "legacy.pt")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    plain_zip = tmp_path / "x.ckpt"
    with zipfile.ZipFile(plain_zip, "w") as zf:
        zf.writestr("readme.txt", "hi")
    plain_pickle = tmp_path / "p.pkl"
    plain_pickle.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    sstable = tmp_path / "tf.ckpt"  # TF V1 checkpoints end with the SSTable magic
    sstable.write_bytes(b"\x00" * 40 + struct.pack("<Q", 0xDB4775248B80FB57))
    for p in (empty, plain_zip, plain_pickle, sstable, tmp_path):
        assert not pt.detect(p), p


# ---- writing -------------------------------------------------------------------------------------

def test_write_is_deterministic_aligned_and_loadable(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5))
    src = tmp_path / "src.pt"
    torch.save(model.state_dict(), src)
    td = pt.read(src)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    pt.write(td, a)
    pt.write(td, b)
    assert a.read_bytes() == b.read_bytes()
    reader = torch._C.PyTorchFileReader(str(a))
    for name in reader.get_all_records():
        if name.startswith("data/"):
            assert reader.get_record_offset(name) % 64 == 0, name
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5))
    fresh.load_state_dict(torch.load(a, weights_only=True, mmap=True), strict=True)
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    fresh.eval()
    assert torch.equal(model(x), fresh(x))



def test_many_tensors_of_every_dtype_and_shape_read_back_by_torch(tmp_path):
    """The writer writes the opcodes a storage class and a shape repeat as bytes once they are in
    its memo: torch reads every tensor back, whatever the order of dtypes, shapes and ranks."""
    rng = np.random.default_rng(11)
    kinds = [d for d in convert.dtypes.TABLE if d.torch is not None]
    shapes = [(), (0,), (3,), (2, 3), (3, 2), (1, 2, 3), (2, 1, 1, 2), (1, 1, 2, 1, 2)]
    arrays = {}
    for i in range(600):
        d, shape = kinds[int(rng.integers(len(kinds)))], shapes[int(rng.integers(len(shapes)))]
        arrays[f"t{i}.{d.name}"] = (rng.standard_normal(shape) * 3).astype(d.numpy)
    out = tmp_path / "all.pt"
    pt.write(TensorDict.from_arrays(arrays), out)
    back = torch.load(out, weights_only=True)
    assert list(back) == list(arrays)
    for name, arr in arrays.items():
        got = back[name]
        assert tuple(got.shape) == arr.shape and str(got.dtype) == f"torch.{name.split('.')[1]}", name
        assert got.reshape(-1).view(torch.uint8).numpy().tobytes() == arr.tobytes(), name

def test_write_does_not_mutate_and_keeps_metadata(tmp_path):
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    td = TensorDict([Tensor.from_array("x/y.z", arr, {"role": "weight"})], {"source.format": "tf", "tf.prefix": "m"})
    before = (dict(td.metadata), list(td), td["x/y.z"].numpy().copy(), dict(td["x/y.z"].attrs))
    pt.write(td, tmp_path / "o.pt")
    assert before == (dict(td.metadata), list(td), before[2], dict(td["x/y.z"].attrs))
    assert np.array_equal(td["x/y.z"].numpy(), before[2])
    back = pt.read(tmp_path / "o.pt")
    assert back.metadata["tf.prefix"] == "m"  # carried along
    assert back.metadata["source.format"] == "torch"  # says what was read
    assert torch.equal(torch.load(tmp_path / "o.pt", weights_only=True)["x/y.z"], torch.from_numpy(arr))


def test_write_refuses_strings_and_existing(tmp_path):
    td = TensorDict.from_arrays({"ok": np.ones(2), "s1": np.array([b"a"], dtype=object), "s2": np.array(["b"])})
    with pytest.raises(WriteError, match=r"torch cannot hold string tensors: s1, s2"):
        convert.write(td, tmp_path / "s.pt", "torch")
    assert not (tmp_path / "s.pt").exists()
    (tmp_path / "exists.pt").write_bytes(b"")
    with pytest.raises(WriteError, match="exists"):
        pt.write(TensorDict.from_arrays({"a": np.ones(1)}), tmp_path / "exists.pt")


def test_non_contiguous_input_written_in_c_order(tmp_path):
    arr = np.arange(12, dtype=np.int32).reshape(3, 4).T
    pt.write(TensorDict.from_arrays({"t": arr}), tmp_path / "t.pt")
    assert np.array_equal(torch.load(tmp_path / "t.pt", weights_only=True)["t"].numpy(), arr)


# ---- memory and independence from torch ----------------------------------------------------------

def test_memory_bounded_by_largest_tensor(tmp_path):
    n = 4 << 20  # 8 tensors of 16 MB
    sd = OrderedDict((f"w{i}", torch.full((n,), float(i))) for i in range(8))
    src = tmp_path / "big.pt"
    torch.save(sd, src)
    del sd
    tracemalloc.start()
    td = pt.read(src)
    pt.write(td, tmp_path / "copy.pt")
    for t in td.values():
        digest(t)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 40 << 20, peak  # the file is 128 MB; one tensor is 16 MB
    assert torch.equal(torch.load(tmp_path / "copy.pt", weights_only=True)["w7"], torch.full((n,), 7.0))


def test_reads_and_writes_without_torch(tmp_path, good_files):
    code = f"""
import sys
from convert.formats import torch as pt
td = pt.read({str(good_files / 'zip.pt')!r})
td2 = pt.read({str(good_files / 'legacy.pt')!r})
pt.write(td, {str(tmp_path / 'nt.pt')!r})
assert sys.modules.get("torch") is None
print(sorted(td), float(td2["t"].numpy()[3, 2]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent,
                         env=blocker(tmp_path, ("torch",)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['a', 'b', 't'] 23.0"
    assert torch.equal(torch.load(tmp_path / "nt.pt", weights_only=True)["t"], torch.arange(100.0).reshape(10, 10).t())


def test_big_endian_zip_matches_torch(tmp_path):
    """A file whose byteorder record says 'big' (saved on s390x/POWER); built by byte-swapping a little one."""
    sd = {"f": torch.arange(12, dtype=torch.float32).reshape(3, 4), "c": torch.tensor([1 + 2j, -3.5j]),
          "h": torch.arange(5, dtype=torch.bfloat16), "i": torch.arange(4, dtype=torch.int64)}
    sd["ft"] = sd["f"].t()
    little = tmp_path / "little.pt"
    torch.save(sd, little)
    itemsize = {"0": 4, "1": 4, "2": 2, "3": 8}  # storage key -> byte-swap unit (complex64: two float32)
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in name:
                unit = itemsize[name.rsplit("/", 1)[1]]
                data = np.frombuffer(data, dtype=f"<u{unit}").byteswap().tobytes()
            dst.writestr(name, data)
    td = pt.read(big)
    assert_matches_torch_load(big, td)
    for name, t in sd.items():
        assert same_bits(td[name].numpy(), as_numpy(t)), name


class _StorageId:
    def __init__(self, pid):
        self.pid = pid


class _TensorPickle:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def test_legacy_storage_views_match_torch(tmp_path):
    """Old torch (< 1.0) wrote storage *views* as ('storage', type, root, loc, numel, (view_key, offset, size))."""
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return obj.pid if isinstance(obj, _StorageId) else None

    root = np.arange(10, dtype=np.float32)
    view = _StorageId(("storage", torch.FloatStorage, "100", "cpu", 10, ("101", 4, 6)))
    whole = _StorageId(("storage", torch.FloatStorage, "100", "cpu", 10, None))
    obj = OrderedDict(v=_TensorPickle(view, 1, (2, 2), (1, 2)), w=_TensorPickle(whole, 0, (10,), (1,)))
    path = tmp_path / "old.pth"
    with open(path, "wb") as f:
        for head in (pt.MAGIC_NUMBER, pt.PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(head, f, protocol=2)
        P(f, protocol=2).dump(obj)
        pickle.dump(["100"], f, protocol=2)
        f.write(struct.pack("<q", 10) + root.tobytes())
    td = pt.read(path)
    assert_matches_torch_load(path, td)
    assert td["v"].numpy().tolist() == [[5.0, 7.0], [6.0, 8.0]]


def test_recompressed_zip_still_reads(tmp_path):
    """Someone re-zipped a checkpoint with deflate: members are then read through zipfile, not by offset."""
    sd = {"a": torch.arange(50, dtype=torch.float32).reshape(5, 10)}
    sd["t"] = sd["a"].t()
    src = tmp_path / "stored.pt"
    torch.save(sd, src)
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            zout.writestr(name, zin.read(name))
    td = pt.read(deflated)
    assert isinstance(td["a"].source, ArraySource)
    for name, t in sd.items():
        assert same_bits(td[name].numpy(), as_numpy(t)), name


def test_tied_weights_to_safetensors_are_copied_and_reported(tmp_path, capsys):
    from convert.cli import main

    from oracles import safetensors_read

    emb = torch.nn.Embedding(5, 3)
    sd = OrderedDict([("emb.weight", emb.weight.data), ("head.weight", emb.weight.data)])
    src = tmp_path / "tied.pt"
    torch.save(sd, src)
    assert main(["torch", str(src), "--to", "safetensors"]) == 0
    err = capsys.readouterr().err
    assert "note: 2 tensors shared storage" in err and "emb.weight" in err and "head.weight" in err
    got = safetensors_read(tmp_path / "tied.safetensors")
    assert np.array_equal(got["emb.weight"], emb.weight.data.numpy())
    assert np.array_equal(got["head.weight"], emb.weight.data.numpy())


# ---- hostile pickles, and the damage torch.load does not see --------------------------------------

def test_tensor_pickle_helper_matches_torch(tmp_path):
    """The hand-written data.pkl above is one torch.load reads (the oracle)."""
    path = _torch_zip(tmp_path / "ok.pt", _tensor_pickle(4, (2, 2), (2, 1)), np.arange(4, dtype=np.float32).tobytes())
    assert torch.load(path, weights_only=True)["w"].tolist() == [[0, 1], [2, 3]]
    assert convert.read(path, "torch")["w"].numpy().tolist() == [[0, 1], [2, 3]]


PICKLE_BOMBS = {
    # protocol 2 pickles, by hand; each is a state_dict-shaped dict holding something hostile
    "binbytes8_claims_1TB": (b"\x80\x04}X\x01\x00\x00\x00w\x8e" + struct.pack("<Q", 1 << 40) + b"abcds.", "damaged|truncated"),
    "binunicode8_claims_1TB": (b"\x80\x04}X\x01\x00\x00\x00w\x8d" + struct.pack("<Q", 1 << 40) + b"abcds.", "damaged|truncated"),
    "frame_claims_1TB": (b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b"}.", None),  # the frame ends short
    "bytearray8_claims_1TB": (b"\x80\x05}X\x01\x00\x00\x00w\x96" + struct.pack("<Q", 1 << 40) + b"s.", "out-of-band|damaged"),
    "long4_claims_2GB": (b"\x80\x02}X\x01\x00\x00\x00w\x8b" + struct.pack("<i", (1 << 31) - 1) + b"\x01s.", "damaged|truncated"),
    "long_text_100k_digits": (b"\x80\x02}X\x01\x00\x00\x00wL" + b"9" * 100000 + b"L\ns.", "damaged|Exceeds"),
    "nested_10k_lists": (b"\x80\x02" + b"]" * 10000 + b"a" * 9999 + b".", "nested deeper than"),
    "list_contains_itself": (b"\x80\x02]q\x00h\x00a.", "contains itself"),
    "dict_contains_itself": (b"\x80\x02}q\x00X\x01\x00\x00\x00wh\x00s.", "contains itself"),
    "billion_laughs": (b"\x80\x02]q\x00X\x03\x00\x00\x00lolaq\x00" + b"".join(
        b"h\x00h\x00\x86q\x00" for _ in range(64)) + b".", "refer to each other so often"),
    "memo_get_missing": (b"\x80\x02}h\x07s.", "damaged pickle|Memo"),
    "put_huge_index": (b"\x80\x02}r\xff\xff\xff\xff.", None),  # a memo dict entry, not 4 G of list: reads
}


@pytest.mark.parametrize("case", list(PICKLE_BOMBS))
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_pickle_bombs(case, layout, tmp_path):
    """Pickles built to exhaust memory or time: lengths claiming terabytes, nesting 10000 deep, objects
    holding themselves, a memo "billion laughs" (64 levels of (x, x): 2**64 leaves); refused quickly,
    small, with a ConvertError (or read, when the pickle is merely odd)."""
    pkl, message = PICKLE_BOMBS[case]
    path = tmp_path / "bomb.pt"
    if layout == "zip":
        _zip(path, {"m/data.pkl": pkl, "m/byteorder": b"little"})
    else:
        _legacy(path, pkl, keys=b"\x80\x02].")
    err = run_guarded(lambda: exercise(path, "torch"), max_bytes=SMALL, seconds=5)
    if message is not None or err is not None:
        assert isinstance(err, CorruptFileError) and str(path) in str(err), err
        assert re.search(message or ".", str(err)), str(err)


# ---- malicious pickles: nothing from a file ever runs

def _payloads(marker: Path) -> dict[str, tuple[bytes, bool]]:
    """Pickles by every route the pickle machine has to call or construct something (GLOBAL+REDUCE,
    STACK_GLOBAL, INST, OBJ, NEWOBJ(_EX), BUILD, copyreg reconstructors, extension codes, persistent
    ids, NumPy object dtypes), each inside a state_dict-shaped dict. The flag says whether plain
    ``pickle.loads`` creates ``marker`` with it (the routes that only construct cannot run code)."""
    m = str(marker)
    code = f"open({m!r}, 'w').close()".encode()
    uni = b"X" + struct.pack("<I", len(code)) + code
    touch = f"touch {m}".encode()
    touch_u = b"X" + struct.pack("<I", len(touch)) + touch

    def in_dict(obj: bytes, proto: bytes = b"\x80\x02") -> bytes:
        return proto + b"}X\x01\x00\x00\x00w" + obj + b"s."

    return {
        "reduce_builtins_eval": (in_dict(b"cbuiltins\neval\n(" + uni + b"tR"), True),
        "reduce_builtins_exec": (in_dict(b"cbuiltins\nexec\n(" + uni + b"tR"), True),
        "reduce_py2_builtin_eval": (in_dict(b"c__builtin__\neval\n(" + uni + b"tR"), True),
        "global_os_system": (in_dict(b"cos\nsystem\n(" + touch_u + b"tR"), True),
        "global_posix_system": (in_dict(b"cposix\nsystem\n(" + touch_u + b"tR"), True),
        "stack_global_exec": (in_dict(b"\x8c\x08builtins\x8c\x04exec\x93(" + uni + b"tR", b"\x80\x04"), True),
        "inst_exec": (in_dict(b"(" + uni + b"ibuiltins\nexec\n"), True),
        "obj_exec": (in_dict(b"(cbuiltins\nexec\n" + uni + b"o"), True),
        "obj_allowed_class": (in_dict(b"(ccollections\nOrderedDict\no"), False),
        "apply_via_functools_partial": (in_dict(b"cfunctools\npartial\n(cbuiltins\nexec\n" + uni + b"tR)R"), True),
        "getattr_import_chain": (in_dict(b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(X\x02\x00\x00\x00ostR"
                                         b"X\x06\x00\x00\x00systemtR(" + touch_u + b"tR"), True),
        "subprocess_popen": (in_dict(b"csubprocess\nPopen\n((X\x05\x00\x00\x00touchX" + struct.pack("<I", len(m))
                                     + m.encode() + b"ltR"), True),
        "newobj_object": (in_dict(b"cbuiltins\nobject\n)\x81"), False),
        "newobj_allowed_class": (in_dict(b"ccollections\nOrderedDict\n)\x81"), False),
        "newobj_ex_allowed_class": (in_dict(b"ccollections\nOrderedDict\n)}\x92", b"\x80\x04"), False),
        "copyreg_newobj": (in_dict(b"ccopyreg\n__newobj__\n(cbuiltins\nobject\ntR"), False),
        "copyreg_reconstructor": (in_dict(b"ccopy_reg\n_reconstructor\n(cbuiltins\nobject\ncbuiltins\nobject\nNtR"),
                                  False),
        "build_on_a_list": (in_dict(b"]}b"), False),
        "build_state_with_code": (in_dict(b"ccollections\nOrderedDict\n)R}X\x0c\x00\x00\x00__setstate__"
                                          b"cbuiltins\nexec\nsb"), False),
        "extension_code": (in_dict(b"\x82\x01"), False),
        "persistent_id_module": (b"\x80\x02}X\x01\x00\x00\x00w(X\x06\x00\x00\x00modulecbuiltins\nexec\n" + uni
                                 + b"tQs.", False),
        "numpy_object_scalar": (in_dict(b"cnumpy.core.multiarray\nscalar\n(cnumpy\ndtype\n(X\x02\x00\x00\x00O8tR"
                                        b"C\x08\x00\x00\x00\x00\x00\x00\x00\x00tR"), False),
        "numpy_reconstruct": (in_dict(b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(K\x00tC\x01btR"),
                              False),
        "torch_rebuild_with_code_in_its_args": (
            b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(cbuiltins\nexec\n(" + uni + b"tR"
            b"K\x00)))\x89ccollections\nOrderedDict\n)RtRs.", False),
        "rebuild_from_type_with_a_foreign_function": (
            in_dict(b"ctorch._tensor\n_rebuild_from_type_v2\n(ccollections\nOrderedDict\nctorch\nTensor\n)}tR"), False),
    }


PAYLOAD_NAMES = list(_payloads(Path("/x")))


def _wait_for(path: Path, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists():
            return True
        time.sleep(0.02)
    return path.exists()


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("route", PAYLOAD_NAMES)
def test_malicious_pickle_never_runs(route, layout, tmp_path):
    """Reading never runs the payload, and is a ConvertError naming the file: a refused global
    (ReadError) or a pickle that builds what no state_dict holds (CorruptFileError). The payload is
    live: a plain ``pickle.loads`` in a child process does create the marker file (zip layout only,
    for the routes that can call something)."""
    marker = tmp_path / "pwned"
    pkl, live = _payloads(marker)[route]
    path = tmp_path / "evil.pt"
    if layout == "zip":
        _zip(path, {"archive/data.pkl": pkl, "archive/byteorder": b"little", "archive/version": b"3\n"})
    else:
        _legacy(path, pkl, keys=b"\x80\x02].")
    err = run_guarded(lambda: exercise(path, "torch"), max_bytes=SMALL)
    assert not _wait_for(marker, 0.2 if route == "subprocess_popen" else 0), "the payload ran"
    assert isinstance(err, (ReadError, CorruptFileError)) and str(path) in str(err), err
    assert "refused to load global" in str(err) or "not a torch state_dict pickle" in str(err), str(err)
    if live and layout == "zip":
        (tmp_path / "payload.pkl").write_bytes(pkl)
        child = subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())",
                                str(tmp_path / "payload.pkl")], capture_output=True, timeout=60, cwd=tmp_path)
        assert _wait_for(marker, 5), f"the test's payload is not live: {child.stderr.decode()[-300:]}"


def test_every_calling_opcode_has_a_route():
    """The routes above use every opcode that can call or construct something."""
    used = set()
    for pkl, _ in _payloads(Path("/x")).values():
        used |= {op.name for op, _, _ in pickletools.genops(pkl)}
    calling = {"REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD", "GLOBAL", "STACK_GLOBAL", "BINPERSID", "EXT1"}
    assert calling <= used, calling - used


def test_torch_zip_crcs_are_checked(tmp_path):
    """torch zips carry a CRC-32 per record: a flipped bit in ``data.pkl`` or in a storage a tensor
    covers whole is a CorruptFileError, although ``torch.load`` (the oracle) reads the flipped
    storage without complaint (it checks no CRC)."""
    seed = next(s for s in _seeds(tmp_path / "seeds") if s.name == "torch_zip")
    data = (seed.root / seed.target).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = {i.filename.split("/", 1)[1]: i for i in zf.infolist()}

    def payload_offset(info):
        name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
        return info.header_offset + 30 + name_len + extra_len

    folder = tmp_path / "copy"
    target = clone(seed, folder)

    def damaged(data):
        replace_file(folder / seed.target, data)
        err = run_guarded(lambda: exercise(target, "torch"))
        one_line_naming(err, folder)
        return err

    pkl = bytearray(data)
    pkl[payload_offset(infos["data.pkl"]) + 40] ^= 0x04
    err = damaged(bytes(pkl))
    assert isinstance(err, CorruptFileError) and "CRC" in str(err), err

    storage = bytearray(data)
    storage[payload_offset(infos["data/0"]) + 1] ^= 0x40
    err = damaged(bytes(storage))
    assert isinstance(err, CorruptFileError) and "crc32" in str(err) and "fc.weight" in str(err), err
    flipped = torch.load(folder / seed.target, weights_only=True)["state_dict"]["fc.weight"]
    original = torch.load(seed.path, weights_only=True)["state_dict"]["fc.weight"]
    assert not torch.equal(flipped, original)  # torch read the damage as data


def test_deflate_bomb_storage_is_read_within_its_tensor(tmp_path):
    """A deflated storage record (torch never writes one, but zip allows it) is decompressed only as
    far as its tensor needs: a 1 MB record of zeros behind a 1 KB compressed one reads as 1 MB."""
    raw = b"\0" * (1 << 20)
    assert len(zlib.compress(raw)) < 2048
    path = _zip(tmp_path / "m.pt", {"m/data.pkl": _tensor_pickle(1 << 18, (1 << 18,), (1,)), "m/byteorder": b"little",
                                    "m/data/0": raw}, compress={"m/data/0": zipfile.ZIP_DEFLATED})
    assert path.stat().st_size < 4096
    td = convert.read(path, "torch")
    assert run_guarded(lambda: td["w"].numpy(), max_bytes=8 << 20) is None


# --- the unpickler's fast path equals the pure-Python unpickler ------------------------------------

def _pure_load(data: bytes, stubbed: bool):
    """The pure-Python restricted unpickler alone, as torch_pickle.load ran it before its fast path."""
    from convert.formats.torch import torch_pickle as tp

    storages: dict = {}
    u = tp.RestrictedUnpickler(io.BytesIO(data), storages=storages, stubbed={} if stubbed else None)
    try:
        obj = u.load()
        tp.check_object_graph(obj)
    except Exception as e:  # noqa: BLE001 - compared by kind and message
        return "error", _error_kind(e)
    return "ok", _canonical(obj), sorted(map(repr, storages.values())), u.stubbed


def _fast_load(data: bytes, stubbed: bool):
    from convert.formats.torch import torch_pickle as tp

    storages: dict = {}
    marks = {} if stubbed else None
    try:
        obj = tp.load(io.BytesIO(data), storages=storages, stubbed=marks)
    except Exception as e:  # noqa: BLE001
        return "error", _error_kind(e)
    return "ok", _canonical(obj), sorted(map(repr, storages.values())), marks


def _error_kind(e: Exception) -> tuple[str, str]:
    from convert.formats.torch import torch_pickle as tp

    if isinstance(e, tp.DamagedPickle):
        e = e.cause
    return type(e).__name__, str(e)


def _canonical(obj, depth=0):
    """What an unpickled object holds, as plain values (our stand-ins by their fields)."""
    if depth > 50:
        return "..."
    if isinstance(obj, dict):
        extra = {k: _canonical(v, depth + 1) for k, v in vars(obj).items()} if hasattr(obj, "__dict__") else {}
        return (type(obj).__name__, [(_canonical(k, depth + 1), _canonical(v, depth + 1)) for k, v in obj.items()], extra)
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(map(repr, obj)) if isinstance(obj, (set, frozenset)) else [_canonical(v, depth + 1) for v in obj]
        return (type(obj).__name__, items)
    if hasattr(obj, "__dataclass_fields__"):
        return (type(obj).__name__, {k: _canonical(getattr(obj, k), depth + 1) for k in obj.__dataclass_fields__})
    return (type(obj).__name__, repr(obj))


class _Hyper:  # a class of the training code: a placeholder when read
    def __init__(self):
        self.lr, self.layers = 0.1, [3, 4]


def _rich_pickles() -> dict[str, bytes]:
    """data.pkl of torch.save for what checkpoints hold, and of convert's writer."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    big = OrderedDict((f"layer{i}.weight", torch.full((2, 3), float(i))) for i in range(300))  # LONG_BINPUT
    w = torch.arange(12.0).reshape(3, 4)
    objects = {
        "state_dict": net.state_dict(),  # with _metadata (a BUILD after the items)
        "training": {"state_dict": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 7,
                     "step": 70_000, "loss": -1.5, "name": "ré", "flags": (True, False, None),
                     "hparams": _Hyper(), "big": 2 ** 70, "neg": -300},
        "many": big,
        "views_and_dtypes": OrderedDict([("w", w), ("t", w.t()), ("row", w[1]), ("u16", torch.ones(3, dtype=torch.uint16)),
                                          ("bf", torch.ones(2, dtype=torch.bfloat16)), ("p", torch.nn.Parameter(torch.ones(2)))]),
        "empty": OrderedDict(),
        "list": [torch.ones(1), torch.zeros(2)],
    }
    out = {}
    for name, obj in objects.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        with zipfile.ZipFile(buf) as zf:
            out[name] = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    from convert.formats.torch.pickle_writer import StorageOut, state_dict_pickle
    f32 = convert.dtypes.from_numpy(np.dtype("float32"))
    out["convert_writer"] = state_dict_pickle([(f"n{i}", StorageOut(str(i), f32, 4), (2, 2)) for i in range(400)])
    return out


def test_fast_unpickling_equals_the_pure_unpickler_on_real_pickles():
    pickles = _rich_pickles()
    for name, data in pickles.items():
        for stubbed in (True, False):
            want, got = _pure_load(data, stubbed), _fast_load(data, stubbed)
            assert got == want, (name, stubbed)
    assert _fast_load(pickles["training"], True)[0] == "ok"  # the placeholder case is read, not refused
    assert _fast_load(pickles["training"], False)[0] == "error"


def test_fast_unpickling_equals_the_pure_unpickler_on_damaged_pickles():
    """Every truncation and 2,000 one-byte changes of small pickles: the same value, or the same error."""
    rng = np.random.default_rng(3)
    pickles = _rich_pickles()
    checked = 0
    for name in ("state_dict", "views_and_dtypes", "training"):
        data = pickles[name]
        variants = [data[:n] for n in range(0, len(data), max(1, len(data) // 300))]
        for _ in range(700):
            b = bytearray(data)
            b[rng.integers(len(b))] = rng.integers(256)
            variants.append(bytes(b))
        for v in variants:
            assert _fast_load(v, True) == _pure_load(v, True), (name, v[:60])
            checked += 1
    assert checked > 2500
