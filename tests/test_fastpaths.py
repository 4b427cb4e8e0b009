"""The fast byte paths: tensors of 1 MB and more are copied inside the kernel (copy_file_range)
while their checksum is taken from a memory map; torch files are zips we write ourselves.

Oracles: TensorFlow wrote the checkpoints, the safetensors library and torch read the outputs,
Python's zipfile checks every member's CRC-32.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import convert

from oracles import safetensors_read, torch_to_numpy

ROWS = (700, 1300, 257)  # 2.7 MB, 5.1 MB, 1 MB: unaligned offsets in the data file


@pytest.fixture(scope="module")
def big_v2(tmp_path_factory):
    """A V2 checkpoint written by TensorFlow's SaveV2 with tensors past the 1 MB fast-path size."""
    tf = pytest.importorskip("tensorflow")
    d = tmp_path_factory.mktemp("big") / "ckpt"
    d.mkdir()
    rng = np.random.default_rng(7)
    arrays = {f"layer{i}/kernel": rng.standard_normal((rows, 1024), dtype=np.float32) for i, rows in enumerate(ROWS)}
    arrays["tiny/bias"] = np.arange(5, dtype=np.float32)
    names = sorted(arrays)
    tf.raw_ops.SaveV2(prefix=str(d / "model.ckpt-3"), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(arrays[n]) for n in names])
    (d / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-3"\n')
    reader = tf.train.load_checkpoint(str(d / "model.ckpt-3"))
    return d, {n: reader.get_tensor(n) for n in names}


def _same(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].tobytes() == theirs[k].tobytes(), k


def test_v2_to_safetensors_copies_in_the_kernel(big_v2, tmp_path, monkeypatch):
    src, expected = big_v2
    calls = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a[2]) or real(*a))
    out = tmp_path / "m.safetensors"
    summary = convert.convert(src, out, to="safetensors")
    assert summary["outputs"][0]["verified"]
    # every byte went by the kernel: the big tensors one by one, the small one as a run (copying.copy_many)
    assert sum(calls) == sum(rows * 4096 for rows in ROWS) + 5 * 4
    _same(safetensors_read(out), expected)


def test_safetensors_to_v2_to_torch_keeps_every_byte(big_v2, tmp_path):
    tf = pytest.importorskip("tensorflow")
    torch = pytest.importorskip("torch")
    src, expected = big_v2
    st = tmp_path / "m.safetensors"
    convert.convert(src, st, to="safetensors")
    back = tmp_path / "back"
    convert.convert(st, back, to="tf-ckpt")
    reader = tf.train.load_checkpoint(str(back))  # TF checks every tensor's crc32c we wrote
    _same({n: reader.get_tensor(n) for n in expected}, expected)
    pt = tmp_path / "m.pt"
    convert.convert(back, pt, to="torch")
    with zipfile.ZipFile(pt) as zf:
        assert zf.testzip() is None  # every member's CRC-32 is right
    _same({k: torch_to_numpy(v) for k, v in torch.load(pt, weights_only=True).items()}, expected)
    again = tmp_path / "again.safetensors"
    convert.convert(pt, again, to="safetensors")  # torch storages are file regions too
    _same(safetensors_read(again), expected)


@pytest.mark.parametrize("verify", [True, False])
def test_damaged_big_tensor_is_caught_while_copying(big_v2, tmp_path, verify):
    """Verified, the copy trusts the stored crc32c and the check of the output catches the damage;
    unverified, the copy checks it itself. Either way: the source's error, no output."""
    src, _ = big_v2
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in src.iterdir():
        bad.joinpath(p.name).write_bytes(p.read_bytes())
    data = next(bad.glob("*.data-*"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # inside layer1/kernel, the 5 MB one
    data.write_bytes(bytes(raw))
    with pytest.raises(convert.errors.CorruptFileError, match="checksum mismatch") as e:
        convert.convert(bad, tmp_path / "out.safetensors", to="safetensors", verify=verify)
    assert e.value.tensor == "layer1/kernel" and str(data) in str(e.value)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("code", [errno.EXDEV, errno.ENOSYS, errno.EINVAL])
def test_streams_where_the_kernel_cannot_copy(big_v2, tmp_path, monkeypatch, code):
    """copy_file_range refuses some file system pairs; the copy then streams through Python."""
    src, expected = big_v2

    def refuse(*_a):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(os, "copy_file_range", refuse)
    out = tmp_path / "m.safetensors"
    convert.convert(src, out, to="safetensors")
    _same(safetensors_read(out), expected)


@pytest.mark.slow
def test_torch_zip64_past_4_gib(tmp_path):
    """A member over 4 GiB needs zip64 fields; torch and zipfile must read it. The input is a
    sparse safetensors file, so only the output takes disk space (4.3 GB, removed at the end)."""
    pytest.importorskip("torch")
    n = (1 << 32) + 4096 * 3
    src = tmp_path / "big.safetensors"
    header = b'{"big":{"dtype":"U8","shape":[%d],"data_offsets":[0,%d]},"small":{"dtype":"F32","shape":[2],' \
             b'"data_offsets":[%d,%d]}}' % (n, n, n, n + 8)
    header += b" " * (-len(header) % 8)
    with open(src, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.seek(8 + len(header) + n)
        f.write(np.array([1.5, -2.0], np.float32).tobytes())
    out = tmp_path / "big.pt"
    try:
        convert.convert(src, out, to="torch")
        with zipfile.ZipFile(out) as zf:
            sizes = sorted(i.file_size for i in zf.infolist())
            assert sizes[-1] == n
        code = ("import sys, torch; sd = torch.load(sys.argv[1], mmap=True, weights_only=True); "
                "b = sd['big']; print(b.shape[0], int(b[-4096:].sum()), sd['small'].tolist())")
        res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
        assert res.stdout.split(None, 2) == [str(n), "0", "[1.5, -2.0]\n"]
    finally:
        out.unlink(missing_ok=True)


@pytest.mark.parametrize("numel", [1000, 600_000])  # a small storage (read) and a big one (kernel copy)
def test_torch_zip_crc_catches_a_flipped_bit(tmp_path, numel):
    """torch.save's zip holds a CRC-32 per storage; a damaged byte fails the read, naming the tensor."""
    torch = pytest.importorskip("torch")
    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(numel, dtype=torch.float32), "b": torch.ones(3)}, path)
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data/0"))
    raw = bytearray(path.read_bytes())
    raw[info.header_offset + 200 + numel * 2] ^= 0x01  # inside storage 0's data ('w')
    path.write_bytes(bytes(raw))
    with pytest.raises(convert.errors.CorruptFileError, match="checksum mismatch \\(crc32 ") as e:
        convert.convert(path, tmp_path / "o.safetensors", to="safetensors")
    assert e.value.tensor == "w" and not (tmp_path / "o.safetensors").exists()


@pytest.fixture(scope="module")
def big_v1(tmp_path_factory):
    """A V1 checkpoint written by TensorFlow's Save op: big float32/float64/complex64 tensors
    (located in the file and copied as is) beside small and integer ones (parsed)."""
    tf = pytest.importorskip("tensorflow")
    path = tmp_path_factory.mktemp("v1") / "model.ckpt"
    rng = np.random.default_rng(3)
    arrays = {"a/kernel": rng.standard_normal((600, 1024), dtype=np.float32),
              "b/kernel": rng.standard_normal((300, 512)),
              "c/spectrum": (rng.standard_normal(200_000) + 1j * rng.standard_normal(200_000)).astype(np.complex64),
              "d/bias": np.arange(7, dtype=np.float32), "e/step": np.arange(300_000, dtype=np.int64)}
    names = sorted(arrays)
    tf.raw_ops.Save(filename=str(path), tensor_names=names, data=[tf.constant(arrays[n]) for n in names])
    return path, arrays


def test_v1_big_tensors_are_copied_from_their_blocks(big_v1, tmp_path):
    tf = pytest.importorskip("tensorflow")
    src, arrays = big_v1
    sources = {n: type(t.source).__name__ for n, t in convert.read(src).items()}
    assert sources == {"a/kernel": "FileRegion", "b/kernel": "FileRegion", "c/spectrum": "FileRegion",
                       "d/bias": "ArraySource", "e/step": "ArraySource"}
    out = tmp_path / "v2"
    convert.convert(src, out, to="tf-ckpt")
    reader = tf.train.load_checkpoint(str(out))
    _same({n: reader.get_tensor(n) for n in arrays}, arrays)


def test_v1_damaged_block_is_caught_by_its_crc(big_v1, tmp_path):
    src, arrays = big_v1
    raw = bytearray(src.read_bytes())
    at = raw.find(arrays["a/kernel"][300].tobytes())  # a row in the middle of the big float32 tensor
    assert at > 0
    raw[at + 5] ^= 0x04
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(convert.errors.CorruptFileError, match="checksum mismatch") as e:
        convert.convert(bad, tmp_path / "out", to="tf-ckpt")
    assert e.value.tensor == "a/kernel" and not (tmp_path / "out").exists()
