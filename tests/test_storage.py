"""The storage layer (convert.storage) against a real local S3 server (moto's, on 127.0.0.1).

Ranged streamed reads checked against the safetensors library's reading of the same file;
remote atomic outputs (uploads held back until the writer is done, commit objects last, a
failure or a SIGKILL leaves no visible object, the next writer removes leftovers); credentials
never in error messages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import safetensors.numpy
from blocking import blocker

import convert
from convert import outputs, storage
from convert.errors import CorruptFileError, ReadError, WriteError
from convert.formats import safetensors as safetensors_format
from convert.ir import FileRegion, Tensor, TensorDict

from servers import FAKE_SECRET

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _safetensors_file(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, tuple[int, int]]:
    """Written by the safetensors library; returns each tensor's (offset, length) in the file."""
    safetensors.numpy.save_file(arrays, str(path))
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}


def test_paths_are_remote_only_with_a_scheme():
    assert storage.is_remote("s3://b/k") and storage.is_remote("memory://x")
    assert not storage.is_remote("file:///tmp/x") and not storage.is_remote("/tmp/x")
    assert not storage.is_remote(Path("s3:/b"))  # a pathlib.Path is local whatever it says
    assert storage.local("file:///tmp/x") == Path("/tmp/x")
    assert storage.join("s3://b/runs", "7", "x.safetensors") == "s3://b/runs/7/x.safetensors"


def test_ranged_reads_match_the_safetensors_library(s3, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {"big": rng.standard_normal((1024, 1300)).astype(np.float32),  # 5.3 MB: many ranges
              "small": np.arange(7, dtype=np.int64)}
    local = tmp_path / "m.safetensors"
    where = _safetensors_file(local, arrays)
    bucket = s3.new_bucket()
    s3.fs().put(str(local), f"{bucket}/m.safetensors")
    monkeypatch.setattr(storage, "REMOTE_RANGE", 1 << 20)  # 6 ranges, 4 in flight: order must hold
    oracle = safetensors.numpy.load_file(str(local))
    url = f"s3://{bucket}/m.safetensors"
    for name, (offset, length) in where.items():
        crc = google_crc32c.value(local.read_bytes()[offset:offset + length])
        region = storage.region(url, offset, length, crc32c=crc, label=name)
        assert isinstance(region, storage.RemoteRegion)
        arr = region.array(convert.dtypes.from_numpy(oracle[name].dtype), oracle[name].shape)
        assert np.array_equal(arr, oracle[name])
        assert region.digest(length) == crc
        assert b"".join(bytes(p) for p in region.chunks(length, 100_000)) == local.read_bytes()[offset:offset + length]


def test_a_damaged_object_is_refused_naming_the_tensor(s3, tmp_path):
    local = tmp_path / "m.safetensors"
    (offset, length), = _safetensors_file(local, {"w": np.ones(300_000, np.float32)}).values()
    crc = google_crc32c.value(local.read_bytes()[offset:offset + length])
    bucket = s3.new_bucket()
    data = bytearray(local.read_bytes())
    data[offset + 1000] ^= 1
    s3.fs().pipe_file(f"{bucket}/m.safetensors", bytes(data))
    region = storage.region(f"s3://{bucket}/m.safetensors", offset, length, crc32c=crc, label="w")
    with pytest.raises(CorruptFileError, match="tensor 'w': checksum mismatch"):
        region.digest(length)
    short = storage.region(f"s3://{bucket}/m.safetensors", offset, length + 10, label="w")
    with pytest.raises(CorruptFileError, match="truncated"):
        short.read()
    with pytest.raises(ReadError, match="no such file or object"):
        storage.region(f"s3://{bucket}/nothing", 0, 10, label="w").read()


def _write_by_hand(out, tensors: list[Tensor]) -> None:
    """A safetensors file written into ``out`` through Tensor.copy_into (what the adapter will do
    in phase 2): header, then each tensor's bytes streamed from its source."""
    header, pos = {}, 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype.safetensors, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with out.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in tensors:
            t.copy_into(f)


def test_single_object_output_appears_only_when_complete(s3, tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"a": rng.standard_normal((700, 1000)).astype(np.float32), "b": np.arange(10, dtype=np.int32)}
    local = tmp_path / "src.safetensors"
    where = _safetensors_file(local, arrays)
    bucket = s3.new_bucket()
    s3.fs().put(str(local), f"{bucket}/src.safetensors")
    url = f"s3://{bucket}/out/model.safetensors"
    # one tensor from a local file (kernel copy refused: an upload has no fd), one from the bucket
    tensors = [Tensor("a", convert.dtypes.by_name("float32"), (700, 1000), FileRegion(str(local), *where["a"])),
               Tensor("b", convert.dtypes.by_name("int32"), (10,),
                      storage.region(f"s3://{bucket}/src.safetensors", *where["b"]))]
    fs = s3.fs()
    with outputs.atomic_output(url) as tmp:
        _write_by_hand(tmp, tensors)
        fs.invalidate_cache()
        assert not fs.exists(url), "visible before the writer was done"
        assert len(s3.pending_uploads(bucket)) == 1
    fs.invalidate_cache()
    got = safetensors.numpy.load(fs.cat_file(url))
    assert set(got) == {"a", "b"} and all(np.array_equal(got[k], arrays[k]) for k in arrays)
    assert s3.pending_uploads(bucket) == []
    assert sorted(fs.find(bucket)) == [f"{bucket}/out/model.safetensors", f"{bucket}/src.safetensors"]
    with pytest.raises(WriteError, match="already exists"):
        with outputs.atomic_output(url):
            pass


def test_a_failing_writer_leaves_nothing(s3):
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/out/model"
    with pytest.raises(RuntimeError, match="writer broke"):
        with outputs.atomic_output(url, commit=["index.json"]) as tmp:
            with (tmp / "shard-1.bin").open("wb") as f:
                f.write(os.urandom(6 << 20))  # more than a part: a real multipart upload
            with (tmp / "shard-2.bin").open("wb") as f:
                f.write(b"x" * 100)
                raise RuntimeError("writer broke")
    s3.fs().invalidate_cache()
    assert s3.fs().find(bucket) == [] and s3.pending_uploads(bucket) == []


def test_commit_object_is_completed_last_and_a_failed_verification_removes_all(s3, commit_order):
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/out/model"
    with pytest.raises(convert.errors.VerificationError):
        with outputs.atomic_output(url, commit=["*.index.json"]) as tmp:
            (tmp / "model.safetensors.index.json").write_text("{}")  # opened first, completed last
            (tmp / "model-00001-of-00002.safetensors").write_bytes(b"1" * 10)
            (tmp / "model-00002-of-00002.safetensors").write_bytes(b"2" * 10)
            back = outputs.readable(tmp)
            assert isinstance(back, storage.RemotePath) and back.is_dir()
            assert (back / "model.safetensors.index.json").read_text() == "{}"
            assert s3.fs().exists(f"{bucket}/out/.model.convert-journal.json")
            raise convert.errors.VerificationError(url, "reads back with different values")
    assert commit_order == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"]
    s3.fs().invalidate_cache()
    assert s3.fs().find(bucket) == []


def test_force_replaces_a_folder_output_without_a_mix(s3):
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/out/ckpt"
    with outputs.atomic_output(url, commit=["checkpoint"]) as tmp:
        (tmp / "old.index").write_bytes(b"old")
        (tmp / "checkpoint").write_text('model_checkpoint_path: "old"\n')
    with outputs.atomic_output(url, force=True, commit=["checkpoint"]) as tmp:
        (tmp / "new.index").write_bytes(b"new")
        (tmp / "checkpoint").write_text('model_checkpoint_path: "new"\n')
    fs = s3.fs()
    assert sorted(fs.find(bucket)) == [f"{bucket}/out/ckpt/checkpoint", f"{bucket}/out/ckpt/new.index"]
    assert fs.cat_file(f"{bucket}/out/ckpt/checkpoint") == b'model_checkpoint_path: "new"\n'


_KILLED_WRITER = """
import sys, time, os
from convert import outputs, storage
from convert.formats import safetensors as safetensors_format
storage.configure(sys.argv[1])
stage = sys.argv[3]
with outputs.atomic_output(sys.argv[2], commit=["checkpoint"]) as tmp:
    (tmp / "model.ckpt.data-00000-of-00001").write_bytes(os.urandom(6 << 20))
    (tmp / "model.ckpt.index").write_bytes(b"index")
    (tmp / "checkpoint").write_text("state")
    if stage == "verify":
        outputs.readable(tmp)
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("stage", ["write", "verify"])
def test_a_killed_writer_leaves_no_commit_object_and_the_next_one_cleans_up(s3, stage):
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/out/ckpt"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, json.dumps({"s3": s3.options}), url, stage],
                            stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    fs = s3.fs()
    if stage == "write":  # nothing visible: only incomplete uploads
        assert fs.find(bucket) == [] and len(s3.pending_uploads(bucket)) == 3
    else:  # killed while verifying: complete but unverified, its journal says what to remove
        assert f"{bucket}/out/.ckpt.convert-journal.json" in fs.find(bucket)
    with outputs.atomic_output(url, commit=["checkpoint"]) as tmp:
        (tmp / "checkpoint").write_text("second run")
    fs.invalidate_cache()
    assert fs.find(bucket) == [f"{bucket}/out/ckpt/checkpoint"] and s3.pending_uploads(bucket) == []


def test_fingerprint_changes_with_the_content_only(s3, tmp_path):
    bucket = s3.new_bucket()
    fs = s3.fs()
    fs.pipe_file(f"{bucket}/run/a", b"1")
    fs.pipe_file(f"{bucket}/run/sub/b", b"2")
    first = storage.fingerprint([f"s3://{bucket}/run"])
    assert [r[0] for r in first] == [f"s3://{bucket}/run/a", f"s3://{bucket}/run/sub/b"]
    assert storage.fingerprint([f"s3://{bucket}/run"]) == first
    fs.pipe_file(f"{bucket}/run/a", b"3")
    assert storage.fingerprint([f"s3://{bucket}/run"]) != first
    (tmp_path / "x").write_bytes(b"1")
    local = storage.fingerprint([tmp_path])
    os.utime(tmp_path / "x", ns=(1, 1))
    assert storage.fingerprint([tmp_path]) != local


def test_credentials_never_reach_a_message(s3, monkeypatch):
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    storage.configure({"s3": {**s3.options, "secret": secret}})
    assert secret not in storage.redact(f"boom {secret} boom")
    assert storage.redact("http://user:pw@host/x?X-Amz-Signature=abc&x=1") == "http://***@host/x?X-Amz-Signature=***&x=1"
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value-123")
    assert "session-token-value-123" not in storage.redact("token session-token-value-123")
    # a connection error quotes the endpoint URL, which here carries a password
    bad = {**s3.options, "client_kwargs": {"endpoint_url": f"http://admin:{secret}@127.0.0.1:9"}}
    storage.configure({"s3": bad})
    with pytest.raises(ReadError) as e:
        storage.as_path("s3://bucket/x").exists()
    assert secret not in str(e.value) and "admin" not in str(e.value)


def test_cli_errors_are_redacted(s3, tmp_path):
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    opts = json.dumps({**s3.options, "client_kwargs": {"endpoint_url": f"http://admin:{secret}@127.0.0.1:9"}})
    res = subprocess.run([sys.executable, "-m", "convert", "batch", "s3://bucket/runs/*", "--to", "safetensors",
                          "-o", str(tmp_path / "{1}.safetensors"), "--storage-options", opts],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("convert: ") and len(res.stderr.strip().splitlines()) == 1
    assert secret not in res.stderr + res.stdout and "admin:" not in res.stderr


def test_remote_paths_without_the_extra_say_what_to_install(tmp_path):
    code = """
from convert import storage
from convert.formats import safetensors as safetensors_format
from convert.errors import MissingDependencyError
try:
    storage.as_path("s3://bucket/x")
except MissingDependencyError as e:
    print(e)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=blocker(tmp_path, ("fsspec", "s3fs"), ENV))
    assert "pip install 'ckpt-convert[remote]'" in res.stdout, res.stderr


def test_local_outputs_go_through_fileio(tmp_path):
    td = TensorDict.from_arrays({"x": np.arange(3, dtype=np.float32)})
    with outputs.atomic_output(tmp_path / "a.safetensors") as tmp:
        assert isinstance(tmp, Path) and ".convert-tmp-" in str(tmp.parent)
        safetensors_format.write(td, tmp)
        assert outputs.readable(tmp) == tmp
    assert np.array_equal(safetensors.numpy.load_file(str(tmp_path / "a.safetensors"))["x"], np.arange(3))


def test_batch_lists_a_remote_pattern_and_says_what_is_not_there_yet(s3, tmp_path):
    torch = pytest.importorskip("torch")
    bucket = s3.new_bucket()
    fs = s3.fs()
    for run in ("run1", "run2"):
        safetensors.numpy.save_file({"w": np.ones(3, np.float32)}, str(tmp_path / "m.safetensors"))
        fs.put(str(tmp_path / "m.safetensors"), f"{bucket}/runs/{run}/model.safetensors")
    args = [sys.executable, "-m", "convert", "batch", f"s3://{bucket}/runs/*/model.safetensors", "--to", "torch",
            "-o", str(tmp_path / "out" / "{1}-{run}.pt"), "--storage-options", s3.options_json]
    res = subprocess.run([*args, "--dry-run"], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr
    jobs = json.loads(res.stdout)
    assert [(j["source"], Path(j["output"]).name) for j in jobs] == [
        (f"s3://{bucket}/runs/run1/model.safetensors", "run1-run1.pt"),
        (f"s3://{bucket}/runs/run2/model.safetensors", "run2-run2.pt")]
    assert FAKE_SECRET not in res.stdout + res.stderr
    # safetensors sources are read remotely now: local torch outputs
    res = subprocess.run([*args, "--json", "--workers", "1"], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["status"] for r in records] == ["done", "done"]
    for run in ("run1", "run2"):
        state = torch.load(tmp_path / "out" / f"{run}-{run}.pt", weights_only=True)
        assert torch.equal(state["w"], torch.ones(3))
    # torch is written to remote paths too
    args[args.index("-o") + 1] = f"s3://{bucket}/out/{{run}}.pt"
    res = subprocess.run([*args, "--json", "--workers", "1"], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr
    assert [json.loads(line)["status"] for line in res.stdout.splitlines()] == ["done", "done"]
    fs.get(f"{bucket}/out/run1.pt", str(tmp_path / "remote-run1.pt"))
    assert torch.equal(torch.load(tmp_path / "remote-run1.pt", weights_only=True)["w"], torch.ones(3))
    # saved-model is written to local paths only: a remote output of it fails naming the format
    args[args.index("--to") + 1] = "saved-model"
    args[args.index("-o") + 1] = f"s3://{bucket}/out/{{run}}-saved"
    res = subprocess.run([*args, "--json", "--workers", "1"], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 1
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert all("writing saved-model to remote paths is not supported yet" in r["error"] for r in records), records
    assert FAKE_SECRET not in res.stdout + res.stderr
