"""Keras files: every layout read equal to Keras's own ``get_weights()`` (Keras 3 with the TF
backend, tf_keras for the legacy format), writers checked by Keras's ``load_weights`` /
``load_model`` and by h5py (the contract)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from blocking import blocker
from fuzzing import Seed

import convert
from convert import registry
from convert.errors import ConvertError

from contract import FormatContract

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
ROOT = Path(__file__).resolve().parent.parent
h5py = pytest.importorskip("h5py")


def _train_one_step(model, inputs, outputs) -> None:
    model.compile(optimizer="adam", loss="mse")
    model.fit(inputs, outputs, epochs=1, batch_size=len(outputs), verbose=0)


def _mixed_model(keras, seed: int = 0):
    """Conv2D, BatchNormalization, Dense, Embedding, LSTM, LayerNormalization: a Functional model."""
    keras.utils.set_random_seed(seed)
    img = keras.Input((8, 8, 3), name="image")
    tok = keras.Input((5,), dtype="int32", name="tokens")
    x = keras.layers.Conv2D(4, 3)(img)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(6)(x)
    y = keras.layers.Embedding(20, 6)(tok)
    y = keras.layers.LSTM(7)(y)
    y = keras.layers.LayerNormalization()(y)
    z = keras.layers.Dense(3)(keras.layers.Concatenate()([x, y]))
    return keras.Model([img, tok], z)


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(4, 8, 8, 3)).astype("f4"), rng.integers(0, 20, (4, 5))], rng.normal(size=(4, 3)).astype("f4")


@pytest.fixture(scope="module")
def keras3():
    return pytest.importorskip("keras")


@pytest.fixture(scope="module")
def saved(keras3, tmp_path_factory):
    """The trained model saved in every Keras 3 layout, with Keras's own view of it."""
    d = tmp_path_factory.mktemp("keras3")
    keras3.backend.clear_session()  # the names a new process gives (dense, adam/...), whatever ran before here
    model = _mixed_model(keras3)
    _train_one_step(model, *_data())
    model.save(d / "m.keras")
    model.save_weights(d / "m.weights.h5")
    (d / "sharded").mkdir()
    model.save_weights(d / "sharded" / "model.weights.json", max_shard_size=0.000002)  # ~2 KB: several shards
    model.save(d / "legacy.h5")  # Keras 3's legacy HDF5 saving (keras.src.legacy.saving)
    with zipfile.ZipFile(d / "m.keras") as zf:
        zf.extractall(d / "unzipped")
    expected = {
        "names": [w.path for w in model.weights],
        "values": [np.asarray(v) for v in model.get_weights()],
        "optimizer": {v.path: np.asarray(v.numpy()) for v in model.optimizer.variables},
    }
    return d, expected


def _weights(td):
    return [t for t in td.values() if t.attrs["role"] == "weight"]


@pytest.mark.parametrize("layout", ["m.keras", "unzipped", "unzipped/model.weights.h5", "legacy.h5"])
def test_named_layouts_read_as_keras_sees_them(saved, layout):
    d, want = saved
    td = convert.read(d / layout)
    assert td.metadata["source.format"] == "keras"
    weights = _weights(td)
    assert [t.name for t in weights] == want["names"]
    for t, arr in zip(weights, want["values"], strict=True):
        np.testing.assert_array_equal(t.numpy(), arr, err_msg=t.name)
    optimizer = {t.name: t for t in td.values() if t.attrs["role"] in ("optimizer", "step")}
    assert set(optimizer) == set(want["optimizer"])
    for name, arr in want["optimizer"].items():
        np.testing.assert_array_equal(optimizer[name].numpy(), arr, err_msg=name)
    assert td["adam/iteration"].attrs["role"] == "step"


@pytest.mark.parametrize("layout", ["m.weights.h5", "sharded", "sharded/model.weights.json"])
def test_bare_weights_read_by_hdf5_path_with_a_note(saved, layout):
    d, want = saved
    td = convert.read(d / layout)
    assert any(k.startswith("local.note.") and "config.json" in v for k, v in td.metadata.items())
    assert "layers/conv2d/vars/0" in td and "layers/lstm/cell/vars/1" in td
    got = sorted((t.numpy() for t in _weights(td)), key=lambda a: (a.shape, a.tobytes()))
    exp = sorted(want["values"], key=lambda a: (a.shape, a.tobytes()))
    assert len(got) == len(exp)
    for a, b in zip(got, exp, strict=True):
        np.testing.assert_array_equal(a, b)
    opt = [t for t in td.values() if t.attrs["role"] == "optimizer"]
    assert len(opt) == len(want["optimizer"])


def test_names_keys_and_contiguous_datasets_are_file_regions(saved):
    d, _ = saved
    td = convert.read(d / "m.keras", names="keys")
    assert "layers/conv2d/vars/0" in td
    with h5py.File(d / "unzipped" / "model.weights.h5") as f:
        for name, t in td.items():
            np.testing.assert_array_equal(t.numpy(), f[name][()])
    assert all(type(t.source).__name__ == "FileRegion" for t in td.values() if t.numel)


def test_weights_only_leaves_out_the_optimizer(saved, tmp_path):
    d, want = saved
    out = tmp_path / "w.safetensors"
    convert.convert(d / "m.keras", out, to="safetensors", weights_only=True)
    from safetensors.numpy import load_file

    got = load_file(out)
    assert sorted(got) == sorted(want["names"])


def test_tf_keras_legacy_h5_reads_as_tf_keras_sees_it(tmp_path):
    tf_keras = pytest.importorskip("tf_keras")
    model = _mixed_model(tf_keras)
    _train_one_step(model, *_data())
    model.save(tmp_path / "m.h5")
    model.save_weights(tmp_path / "w.h5")
    names = [w.name.removesuffix(":0") for w in model.weights]
    for path in ("m.h5", "w.h5"):
        td = convert.read(tmp_path / path)
        weights = _weights(td)
        assert [t.name for t in weights] == names, path
        for t, arr in zip(weights, model.get_weights(), strict=True):
            np.testing.assert_array_equal(t.numpy(), arr, err_msg=t.name)
    td = convert.read(tmp_path / "m.h5")
    opt = {t.name: t.attrs["role"] for t in td.values() if t.attrs["role"] != "weight"}
    assert len(opt) == len(model.optimizer.variables()) and "step" in opt.values()


# ------------------------------------------------------------------------------------------- writing

def test_weights_h5_written_loads_into_keras(saved, keras3, tmp_path):
    d, want = saved
    out = tmp_path / "out.weights.h5"
    convert.convert(d / "m.keras", out, to="keras")
    fresh = _mixed_model(keras3, seed=5)
    fresh.load_weights(out)
    for a, b in zip(fresh.get_weights(), want["values"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_foreign_names_written_on_a_template_load_into_keras(saved, keras3, tmp_path):
    """A source without Keras paths (safetensors, other names' order) is resolved against the template."""
    d, want = saved
    st = tmp_path / "w.safetensors"
    convert.convert(d / "m.keras", st, to="safetensors", weights_only=True)
    keras3.backend.clear_session()  # a new process's layer names: conv2d, dense, dense_1...
    other = _mixed_model(keras3, seed=7)
    _train_one_step(other, *_data(1))
    other.save(tmp_path / "template.keras")
    out = tmp_path / "out.weights.h5"
    convert.convert(st, out, to="keras", write_opts={"template": str(tmp_path / "template.keras")})
    keras3.backend.clear_session()
    fresh = _mixed_model(keras3, seed=9)
    fresh.load_weights(out)
    for a, b in zip(fresh.get_weights(), want["values"], strict=True):
        np.testing.assert_array_equal(a, b)
    out2 = tmp_path / "out.keras"
    convert.convert(st, out2, to="keras:keras", write_opts={"template": str(tmp_path / "template.keras")})
    loaded = keras3.models.load_model(out2)
    for a, b in zip(loaded.get_weights(), want["values"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_keras_writer_needs_a_template(saved, tmp_path):
    d, _ = saved
    with pytest.raises(ConvertError, match="--template"):
        convert.convert(d / "m.keras", tmp_path / "o.keras", to="keras:keras")
    assert list(tmp_path.iterdir()) == []


def test_legacy_writer_loads_into_tf_keras(tmp_path):
    tf_keras = pytest.importorskip("tf_keras")
    model = _mixed_model(tf_keras)
    _train_one_step(model, *_data())
    model.save(tmp_path / "m.h5")
    out = tmp_path / "w.h5"
    convert.convert(tmp_path / "m.h5", out, to="keras-legacy", weights_only=True)
    fresh = _mixed_model(tf_keras, seed=3)
    fresh.load_weights(out)
    for a, b in zip(fresh.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def _seeds(root: Path) -> list[Seed]:
    """Keras 3 (TF backend) after one training step: a .keras zip, a .weights.h5, legacy HDF5
    (Keras 3's legacy saving) and sharded weights; none if Keras is not installed."""
    try:
        import keras
    except ImportError:
        return []
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
                              keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((2, 6), np.float32), np.zeros((2, 2), np.float32), epochs=1, verbose=0)
    seeds = []
    for name, target, save in (("keras_zip", "m.keras", model.save), ("keras_weights", "m.weights.h5", model.save_weights),
                               ("keras_legacy", "m.h5", model.save)):
        d = root / name
        d.mkdir()
        save(d / target)
        seeds.append(Seed(name, "keras", d, target, (target,)))
    d = root / "keras_sharded"
    d.mkdir()
    model.save_weights(d / "model.weights.json", max_shard_size=0.0000005)
    seeds.append(Seed("keras_sharded", "keras", d, "model.weights.json",
                      tuple(sorted(p.name for p in d.iterdir()))))
    return seeds


class TestKerasContract(FormatContract):
    FORMAT = "keras"
    SEEDS = ("keras_zip", "keras_weights", "keras_legacy", "keras_sharded")
    FUZZ = {"keras": (SEEDS, "raw")}

    @classmethod
    def make_seeds(cls, root):
        return _seeds(root)

    def oracle_read(self, path):
        out = {}
        with h5py.File(path) as f:
            def visit(_, obj):
                if isinstance(obj, h5py.Dataset):
                    value = obj[()]
                    if obj.attrs.get("dtype") == "bfloat16":  # as Keras's H5IOStore reads it
                        import ml_dtypes
                        value = np.asarray(value).view(ml_dtypes.bfloat16)
                    out[obj.attrs["name"]] = np.asarray(value)
            f.visititems(visit)
        return out


class TestKerasLegacyContract(FormatContract):
    FORMAT = "keras-legacy"

    def oracle_read(self, path):
        """As tf_keras's hdf5_format.load_weights_from_hdf5_group walks the file: layer_names, then
        each layer's weight_names, then optimizer_weights."""
        out = {}
        with h5py.File(path) as f:
            groups = [f[name] for name in f.attrs["layer_names"]]
            if "optimizer_weights" in f:
                groups.append(f["optimizer_weights"])
            for g in groups:
                for name in g.attrs["weight_names"]:
                    name = name.decode() if isinstance(name, bytes) else name
                    value = g[name]
                    arr = np.asarray(value[()])
                    if value.attrs.get("dtype") == "bfloat16":
                        import ml_dtypes
                        arr = arr.view(ml_dtypes.bfloat16)
                    out[name] = arr
        return out


# ---------------------------------------------------------------------------------------- without Keras

def test_reading_needs_neither_tensorflow_nor_keras(saved, tmp_path):
    d, want = saved
    code = f"""
import convert
for p in ("m.keras", "unzipped", "m.weights.h5", "legacy.h5", "sharded"):
    td = convert.read({str(d)!r} + "/" + p)
    print(p, len(td), float(sum(t.numpy().astype("f8").sum() for t in td.values())))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=blocker(tmp_path, ("tensorflow", "keras", "tf_keras", "torch")))
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 5


def test_without_h5py_says_what_to_install(saved, tmp_path):
    d, _ = saved
    code = f"""
import convert
from convert.errors import MissingDependencyError
try:
    convert.read({str(d / 'm.weights.h5')!r})
except MissingDependencyError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=blocker(tmp_path, ("h5py",)))
    assert out.returncode == 0, out.stderr
    assert "ckpt-convert[keras]" in out.stdout, out.stdout


# ------------------------------------------------------------------------------------------- detection

def test_detect_tells_keras_hdf5_from_other_hdf5(saved, tmp_path):
    d, _ = saved
    for p in ("m.keras", "unzipped", "m.weights.h5", "legacy.h5", "sharded", "sharded/model.weights.json"):
        assert registry.detect(d / p).name == "keras", p
    other = tmp_path / "data.h5"
    with h5py.File(other, "w") as f:
        f["images"] = np.zeros((2, 2))
    assert not registry.get("keras").format.detect(other)
    with pytest.raises(ConvertError, match="not Keras weights.*images"):
        convert.read(other)


# ------------------------------------------------------------------------------------ keras-to-torch

def _cnn(keras, seed: int = 0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((10, 10, 3)), keras.layers.Conv2D(4, 3, name="conv1"), keras.layers.BatchNormalization(name="bn1"),
        keras.layers.ReLU(), keras.layers.Conv2D(6, 3, padding="same", name="conv2"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5, name="fc")], name="cnn")


def _torch_cnn():
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3)
            self.conv2, self.fc = nn.Conv2d(4, 6, 3, padding=1), nn.Linear(6, 5)

        def forward(self, x):
            x = self.conv2(self.bn1(self.conv1(x)).relu())
            return self.fc(x.mean(dim=(2, 3)))
    return Net().eval()


@pytest.mark.parametrize("trained", [False, True])
def test_keras_cnn_to_torch_gives_keras_outputs(keras3, tmp_path, trained):
    torch = pytest.importorskip("torch")
    model = _cnn(keras3)
    rng = np.random.default_rng(3)
    x = rng.random((4, 10, 10, 3), dtype=np.float32)
    if trained:  # moving statistics and biases move away from their initial values; the optimizer has state
        _train_one_step(model, x, rng.normal(size=(4, 5)).astype("f4"))
    want = np.asarray(model(x, training=False))
    model.save(tmp_path / "m.keras")
    extra = ["--weights-only"] if trained else []
    out = subprocess.run([sys.executable, "-m", "convert", "keras", str(tmp_path / "m.keras"), "--to", "torch",
                          "--map", "keras-to-torch", "-o", str(tmp_path / "m.pt"), *extra],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    net = _torch_cnn()
    net.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=True)
    with torch.no_grad():
        got = net(torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy())).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # and back: torch names to Keras's by torch-to-tf1 (kernel/bias, gamma/beta/moving_*), into the
    # template's layout, which a fresh model's load_weights accepts
    back = tmp_path / "back.weights.h5"
    out = subprocess.run([sys.executable, "-m", "convert", "torch", str(tmp_path / "m.pt"), "--to", "keras",
                          "--map", "torch-to-tf1", "--template", str(tmp_path / "m.keras"), "-o", str(back)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    fresh = _cnn(keras3, seed=11)
    fresh.load_weights(back)
    np.testing.assert_allclose(np.asarray(fresh(x, training=False)), want, atol=1e-6, rtol=0)
    for a, b in zip(fresh.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------- hostile files

def _keras3_file(path: Path, build) -> Path:
    """A Keras 3 .weights.h5 with one honest layer and whatever ``build(f)`` adds."""
    with h5py.File(path, "w") as f:
        f.create_group("layers/dense/vars")["0"] = np.ones((2, 2), np.float32)
        build(f)
    return path


def _external_link(f):
    f["layers/dense/vars"]["1"] = h5py.ExternalLink("/etc/passwd", "/x")


def _external_storage(f):
    f["layers/dense/vars"].create_dataset("1", (4,), np.float32, external=[("/etc/hostname", 0, 16)])


def _virtual(f, outside="/tmp/elsewhere.h5"):
    layout = h5py.VirtualLayout((4,), np.float32)
    layout[:] = h5py.VirtualSource(outside, "data", (4,))
    f["layers/dense/vars"].create_virtual_dataset("1", layout, fillvalue=0)


def _huge(f):
    f["layers/dense/vars"].create_dataset("1", (1 << 40,), np.float32, chunks=(1 << 20,))


def _soft(f):
    f["layers/dense/vars"]["1"] = h5py.SoftLink("/layers/dense/vars/0")


HOSTILE = {
    "external link": (_external_link, "external link"),
    "external raw storage": (_external_storage, "external files"),
    "virtual dataset": (_virtual, "virtual"),
    "huge claimed shape": (_huge, "claims"),
    "soft link": (_soft, "soft link"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_hdf5_is_one_line_naming_the_file(tmp_path, case):
    from fuzzing import exercise, one_line_naming, run_guarded

    build, expected = HOSTILE[case]
    path = _keras3_file(tmp_path / "hostile.weights.h5", build)
    error = run_guarded(lambda: exercise(path, "keras"), max_bytes=16 << 20)
    assert isinstance(error, ConvertError), case
    one_line_naming(error, tmp_path)
    assert expected in str(error), str(error)


def test_zip_path_traversal_and_shards_outside_are_refused(saved, tmp_path):
    d, _ = saved
    evil = tmp_path / "evil.keras"
    with zipfile.ZipFile(d / "m.keras") as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr("../../outside.txt", b"x")
    with pytest.raises(ConvertError, match="path traversal") as e:
        convert.read(evil)
    assert str(evil) in str(e.value)
    shard_dir = tmp_path / "sh"
    shutil.copytree(d / "sharded", shard_dir)
    index = shard_dir / "model.weights.json"
    index.write_text(index.read_text().replace('"model_00000.weights.h5"', '"../m.weights.h5"'))
    shutil.copy(d / "m.weights.h5", tmp_path / "m.weights.h5")
    with pytest.raises(ConvertError, match="refused") as e:
        convert.read(index)
    assert str(index) in str(e.value)


def test_truncated_and_damaged_files_fail_in_one_line_on_the_command_line(saved, tmp_path):
    d, _ = saved
    for name in ("m.keras", "m.weights.h5", "legacy.h5"):
        data = (d / name).read_bytes()
        for i, blob in enumerate((data[: len(data) // 2], data[: len(data) - 3000])):
            victim = tmp_path / f"{i}.{name}"
            victim.write_bytes(blob)
            out = subprocess.run([sys.executable, "-m", "convert", "keras", str(victim), "--to", "safetensors",
                                  "-o", str(tmp_path / f"{i}{name}.safetensors")],
                                 capture_output=True, text=True, cwd=ROOT)
            assert out.returncode == 1, (name, out.stdout)
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1 and str(victim) in lines[0], out.stderr
    assert not list(tmp_path.glob("*.safetensors"))


# ------------------------------------------------------------------------------- files written by others

DATA = ROOT / "tests" / "data" / "keras"


@pytest.mark.parametrize("stem", ["KERAS_3layer_batch_norm", "KERAS_conv2d_model"])
def test_real_legacy_weights_read_as_tf_keras_loads_them(stem):
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras.models.model_from_json((DATA / f"{stem}.json").read_text())
    model.load_weights(DATA / f"{stem}_weights.h5")
    td = convert.read(DATA / f"{stem}_weights.h5")
    assert td.metadata["keras.layout"] == "legacy-h5-weights"
    assert list(td) == [w.name.removesuffix(":0") for w in model.weights]
    for t, arr in zip(td.values(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(t.numpy(), arr, err_msg=t.name)


def test_real_qkeras_keras_file_reads_as_h5py_sees_it():
    path = DATA / "qkeras-v3_3layer.keras"
    td = convert.read(path)
    assert list(td) == [f"{layer}/{var}" for layer in ("fc1", "fc2", "fc3", "output") for var in ("kernel", "bias")]
    assert "QDense as Dense" in td.metadata["local.note.keras.names_config"]
    import io

    with zipfile.ZipFile(path) as zf, h5py.File(io.BytesIO(zf.read("model.weights.h5"))) as f:
        datasets = {}
        f.visititems(lambda name, obj: datasets.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    assert len(datasets) == len(td)
    for t in td.values():
        np.testing.assert_array_equal(t.numpy(), datasets[t.attrs["keras.path"]], err_msg=t.name)


def test_deflated_keras_zip_reads_the_same(saved, tmp_path):
    """Keras stores its members; a .keras re-zipped with deflate (by hand, a tool) reads through zipfile."""
    d, want = saved
    deflated = tmp_path / "deflated.keras"
    with zipfile.ZipFile(d / "m.keras") as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    td = convert.read(deflated)
    weights = _weights(td)
    assert [t.name for t in weights] == want["names"]
    for t, arr in zip(weights, want["values"], strict=True):
        np.testing.assert_array_equal(t.numpy(), arr, err_msg=t.name)


def test_sharded_weights_written_load_into_keras(saved, keras3, tmp_path):
    d, want = saved
    out = tmp_path / "shards"
    convert.convert(d / "m.keras", out, to="keras", write_opts={"max_shard_size": "1KB"})
    assert len(list(out.glob("model_*.weights.h5"))) > 3
    fresh = _mixed_model(keras3, seed=5)
    fresh.load_weights(out / "model.weights.json")
    for a, b in zip(fresh.get_weights(), want["values"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted(convert.read(out)) == sorted(convert.read(d / "m.keras"))  # read back under the names written


def test_chunked_compressed_and_big_endian_datasets_read_as_h5py_reads_them(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"layers/dense/vars/0": rng.standard_normal((64, 32)).astype(np.float32),
              "layers/dense/vars/1": rng.standard_normal(32).astype(">f4"),
              "layers/conv2d/vars/0": rng.standard_normal((3, 3, 2, 4)).astype(np.float64)}
    path = tmp_path / "odd.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("layers/dense/vars/0", data=arrays["layers/dense/vars/0"], compression="gzip", chunks=(8, 32))
        f["layers/dense/vars/1"] = arrays["layers/dense/vars/1"]
        f.create_dataset("layers/conv2d/vars/0", data=arrays["layers/conv2d/vars/0"], chunks=(1, 3, 2, 4),
                         shuffle=True)
    td = convert.read(path)
    assert {t.name: type(t.source).__name__ for t in td.values()} == dict.fromkeys(arrays, "DatasetSource")
    for name, arr in arrays.items():
        got = td[name].numpy()
        assert got.dtype == arr.dtype.newbyteorder("<")
        np.testing.assert_array_equal(got, arr)
        pieces = list(td[name].chunks(size=200))  # streamed in slabs of whole rows, little-endian
        assert (len(pieces) > 1 or arr.nbytes <= 200) and max(len(p) for p in pieces) <= max(200, arr[0].nbytes)
        assert b"".join(bytes(p) for p in pieces) == arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def test_legacy_writer_loads_into_keras3_legacy_loader(saved, keras3, tmp_path):
    d, want = saved
    out = tmp_path / "w.h5"
    convert.convert(d / "m.keras", out, to="keras-legacy", weights_only=True)
    fresh = _mixed_model(keras3, seed=4)
    fresh.load_weights(out)  # an .h5 that is not .weights.h5: keras.src.legacy.saving.legacy_h5_format
    for a, b in zip(fresh.get_weights(), want["values"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_nested_wrapped_and_attention_layers_named_as_keras_names_them(keras3, tmp_path):
    """Bidirectional GRU, MultiHeadAttention, TimeDistributed, SeparableConv1D, GroupNormalization, a nested
    Sequential, options that drop variables (use_bias=False, center=False), SGD with momentum."""
    keras3.utils.set_random_seed(0)
    inner = keras3.Sequential([keras3.Input((6,)), keras3.layers.Dense(5), keras3.layers.Dense(4, use_bias=False)],
                              name="inner")
    tok = keras3.Input((7,), dtype="int32")
    x = keras3.layers.Embedding(30, 6)(tok)
    x = keras3.layers.Bidirectional(keras3.layers.GRU(3, return_sequences=True))(x)
    x = keras3.layers.MultiHeadAttention(2, 4)(x, x)
    x = keras3.layers.TimeDistributed(keras3.layers.Dense(6))(x)
    x = keras3.layers.SeparableConv1D(6, 2)(keras3.layers.Conv1D(6, 2)(x))
    x = keras3.layers.GlobalAveragePooling1D()(keras3.layers.GroupNormalization(2)(x))
    x = keras3.layers.PReLU()(keras3.layers.LayerNormalization(center=False)(inner(x)))
    model = keras3.Model(tok, x)
    model.compile(optimizer=keras3.optimizers.SGD(momentum=0.9), loss="mse")
    model.fit(np.ones((2, 7), "int32"), np.zeros((2, 4), "f4"), epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    td = convert.read(tmp_path / "m.keras")
    assert not [k for k in td.metadata if k.startswith("local.note.")]
    weights = _weights(td)
    assert [t.name for t in weights] == [w.path for w in model.weights]
    for t, arr in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(t.numpy(), arr, err_msg=t.name)
    optimizer = {t.name: t.numpy() for t in td.values() if t.attrs["role"] != "weight"}
    assert set(optimizer) == {v.path for v in model.optimizer.variables}
    for v in model.optimizer.variables:
        np.testing.assert_array_equal(optimizer[v.path], v.numpy(), err_msg=v.path)


def test_tf_keras_dot_keras_file_reads_as_tf_keras_sees_it(tmp_path):
    """tf_keras's own .keras format (Keras 2.13+ saving): no 'name' attributes, metrics state saved."""
    tf_keras = pytest.importorskip("tf_keras")
    model = _mixed_model(tf_keras)
    _train_one_step(model, *_data())
    model.save(tmp_path / "m.keras")
    td = convert.read(tmp_path / "m.keras")
    weights = _weights(td)
    assert [t.name for t in weights] == [w.name.removesuffix(":0") for w in model.weights]
    for t, arr in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(t.numpy(), arr, err_msg=t.name)
    opt = [t for t in td.values() if t.attrs["role"] == "optimizer"]
    assert len(opt) == len(model.optimizer.variables())


def test_zip_bomb_weights_member_is_refused(saved, tmp_path):
    d, _ = saved
    bomb = tmp_path / "bomb.keras"
    with zipfile.ZipFile(d / "m.keras") as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename != "model.weights.h5":
                dst.writestr(info.filename, src.read(info))
        with dst.open("model.weights.h5", "w", force_zip64=True) as f:
            zeros = bytes(16 << 20)
            for _ in range(20):  # 320 MiB of zeros: ~320 KB deflated
                f.write(zeros)
    from fuzzing import run_guarded

    error = run_guarded(lambda: convert.read(bomb), max_bytes=16 << 20)
    assert isinstance(error, ConvertError) and "zip bomb" in str(error) and str(bomb) in str(error)
