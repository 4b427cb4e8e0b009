"""PyTorch Distributed Checkpoint (DCP) folders, read; torch is the oracle: it writes the checkpoints
(``torch.distributed.checkpoint.save``, in one process and in a 2-process gloo group on 127.0.0.1 with
tensors sharded across the ranks) and reads them (``format_utils.dcp_to_torch_save`` + ``torch.load``).

The format is read-only here, so instead of the shared round-trip contract the tests check detect,
read and hostile input directly."""

from __future__ import annotations

import os
import pickle
import random
import re
import socket
import subprocess
import sys
import tracemalloc
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
from blocking import blocker
from fuzzing import exercise, run_guarded

import convert
from convert import registry
from convert.errors import ConvertError, CorruptFileError, ReadError
from convert.formats import dcp
from convert.ir import FileRegion, digest

from oracles import safetensors_read, torch_to_numpy

torch = pytest.importorskip("torch")
import torch.distributed.checkpoint as tdcp  # noqa: E402
from torch.distributed.checkpoint import metadata as tmeta  # noqa: E402
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # noqa: E402

ROOT = Path(__file__).parent.parent
SMALL = 8 << 20  # traced bytes a refused hostile checkpoint may cost

DTYPES = ["float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8", "int16", "int32",
          "int64", "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128"]


def random_tensor(dtype: str, shape, seed: int) -> torch.Tensor:
    """Arbitrary bit patterns of a dtype (NaN payloads, -0...), bools 0/1."""
    dt = getattr(torch, dtype)
    n = int(np.prod(shape))
    itemsize = torch.empty((), dtype=dt).element_size()
    raw = np.random.default_rng(seed).integers(0, 256, size=n * itemsize, dtype=np.uint8)
    if dtype == "bool":
        raw &= 1
    return torch.from_numpy(raw.copy()).view(dt).reshape(shape)


def flatten(obj, prefix: str = "") -> dict:
    """A nested state dict (as ``dcp_to_torch_save`` rebuilds it) flattened the way DCP names entries."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list) and _holds_tensor(obj):  # DCP keeps lists of plain values whole
        items = enumerate(obj)
    else:
        return {prefix: obj}
    out = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _holds_tensor(obj) -> bool:
    """Whether DCP's flattening descends into a list (torch/distributed/checkpoint/_traverse.py: a list
    is a leaf unless it holds a dict, a tensor or such a list)."""
    return any(isinstance(v, (dict, torch.Tensor)) or (isinstance(v, list) and _holds_tensor(v)) for v in obj)


def torch_oracle(folder: Path, tmp_path: Path) -> dict:
    """What torch reads from the checkpoint: every entry, flattened."""
    out = tmp_path / f"oracle-{folder.name}.pt"
    dcp_to_torch_save(str(folder), str(out))
    return flatten(torch.load(out, weights_only=False))  # our own test file: objects included


def assert_reads_like_torch(folder: Path, tmp_path: Path) -> convert.TensorDict:
    td = dcp.read(folder)
    expected = torch_oracle(folder, tmp_path)
    tensors = {k: v for k, v in expected.items() if isinstance(v, torch.Tensor)}
    assert sorted(td) == sorted(tensors)
    for name, t in tensors.items():
        want = torch_to_numpy(t)
        got = td[name].numpy()
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name
        assert digest(td[name]) == google_crc32c.value(np.ascontiguousarray(want).tobytes()), name
    for name, value in expected.items():
        if not isinstance(value, torch.Tensor):
            stored = td.metadata[f"dcp.extra.{name}"]
            assert stored == (value if isinstance(value, str) else value.hex() if isinstance(value, bytes)
                              else __import__("json").dumps(value)), name
    return td


# ---- one process -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dcp") / "step-7"
    base = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    sd = {f"dtypes.{d}": random_tensor(d, (3, 4), i) for i, d in enumerate(DTYPES)}
    sd.update({
        "model": {"conv.weight": random_tensor("float32", (8, 3, 3, 3), 99), "fc.bias": torch.zeros(10)},
        "transposed": base.t(),  # a view saved with its strides
        "scalar": torch.tensor(2.5), "empty": torch.zeros((0, 3)),
        "optim": {"state": {"fc.bias": {"exp_avg": torch.ones(10), "step": torch.tensor(3.0)}},
                  "param_groups": [{"lr": 0.001, "betas": [0.9, 0.999], "name": "adam"}]},
        "step": 7, "blob": b"\x00\xffraw", "note": "hello", "layers": [torch.ones(2), 5],
    })
    tdcp.save(sd, checkpoint_id=str(folder))
    return folder


def test_single_process_reads_like_torch(single, tmp_path):
    td = assert_reads_like_torch(single, tmp_path)
    assert td.metadata["source.format"] == "dcp" and td.metadata["dcp.extra.step"] == "7"
    assert td["optim.state.fc.bias.exp_avg"].attrs["role"] == "optimizer"
    assert td["model.conv.weight"].attrs["role"] == "weight"


def test_contiguous_chunks_are_regions_of_the_distcp_file(single):
    td = dcp.read(single)
    for name in ("model.conv.weight", "dtypes.bfloat16", "dtypes.complex128"):
        inner = td[name].source.inner()
        assert isinstance(inner, FileRegion) and inner.path.endswith(".distcp") and inner.crc32 is not None, name
    assert not isinstance(td["transposed"].source.inner(), FileRegion)  # resolved through its strides


def test_detect_and_auto(single, tmp_path):
    assert dcp.detect(single) and dcp.detect(single / ".metadata")
    assert registry.detect(single).name == "dcp"
    for other in (tmp_path, single / "__0_0.distcp"):
        assert not dcp.detect(other)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / ".metadata").write_bytes(random.Random(0).randbytes(300))
    assert not dcp.detect(junk)


@pytest.mark.parametrize("to", ["safetensors", "torch"])
def test_converted_output_matches_torch(single, tmp_path, to):
    out = tmp_path / ("out.safetensors" if to == "safetensors" else "out.pt")
    keep = r"^(model|dtypes|optim)\.(?!complex128)"  # safetensors has no complex128
    convert.convert(single, out, to=to, include=[keep])
    expected = {k: torch_to_numpy(v) for k, v in torch_oracle(single, tmp_path).items()
                if isinstance(v, torch.Tensor) and re.match(keep, k)}
    if to == "safetensors":
        got = safetensors_read(out)
    else:
        got = {k: torch_to_numpy(v) for k, v in torch.load(out, weights_only=True).items()}
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].tobytes() == v.tobytes() and got[k].shape == v.shape, k


def test_reads_without_torch(single, tmp_path):
    code = f"""
import sys
from convert.formats import dcp
from convert.ir import digest
td = dcp.read({str(single)!r})
print(len(td), td["model.fc.bias"].numpy().sum(), td.metadata["dcp.extra.note"], [digest(t) > 0 for t in td.values()][:1])
assert sys.modules["torch"] is None
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=blocker(tmp_path, ("torch",)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:3] == [str(len(dcp.read(single))), "0.0", "hello"]


def test_memory_bounded_by_largest_tensor(tmp_path):
    n = 4 << 20  # 8 tensors of 16 MB
    folder = tmp_path / "big"
    tdcp.save({f"w{i}": torch.full((n,), float(i)) for i in range(8)}, checkpoint_id=str(folder))
    tracemalloc.start()
    td = convert.read(folder)
    convert.write(td, tmp_path / "big.safetensors", "safetensors")
    for t in td.values():
        digest(t)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 40 << 20, peak
    assert float(safetensors_read(tmp_path / "big.safetensors")["w7"][-1]) == 7.0


def test_crc32c_combine_matches_google_crc32c():
    rng = random.Random(1)
    for _ in range(50):
        a, b = rng.randbytes(rng.randrange(0, 300)), rng.randbytes(rng.randrange(0, 5000))
        assert dcp.crc32c_combine(google_crc32c.value(a), google_crc32c.value(b), len(b)) == google_crc32c.value(a + b)


# ---- two processes, tensors sharded across the ranks ---------------------------------------------

GLOO_SAVE = r"""
import os, sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, Shard, Replicate
rank, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
mesh = init_device_mesh("cpu", (2,))
g = torch.Generator().manual_seed(0)
full = {"rows": torch.randn(5, 3, generator=g),  # uneven: 3 + 2 rows
        "big_rows": torch.randn(512, 1024, generator=g),  # 2 MB: kernel copies, stitched
        "cols": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "planes": torch.arange(2 * 6 * 4, dtype=torch.int64).reshape(2, 6, 4),
        "rep": torch.arange(24, dtype=torch.int32).reshape(2, 3, 4)}
sd = {"model": {"rows": distribute_tensor(full["rows"], mesh, [Shard(0)]),
                "big_rows": distribute_tensor(full["big_rows"], mesh, [Shard(0)]),
                "cols": distribute_tensor(full["cols"], mesh, [Shard(1)]),
                "planes": distribute_tensor(full["planes"], mesh, [Shard(1)]),
                "rep": distribute_tensor(full["rep"], mesh, [Replicate()])},
      "step": 3}
dcp.save(sd, checkpoint_id=out)
dist.barrier()  # both ranks past the save before either tears its group down
dist.destroy_process_group()
# Gloo's worker threads may still be alive when the interpreter finalizes, which aborts the process
# now and then ("terminate called without an active exception", pytorch/pytorch#190489, #179291):
# the checkpoint is complete and the group destroyed, so leave without finalizing.
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gloo") / "ckpt"
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", GLOO_SAVE, str(r), str(port), str(folder)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    try:
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err.decode()[-2000:]
    return folder


@pytest.mark.slow
def test_two_ranks_sharded_tensors_read_like_torch(sharded, tmp_path):
    assert sorted(p.name for p in sharded.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    td = assert_reads_like_torch(sharded, tmp_path)
    for name in ("model.rows", "model.big_rows", "model.cols", "model.planes"):
        assert td[name].attrs["dcp.chunks"] == "2", name  # stitched from both ranks' files
        files = {Path(src.item.path).name for _, src in td[name].source.parts}
        assert files == {"__0_0.distcp", "__1_0.distcp"}, name
    assert td["model.rows"].source.rows and not td["model.cols"].source.rows


@pytest.mark.slow
def test_two_ranks_to_safetensors_byte_copies_verified(sharded, tmp_path):
    out = tmp_path / "s.safetensors"
    summary = convert.convert(sharded, out, to="safetensors")
    assert [o["verified"] for o in summary["outputs"]] == [True], summary  # re-read, every CRC-32C compared
    expected = {k: torch_to_numpy(v) for k, v in torch_oracle(sharded, tmp_path).items() if isinstance(v, torch.Tensor)}
    got = safetensors_read(out)
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].tobytes() == v.tobytes(), k


# ---- hostile input -------------------------------------------------------------------------------

def _resave(src: Path, dst: Path, edit) -> Path:
    """A copy of a checkpoint whose metadata ``edit(md)`` changed (pickled by torch itself)."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name != ".metadata":
            (dst / p.name).write_bytes(p.read_bytes())
    with open(src / ".metadata", "rb") as f:
        md = pickle.load(f)
    edit(md)
    with open(dst / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return dst


def _refused(folder: Path, error=ConvertError, match: str | None = None) -> ConvertError:
    err = run_guarded(lambda: exercise(folder, "dcp"), max_bytes=SMALL, seconds=10)
    assert isinstance(err, error), f"expected {error.__name__}, got {err!r}"
    assert str(folder) in str(err) and "\n" not in str(err), str(err)
    if match is not None:
        assert re.search(match, str(err)), str(err)
    return err


def _entry(md, name):
    return md.state_dict_metadata[name]


def _first_key(md, name):
    return next(k for k in md.storage_data if k.fqn == name)


def _set_storage(md, name, **changes):
    key = _first_key(md, name)
    info = md.storage_data[key]
    for k, v in changes.items():
        setattr(info, k, v)


HOSTILE = {
    "item_past_the_end": (lambda md: _set_storage(md, "model.conv.weight", offset=1 << 40), CorruptFileError,
                          "past the end"),
    "item_leaves_the_folder": (lambda md: _set_storage(md, "model.conv.weight", relative_path="../../etc/passwd"),
                               CorruptFileError, "not a file of the folder"),
    "item_absolute_path": (lambda md: _set_storage(md, "model.conv.weight", relative_path="/etc/passwd"),
                           CorruptFileError, "not a file of the folder"),
    "item_file_missing": (lambda md: _set_storage(md, "model.conv.weight", relative_path="__9_0.distcp"),
                          ReadError, "missing"),
    "compressed_items": (lambda md: _set_storage(md, "model.conv.weight", transform_descriptors=["zstd/1"]),
                         ReadError, "not supported"),
    "huge_shape": (lambda md: setattr(_entry(md, "model.fc.bias"), "size", torch.Size([1 << 40, 1 << 40])),
                   CorruptFileError, "too large|outside|elements"),
    "chunk_claims_more_than_its_item": (lambda md: (
        setattr(_entry(md, "model.fc.bias"), "size", torch.Size([1 << 28])),
        setattr(_entry(md, "model.fc.bias").chunks[0], "sizes", torch.Size([1 << 28]))), CorruptFileError,
        "needs .* bytes; its item holds"),
    "chunks_leave_a_gap": (lambda md: setattr(_entry(md, "model.fc.bias"), "size", torch.Size([20])),
                           CorruptFileError, "elements"),
    "chunk_outside_the_tensor": (lambda md: setattr(_entry(md, "model.fc.bias").chunks[0], "sizes",
                                                    torch.Size([11])), CorruptFileError, "outside"),
    "chunk_without_storage": (lambda md: md.storage_data.pop(_first_key(md, "model.fc.bias")), CorruptFileError,
                              "no storage entry"),
    "wrong_dtype_in_metadata": (lambda md: setattr(_entry(md, "model.fc.bias").properties, "dtype", torch.int64),
                                CorruptFileError, "the metadata says"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_metadata(single, tmp_path, case):
    edit, error, match = HOSTILE[case]
    _refused(_resave(single, tmp_path / case, edit), error, match)


def test_overlapping_chunks_refused(sharded_like, tmp_path):
    """Both chunks claim the left half: as many elements as the tensor has, but overlapping."""
    def edit(md):
        md.state_dict_metadata["t"].chunks[1].offsets = torch.Size([0, 0])
    _refused(_resave(sharded_like, tmp_path / "o", edit), CorruptFileError, "overlaps")


@pytest.fixture
def sharded_like(tmp_path) -> Path:
    """A one-process checkpoint whose tensor 't' has two chunks (column halves), as a rank pair writes it:
    built by editing the metadata of two saved halves together, with torch's own classes."""
    a, b = tmp_path / "a", tmp_path / "b"
    tdcp.save({"t": torch.arange(12.0).reshape(4, 3)}, checkpoint_id=str(a))
    tdcp.save({"t": torch.arange(12.0, 24.0).reshape(4, 3)}, checkpoint_id=str(b))
    out = tmp_path / "joined"
    out.mkdir()
    (out / "__0_0.distcp").write_bytes((a / "__0_0.distcp").read_bytes())
    (out / "__1_0.distcp").write_bytes((b / "__0_0.distcp").read_bytes())
    md = pickle.load(open(a / ".metadata", "rb"))
    info_a = next(iter(md.storage_data.values()))
    info_b = next(iter(pickle.load(open(b / ".metadata", "rb")).storage_data.values()))
    info_b.relative_path = "__1_0.distcp"
    props = md.state_dict_metadata["t"].properties
    md.state_dict_metadata = {"t": tmeta.TensorStorageMetadata(props, torch.Size([4, 6]), [
        tmeta.ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([4, 3])),
        tmeta.ChunkStorageMetadata(torch.Size([0, 3]), torch.Size([4, 3]))])}
    md.storage_data = {tmeta.MetadataIndex("t", torch.Size([0, 0])): info_a,
                       tmeta.MetadataIndex("t", torch.Size([0, 3])): info_b}
    pickle.dump(md, open(out / ".metadata", "wb"))
    return out


def test_column_chunks_are_stitched(sharded_like, tmp_path):
    """The hand-joined checkpoint is one torch reads too; ours reads it the same (a column tiling)."""
    td = assert_reads_like_torch(sharded_like, tmp_path)
    assert td["t"].numpy()[0].tolist() == [0, 1, 2, 12, 13, 14]


def test_truncated_distcp_and_metadata(single, tmp_path):
    for victim in (".metadata", "__0_0.distcp"):
        for frac in (0.0, 0.3, 0.7, 0.99):
            folder = _resave(single, tmp_path / f"{victim}-{frac}", lambda md: None)
            data = (folder / victim).read_bytes()
            (folder / victim).write_bytes(data[: int(len(data) * frac)])
            if victim == ".metadata" and frac == 0.0:
                assert not dcp.detect(folder)
                with pytest.raises(ConvertError):
                    dcp.read(folder)
                continue
            _refused(folder)


def test_flipped_bytes_in_chunks_are_caught_by_the_archive_crc(single, tmp_path):
    folder = _resave(single, tmp_path / "flip", lambda md: None)
    md = pickle.load(open(folder / ".metadata", "rb"))
    info = md.storage_data[_first_key(md, "model.conv.weight")]
    data = bytearray((folder / info.relative_path).read_bytes())
    region = dcp.read(single)["model.conv.weight"].source.inner()
    data[region.offset + 17] ^= 0x10
    (folder / info.relative_path).write_bytes(bytes(data))
    _refused(folder, CorruptFileError, "checksum mismatch")


def _metadata_pickle_with(obj_bytes: bytes) -> bytes:
    """A protocol-4 pickle that starts like DCP's (so detect accepts it) and then builds ``obj_bytes``."""
    mod = b"torch.distributed.checkpoint.metadata"
    return b"\x80\x04\x8c" + bytes([len(mod)]) + mod + b"\x94" + b"0" + obj_bytes  # push, memoize, pop; then obj


def test_malicious_metadata_never_runs(tmp_path):
    from test_torch import _payloads, _wait_for

    marker = tmp_path / "pwned"
    for route, (pkl, _) in _payloads(marker).items():
        folder = tmp_path / route
        folder.mkdir()
        body = pkl[2:] if pkl.startswith(b"\x80") else pkl
        (folder / ".metadata").write_bytes(_metadata_pickle_with(body))
        assert dcp.detect(folder), route
        err = _refused(folder)
        assert not _wait_for(marker, 0), f"{route}: the payload ran"
        assert isinstance(err, (ReadError, CorruptFileError)), (route, err)


def test_malicious_bytes_item_never_runs(single, tmp_path):
    """A non-tensor item is a torch.save archive; one whose pickle asks for os.system is refused."""
    folder = _resave(single, tmp_path / "evil", lambda md: None)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save(Evil(), evil)
    md = pickle.load(open(folder / ".metadata", "rb"))
    info = md.storage_data[_first_key(md, "note")]
    with open(folder / "__0_0.distcp", "ab") as f:
        info.offset, info.length = f.tell(), evil.stat().st_size
        f.write(evil.read_bytes())
    pickle.dump(md, open(folder / ".metadata", "wb"))
    err = _refused(folder, ReadError, "refused to load global 'posix.system'|refused to load global 'os.system'")
    assert not marker.exists(), err


def test_pickle_bombs_in_metadata(tmp_path):
    from test_torch import PICKLE_BOMBS

    for case, (pkl, _) in PICKLE_BOMBS.items():
        folder = tmp_path / case
        folder.mkdir()
        (folder / ".metadata").write_bytes(_metadata_pickle_with(pkl[2:]))
        _refused(folder)


def test_safetensors_serialization_is_refused_clearly(tmp_path):
    """torch 2.13 can also write each rank's file as one safetensors file (which its own FileSystemReader
    and dcp_to_torch_save cannot read back); that is said, in one line."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    folder = tmp_path / "st"
    tdcp.save({"w": torch.ones(3, 4)}, storage_writer=FileSystemWriter(
        str(folder), serialization_format=SerializationFormat.SAFETENSORS))
    with pytest.raises(tdcp.api.CheckpointException):
        dcp_to_torch_save(str(folder), str(tmp_path / "oracle.pt"))  # torch's reader fails too
    _refused(folder, ReadError, "serialization_format=SAFETENSORS")
