"""safetensors: the contract, plus sharding and metadata, checked with the safetensors library."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from fuzzing import Seed

import convert
from convert.errors import CorruptFileError, UsageError

from contract import FormatContract, same_values, samples
from oracles import safetensors_read


def _seeds(root: Path) -> list[Seed]:
    """safetensors.numpy.save_file: one file with metadata, and a two-shard folder with its index."""
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


# ---- hostile files, by hand (collected by tests/test_hostile.py)

def _safetensors(path: Path, header: bytes, data: bytes = b"\0" * 16, length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


HEADER_CASES = {
    "header_length_2_63": (b"{}", 1 << 63, "header length"),
    "header_length_past_eof": (b"{}", 10**6, "header length"),
    "offsets_past_eof": (b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,1000000000000]}}', None, "outside the data"),
    "offsets_negative": (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}}', None, "outside the data"),
    "offsets_reversed": (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}', None, "outside the data"),
    "offsets_huge_float": (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,1e400]}}', None, "malformed"),
    "shape_terabytes": (b'{"w":{"dtype":"F32","shape":[1048576,1048576],"data_offsets":[0,16]}}', None,
                        "holds 16 bytes but"),
    "shape_negative": (b'{"w":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}}', None, "negative dimension"),
    "shape_not_a_list": (b'{"w":{"dtype":"F32","shape":7,"data_offsets":[0,16]}}', None, "malformed"),
    "entry_not_an_object": (b'{"w":[1,2]}', None, "malformed"),
    "unknown_dtype": (b'{"w":{"dtype":"Q9","shape":[4],"data_offsets":[0,16]}}', None, "malformed"),
    "metadata_not_strings": (b'{"__metadata__":{"a":[1]}}', None, "__metadata__"),
    "header_not_utf8": (b'{"\xff":1}', None, "not valid JSON"),
    "header_not_an_object": (b"[1,2,3]", None, "not a JSON object"),
}


def _header_case(header: bytes, length: int | None, message: str):
    return lambda folder: (_safetensors(folder / "m.safetensors", header, length=length), CorruptFileError, message)


def _deep(folder: Path):
    """JSON nested 100000 deep: json raises RecursionError."""
    deep = b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
    return _safetensors(folder / "deep.safetensors", deep), CorruptFileError, "too deeply"


def _index_case(weight_map, message: str):
    """A sharded folder whose index names files outside its folder, no file, or a file without the tensor."""
    def build(folder: Path):
        sharded = folder / "sharded"
        sharded.mkdir()
        _safetensors(folder / "outside.safetensors", b"{}")
        _safetensors(sharded / "a.safetensors", b"{}", data=b"")
        names = {k: str(folder / v[1:]) if isinstance(v, str) and v.startswith("/") else v for k, v in weight_map.items()}
        (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
        return sharded, CorruptFileError, message
    return build


class TestSafetensorsContract(FormatContract):
    FORMAT = "safetensors"
    SEEDS = ("safetensors", "safetensors_sharded")
    FUZZ = {"safetensors": (SEEDS, "raw")}
    HOSTILE = {
        **{name: _header_case(*case) for name, case in HEADER_CASES.items()},
        "nested_100000_deep": _deep,
        "index_names_a_file_above": _index_case({"w": "../outside.safetensors"}, "not a file of the index's folder"),
        "index_names_an_absolute_path": _index_case({"w": "/outside.safetensors"}, "not a file of the index's folder"),
        "index_names_no_file": _index_case({"w": 5}, "not a safetensors index"),
        # what a message quotes from the file (a tensor name of the index) is escaped: one printable line
        "index_quotes_a_terminal_escape": _index_case({"x\n\x1b[2J": "a.safetensors"}, "in no shard"),
    }

    @classmethod
    def make_seeds(cls, root):
        return _seeds(root)

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
