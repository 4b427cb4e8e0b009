"""SavedModel: variables read without TensorFlow, named as TensorFlow/Keras name them; written with TensorFlow.

Oracles: the Keras/tf.Module objects that wrote the files (their variables' paths and
values), tf.train.load_checkpoint on the variables bundle, tf.saved_model.load.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fuzzing import SMALL, Seed, corpus_seed, exercise, pb_bytes, pb_varint, run_guarded

import convert
from convert.errors import CorruptFileError, ReadError

from contract import FormatContract, same_values, samples

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
CORPUS_SAVED_MODELS = sorted(p.parent for p in CORPUS.rglob("saved_model.pb"))


def _seeds(root: Path) -> list[Seed]:
    """A small TF2 SavedModel written by TensorFlow, and one from the corpus (TensorFlow Serving's)."""
    d = root / "saved_model"
    module = tf.Module()
    with tf.device("/cpu:0"):
        module.w = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="w")
        module.b = tf.Variable(np.array([0.5, -1.0], np.float64), name="b")
        module.step = tf.Variable(np.int64(7), name="step")
    tf.saved_model.save(module, str(d))
    files = tuple(sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()))
    variables = ("variables/variables.index", "variables/variables.data-00000-of-00001")
    return [Seed("saved_model", "saved-model", d, ".", files, checksummed=tuple(f for f in files if f.startswith("variables/")),
                 metadata_only=("fingerprint.pb", "saved_model.pb")),
            *corpus_seed(root, "corpus_saved_model", "saved-model", "tensorflow+serving@9d981c5c2708/tensorflow_serving/"
                         "servables/tensorflow/testdata/saved_model_half_plus_two_tf2_cpu/00000123", ".",
                         ("saved_model.pb", *variables), variables, metadata_only=("saved_model.pb",))]


def _saved_model_pb(data: bytes, error, message: str, junk_variables: bool = False):
    def build(folder: Path):
        (folder / "saved_model.pb").write_bytes(data)
        if junk_variables:
            (folder / "variables").mkdir()
            (folder / "variables" / "junk").write_bytes(b"x")
        return folder, error, message
    return build


class TestSavedModelContract(FormatContract):
    FORMAT = "saved-model"
    SEEDS = ("saved_model", "corpus_saved_model")
    CHECKSUMMED = tuple((seed, f) for seed in SEEDS
                        for f in ("variables/variables.index", "variables/variables.data-00000-of-00001"))
    # entries: a LevelDB table's entries mutated and the table rebuilt with valid checksums
    FUZZ = {"saved_model": (SEEDS, "raw"), "saved_model_entries": (SEEDS, "entries")}
    HOSTILE = {
        "pb_not_a_protobuf": _saved_model_pb(b"\xff" * 64, CorruptFileError, "not a SavedModel protobuf"),
        "pb_empty_and_no_variables_index": _saved_model_pb(b"", ReadError, "holds no variables.index",
                                                           junk_variables=True),
    }

    @classmethod
    def make_seeds(cls, root):
        return _seeds(root)

    def oracle_read(self, path):
        loaded = tf.saved_model.load(str(path))
        return {name: np.asarray(v.numpy()) for name, v in loaded.weights.items()}

    def test_same_bytes_on_rerun(self, tmp_path):
        # TensorFlow numbers the functions it saves with a per-process counter, so the bytes
        # are the same from run to run (what a pipeline does), not within one process.
        script = ("import sys, numpy as np, convert; from contract import samples; "
                  "td = samples()['shapes']; convert.write(td, sys.argv[1], 'saved-model')")
        outs = []
        for name in ("a", "b"):
            out = tmp_path / name
            subprocess.run([sys.executable, "-c", script, str(out)], check=True, capture_output=True,
                           cwd=Path(__file__).parent)
            outs.append({str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
        assert outs[0] == outs[1]


def _keras_model(functional: bool):
    keras.utils.set_random_seed(0)
    if functional:
        inp = keras.Input((8, 8, 3), name="img")
        x = keras.layers.Conv2D(4, 3, name="conv")(inp)
        x = keras.layers.BatchNormalization(name="bn")(x)
        out = keras.layers.Dense(5, name="dense")(keras.layers.Flatten()(x))
        return keras.Model(inp, out, name="func")
    return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="conv"),
                             keras.layers.Flatten(), keras.layers.Dense(5, name="dense")], name="seq")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """SavedModels and checkpoints written by TensorFlow 2.21, with what wrote them."""
    root = tmp_path_factory.mktemp("tf_written")
    out = {}
    rng = np.random.default_rng(0)
    for name, functional, compiled in (("sequential", False, True), ("functional", True, True),
                                       ("uncompiled", True, False)):
        model = _keras_model(functional)
        if compiled:
            model.compile(optimizer="adam", loss="mse")
            model.fit(rng.random((4, 8, 8, 3)), rng.random((4, 5)), epochs=1, verbose=0)
        model.export(str(root / f"{name}_export"), verbose=False)
        ckpt = tf.train.Checkpoint(model=model, **({"optimizer": model.optimizer} if compiled else {}))
        prefix = ckpt.save(str(root / f"{name}_ckpt" / "ckpt"))
        out[name] = (model, root / f"{name}_export", prefix)

    class Module(tf.Module):
        def __init__(self):
            super().__init__()
            self.v = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="my_var")
            self.sub = tf.Module()
            self.sub.w = tf.Variable(np.float64(1.5), name="inner/w")
            self.table = tf.Variable([b"a", b"bc"], name="strings")

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
        def __call__(self, x):
            return tf.matmul(x, tf.transpose(self.v)) * tf.cast(self.sub.w, tf.float32)

    module = Module()
    tf.saved_model.save(module, str(root / "module"))
    out["module"] = (module, root / "module", None)
    return out


@pytest.mark.parametrize("kind", ["sequential", "functional", "uncompiled"])
def test_keras_export_named_by_variable_paths_once_each(written, kind):
    model, export, _ = written[kind]
    td = convert.read(export)
    expected = {v.path: np.asarray(v.numpy()) for v in model.weights}
    assert sorted(td) == sorted(expected)  # every variable once, though export stores each twice
    for name, arr in expected.items():
        assert same_values(td[name].numpy(), arr), name
    assert td.metadata["tf.duplicate_keys_dropped"]


@pytest.mark.parametrize("kind", ["sequential", "functional", "uncompiled"])
def test_tf2_checkpoint_readable_names_roles_and_raw_keys(written, kind):
    model, _, prefix = written[kind]
    td = convert.read(prefix + ".index")
    weights = {v.path: np.asarray(v.numpy()) for v in model.weights}
    for name, arr in weights.items():
        assert same_values(td[name].numpy(), arr), name
        assert td[name].attrs["role"] == "weight"
    optimizer = getattr(model, "optimizer", None)
    optimizer_state = {v.path: np.asarray(v.numpy()) for v in (optimizer.variables if optimizer else [])}
    for name, arr in optimizer_state.items():
        assert same_values(td[name].numpy(), arr), name
        assert td[name].attrs["role"] in ("optimizer", "step"), name
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" not in td
    slim = convert.api.select(td, weights_only=True)
    assert sorted(slim) == sorted(weights)  # optimizer state and counters (save_counter) left out
    reader = tf.train.load_checkpoint(prefix)
    raw = convert.read(prefix + ".index", names="keys")
    assert sorted(raw) == sorted(reader.get_variable_to_shape_map())
    for key in raw:
        if key != "_CHECKPOINTABLE_OBJECT_GRAPH":
            assert same_values(raw[key].numpy(), np.asarray(reader.get_tensor(key))), key


def test_tf_module_saved_model(written):
    module, path, _ = written["module"]
    td = convert.read(path)
    expected = {v.name[:-2]: np.asarray(v.numpy()) for v in module.variables}
    assert sorted(td) == sorted(expected)
    for name, arr in expected.items():
        assert same_values(td[name].numpy(), arr), name


@pytest.mark.parametrize("path", CORPUS_SAVED_MODELS, ids=lambda p: p.relative_to(CORPUS).parts[0])
def test_corpus_saved_models_equal_tensorflow(path):
    reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
    td = convert.read(path)
    assert td, path
    covered = set()
    for name, t in td.items():
        key = t.attrs.get("tf.key", name)
        covered.add(key)
        assert same_values(t.numpy(), np.asarray(reader.get_tensor(key))), name
    dropped = set(filter(None, td.metadata.get("tf.duplicate_keys_dropped", "").split(",")))
    assert covered | dropped | {"_CHECKPOINTABLE_OBJECT_GRAPH"} >= set(reader.get_variable_to_shape_map())
    # no corpus SavedModel is a Keras 3 export: every variable comes out, equal values or not
    # (rossman's two metrics each have a 'count' of the same value)
    assert not dropped
    assert len(td) == len(set(reader.get_variable_to_shape_map()) - {"_CHECKPOINTABLE_OBJECT_GRAPH"})


def test_weights_only_drops_optimizer_state_of_a_corpus_model(tmp_path):
    rossman = CORPUS / "psch125+rossman@1e752ce04c9a"
    out = tmp_path / "rossman.safetensors"
    convert.convert(rossman, out, to="safetensors", weights_only=True)
    names = set(convert.read(out))
    assert names and not any(n.startswith("Adam/") for n in names)
    assert {"dense_10/kernel", "dense_10/bias"} <= names


def test_written_saved_model_loads_with_variables_named(tmp_path):
    td = samples()["names"]
    convert.write(td, tmp_path / "sm", "saved-model")
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    assert sorted(loaded.weights) == sorted(td)
    for name, v in loaded.weights.items():
        assert v.name.startswith(name), (v.name, name)
        assert same_values(np.asarray(v.numpy()), td[name].numpy())


def test_object_based_checkpoint_written_restores_in_tensorflow(tmp_path):
    td = convert.TensorDict.from_arrays({
        "dense/kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "dense/bias": np.ones(3, np.float32),
        "step": np.int64(7), "a.b/c": np.array([b"x", b"yz"], dtype=object)})
    convert.write(td, tmp_path / "out", "tf-ckpt", object_graph=True)
    dense = tf.Module()
    dense.kernel = tf.Variable(np.zeros((2, 3), np.float32))
    dense.bias = tf.Variable(np.zeros(3, np.float32))
    ab = tf.Module()
    ab.c = tf.Variable([b"", b""])
    ckpt = tf.train.Checkpoint(dense=dense, step=tf.Variable(np.int64(0)), **{"a.b": ab})
    ckpt.restore(tf.train.latest_checkpoint(str(tmp_path / "out"))).assert_consumed()  # every value, every object
    assert same_values(dense.kernel.numpy(), td["dense/kernel"].numpy())
    assert same_values(dense.bias.numpy(), td["dense/bias"].numpy())
    assert ckpt.step.numpy() == 7 and list(ab.c.numpy()) == [b"x", b"yz"]
    back = convert.read(tmp_path / "out")
    assert sorted(back) == sorted([*td, "save_counter"])  # as tf.train.Checkpoint.save writes


def test_keras_checkpoint_round_trips_through_object_graph_writer(written, tmp_path):
    model, _, prefix = written["sequential"]
    td = convert.read(prefix + ".index")
    convert.write(td, tmp_path / "again", "tf-ckpt", object_graph=True)
    back = convert.read(tmp_path / "again")
    assert set(back) == set(td)
    for name in td:
        assert same_values(back[name].numpy(), td[name].numpy()), name


@pytest.mark.parametrize("arrays, text", [
    ({"a": np.ones(1), "a/b": np.ones(1)}, "cannot hold other objects"),
    ({"x/.ATTRIBUTES/VARIABLE_VALUE": np.ones(1)}, "already carry object-graph keys"),
    ({"a//b": np.ones(1)}, "empty part"),
])
def test_object_graph_writer_refuses_what_no_object_tree_holds(tmp_path, arrays, text):
    with pytest.raises(convert.WriteError, match=text):
        convert.write(convert.TensorDict.from_arrays(arrays), tmp_path / "o", "tf-ckpt", object_graph=True)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_no_saved_model_is_refused(tmp_path, capsys):
    from convert.cli import main

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    code = main(["saved-model", str(tmp_path / "junk"), "--to", "safetensors", "-o", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert code == 1 and "not a SavedModel" in err and not (tmp_path / "o.safetensors").exists()


def test_saved_model_pb_fields_of_the_wrong_wire_type_are_skipped(tmp_path):
    """``saved_model.pb`` is read for its tags and signature names only: fields of the wrong wire
    type are skipped (never ``bytes(2**40)``); the variables (none here) read. Its refusals:
    ``TestSavedModelContract.HOSTILE``."""
    for i, body in enumerate((pb_bytes(1, pb_varint(4, 1 << 40)), pb_bytes(5, pb_varint(1, 1 << 40)))):
        folder = tmp_path / f"sm{i}"
        folder.mkdir()
        (folder / "saved_model.pb").write_bytes(pb_varint(1, 1) + pb_bytes(2, body))
        assert run_guarded(lambda: exercise(folder, "saved-model"), max_bytes=SMALL) is None  # noqa: B023
