"""--split shards: a sharded checkpoint converted by parallel workers (issue 17).

The source is a 4-shard Hugging Face safetensors model written by the safetensors library;
four ``--worker I/4`` processes run at once (as xargs or a Slurm array would); TensorFlow
restores the result, and the safetensors library reads the way back. Every shard is verified
by its worker, and the index resolves every tensor to where it was written.
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

from convert import split
from convert.errors import CorruptFileError, UsageError, WriteError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "TF_CPP_MIN_LOG_LEVEL": "2"}


def _arrays() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{f"layers.{k}.attn.weight": rng.standard_normal((96, 80)).astype(np.float32),
             f"layers.{k}.attn.bias": rng.standard_normal(80).astype(np.float16),
             f"layers.{k}.count": np.arange(k + 5, dtype=np.int64)} for k in range(4)]


@pytest.fixture
def sharded(tmp_path) -> Path:
    """A 4-shard model as transformers lays it out: the shards by the safetensors library, the index."""
    src = tmp_path / "model"
    src.mkdir()
    weight_map = {}
    for k, arrays in enumerate(_arrays()):
        name = f"model-{k + 1:05d}-of-00004.safetensors"
        safetensors.numpy.save_file(arrays, str(src / name))
        weight_map.update(dict.fromkeys(arrays, name))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src


def _expected() -> dict[str, np.ndarray]:
    return {k: v for shard in _arrays() for k, v in shard.items()}


def _workers(*args: str, n: int) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-m", "convert", *args, "--split", "shards", "--worker", f"{i}/{n}",
                               "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for i in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout))
    return out


def test_four_workers_to_tf_ckpt_restored_by_tensorflow(sharded, tmp_path):
    tf = pytest.importorskip("tensorflow")
    out = tmp_path / "ckpt"
    results = _workers("safetensors", str(sharded), "--to", "tf-ckpt", "-o", str(out), n=4)
    assert sorted(r["worker"] for r in results) == ["0/4", "1/4", "2/4", "3/4"]
    assert sum(r["committed"] for r in results) >= 1  # whoever found every receipt committed
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "model.ckpt.data-00000-of-00004",
                                                     "model.ckpt.data-00001-of-00004", "model.ckpt.data-00002-of-00004",
                                                     "model.ckpt.data-00003-of-00004", "model.ckpt.index"]
    reader = tf.train.load_checkpoint(str(out))
    want = _expected()
    assert set(reader.get_variable_to_shape_map()) == set(want)
    for name, arr in want.items():
        got = reader.get_tensor(name)
        assert got.dtype == arr.dtype and np.array_equal(got, arr), name

    # and back, from a 4-shard V2 bundle, alone this time
    back = tmp_path / "back"
    res = subprocess.run([sys.executable, "-m", "convert", "tf-ckpt", str(out), "--to", "safetensors", "-o", str(back),
                          "--split", "shards", "--json"], capture_output=True, text=True, env=ENV)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["output_shards"] == 4
    index = json.loads((back / "model.safetensors.index.json").read_text())
    got = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = safetensors.numpy.load_file(str(back / shard))
        assert all(index["weight_map"][k] == shard for k in part)
        got.update(part)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_half_the_workers_leave_no_index_and_a_rerun_resumes(sharded, tmp_path):
    out = tmp_path / "st"
    req = split.Request(str(sharded), str(out), "safetensors")
    first = split.run(req, (0, 2))
    assert not first["committed"] and not (out / "model.safetensors.index.json").exists()
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("model-*.safetensors")}
    assert sorted(written) == ["model-00001-of-00004.safetensors", "model-00003-of-00004.safetensors"]
    again = split.run(req, (0, 2))  # resumed: its shards have receipts of this plan
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("model-*.safetensors")} == written
    assert not again["committed"]
    last = split.run(req, (1, 2))
    assert last["committed"] and last["verified"] and last["tensors"] == 12
    assert not list(out.glob(".*receipt*"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    want = _expected()
    got = {k: v for s in set(index["weight_map"].values()) for k, v in safetensors.numpy.load_file(str(out / s)).items()}
    assert all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(WriteError, match="already exists"):
        split.run(req)
    assert split.run(split.Request(str(sharded), str(out), "safetensors", force=True))["committed"]


def test_a_damaged_source_shard_fails_its_worker_and_nothing_is_committed(sharded, tmp_path):
    ckpt = tmp_path / "ckpt"
    split.run(split.Request(str(sharded), str(ckpt), "tf-ckpt"))
    data = ckpt / "model.ckpt.data-00002-of-00004"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x40
    data.write_bytes(bytes(raw))
    out = tmp_path / "out"
    with pytest.raises(CorruptFileError, match="checksum mismatch"):
        split.run(split.Request(str(ckpt), str(out), "safetensors"))
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("*.convert-tmp-*"))


def test_split_needs_a_sharded_writer(sharded, tmp_path):
    with pytest.raises(UsageError, match="has no sharded output"):
        split.run(split.Request(str(sharded), str(tmp_path / "x.pt"), "torch"))
    with pytest.raises(UsageError, match="I/N"):
        split.parse_worker("3")
    res = subprocess.run([sys.executable, "-m", "convert", "safetensors", str(sharded), "--to", "tf-ckpt",
                          "--worker", "0/2"], capture_output=True, text=True, env=ENV)
    assert res.returncode == 2 and "--split shards" in res.stderr


@pytest.mark.slow
def test_on_ray(sharded, tmp_path):
    ray = pytest.importorskip("ray")
    tf = pytest.importorskip("tensorflow")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = split.run(split.Request(str(sharded), str(tmp_path / "ckpt"), "tf-ckpt"),
                           ray_address=ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()
    assert result["committed"] and result["output_shards"] == 4
    reader = tf.train.load_checkpoint(str(tmp_path / "ckpt"))
    assert all(np.array_equal(reader.get_tensor(k), v) for k, v in _expected().items())
