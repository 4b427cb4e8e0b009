"""TorchScript archives (torch.jit.save): parameters and buffers by module path, equal to
``torch.jit.load(f).state_dict()``, read without torch and without running the code inside."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from blocking import blocker

from convert.cli import main
from convert.errors import ConvertError
from convert.formats import torch as pt

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 3))
        self.plain = torch.full((2,), 9.0)  # a tensor attribute: neither parameter nor buffer

    def forward(self, x):
        return self.lin(x) * self.scale


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 4, bias=False)
        self.head = torch.nn.Sequential(Block(), torch.nn.ReLU(), torch.nn.Linear(3, 2))

    def forward(self, x):
        x = self.bn(self.conv1(x)).mean((2, 3))
        return self.head(self.fc(x))


@pytest.fixture(scope="module", params=["scripted", "traced"])
def archive(request, tmp_path_factory):
    torch.manual_seed(0)
    model = Net()
    model(torch.randn(6, 3, 8, 8))  # training mode: batch norm statistics move away from 0 and 1
    model.eval()
    compiled = torch.jit.script(model) if request.param == "scripted" else torch.jit.trace(model, torch.randn(2, 3, 8, 8))
    path = tmp_path_factory.mktemp(request.param) / "script.pt"
    torch.jit.save(compiled, str(path))
    return path, torch.jit.load(str(path)).state_dict()


def test_read_equals_jit_load_state_dict(archive):
    path, ref = archive
    assert pt.detect(path)
    td = pt.read(path)
    assert td.metadata["torch.layout"].startswith("torchscript")
    assert list(td) == list(ref)
    assert "head.0.plain" not in td and "head.0.scale" in td and "bn.num_batches_tracked" in td
    for name, t in td.items():
        r = ref[name]
        assert t.dtype.torch == str(r.dtype).removeprefix("torch."), name
        assert t.shape == tuple(r.shape), name
        assert np.array_equal(t.numpy(), r.numpy()), name


def test_convert_to_safetensors(archive, tmp_path):
    path, ref = archive
    out = tmp_path / "script.safetensors"
    assert main(["torch", str(path), "--to", "safetensors", "-o", str(out)]) == 0
    got = safetensors_numpy.load_file(str(out))
    assert sorted(got) == sorted(ref)
    for name, r in ref.items():
        assert np.array_equal(got[name], r.numpy()), name


def test_reading_needs_no_torch(archive, tmp_path):
    path, ref = archive
    code = f"""
import sys
from convert.formats import torch as pt
for n, t in pt.read({str(path)!r}).items():
    print(n, t.numpy().tobytes().hex())
assert sys.modules.get("torch") is None
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent,
                         env=blocker(tmp_path, ("torch",)))
    assert out.returncode == 0, out.stderr
    got = [line.split() for line in out.stdout.splitlines()]
    assert [n for n, _ in got] == list(ref)
    for name, hexed in got:
        assert hexed == ref[name].numpy().tobytes().hex(), name


def _rewrite(src: Path, dst: Path, change):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = change(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)


def test_code_inside_never_runs(archive, tmp_path):
    path, ref = archive
    marker = tmp_path / "pwned"
    payload = f"import os\nos.system('touch {marker}')\n__import__('os').system('touch {marker}')\n".encode()
    evil = tmp_path / "evil.pt"

    def change(name, data):
        return payload + data if "/code/" in name and name.endswith(".py") else data

    _rewrite(path, evil, change)
    td = pt.read(evil)
    assert list(td) == list(ref)
    assert not marker.exists()


def test_damaged_archives_give_convert_errors(archive, tmp_path):
    path, _ = archive
    cases = {
        "no code": lambda n, d: None if "/code/" in n else d,  # then every tensor attribute is read
        "bad code": lambda n, d: b"class (:\n" if "/code/" in n and n.endswith(".py") else d,
        "data.pkl not a module": lambda n, d: (b"\x80\x02}q\x00." if n.endswith("/data.pkl") else d),
        "storage missing": lambda n, d: None if "/data/0" in n else d,
    }
    for label, change in cases.items():
        bad = tmp_path / f"{label.replace(' ', '_')}.pt"
        _rewrite(path, bad, change)
        try:
            td = pt.read(bad)
            for t in td.values():
                t.numpy()
        except ConvertError as e:
            assert str(bad) in str(e), label
        else:
            assert label == "no code", label


def test_archive_saved_to_a_file_object(tmp_path):
    buf = io.BytesIO()
    model = torch.jit.script(torch.nn.Linear(2, 3))
    torch.jit.save(model, buf)
    path = tmp_path / "lin.pt"
    path.write_bytes(buf.getvalue())
    ref = torch.jit.load(str(path)).state_dict()
    td = pt.read(path)
    assert list(td) == list(ref) == ["weight", "bias"]
    for name, t in td.items():
        assert np.array_equal(t.numpy(), ref[name].numpy())


def test_more_module_kinds_and_quantized(tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.lstm = torch.nn.LSTM(4, 5, num_layers=2, batch_first=True)
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(5, 5) for _ in range(2)])
            self.d = torch.nn.ModuleDict({"a": torch.nn.LayerNorm(5)})
            self.shared = self.blocks[0]  # one module under two names: torch lists it under both

        def forward(self, x):
            h, _ = self.lstm(self.emb(x))
            for b in self.blocks:
                h = b(h)
            return self.d["a"](self.shared(h))

    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(M(), torch.zeros(1, 3, dtype=torch.long)), str(path))
    ref = torch.jit.load(str(path)).state_dict()
    td = pt.read(path)
    assert list(td) == list(ref) and "shared.weight" in td and "lstm.weight_hh_l1" in td
    for name, t in td.items():
        assert np.array_equal(t.numpy(), ref[name].numpy()), name
    q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(4, 4)), {torch.nn.Linear},
                                               dtype=torch.qint8)
    qpath = tmp_path / "q.pt"
    torch.jit.save(torch.jit.script(q), str(qpath))
    with pytest.raises(ConvertError, match="TorchScript modules declare no parameters or buffers"):
        pt.read(qpath)
