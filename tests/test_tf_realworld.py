"""TensorFlow checkpoints as people's tools leave them (issue: real-world files, second round).

Each kind of file is made here by TensorFlow 2.21 the way its authors' code made it, and
TensorFlow is the oracle for what it holds; conversions run through the command line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import convert

from tf_helpers import assert_same


@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("tensorflow")


def run(*argv: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convert", *map(str, argv)], capture_output=True, text=True)


def tf_values(tf, prefix: str) -> dict[str, np.ndarray]:
    """TensorFlow's reader on a prefix as it is (``load_checkpoint`` would take ``run/`` for a folder)."""
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}


# ---------------------------------------------------------------- --names keys, verified like with like

@pytest.fixture(scope="module")
def keras_object_checkpoint(tf, tmp_path_factory):
    """A ``tf.train.Checkpoint`` of a compiled, trained Keras model and its optimizer."""
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3, name="dense"),
                                 tf.keras.layers.Dense(2, name="out")])
    optimizer = tf.keras.optimizers.Adam()
    model.compile(optimizer, "mse")
    model.fit(np.ones((8, 4), np.float32), np.ones((8, 2), np.float32), verbose=0)
    folder = tmp_path_factory.mktemp("tf2")
    tf.train.Checkpoint(model=model, optimizer=optimizer).save(str(folder / "ckpt"))
    return folder, model


def test_names_keys_to_tf_ckpt_is_verified_and_restores(tf, keras_object_checkpoint, tmp_path):
    src, model = keras_object_checkpoint
    res = run("tf-ckpt", src, "--names", "keys", "--to", "tf-ckpt", "-o", tmp_path / "out", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["outputs"][0]["verified"] is True
    expected = tf_values(tf, tf.train.latest_checkpoint(str(src)))
    got = tf_values(tf, tf.train.latest_checkpoint(str(tmp_path / "out")))
    assert set(got) == set(expected) and "_CHECKPOINTABLE_OBJECT_GRAPH" in got
    for k in expected:
        assert_same(got[k], expected[k], k)
    # the object graph came along unchanged: Keras restores every variable from the output
    clone = tf.keras.models.clone_model(model)
    optimizer = tf.keras.optimizers.Adam()
    clone.compile(optimizer, "mse")
    optimizer.build(clone.trainable_variables)
    status = tf.train.Checkpoint(model=clone, optimizer=optimizer).restore(
        tf.train.latest_checkpoint(str(tmp_path / "out")))
    status.assert_existing_objects_matched()
    for a, b in zip(clone.weights, model.weights, strict=True):
        assert_same(a.numpy(), b.numpy(), a.name)


# ---------------------------------------------------------------- an empty prefix and a stale state file

@pytest.fixture(scope="module")
def empty_prefix(tf, tmp_path_factory):
    """What ``saver.save(sess, "run/")`` leaves (the author gave a folder as the save path): files
    named ``.index``, ``.data-00000-of-00001`` and ``.meta``, and a state file holding the absolute
    path of the author's folder, which no longer exists once the folder is moved."""
    root = tmp_path_factory.mktemp("author")
    run_dir = root / "home" / "run"
    run_dir.mkdir(parents=True)
    graph = tf.Graph()
    with graph.as_default():
        w = tf.compat.v1.get_variable("layer/w", initializer=np.arange(12, dtype=np.float32).reshape(3, 4))
        b = tf.compat.v1.get_variable("layer/b", initializer=np.array([1.5, -2], np.float32))
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(run_dir) + os.sep)
    assert sorted(p.name for p in run_dir.iterdir()) == [".data-00000-of-00001", ".index", ".meta", "checkpoint"]
    assert str(run_dir) in (run_dir / "checkpoint").read_text()
    moved = root / "downloaded"
    shutil.move(run_dir, moved)
    del w, b
    return moved


@pytest.mark.parametrize("which", ["folder", ".index", ".data-00000-of-00001", ".meta"])
def test_empty_prefix_read_from_any_of_its_files(tf, empty_prefix, which):
    path = empty_prefix if which == "folder" else empty_prefix / which
    expected = tf_values(tf, str(empty_prefix) + os.sep)
    td = convert.read(path)
    assert td.metadata["source.format"] == "tf-ckpt"
    assert set(td) == set(expected)
    for k, v in expected.items():
        assert_same(td[k].numpy(), v, k)


def test_stale_state_file_falls_back_to_the_folders_checkpoint_and_says_so(tf, empty_prefix, tmp_path):
    folder = tmp_path / "renamed"
    shutil.copytree(empty_prefix, folder)
    (folder / "checkpoint").write_text('model_checkpoint_path: "/nowhere/run/model.ckpt-500"\n')
    assert tf.train.latest_checkpoint(str(folder)) is None  # TensorFlow gives up here
    res = run("tf-ckpt", folder, "--to", "tf-ckpt", "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "names checkpoint '/nowhere/run/model.ckpt-500', which is not there; read the folder's only" in res.stderr
    expected = tf_values(tf, str(empty_prefix) + os.sep)
    got = tf_values(tf, tf.train.latest_checkpoint(str(tmp_path / "out")))
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert_same(got[k], v, k)


def test_stale_state_file_with_several_checkpoints_asks_to_name_one(empty_prefix, tmp_path):
    folder = tmp_path / "two"
    shutil.copytree(empty_prefix, folder)
    for suffix in (".index", ".data-00000-of-00001"):
        shutil.copy(folder / suffix, folder / f"other{suffix}")
    (folder / "checkpoint").write_text('model_checkpoint_path: "/nowhere/model.ckpt-500"\n')
    res = run("inspect", folder)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "holds 2 checkpoints" in res.stderr and "name one" in res.stderr


# ---------------------------------------------------------------- optimizer state of every optimizer TF shipped

_WRITE_TRAINED = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf
tf.compat.v1.disable_eager_execution()
root, jobs = sys.argv[1], json.loads(sys.argv[2])
x, y = np.ones((8, 4), np.float32), np.ones((8, 1), np.float32)
for kind, name in jobs:
  out = os.path.join(root, name)
  with tf.Graph().as_default():
      if kind == "keras":  # a Keras optimizer in a TF1 graph, as in an Estimator (model_to_estimator)
          import tf_keras as keras
          model = keras.Sequential([keras.layers.Dense(3, input_shape=(4,), name="dense"),
                                    keras.layers.Dense(1, name="logits")])
          model.compile(getattr(keras.optimizers.legacy, name)(), "mse")
          model.fit(x, y, verbose=0)
          sess = keras.src.backend.get_session()
      else:  # a TF1 optimizer
          inp = tf.compat.v1.placeholder(tf.float32, (None, 4))
          def dense(h, units, scope):
              with tf.compat.v1.variable_scope(scope):
                  w = tf.compat.v1.get_variable("kernel", (h.shape[1], units))
                  return h @ w + tf.compat.v1.get_variable("bias", (units,), initializer=tf.zeros_initializer())
          loss = tf.reduce_mean(tf.square(dense(dense(inp, 3, "dense"), 1, "logits") - y))
          step = tf.compat.v1.train.get_or_create_global_step()
          args = {"GradientDescentOptimizer": (0.1,), "MomentumOptimizer": (0.1, 0.9),
                  "AdagradDAOptimizer": (0.1, step)}.get(name, (0.1,))
          train = getattr(tf.compat.v1.train, name)(*args).minimize(loss, global_step=step)
          sess = tf.compat.v1.Session()
          sess.run(tf.compat.v1.global_variables_initializer())
          sess.run(train, {inp: x})
      os.makedirs(out)
      tf.compat.v1.train.Saver().save(sess, out + "/model.ckpt")
      with open(out + "/trainable.json", "w") as f:
          json.dump(sorted(v.op.name for v in tf.compat.v1.trainable_variables()), f)
"""

KERAS_OPTIMIZERS = ["Adadelta", "Adagrad", "Adam", "Adamax", "Ftrl", "Nadam", "RMSprop", "SGD"]
TF1_OPTIMIZERS = ["AdadeltaOptimizer", "AdagradDAOptimizer", "AdagradOptimizer", "AdamOptimizer", "FtrlOptimizer",
                  "GradientDescentOptimizer", "MomentumOptimizer", "ProximalAdagradOptimizer", "RMSPropOptimizer"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One trained checkpoint per optimizer, written by TensorFlow in TF1 graph mode (one process)."""
    pytest.importorskip("tf_keras")
    root = tmp_path_factory.mktemp("optimizers")
    jobs = [("keras", n) for n in KERAS_OPTIMIZERS] + [("tf1", n) for n in TF1_OPTIMIZERS]
    subprocess.run([sys.executable, "-c", _WRITE_TRAINED, str(root), json.dumps(jobs)], check=True, capture_output=True)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", KERAS_OPTIMIZERS + TF1_OPTIMIZERS)
def test_weights_only_keeps_exactly_the_trainable_variables(trained, name, tmp_path):
    src = trained / name
    trainable = json.loads((src / "trainable.json").read_text())
    res = run("tf-ckpt", src, "--weights-only", "--to", "safetensors", "-o", tmp_path / "w.safetensors")
    assert res.returncode == 0, res.stderr
    from safetensors import safe_open

    with safe_open(str(tmp_path / "w.safetensors"), "np") as f:
        assert sorted(f.keys()) == trainable  # TensorFlow's own word on which variables are weights


# ---------------------------------------------------------------- V1 output: what TF reads, streamed

def test_v1_float16_restores_in_tf_and_the_get_tensor_gap_is_said(tf, tmp_path):
    values = {"h": np.array([1.5, -2, 65504, np.inf], np.float16), "c": np.array([1 + 2j], np.complex64),
              "f": np.arange(3, dtype=np.float32)}
    convert.write(convert.TensorDict.from_arrays(values), tmp_path / "src.safetensors", "safetensors")
    res = run("safetensors", tmp_path / "src.safetensors", "--to", "tf-ckpt-v1", "-o", tmp_path / "v1")
    assert res.returncode == 0, res.stderr
    assert "get_tensor refuses V1 float16" in res.stderr and ": h, c;" in res.stderr  # f32 reads everywhere
    prefix = str(tmp_path / "v1" / "model.ckpt")
    with pytest.raises(tf.errors.UnimplementedError):  # the gap the note speaks of is TensorFlow's own
        tf.train.load_checkpoint(prefix).get_tensor("h")
    graph = tf.Graph()
    with graph.as_default():  # what a V1 consumer does: a graph and its Saver
        variables = {k: tf.compat.v1.get_variable(k, initializer=np.zeros_like(v)) for k, v in values.items()}
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session() as sess:
            saver.restore(sess, prefix)
            for k, v in values.items():
                assert_same(sess.run(variables[k]), v, k)


def test_v1_tensors_larger_than_a_block_stream_and_equal_tfs_own_bytes(tf, tmp_path):
    """Values of several MB (a table block is 256 KB) are encoded piece by piece; the file is
    still byte for byte what TensorFlow's own V1 ``Save`` op writes."""
    rng = np.random.default_rng(7)
    values = {"big_f16": rng.standard_normal(3_000_001).astype(np.float16),
              "big_u8": rng.integers(0, 256, 1_500_000, dtype=np.uint8),
              "big_i64": rng.integers(-2**62, 2**62, 300_000, dtype=np.int64),
              "small": np.float32(1.25)}
    ours = tmp_path / "ours"
    convert.write(convert.TensorDict.from_arrays(values), ours, "tf-ckpt-v1")
    names = sorted(values)
    theirs = str(tmp_path / "theirs.ckpt")
    tf.raw_ops.Save(filename=theirs, tensor_names=names, data=[tf.constant(values[n]) for n in names])
    assert (ours / "model.ckpt").read_bytes() == open(theirs, "rb").read()
    for k, v in values.items():
        got = tf.raw_ops.RestoreV2(prefix=str(ours / "model.ckpt"), tensor_names=[k], shape_and_slices=[""],
                                   dtypes=[tf.as_dtype(v.dtype)])[0].numpy()
        assert_same(got, v, k)
