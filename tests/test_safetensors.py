"""safetensors: the contract, plus sharding and metadata, checked with the safetensors library."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import convert
from convert.errors import CorruptFileError, UsageError

from contract import FormatContract, same_values, samples
from oracles import safetensors_read


class TestSafetensorsContract(FormatContract):
    FORMAT = "safetensors"

    def oracle_read(self, path):
        if path.is_dir():
            index = json.loads((path / "model.safetensors.index.json").read_text())
            out = {}
            for shard in sorted(set(index["weight_map"].values())):
                out.update(safetensors_read(path / shard))
            return out
        return safetensors_read(path)


def test_metadata_travels_in_dunder_metadata(tmp_path):
    from safetensors import safe_open

    td = convert.TensorDict.from_arrays({"w": np.ones(2, np.float32)}, {"tf.global_step": "190"})
    convert.write(td, tmp_path / "m.safetensors", "safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="np") as f:
        assert f.metadata() == {"tf.global_step": "190"}
    assert convert.read(tmp_path / "m.safetensors").metadata["tf.global_step"] == "190"


def test_reads_files_written_by_the_library(tmp_path):
    from safetensors.numpy import save_file

    arrays = {"b": np.arange(5, dtype=np.int16), "a": np.linspace(0, 1, 12, dtype=np.float64).reshape(3, 4),
              "c": np.array(True)}
    save_file(arrays, str(tmp_path / "lib.safetensors"), metadata={"format": "np"})
    td = convert.read(tmp_path / "lib.safetensors")
    assert set(td) == set(arrays)
    for k, v in arrays.items():
        assert same_values(td[k].numpy(), v)
    assert td.metadata["format"] == "np"


def test_sharded_write_matches_transformers_layout(tmp_path):
    td = samples()["shapes"]
    out = tmp_path / "sharded"
    convert.write(td, out, "safetensors", max_shard_size="200B")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert index["metadata"]["total_size"] == td.nbytes
    assert set(index["weight_map"]) == set(td)
    for shard in shards:  # every shard within the limit unless it holds a single larger tensor
        got = safetensors_read(out / shard)
        assert sum(v.nbytes for v in got.values()) <= 200 or len(got) == 1
        for name, arr in got.items():
            assert index["weight_map"][name] == shard
            assert same_values(arr, td[name].numpy())
    for path in (out, out / "model.safetensors.index.json"):
        back = convert.read(path)
        assert set(back) == set(td)


def test_sharded_folder_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=20)
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = tmp_path / "bert"
    convert.write(convert.TensorDict.from_arrays(state), out, "safetensors", max_shard_size="4KB")
    config.save_pretrained(out)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    loaded = transformers.BertModel.from_pretrained(out)
    for k, v in loaded.state_dict().items():
        assert np.array_equal(v.numpy(), state[k]), k


def test_bad_shard_size_is_refused(tmp_path):
    with pytest.raises(UsageError, match="cannot read size"):
        convert.write(samples()["names"], tmp_path / "x", "safetensors", max_shard_size="lots")


@pytest.mark.parametrize("header", [
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}},     # wrong length for shape
    {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},     # beyond the data section
    {"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}},       # unknown dtype
    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},      # leaves a gap
])
def test_inconsistent_header_names_the_tensor(tmp_path, header):
    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    with pytest.raises(CorruptFileError, match="tensor 'w'"):
        convert.read(path)


def test_listing_a_10_gb_file_reads_only_its_header(tmp_path):
    """A sparse file whose header declares 10 GiB of data: inspect must not touch the data."""
    import time
    import tracemalloc

    n = 10 * 2**30 // 4
    raw = json.dumps({"big": {"dtype": "F32", "shape": [n], "data_offsets": [0, n * 4]}}).encode()
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + n * 4)  # sparse: no disk used
    tracemalloc.start()
    started = time.perf_counter()
    report = convert.inspect(path)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert report["total_bytes"] == 10 * 2**30 and report["tensors"][0]["shape"] == [n]
    assert peak < 1 << 20 and elapsed < 5


def test_conversion_memory_is_bounded_by_the_largest_tensor(tmp_path):
    import tracemalloc

    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensor_bytes = 8 << 20
    save_file({f"t{i}": rng.standard_normal(tensor_bytes // 4, dtype=np.float32) for i in range(12)},
              str(tmp_path / "in.safetensors"))
    tracemalloc.start()
    convert.convert(tmp_path / "in.safetensors", tmp_path / "out.safetensors", to="safetensors")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * tensor_bytes, peak  # 96 MB converted (and verified) in a few tensors' worth of memory
    assert safetensors_read(tmp_path / "out.safetensors").keys() == {f"t{i}" for i in range(12)}
