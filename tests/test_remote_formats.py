"""Format adapters on remote paths (issue 17, phase 2), against a real local S3 (moto's server
on 127.0.0.1, the ``s3`` fixture of conftest.py).

safetensors single files and sharded folders, tf-ckpt V2, torch (zip; legacy read), npz, GGUF and
DCP folders read from and written to the bucket, the values checked with each format's own library
(safetensors, TensorFlow, torch.load, numpy.load, gguf.GGUFReader) reading downloaded copies; reads are ranged (a
tensor costs its bytes and a few header blocks, never the whole object); a failure while
writing leaves no object and no incomplete upload; ``--force`` replaces an output without a
mix; formats that take local paths only are refused in one line naming the format.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import convert
from convert import storage
from convert.errors import ReadError, UsageError, WriteError

from servers import FAKE_SECRET

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"embed": rng.standard_normal((600, 1100)).astype(np.float32),  # 2.6 MB: several GETs
            "layer.0.w": rng.standard_normal((64, 48)).astype(np.float16),
            "layer.0.b": rng.standard_normal(48).astype(np.float32),
            "layer.1.w": rng.integers(-1000, 1000, (32, 32)).astype(np.int64),
            "step": np.array(7, dtype=np.int32)}


def _equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert np.array_equal(got[k], want[k]), k


def _load_remote(fs, key: str, tmp_path: Path) -> dict[str, np.ndarray]:
    """The safetensors library's read of a downloaded object (a file, or a folder's shards via its index)."""
    local = tmp_path / f"dl-{key.replace('/', '_')}"
    if fs.isdir(key):
        fs.get(key + "/", str(local) + "/", recursive=True)
        index = json.loads((local / "model.safetensors.index.json").read_text())
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(safetensors.numpy.load_file(str(local / shard)))
        assert set(out) == set(index["weight_map"])
        return out
    fs.get(key, str(local))
    return safetensors.numpy.load_file(str(local))


def test_local_to_s3_to_sharded_s3_to_local(s3, tmp_path):
    arrays = _arrays()
    src = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(arrays, str(src), metadata={"format": "pt"})
    bucket = s3.new_bucket()
    fs = s3.fs()
    single, sharded = f"s3://{bucket}/exports/model.safetensors", f"s3://{bucket}/exports/sharded"

    out = convert.convert(src, single, to="safetensors")["outputs"][0]
    assert out["verified"] and out["output"] == single
    _equal(_load_remote(fs, single[5:], tmp_path), arrays)

    out = convert.convert(single, sharded, to="safetensors", write_opts={"max_shard_size": "1MB"})["outputs"][0]
    assert out["verified"]
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{bucket}/exports/sharded"))
    index = json.loads(fs.cat_file(f"{bucket}/exports/sharded/model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and names == [*shards, "model.safetensors.index.json"]
    _equal(_load_remote(fs, sharded[5:], tmp_path), arrays)

    back = tmp_path / "back.safetensors"
    out = convert.convert(sharded, back, to="safetensors")["outputs"][0]
    assert out["verified"]
    _equal(safetensors.numpy.load_file(str(back)), safetensors.numpy.load_file(str(src)))
    # nothing but the outputs: no journal, no record, no incomplete upload
    assert sorted(fs.find(bucket)) == [f"{bucket}/exports/model.safetensors",
                                       *(f"{bucket}/exports/sharded/{n}" for n in names)]
    assert s3.pending_uploads(bucket) == []
    # the reader reads the index straight too, and a tensor's values on demand
    td = convert.read(f"{sharded}/model.safetensors.index.json")
    assert np.array_equal(td["layer.1.w"].numpy(), arrays["layer.1.w"])
    assert isinstance(td["embed"].source, storage.RemoteRegion)


def test_file_urls_are_local_paths(tmp_path):
    arrays = _arrays(1)
    src = tmp_path / "m.safetensors"
    safetensors.numpy.save_file(arrays, str(src))
    convert.convert(f"file://{src}", f"file://{tmp_path}/out.safetensors", to="safetensors")
    _equal(safetensors.numpy.load_file(str(tmp_path / "out.safetensors")), arrays)


def test_memory_urls_round_trip(tmp_path):
    arrays = _arrays(2)
    src = tmp_path / "m.safetensors"
    safetensors.numpy.save_file(arrays, str(src))
    url = "memory://convert-test/run1/model.safetensors"
    convert.convert(src, url, to="safetensors", force=True)
    import fsspec

    _equal(safetensors.numpy.load(fsspec.filesystem("memory").cat_file("/convert-test/run1/model.safetensors")),
           arrays)
    convert.convert(url, tmp_path / "back.safetensors", to="safetensors")
    _equal(safetensors.numpy.load_file(str(tmp_path / "back.safetensors")), arrays)


@pytest.fixture
def fetched(monkeypatch):
    """Body bytes of every GET the S3 client makes, in order."""
    import s3fs

    got: list[int] = []
    real = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        resp = await real(self, method, *args, **kwargs)
        if method == "get_object":
            got.append(int(resp.get("ContentLength") or 0))
        return resp
    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    return got


def test_reads_are_ranged(s3, tmp_path, fetched, monkeypatch):
    rng = np.random.default_rng(3)
    arrays = {"big": rng.standard_normal((2048, 2048)).astype(np.float32),  # 16 MiB
              "small": np.arange(1000, dtype=np.float64)}
    src = tmp_path / "m.safetensors"
    safetensors.numpy.save_file(arrays, str(src))
    bucket = s3.new_bucket()
    s3.fs().put(str(src), f"{bucket}/m.safetensors")
    url = f"s3://{bucket}/m.safetensors"
    monkeypatch.setattr(storage, "REMOTE_RANGE", 4 << 20)  # the big tensor in 4 ranges
    few_blocks = 3 * storage.HEADER_BLOCK

    fetched.clear()
    out = tmp_path / "small.safetensors"
    convert.convert(url, out, to="safetensors", include=["^small$"])
    assert sum(fetched) <= arrays["small"].nbytes + few_blocks, fetched
    _equal(safetensors.numpy.load_file(str(out)), {"small": arrays["small"]})

    fetched.clear()
    td = convert.read(url)
    assert np.array_equal(td["big"].numpy(), arrays["big"])
    big = arrays["big"].nbytes
    assert sum(fetched) <= big + few_blocks, fetched
    assert max(fetched) <= max(4 << 20, storage.HEADER_BLOCK + 8)  # ranged, never the whole object


def test_neighbouring_tensors_are_fetched_together(s3, tmp_path, fetched):
    """500 small tensors and a few of 2 MB: a handful of GETs, not one per tensor."""
    rng = np.random.default_rng(9)
    arrays = {f"layer{i:03d}/b": rng.standard_normal(1000).astype(np.float32) for i in range(500)}
    arrays.update({f"big{i}": rng.standard_normal(500_000).astype(np.float32) for i in range(3)})
    src = tmp_path / "many.safetensors"
    safetensors.numpy.save_file(arrays, str(src))
    bucket = s3.new_bucket()
    s3.fs().put(str(src), f"{bucket}/many.safetensors")
    fetched.clear()
    out = tmp_path / "out.safetensors"
    convert.convert(f"s3://{bucket}/many.safetensors", out, to="safetensors")
    assert len(fetched) <= 4, fetched  # detect's and the header's read-ahead blocks, the data in 1-2 runs
    assert sum(fetched) <= src.stat().st_size + 2 * storage.HEADER_BLOCK
    _equal(safetensors.numpy.load_file(str(out)), arrays)


def _failing_source(tmp_path: Path) -> Path:
    """A safetensors file whose last tensor float16 cannot hold: --dtype float16 fails while writing it."""
    arrays = {"a": np.random.default_rng(4).standard_normal((1600, 1000)).astype(np.float32),  # 6.4 MB: a part
              "b": np.ones(10, np.float32), "z": np.full(4, 1e30, np.float32)}
    src = tmp_path / "bad.safetensors"
    safetensors.numpy.save_file(arrays, str(src))
    return src


@pytest.mark.parametrize("sharded", [False, True])
def test_a_failure_while_writing_leaves_no_object(s3, tmp_path, sharded):
    src = _failing_source(tmp_path)
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/out/" + ("sharded" if sharded else "model.safetensors")
    opts = {"max_shard_size": "1MB"} if sharded else {}
    with pytest.raises(WriteError, match="value 1e\\+30 cannot be held by float16"):
        convert.convert(src, url, to="safetensors", dtype="float16", write_opts=opts)
    fs = s3.fs()
    assert fs.find(bucket) == [] and s3.pending_uploads(bucket) == []


def _cli(*args: str, options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convert", *args, "--storage-options", options],
                          capture_output=True, text=True, env=ENV, timeout=180)


def test_force_replaces_a_remote_output_without_a_mix(s3, tmp_path):
    bucket = s3.new_bucket()
    fs = s3.fs()
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    safetensors.numpy.save_file(_arrays(5), str(first))
    small = {"only": np.arange(12, dtype=np.float32).reshape(3, 4)}
    safetensors.numpy.save_file(small, str(second))
    url = f"s3://{bucket}/out/sharded"
    res = _cli("safetensors", str(first), "--to", "safetensors", "-o", url, "--max-shard-size", "1MB",
               options=s3.options_json)
    assert res.returncode == 0, res.stderr
    assert len(fs.find(f"{bucket}/out/sharded")) == 4  # three shards and the index
    res = _cli("safetensors", str(second), "--to", "safetensors", "-o", url, "--max-shard-size", "1MB",
               options=s3.options_json)
    assert res.returncode == 1 and "already exists (use --force to overwrite)" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and FAKE_SECRET not in res.stderr
    res = _cli("safetensors", str(second), "--to", "safetensors", "-o", url, "--max-shard-size", "1MB", "--force",
               options=s3.options_json)
    assert res.returncode == 0, res.stderr
    fs.invalidate_cache()
    assert sorted(fs.find(bucket)) == [f"{bucket}/out/sharded/model-00001-of-00001.safetensors",
                                       f"{bucket}/out/sharded/model.safetensors.index.json"]
    _equal(_load_remote(fs, f"{bucket}/out/sharded", tmp_path), small)
    assert s3.pending_uploads(bucket) == []


def test_a_remote_folder_of_shards_without_its_index_is_refused(s3, tmp_path):
    bucket = s3.new_bucket()
    fs = s3.fs()
    for i in (1, 2):
        safetensors.numpy.save_file({f"w{i}": np.ones(3, np.float32)}, str(tmp_path / "s.safetensors"))
        fs.put(str(tmp_path / "s.safetensors"), f"{bucket}/run/model-0000{i}-of-00002.safetensors")
    with pytest.raises(ReadError, match="no \\*.safetensors.index.json \\(an unfinished output\\?\\)"):
        convert.read(f"s3://{bucket}/run")


def test_local_only_formats_are_refused_naming_the_format(s3, tmp_path):
    bucket = s3.new_bucket()
    src = tmp_path / "m.safetensors"
    safetensors.numpy.save_file({"w": np.ones(3, np.float32)}, str(src))
    s3.fs().put(str(src), f"{bucket}/m.safetensors")
    s3.fs().pipe_file(f"{bucket}/m.tflite", b"\x1c\x00\x00\x00TFL3 not really")
    with pytest.raises(UsageError, match="writing saved-model to remote paths is not supported yet"):
        convert.convert(src, f"s3://{bucket}/m-saved", to="saved-model")
    with pytest.raises(UsageError, match="reading tflite from remote paths is not supported yet"):
        convert.read(f"s3://{bucket}/m.tflite")
    res = _cli("auto", f"s3://{bucket}/m.tflite", "--to", "safetensors", options=s3.options_json)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "tflite from remote paths" in res.stderr
    assert all(f in res.stderr for f in ("safetensors", "tf-ckpt", "torch", "npz", "gguf", "dcp", "onnx", "keras")), \
        res.stderr
    # argparse's own error quotes the command line: the storage options' secret is redacted there too
    res = _cli("auto", f"s3://{bucket}/m.tflite", "--to", "safetensors", "--no-such-flag", options=s3.options_json)
    assert res.returncode == 2 and "--no-such-flag" in res.stderr, res.stderr
    assert FAKE_SECRET not in res.stderr
    assert s3.fs().find(bucket) == [f"{bucket}/m.safetensors", f"{bucket}/m.tflite"]


def test_a_default_output_of_a_remote_input_is_beside_it(s3, tmp_path):
    bucket = s3.new_bucket()
    src = tmp_path / "m.safetensors"
    arrays = _arrays(6)
    safetensors.numpy.save_file(arrays, str(src))
    convert.convert(src, f"s3://{bucket}/runs/7/sharded", to="safetensors", write_opts={"max_shard_size": "2MB"})
    out = convert.convert(f"s3://{bucket}/runs/7/sharded", to="safetensors")["outputs"][0]
    assert out["output"] == f"s3://{bucket}/runs/7/sharded.safetensors"
    _equal(_load_remote(s3.fs(), f"{bucket}/runs/7/sharded.safetensors", tmp_path), arrays)


# ------------------------------------------------------------------ tf-ckpt (V2)

def _tf_values(tf, folder: Path) -> dict[str, np.ndarray]:
    """TensorFlow's own read of a checkpoint folder (its latest checkpoint, through the state file)."""
    reader = tf.train.load_checkpoint(str(folder))
    return {name: np.asarray(reader.get_tensor(name)) for name in reader.get_variable_to_shape_map()}


def test_safetensors_in_s3_to_tf_checkpoint_in_s3_restores_in_tensorflow(s3, tmp_path, commit_order):
    tf = pytest.importorskip("tensorflow")
    arrays = _arrays(7)
    src = tmp_path / "m.safetensors"
    safetensors.numpy.save_file(arrays, str(src))
    bucket = s3.new_bucket()
    fs = s3.fs()
    fs.put(str(src), f"{bucket}/hf/m.safetensors")
    out = convert.convert(f"s3://{bucket}/hf/m.safetensors", f"s3://{bucket}/tf/run1", to="tf-ckpt")["outputs"][0]
    assert out["verified"] and out["format"] == "tf-ckpt"
    assert commit_order == ["model.ckpt.data-00000-of-00001", "model.ckpt.index", "checkpoint"]  # the state file last
    fs.invalidate_cache()
    assert sorted(fs.find(f"{bucket}/tf")) == [f"{bucket}/tf/run1/{n}" for n in
                                                ("checkpoint", "model.ckpt.data-00000-of-00001", "model.ckpt.index")]
    local = tmp_path / "run1"
    fs.get(f"{bucket}/tf/run1/", str(local) + "/", recursive=True)
    _equal(_tf_values(tf, local), arrays)
    # and back: the remote checkpoint read through its state file, to a local safetensors file
    back = tmp_path / "back.safetensors"
    convert.convert(f"s3://{bucket}/tf/run1", back, to="safetensors")
    _equal(safetensors.numpy.load_file(str(back)), arrays)
    assert s3.pending_uploads(bucket) == []


def test_a_tensorflow_saver_folder_in_s3(s3, tmp_path):
    """examples/model1 (tf.compat.v1.train.Saver: a state file, .index, .data, .meta) read from the bucket."""
    tf = pytest.importorskip("tensorflow")
    bucket = s3.new_bucket()
    fs = s3.fs()
    fs.put(str(REPO / "examples" / "model1") + "/", f"{bucket}/runs/model1/", recursive=True)
    want = _tf_values(tf, REPO / "examples" / "model1")
    td = convert.read(f"s3://{bucket}/runs/model1")
    assert td.metadata["tf.global_step"] == "190" and set(td) == set(want)
    out = f"s3://{bucket}/exports/model1.safetensors"
    convert.convert(f"s3://{bucket}/runs/model1", out, to="safetensors")
    _equal(_load_remote(fs, out[5:], tmp_path), want)
    # --step picks a retained checkpoint through the state file, remotely too
    assert convert.read(f"s3://{bucket}/runs/model1", step=190)["conv1/w"].shape == want["conv1/w"].shape
    with pytest.raises(UsageError, match="no retained checkpoint of step 5; available steps: 190"):
        convert.read(f"s3://{bucket}/runs/model1", step=5)
    # a remote tf-ckpt folder to another, with --force over it
    for force in (False, True):
        convert.convert(f"s3://{bucket}/runs/model1", f"s3://{bucket}/exports/tf", to="tf-ckpt", force=force)
    fs.invalidate_cache()
    local = tmp_path / "tf"
    fs.get(f"{bucket}/exports/tf/", str(local) + "/", recursive=True)
    _equal(_tf_values(tf, local), want)


def test_a_remote_checkpoint_folder_without_its_state_file_is_refused(s3):
    bucket = s3.new_bucket()
    fs = s3.fs()
    for name in ("my-model-190.index", "my-model-190.data-00000-of-00001"):
        fs.put(str(REPO / "examples" / "model1" / name), f"{bucket}/run/{name}")
    with pytest.raises(ReadError, match="no 'checkpoint' state file: a remote checkpoint folder is read through it"):
        convert.read(f"s3://{bucket}/run")
    with pytest.raises(ReadError, match="no 'checkpoint' state file"):
        convert.read(f"s3://{bucket}/run/my-model-190.index", format="tf-ckpt")


def test_a_failure_while_writing_a_tf_checkpoint_leaves_no_object(s3, tmp_path):
    src = _failing_source(tmp_path)
    bucket = s3.new_bucket()
    with pytest.raises(WriteError, match="cannot be held by float16"):
        convert.convert(src, f"s3://{bucket}/out/ckpt", to="tf-ckpt", dtype="float16")
    with pytest.raises(WriteError, match="V1 checkpoints are written to local paths only"):
        convert.convert(src, f"s3://{bucket}/out/v1", to="tf-ckpt-v1")
    assert s3.fs().find(bucket) == [] and s3.pending_uploads(bucket) == []


# ------------------------------------------------------------------ --split shards

def test_four_safetensors_shards_in_s3_to_tf_checkpoint_in_s3_by_split_workers(s3, tmp_path):
    """Issue 17's proof: a 4-shard model in the bucket, converted by two --worker processes of
    --split shards into a V2 checkpoint in the bucket, which TensorFlow restores."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(8)
    shards = [{f"layers.{k}.w": rng.standard_normal((300, 200 + k)).astype(np.float32),
               f"layers.{k}.b": rng.standard_normal(200 + k).astype(np.float16),
               f"layers.{k}.n": np.arange(k + 3, dtype=np.int64)} for k in range(4)]
    hf = tmp_path / "hf"
    hf.mkdir()
    weight_map = {}
    for k, arrays in enumerate(shards):
        name = f"model-{k + 1:05d}-of-00004.safetensors"
        safetensors.numpy.save_file(arrays, str(hf / name))
        weight_map.update(dict.fromkeys(arrays, name))
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    bucket = s3.new_bucket()
    fs = s3.fs()
    fs.put(str(hf) + "/", f"{bucket}/hf/", recursive=True)
    want = {k: v for arrays in shards for k, v in arrays.items()}
    results = []
    for worker in ("1/2", "0/2"):  # worker 1 first: worker 0 then finds every receipt and commits
        res = _cli("safetensors", f"s3://{bucket}/hf", "--to", "tf-ckpt", "-o", f"s3://{bucket}/tf",
                   "--split", "shards", "--worker", worker, "--json", options=s3.options_json)
        assert res.returncode == 0, res.stderr
        results.append(json.loads(res.stdout))
    assert [r["committed"] for r in results] == [False, True] and results[1]["output_shards"] == 4
    assert sorted(results[0]["shards"] + results[1]["shards"]) == [
        f"model.ckpt.data-0000{k}-of-00004" for k in range(4)]
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{bucket}/tf")) == [
        "checkpoint", *(f"model.ckpt.data-0000{k}-of-00004" for k in range(4)), "model.ckpt.index"]  # no receipts left
    assert s3.pending_uploads(bucket) == []
    local = tmp_path / "tf"
    fs.get(f"{bucket}/tf/", str(local) + "/", recursive=True)
    _equal(_tf_values(tf, local), want)


def test_batch_converts_checkpoints_in_a_bucket_into_the_bucket_and_a_rerun_skips_them(s3, tmp_path):
    tf = pytest.importorskip("tensorflow")
    bucket = s3.new_bucket()
    fs = s3.fs()
    for run in ("run1", "run2"):
        fs.put(str(REPO / "examples" / "model1") + "/", f"{bucket}/runs/{run}/", recursive=True)
    want = _tf_values(tf, REPO / "examples" / "model1")
    args = ["batch", f"s3://{bucket}/runs/*/checkpoint", "--to", "safetensors",
            "-o", f"s3://{bucket}/exports/{{run}}.safetensors", "--json", "--workers", "2"]
    res = _cli(*args, options=s3.options_json)
    assert res.returncode == 0, res.stderr
    assert [json.loads(line)["status"] for line in res.stdout.splitlines()] == ["done", "done"]
    for run in ("run1", "run2"):
        _equal(_load_remote(fs, f"{bucket}/exports/{run}.safetensors", tmp_path), want)
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{bucket}/exports")) == [
        ".run1.safetensors.convert-batch.json", ".run2.safetensors.convert-batch.json",
        "run1.safetensors", "run2.safetensors"]  # each with its record, no journal
    res = _cli(*args, options=s3.options_json)
    assert res.returncode == 0, res.stderr
    assert [json.loads(line)["status"] for line in res.stdout.splitlines()] == ["skipped", "skipped"]
    assert FAKE_SECRET not in res.stdout + res.stderr


# ------------------------------------------------------------------ torch, npz, gguf, dcp

def _download(fs, key: str, tmp_path: Path) -> Path:
    local = tmp_path / f"dl-{key.replace('/', '_')}"
    fs.invalidate_cache()
    if fs.isdir(key):
        fs.get(key + "/", str(local) + "/", recursive=True)
    else:
        fs.get(key, str(local))
    return local


def _torch_arrays(torch, sd) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in sd.items()}


def test_torch_checkpoints_in_s3_read_and_written_by_ranged_gets(s3, tmp_path, fetched, commit_order):
    """A torch.save zip in the bucket -> a .pt in the bucket (streamed: data descriptors) that
    torch.load reads back; the read is ranged (the tensors' bytes and a few blocks, however many
    storage records the archive has); a legacy (pre-1.6) file reads too."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    sd = {f"layers.{i}.w": torch.from_numpy(rng.standard_normal((64, 32)).astype(np.float32)) for i in range(40)}
    sd["embed"] = torch.from_numpy(rng.standard_normal((2500, 1000)).astype(np.float32))  # 10 MB
    sd["half"] = torch.from_numpy(rng.standard_normal(300).astype(np.float16))
    sd["ids"] = torch.arange(50, dtype=torch.int64)
    sd["tied"] = sd["ids"]  # a tensor sharing another's storage
    src = tmp_path / "model.pt"
    torch.save(sd, src)
    bucket = s3.new_bucket()
    fs = s3.fs()
    fs.put(str(src), f"{bucket}/runs/model.pt")
    url, out = f"s3://{bucket}/runs/model.pt", f"s3://{bucket}/exports/model.pt"

    fetched.clear()
    td = convert.read(url, format="torch")
    assert isinstance(td["embed"].source, storage.RemoteRegion)
    # the central directory, data.pkl and 30 bytes of each of the 44 records' local headers:
    # a few read-ahead blocks, not one per record, and not the 10 MB of data
    assert sum(fetched) <= 3 * storage.HEADER_BLOCK, fetched
    fetched.clear()
    assert np.array_equal(td["layers.3.w"].numpy(), sd["layers.3.w"].numpy())
    assert sum(fetched) == sd["layers.3.w"].numel() * 4, fetched  # that tensor's bytes, no more

    res = convert.convert(url, out, to="torch")["outputs"][0]
    assert res["verified"] and res["output"] == out and commit_order == ["model.pt"]
    got = torch.load(_download(fs, out[5:], tmp_path), weights_only=True)
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    # safetensors in the bucket to torch in the bucket
    arrays = _arrays(12)
    st = tmp_path / "m.safetensors"
    safetensors.numpy.save_file(arrays, str(st))
    fs.put(str(st), f"{bucket}/hf/m.safetensors")
    convert.convert(f"s3://{bucket}/hf/m.safetensors", f"s3://{bucket}/exports/from-st.pt", to="torch")
    got = torch.load(_download(fs, f"{bucket}/exports/from-st.pt", tmp_path), weights_only=True)
    _equal({k: v.numpy() for k, v in got.items()}, arrays)

    legacy = tmp_path / "legacy.pt"
    torch.save({"a": sd["embed"][:5], "b": sd["half"], "c": sd["embed"].t()[:3]}, legacy,
               _use_new_zipfile_serialization=False)
    fs.put(str(legacy), f"{bucket}/old/legacy.pt")
    want = torch.load(legacy, weights_only=True)
    back = tmp_path / "legacy.safetensors"
    convert.convert(f"s3://{bucket}/old/legacy.pt", back, to="safetensors")
    _equal(safetensors.numpy.load_file(str(back)), {k: v.contiguous().numpy() for k, v in want.items()})
    assert s3.pending_uploads(bucket) == []


def test_a_failure_while_writing_torch_or_npz_or_gguf_leaves_no_object(s3, tmp_path):
    pytest.importorskip("gguf")
    src = _failing_source(tmp_path)
    bucket = s3.new_bucket()
    for fmt, name in (("torch", "m.pt"), ("npz", "m.npz"), ("gguf", "m.gguf")):
        with pytest.raises(WriteError, match="value 1e\\+30 cannot be held by float16"):
            convert.convert(src, f"s3://{bucket}/out/{name}", to=fmt, dtype="float16")
    assert s3.fs().find(bucket) == [] and s3.pending_uploads(bucket) == []


def test_npz_archives_in_s3_read_and_written(s3, tmp_path, fetched):
    """np.savez and np.savez_compressed archives in the bucket -> an npz in the bucket that
    numpy.load reads; a stored member's array is a ranged read."""
    rng = np.random.default_rng(13)
    arrays = {f"w{i}": rng.standard_normal((50, 20)).astype(np.float32) for i in range(30)}
    arrays.update(big=rng.standard_normal((800, 1000)).astype(np.float32), ids=np.arange(9, dtype=np.int16),
                  fortran=np.asfortranarray(rng.standard_normal((6, 4))), flags=np.array([True, False]))
    plain, packed = tmp_path / "plain.npz", tmp_path / "packed.npz"
    np.savez(plain, **arrays)
    np.savez_compressed(packed, **arrays)
    bucket = s3.new_bucket()
    fs = s3.fs()
    fs.put(str(plain), f"{bucket}/in/plain.npz")
    fs.put(str(packed), f"{bucket}/in/packed.npz")

    fetched.clear()
    td = convert.read(f"s3://{bucket}/in/plain.npz", format="npz")
    assert sum(fetched) <= 3 * storage.HEADER_BLOCK, fetched  # not a read-ahead block per member
    assert isinstance(td["big"].source, storage.RemoteRegion)
    fetched.clear()
    assert np.array_equal(td["w7"].numpy(), arrays["w7"]) and sum(fetched) == arrays["w7"].nbytes

    for name in ("plain", "packed"):
        out = f"s3://{bucket}/out/{name}.npz"
        assert convert.convert(f"s3://{bucket}/in/{name}.npz", out, to="npz")["outputs"][0]["verified"]
        with np.load(_download(fs, out[5:], tmp_path)) as got:
            _equal(dict(got), arrays)
    assert s3.pending_uploads(bucket) == []


def test_gguf_files_in_s3_read_and_written(s3, tmp_path, fetched):
    """A GGUF file written by the gguf library (F32, F16, Q8_0 blocks, typed key/values) in the
    bucket -> GGUF in the bucket that gguf.GGUFReader reads with the same tensors and values."""
    gguf = pytest.importorskip("gguf")
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import quantize

    rng = np.random.default_rng(14)
    f32 = rng.standard_normal((512, 1024)).astype(np.float32)  # 2 MB
    f16 = rng.standard_normal((8, 64)).astype(np.float16)
    q8 = quantize(rng.standard_normal((16, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    src = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(src), arch="llama")
    w.add_uint32("llama.block_count", 2)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(20000)])  # a header of a few blocks
    w.add_tensor("token_embd.weight", f32)
    w.add_tensor("blk.0.attn_norm.weight", f16)
    w.add_tensor("blk.0.ffn_up.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    bucket = s3.new_bucket()
    fs = s3.fs()
    fs.put(str(src), f"{bucket}/in/m.gguf")

    fetched.clear()
    td = convert.read(f"s3://{bucket}/in/m.gguf", format="gguf")
    assert sum(fetched) <= src.stat().st_size - f32.nbytes + 2 * storage.HEADER_BLOCK, fetched
    assert isinstance(td["token_embd.weight"].source, storage.RemoteRegion)
    out = f"s3://{bucket}/out/m.gguf"
    assert convert.convert(f"s3://{bucket}/in/m.gguf", out, to="gguf")["outputs"][0]["verified"]
    local = _download(fs, out[5:], tmp_path)
    want = {t.name: (int(t.tensor_type), np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(src)).tensors}
    got = {t.name: (int(t.tensor_type), np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(local)).tensors}
    assert got == want
    fields = gguf.GGUFReader(str(local)).fields
    assert fields["llama.block_count"].contents() == 2
    assert fields["tokenizer.ggml.tokens"].contents()[19999] == "tok19999"
    assert local.read_bytes() == src.read_bytes()  # GGUF -> GGUF is byte for byte, remotely too
    assert s3.pending_uploads(bucket) == []


def test_a_dcp_checkpoint_in_s3_converts_to_safetensors_in_s3(s3, tmp_path):
    """torch.distributed.checkpoint.save's folder (.metadata + __0_0.distcp) in the bucket, read
    remotely (the tensors' bytes by ranged GETs) into safetensors in the bucket."""
    torch = pytest.importorskip("torch")
    tdcp = pytest.importorskip("torch.distributed.checkpoint")
    rng = np.random.default_rng(15)
    sd = {"model": {"embed": torch.from_numpy(rng.standard_normal((600, 900)).astype(np.float32)),
                    "fc.bias": torch.from_numpy(rng.standard_normal(10).astype(np.float16))},
          "step": 42}
    folder = tmp_path / "step-42"
    tdcp.save(sd, checkpoint_id=str(folder))
    bucket = s3.new_bucket()
    fs = s3.fs()
    fs.put(str(folder) + "/", f"{bucket}/runs/step-42/", recursive=True)
    td = convert.read(f"s3://{bucket}/runs/step-42")
    assert td.metadata["dcp.extra.step"] == "42"
    out = f"s3://{bucket}/exports/step-42.safetensors"
    assert convert.convert(f"s3://{bucket}/runs/step-42", out, to="safetensors")["outputs"][0]["verified"]
    got = safetensors.numpy.load_file(str(_download(fs, out[5:], tmp_path)))
    _equal(got, {f"model.{k}": v.numpy() for k, v in sd["model"].items()})
    # a folder whose .metadata (written last, by the coordinator) is missing is an unfinished checkpoint
    fs.rm(f"{bucket}/runs/step-42/.metadata")
    fs.invalidate_cache()
    with pytest.raises(ReadError):
        convert.read(f"s3://{bucket}/runs/step-42", format="dcp")


def _onnx_model(onnx, arrays: dict[str, np.ndarray]):
    """A small runnable model: y = x @ w + b, every array an initializer."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                              [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_onnx_models_in_s3_inline_and_with_external_data(s3, tmp_path):
    """ONNX models in the bucket, weights inline and in a data file beside the model, read remotely;
    written to the bucket inline, which onnxruntime runs (a weights-only model returns its weights)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    rng = np.random.default_rng(16)
    arrays = {"w": rng.standard_normal((64, 32)).astype(np.float32), "b": rng.standard_normal(32).astype(np.float32),
              "unused.big": rng.standard_normal((500, 1000)).astype(np.float32)}
    model = _onnx_model(onnx, arrays)
    inline, external = tmp_path / "inline", tmp_path / "external"
    inline.mkdir()
    external.mkdir()
    onnx.save(model, str(inline / "m.onnx"))
    onnx.save_model(model, str(external / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    bucket = s3.new_bucket()
    fs = s3.fs()
    for folder in (inline, external):
        fs.put(str(folder) + "/", f"{bucket}/{folder.name}/", recursive=True)
    for name in ("inline", "external"):
        td = convert.read(f"s3://{bucket}/{name}/m.onnx")
        assert isinstance(td["unused.big"].source, storage.RemoteRegion)
        assert td["w"].attrs["origin"] == ("external:m.onnx.data" if name == "external" else "initializer")
        out = f"s3://{bucket}/out/{name}.onnx"
        assert convert.convert(f"s3://{bucket}/{name}/m.onnx", out, to="onnx")["outputs"][0]["verified"]
        local = _download(fs, out[5:], tmp_path)
        got = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(local)).graph.initializer}
        _equal(got, arrays)
        session = ort.InferenceSession(str(local), providers=["CPUExecutionProvider"])
        ran = dict(zip([o.name for o in session.get_outputs()], session.run(None, {}), strict=True))
        _equal(ran, arrays)
    # external data beside a remote output is refused before anything is written
    with pytest.raises(WriteError, match="external data .* local paths only"):
        convert.convert(f"s3://{bucket}/inline/m.onnx", f"s3://{bucket}/out2/m.onnx", to="onnx",
                        write_opts={"external_data_threshold": 0})
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/out2") and s3.pending_uploads(bucket) == []


@pytest.mark.slow
def test_keras_files_in_s3_read_as_keras_sees_them(s3, tmp_path):
    """A .keras zip, its unzipped folder and the weights file in it in the bucket, read
    remotely (h5py over ranged reads) to safetensors in the bucket: the values are Keras's own;
    writing Keras to a URL is refused in one line."""
    keras = pytest.importorskip("keras")
    pytest.importorskip("h5py")
    import zipfile

    keras.backend.clear_session()
    keras.utils.set_random_seed(3)
    x = keras.Input((6,))
    model = keras.Model(x, keras.layers.Dense(3)(keras.layers.LayerNormalization()(keras.layers.Dense(40)(x))))
    d = tmp_path / "k"
    d.mkdir()
    model.save(d / "m.keras")
    with zipfile.ZipFile(d / "m.keras") as zf:
        zf.extractall(d / "unzipped")
    want = {w.path: np.asarray(w.numpy()) for w in model.weights}
    bucket = s3.new_bucket()
    fs = s3.fs()
    fs.put(str(d) + "/", f"{bucket}/k/", recursive=True)
    for layout in ("m.keras", "unzipped", "unzipped/model.weights.h5"):
        td = convert.read(f"s3://{bucket}/k/{layout}")
        assert {n for n, t in td.items() if t.attrs["role"] == "weight"} == set(want), layout
        out = f"s3://{bucket}/out/{layout.replace('/', '-')}.safetensors"
        assert convert.convert(f"s3://{bucket}/k/{layout}", out, to="safetensors", weights_only=True)["outputs"][0][
            "verified"]
        _equal(safetensors.numpy.load_file(str(_download(fs, out[5:], tmp_path))), want)
    assert isinstance(convert.read(f"s3://{bucket}/k/m.keras")["dense/kernel"].source, storage.RemoteRegion)
    with pytest.raises(WriteError, match="Keras files are written to local paths only"):
        convert.convert(f"s3://{bucket}/out/m.keras.safetensors", f"s3://{bucket}/out2/w.weights.h5", to="keras")
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/out2") and s3.pending_uploads(bucket) == []
