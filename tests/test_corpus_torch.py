"""Real PyTorch files from ../shared/corpus and tests/data/torch: each must read, and equal what torch reads.

All three are named ``model.ckpt``, like several TensorFlow V1 checkpoints there: the
content decides. The test also runs the reader with torch blocked from importing, so the
restricted unpickler alone must give the same answer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from blocking import blocker

from convert.formats import torch as pt
from convert.ir import FileRegion

torch = pytest.importorskip("torch")

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"
TORCH_FILES = {  # folder -> (layout, tensor count)
    "Hardlygo+pytorch_mnist@b3b18bfb98b7": ("zip (no byteorder record)", 6),
    "JockWang+little-pytorch@e78235369526": ("legacy", 2),
    "NiharP31+MNIST@3cd7eae1bcc4": ("zip", 4),
}

shared = pytest.mark.skipif(not CORPUS.is_dir(), reason="../shared/corpus is not here")


@shared
@pytest.mark.parametrize("folder", sorted(TORCH_FILES))
def test_corpus_file_equals_torch_load(folder):
    path = CORPUS / folder / "model.ckpt"
    layout, count = TORCH_FILES[folder]
    assert pt.detect(path)
    td = pt.read(path)
    ref = torch.load(path, weights_only=True, map_location="cpu")  # NiharP31 was saved on CUDA
    assert td.metadata["torch.layout"] == layout
    assert td.metadata["torch.key"] == "(root)"
    assert list(td) == list(ref) and len(td) == count
    for name, t in td.items():
        r = ref[name]
        assert t.dtype.torch == str(r.dtype).removeprefix("torch.")
        assert t.shape == tuple(r.shape)
        assert isinstance(t.source, FileRegion)  # lazily read straight from the file
        assert t.numpy().tobytes() == r.contiguous().numpy().tobytes(), name


@shared
def test_corpus_without_torch_matches(tmp_path):
    """The same digests with torch unimportable (the path users without torch take)."""
    code = f"""
from convert.formats import torch as pt
from convert.ir import digest
for folder in {sorted(TORCH_FILES)!r}:
    td = pt.read({str(CORPUS)!r} + "/" + folder + "/model.ckpt")
    print(folder, *(f"{{n}}={{digest(t)}}" for n, t in td.items()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, env=blocker(tmp_path, ("torch",)))
    assert out.returncode == 0, out.stderr
    import google_crc32c
    for line in out.stdout.splitlines():
        folder, *pairs = line.split()
        ref = torch.load(CORPUS / folder / "model.ckpt", weights_only=True, map_location="cpu")
        for pair in pairs:
            name, crc = pair.rsplit("=", 1)
            assert int(crc) == google_crc32c.value(ref[name].contiguous().numpy().tobytes()), (folder, name)
    assert len(out.stdout.splitlines()) == len(TORCH_FILES)


def _all_corpus_files():
    return sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.name != "README.md") if CORPUS.is_dir() else []


@shared
@pytest.mark.parametrize("path", _all_corpus_files(), ids=lambda p: str(p.relative_to(CORPUS)))
def test_detect_only_torch_files(path):
    expected = path.parent.name in TORCH_FILES and path.name == "model.ckpt"
    assert pt.detect(path) is expected


# ---- files kept with the tests (tests/data/torch): kinds ../shared/corpus lacks --------------------------

LOCAL = Path(__file__).resolve().parent / "data" / "torch"
SCRIPTS = ["tarekbzahid+nn_adder@9000012e24f7/model_scripted.pt", "fer-oliveiraa+aula_iris@ebe08b1dcc2f/model_scripted.pt"]
LIGHTNING = "annshorn+EyeTrackDiagError@d1357d76ee03/weights/read_features_last.ckpt"


@pytest.mark.parametrize("name", SCRIPTS)
def test_torchscript_file_equals_jit_load(name):
    path = LOCAL / name
    assert pt.detect(path)
    td = pt.read(path)
    ref = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert td.metadata["torch.layout"].startswith("torchscript")
    assert list(td) == list(ref) and len(td) == 4
    for n, t in td.items():
        assert t.shape == tuple(ref[n].shape)
        assert t.numpy().tobytes() == ref[n].contiguous().numpy().tobytes(), n


def test_lightning_file_equals_torch_load():
    path = LOCAL / LIGHTNING
    td = pt.read(path)
    ref = torch.load(path, weights_only=False, map_location="cpu")  # saved on CUDA
    assert td.metadata["torch.key"] == "state_dict"
    assert td.metadata["torch.extra.pytorch-lightning_version"] == ref["pytorch-lightning_version"]
    assert list(td) == list(ref["state_dict"])
    for n, t in td.items():
        assert t.numpy().tobytes() == ref["state_dict"][n].cpu().numpy().tobytes(), n
    opt = pt.read(path, key="optimizer_states.0.state")
    assert len(opt) == sum(len(v) for v in ref["optimizer_states"][0]["state"].values())
    assert opt["0.exp_avg"].numpy().tobytes() == ref["optimizer_states"][0]["state"][0]["exp_avg"].cpu().numpy().tobytes()


def test_local_corpus_without_torch_matches(tmp_path):
    code = f"""
from convert.formats import torch as pt
from convert.ir import digest
for name in {[*SCRIPTS, LIGHTNING]!r}:
    td = pt.read({str(LOCAL)!r} + "/" + name)
    print(name, *(f"{{n}}={{digest(t)}}" for n, t in td.items()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, env=blocker(tmp_path, ("torch",)))
    assert out.returncode == 0, out.stderr
    import google_crc32c
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        name, *pairs = line.split()
        path = LOCAL / name
        ref = (torch.jit.load(str(path)).state_dict() if name in SCRIPTS
               else torch.load(path, weights_only=False, map_location="cpu")["state_dict"])
        assert len(pairs) == len(ref)
        for pair in pairs:
            n, crc = pair.rsplit("=", 1)
            assert int(crc) == google_crc32c.value(ref[n].cpu().contiguous().numpy().tobytes()), (name, n)
