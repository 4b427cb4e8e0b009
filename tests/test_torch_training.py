"""Training checkpoints (PyTorch Lightning style) holding objects convert does not load: the tensors come
through, the objects are kept as inert text placeholders, NumPy arrays are read as tensors. torch
writes every file and is the oracle (``torch.load(weights_only=False)``, which imports and runs what
the pickle names: the test module's own classes here)."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from blocking import blocker

from convert.cli import main
from convert.errors import CorruptFileError, ReadError
from convert.formats import torch as pt

from oracles import safetensors_read

torch = pytest.importorskip("torch")
F = torch.nn.functional


class ConfigNode:
    """Like an OmegaConf DictConfig: content, metadata, and a pointer to its parent (a cycle)."""

    def __init__(self, content, parent=None):
        self._metadata = {"flags": {"readonly": False}, "key": None}
        self._parent = parent
        self._content = content


class ListConfigLike(list):  # a list subclass: the pickle APPENDs to the object
    pass


class AttributeDictLike(dict):  # Lightning's AttributeDict: the pickle SETITEMs on the object
    pass


def _checkpoint():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        F.binary_cross_entropy(torch.sigmoid(model(torch.randn(5, 4))), torch.rand(5, 2)).backward()
        opt.step()
    cfg = ConfigNode({"lr": 1e-3, "layers": ListConfigLike([4, 3, 2])})
    cfg._content["child"] = ConfigNode({"depth": 2}, parent=cfg)
    ckpt = {
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [],
        "hyper_parameters": {
            "args": argparse.Namespace(lr=1e-3, batch_size=32, tags=["a", "b"]),
            "cfg": cfg,
            "loss_fn": F.binary_cross_entropy,
            "attrs": AttributeDictLike(seed=7, name="mlp"),
            "class_weights": np.array([0.25, 0.5, 0.25], np.float32),
            "mean": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
            "swapped": np.arange(4, dtype=">i4"),
            "mask": np.array([[True, False], [False, True]]),
            "names": np.array(["cat", "dog"]),  # a string array: not read, reported
            "objects": np.array([{"a": 1}, None], dtype=object),  # object dtype: refused, reported
        },
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.125),
                                                                   "dirpath": "/tmp/ckpts"}},
    }
    return ckpt, model


@pytest.fixture(scope="module", params=[("zip", 2), ("zip", 4), ("legacy", 2)], ids=["zip", "zip-protocol4", "legacy"])
def lightning(request, tmp_path_factory):
    layout, protocol = request.param
    ckpt, model = _checkpoint()
    path = tmp_path_factory.mktemp("lightning") / "epoch=3-step=120.ckpt"
    torch.save(ckpt, path, pickle_protocol=protocol, _use_new_zipfile_serialization=layout == "zip")
    with pytest.raises(pickle.UnpicklingError):  # what convert used to do: refuse the whole file
        torch.load(path, weights_only=True)
    return path, torch.load(path, weights_only=False)


def _equal(t, ref) -> bool:
    ref = ref.detach().contiguous().numpy() if isinstance(ref, torch.Tensor) else np.ascontiguousarray(ref)
    got = t.numpy()
    return got.shape == ref.shape and got.dtype == ref.dtype.newbyteorder("=") and np.array_equal(got, ref)


def test_default_and_key_state_dict_equal_torch_load(lightning):
    path, ref = lightning
    for td in (pt.read(path), pt.read(path, key="state_dict")):
        assert td.metadata["torch.key"] == "state_dict"
        assert list(td) == list(ref["state_dict"])
        for name, t in td.items():
            assert _equal(t, ref["state_dict"][name]), name


def test_placeholders_kept_as_text_and_listed(lightning):
    path, ref = lightning
    md = pt.read(path).metadata
    args = json.loads(md["torch.stubbed.hyper_parameters.args"])
    assert args["class"] == "argparse.Namespace" and args["state"] == vars(ref["hyper_parameters"]["args"])
    assert json.loads(md["torch.stubbed.hyper_parameters.loss_fn"]) == {"global": "torch.nn.functional.binary_cross_entropy"}
    cfg = json.loads(md["torch.stubbed.hyper_parameters.cfg"])
    assert cfg["class"] == f"{__name__}.ConfigNode"
    assert cfg["state"]["_content"]["lr"] == ref["hyper_parameters"]["cfg"]._content["lr"]
    assert cfg["state"]["_content"]["layers"]["items"] == [4, 3, 2]
    assert cfg["state"]["_content"]["child"]["state"]["_parent"] == "<cycle>"  # points back to cfg
    attrs = json.loads(md["torch.stubbed.hyper_parameters.attrs"])
    assert attrs["entries"] == dict(ref["hyper_parameters"]["attrs"])
    stubbed = json.loads(md["torch.stubbed_globals"])
    assert {"argparse.Namespace", f"{__name__}.ConfigNode", f"{__name__}.ListConfigLike",
            f"{__name__}.AttributeDictLike", "torch.nn.functional.binary_cross_entropy"} <= set(stubbed)
    assert not any(s.startswith("numpy") for s in stubbed)  # NumPy arrays are read, not stubbed
    assert "argparse.Namespace" in md["local.note.torch.stubbed"]
    assert md["torch.extra.epoch"] == "3" and md["torch.extra.global_step"] == "120"
    skipped = json.loads(md["torch.skipped"])
    assert "hyper_parameters.class_weights" in skipped and "optimizer_states" in skipped


def test_numpy_arrays_read_as_tensors(lightning):
    path, ref = lightning
    td = pt.read(path, key="hyper_parameters")
    hp = ref["hyper_parameters"]
    assert sorted(td) == ["class_weights", "mask", "mean", "swapped"]
    for name, t in td.items():
        assert _equal(t, hp[name]), name
        assert t.attrs["torch.numpy"] == "true"
    skipped = json.loads(td.metadata["torch.skipped"])
    assert "object" in skipped["hyper_parameters.objects"] and "hyper_parameters.names" in skipped
    assert "hyper_parameters.args" not in skipped and "torch.stubbed.hyper_parameters.args" in td.metadata


def test_optimizer_and_callback_tensors_by_key(lightning):
    path, ref = lightning
    state = ref["optimizer_states"][0]["state"]
    td = pt.read(path, key="optimizer_states.0.state")
    assert len(td) == sum(len(v) for v in state.values())
    for k, per_param in state.items():
        for slot, value in per_param.items():
            assert _equal(td[f"{k}.{slot}"], value), (k, slot)
    cb = pt.read(path, key="callbacks")
    (name,) = cb
    assert _equal(cb[name], ref["callbacks"]["ModelCheckpoint{'monitor': 'val_loss'}"]["best_model_score"])


def test_convert_to_safetensors_and_note(lightning, capsys):
    path, ref = lightning
    out = path.parent / f"{path.stem}-{id(ref)}.safetensors"
    assert main(["torch", str(path), "--to", "safetensors", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note:" in err and "argparse.Namespace" in err and "nothing imported or run" in err
    got = safetensors_read(out)
    assert sorted(got) == sorted(ref["state_dict"])
    for name, arr in got.items():
        assert np.array_equal(arr, ref["state_dict"][name].numpy()), name


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_in_a_training_checkpoint_is_stubbed_never_run(tmp_path):
    marker = tmp_path / "pwned"
    lin = torch.nn.Linear(3, 2)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": lin.state_dict(), "hyper_parameters": {"hook": _Evil(marker)}}, path)
    td = pt.read(path)
    assert not marker.exists()
    for name, t in td.items():
        assert _equal(t, lin.state_dict()[name]), name
    hook = json.loads(td.metadata["torch.stubbed.hyper_parameters.hook"])
    assert hook["class"] in ("posix.system", "os.system") and hook["args"] == [f"touch {marker}"]
    assert not marker.exists()


def test_no_tensors_at_all_is_refused(tmp_path):
    path = tmp_path / "hparams.ckpt"
    torch.save({"hyper_parameters": argparse.Namespace(lr=0.1), "epoch": 1}, path)
    with pytest.raises(ReadError, match=r"refused to load global 'argparse\.Namespace'.*no tensors"):
        pt.read(path)
    plain = tmp_path / "plain.pt"  # nothing stubbed: an empty state_dict is still a state_dict
    torch.save({}, plain)
    assert len(pt.read(plain)) == 0


def test_reading_needs_no_torch(lightning, tmp_path):
    path, ref = lightning
    code = f"""
import sys
from convert.formats import torch as pt
for key in (None, "hyper_parameters"):
    for n, t in pt.read({str(path)!r}, key=key).items():
        print(n, t.numpy().tobytes().hex())
assert sys.modules.get("torch") is None
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent,
                         env=blocker(tmp_path, ("torch",)))
    assert out.returncode == 0, out.stderr
    got = dict(line.split() for line in out.stdout.splitlines())
    expected = {**ref["state_dict"], **{k: ref["hyper_parameters"][k] for k in ("class_weights", "mask", "mean", "swapped")}}
    assert set(got) == set(expected)
    for name, value in expected.items():
        arr = value.numpy() if isinstance(value, torch.Tensor) else np.ascontiguousarray(value, value.dtype.newbyteorder("<"))
        assert got[name] == (arr.tobytes().hex() if arr.size else ""), name


class Holder:
    """Not a module: an object of the training code that holds a tensor."""

    def __init__(self, t):
        self.t = t


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.bn = torch.nn.BatchNorm2d(3)
        self.register_buffer("scratch", torch.zeros(3), persistent=False)  # not in the state_dict
        self.head = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1, bias=False))


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_whole_pickled_models_read_as_their_state_dict(tmp_path, layout):
    model = Block()
    model.bn(torch.randn(4, 3, 5, 5))  # running statistics move
    top, nested = tmp_path / "model.pt", tmp_path / "ckpt.pt"
    kw = {"_use_new_zipfile_serialization": layout == "zip"}
    torch.save(model, top, **kw)
    torch.save({"model": model, "epoch": 2}, nested, **kw)
    for path, key in ((top, "(root)"), (nested, "model")):
        ref = torch.load(path, weights_only=False)
        ref = (ref if key == "(root)" else ref["model"]).state_dict()
        td = pt.read(path)
        assert td.metadata["torch.key"] == key
        assert json.loads(td.metadata["torch.pickled_modules"]) == {key: f"{__name__}.Block"}
        assert list(td) == list(ref) and "scratch" not in td
        for name, t in td.items():
            assert _equal(t, ref[name]), name


def test_tensors_only_inside_other_objects_named_by_attribute(tmp_path):
    """A file whose tensors are all inside objects of the training code: read by attribute path."""
    path = tmp_path / "holder.pt"
    inner = Holder(torch.arange(6.0).reshape(2, 3))
    outer = Holder({"inner": inner, "steps": [torch.ones(2, dtype=torch.int64)], "again": inner})
    torch.save(outer, path)
    ref = torch.load(path, weights_only=False)
    td = pt.read(path)
    assert td.metadata["torch.opened_placeholders"] == "true"
    assert list(td) == ["t.inner.t", "t.steps.0", "t.again.t"]
    assert _equal(td["t.inner.t"], ref.t["inner"].t) and _equal(td["t.again.t"], ref.t["again"].t)
    assert _equal(td["t.steps.0"], ref.t["steps"][0])
    assert f"{__name__}.Holder" in td.metadata["local.note.torch.stubbed"]


def test_tensors_out_of_reach_are_refused(tmp_path):
    """A tensor only in an object's __reduce__ arguments of a kind that is not followed (a set)."""
    path = tmp_path / "odd.pt"
    torch.save(Holder(frozenset([torch.ones(1)])), path)
    with pytest.raises(ReadError, match=rf"refused to load global '{__name__}\.Holder'.*inside objects.*state_dict"):
        pt.read(path)


def test_shared_objects_inside_placeholders_cost_neither_time_nor_memory(tmp_path):
    """A few hundred bytes of pickle can describe 2**60 values by sharing (nested lists holding the
    previous one twice) inside an object not loaded: its text is cut short, and opening such objects
    (when the tensors are all inside them) is refused as a 'billion laughs' pickle."""
    import time

    bomb = []
    for _ in range(60):
        bomb = [bomb, bomb]
    lin = torch.nn.Linear(2, 2)
    path, inside = tmp_path / "bomb.ckpt", tmp_path / "bomb_inside.pt"
    torch.save({"state_dict": lin.state_dict(), "hyper_parameters": argparse.Namespace(bomb=bomb)}, path)
    torch.save(Holder({"w": torch.ones(2), "bomb": bomb}), inside)
    assert path.stat().st_size < 10_000
    start = time.monotonic()
    td = pt.read(path)
    assert list(td) == ["weight", "bias"]
    text = td.metadata["torch.stubbed.hyper_parameters"]
    assert len(text) < 2_000_000 and "..." in text
    with pytest.raises(CorruptFileError, match="billion laughs"):
        pt.read(inside)
    assert time.monotonic() - start < 20
