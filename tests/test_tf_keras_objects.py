"""Keras files named as Keras names them (issue 21, items 3 and 8).

* Keras ``save_weights`` TF-format checkpoints as TF 1.x wrote them: object-based, and every
  object with a ``get_config`` (model, layers, optimizer) also saved its configuration as a
  string attribute ``OBJECT_CONFIG_JSON`` (TF 1.x ``CheckpointableBase._gather_saveables_for_checkpoint``:
  ``json.dumps(self, default=get_json_type, sort_keys=True)``), the model's own under the key
  ``/.ATTRIBUTES/OBJECT_CONFIG_JSON``. TF 2.21 no longer writes them; the fixture gives tf_keras's
  layers and optimizer that same method back, so that TF 2.21's saver writes the file TF 1.x wrote.

Oracle: TensorFlow's reader and object graph (``TrackableObjectGraph`` decoded by TF's own
protobuf class), the Keras variables' names, and Keras ``load_weights`` on our output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import convert
from convert.formats import tf_checkpoint as tfc

from tf_helpers import assert_same, strip_full_names


@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def keras(tf):
    return pytest.importorskip("tf_keras")


def run(*argv: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convert", *map(str, argv)], capture_output=True, text=True)


def object_graph(tf, prefix: str):
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(tf.train.load_checkpoint(prefix).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    return graph


def keras_model(keras, seed: int):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.layers.Dense(3, input_shape=(4,), name="dense"),
                              keras.layers.Dense(2, name="out")])
    model.compile(optimizer=keras.optimizers.legacy.Adam(), loss="mse")
    model.fit(np.ones((8, 4), np.float32), np.full((8, 2), seed, np.float32), verbose=0)
    return model


def variable_names(model) -> list[str]:
    return [v.name.removesuffix(":0") for v in model.weights + model.optimizer.variables()]


@pytest.fixture(scope="module")
def tf1_keras_checkpoint(tf, keras, tmp_path_factory):
    """``model.save_weights(prefix)`` of a trained Keras model, as TF 1.x wrote it (see the docstring)."""
    from tensorflow.python.training.saving import saveable_object_util
    from tf_keras.src.saving.legacy.saved_model.json_utils import get_json_type

    def with_config(self):  # TF 1.x: every object with a get_config saved it as a string attribute
        config = json.dumps(self, default=get_json_type, sort_keys=True).encode("utf8")
        return {"OBJECT_CONFIG_JSON": lambda name: saveable_object_util._PythonStringStateSaveable(
            name, lambda: config, lambda _: None).freeze()}

    patched = (keras.layers.Layer, keras.optimizers.legacy.Optimizer)
    saved = [c.__dict__.get("_gather_saveables_for_checkpoint") for c in patched]
    for c in patched:
        c._gather_saveables_for_checkpoint = with_config
    try:
        model = keras_model(keras, 1)
        prefix = str(tmp_path_factory.mktemp("tf1keras") / "weights")
        model.save_weights(prefix)
    finally:
        for c, old in zip(patched, saved, strict=True):
            if old is None:
                del c._gather_saveables_for_checkpoint
            else:
                c._gather_saveables_for_checkpoint = old
    keys = dict(tf.train.list_variables(prefix))
    # the file the issue describes: config strings beside the variables, the model's under an empty path
    assert {"/.ATTRIBUTES/OBJECT_CONFIG_JSON", "layer_with_weights-0/.ATTRIBUTES/OBJECT_CONFIG_JSON",
            "optimizer/.ATTRIBUTES/OBJECT_CONFIG_JSON"} <= set(keys)
    return prefix, variable_names(model)


def test_tf1_keras_checkpoint_named_as_keras_names_its_variables(tf, tf1_keras_checkpoint):
    prefix, keras_names = tf1_keras_checkpoint
    graph = object_graph(tf, prefix)
    key_of = {a.full_name: a.checkpoint_key for n in graph.nodes for a in n.attributes if a.name == "VARIABLE_VALUE"}
    configs = {a.checkpoint_key for n in graph.nodes for a in n.attributes if a.name == "OBJECT_CONFIG_JSON"}
    assert len(configs) == 4  # the model, its two layers, the optimizer
    td = tfc.read(prefix)
    assert sorted(td) == sorted(key_of)
    assert set(keras_names) < set(td)  # and the optimizer's hyper-parameters: Adam/beta_1, ...
    reader = tf.train.load_checkpoint(prefix)
    for name, t in td.items():
        assert t.attrs["tf.key"] == key_of[name]
        assert_same(t.numpy(), reader.get_tensor(key_of[name]), name)
    roles = {name: t.attrs["role"] for name, t in td.items()}
    assert [n for n, r in roles.items() if r == "weight"] == ["dense/bias", "dense/kernel", "out/bias", "out/kernel"]
    assert roles["Adam/iter"] == "step" and roles["Adam/dense/kernel/m"] == "optimizer"
    # the configurations are metadata, as TF stored them
    for key in configs:
        path = key.removesuffix("/.ATTRIBUTES/OBJECT_CONFIG_JSON").lstrip("/")
        meta = "tf.object_config" + (f".{path}" if path else "")
        assert td.metadata[meta] == reader.get_tensor(key).decode()
    assert json.loads(td.metadata["tf.object_config.layer_with_weights-1"])["config"]["name"] == "out"
    assert json.loads(td.metadata["tf.object_config"])["class_name"] == "Sequential"
    # the raw keys are still there on request, the strings with them
    raw = tfc.read(prefix, names="keys")
    assert sorted(raw) == sorted(dict(tf.train.list_variables(prefix)))
    assert raw["/.ATTRIBUTES/OBJECT_CONFIG_JSON"].attrs["role"] == "other"


@pytest.mark.parametrize("names", ["readable", "keys"])
def test_tf1_keras_checkpoint_to_tf_ckpt_loads_into_keras(tf, keras, tf1_keras_checkpoint, names, tmp_path):
    """Readable names give a name-based checkpoint, raw keys the object-based one: Keras
    ``load_weights`` restores every weight and optimizer variable from either."""
    prefix, _ = tf1_keras_checkpoint
    out = tmp_path / "out"
    res = run("tf-ckpt", prefix, "--names", names, "--to", "tf-ckpt", "-o", out, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["outputs"][0]["verified"] is True
    model = keras_model(keras, 2)
    graph = object_graph(tf, prefix)
    key_of = {a.full_name: a.checkpoint_key for n in graph.nodes for a in n.attributes if a.name == "VARIABLE_VALUE"}
    reader = tf.train.load_checkpoint(prefix)
    before = {n: v.numpy() for n, v in zip(variable_names(model), model.weights + model.optimizer.variables(), strict=True)}
    assert not np.array_equal(before["dense/kernel"], reader.get_tensor(key_of["dense/kernel"]))
    model.load_weights(tf.train.latest_checkpoint(str(out))).expect_partial()
    for name, v in zip(variable_names(model), model.weights + model.optimizer.variables(), strict=True):
        assert_same(v.numpy(), reader.get_tensor(key_of[name]), name)


def test_tf1_keras_configs_travel_as_safetensors_metadata(tf, tf1_keras_checkpoint, tmp_path):
    from safetensors import safe_open

    prefix, _ = tf1_keras_checkpoint
    out = tmp_path / "w.safetensors"
    convert.convert(prefix, out, to="safetensors")
    reader = tf.train.load_checkpoint(prefix)
    with safe_open(str(out), "np") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == sorted(tfc.read(prefix))
    assert meta["tf.object_config.layer_with_weights-0"] == \
        reader.get_tensor("layer_with_weights-0/.ATTRIBUTES/OBJECT_CONFIG_JSON").decode()


# ---------------------------------------------------------------- item 8: Keras SavedModels

@pytest.mark.parametrize("optimizer", ["legacy", "adam"])
@pytest.mark.parametrize("full_names", [True, False], ids=["tf2.21", "no-full-names"])
def test_keras_saved_model_named_as_the_saved_model_names_them(tf, keras, optimizer, full_names, tmp_path):
    from tensorflow.core.protobuf import saved_model_pb2, trackable_object_graph_pb2

    from convert.formats import saved_model

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.layers.Dense(3, input_shape=(4,), name="dense"),
                              keras.layers.Dense(2, name="out")])
    model.compile(optimizer=keras.optimizers.legacy.Adam() if optimizer == "legacy" else "adam", loss="mse")
    model.fit(np.ones((8, 4), np.float32), np.ones((8, 2), np.float32), verbose=0)
    sm = tmp_path / "sm"
    model.save(str(sm), save_format="tf")
    if not full_names:
        strip_full_names(tf, sm)
    prefix = str(sm / "variables" / "variables")
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(tf.train.load_checkpoint(prefix).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    assert any(bool(a.full_name) for n in graph.nodes for a in n.attributes) == full_names
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((sm / "saved_model.pb").read_bytes())
    nodes = proto.meta_graphs[0].object_graph_def.nodes
    expected = {a.checkpoint_key: nodes[i].variable.name for i, n in enumerate(graph.nodes) for a in n.attributes}

    td = saved_model.read(sm)
    assert {t.attrs["tf.key"]: name for name, t in td.items()} == expected
    reader = tf.train.load_checkpoint(prefix)
    for name, t in td.items():
        assert_same(t.numpy(), reader.get_tensor(t.attrs["tf.key"]), name)
    # the variables tf.saved_model.load revives (all but the legacy optimizer's slots): same names, same values
    loaded = tf.saved_model.load(str(sm))
    variables = {v.name.removesuffix(":0"): v.numpy() for v in tf.train.TrackableView(loaded).descendants()
                 if isinstance(v, tf.Variable)}
    assert len(variables) >= {"legacy": 9, "adam": 16}[optimizer]
    for name, value in variables.items():
        assert_same(td[name].numpy(), value, name)
    assert {"dense/kernel", "dense/bias", "out/kernel", "out/bias"} <= set(td)
    slots = {"legacy": "Adam/dense/kernel/m", "adam": "Adam/m/dense/kernel"}[optimizer]
    assert td[slots].attrs["role"] == "optimizer" and td["dense/kernel"].attrs["role"] == "weight"
    assert not any(".OPTIMIZER_SLOT" in n or "layer_with_weights" in n for n in td)
