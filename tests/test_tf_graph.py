"""TensorFlow graphs to runnable ONNX (tf2onnx) and to SavedModels with a serving signature.

Oracle: the original TF1 session (import_meta_graph + Saver.restore of the example CNN,
examples/model1, written by tf.compat.v1.train.Saver) and tf.saved_model.load; the ONNX
models are run by onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convert.cli import main

tf = pytest.importorskip("tensorflow")
ort = pytest.importorskip("onnxruntime")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(7).random((5, 28, 28, 1), dtype=np.float32)


@pytest.fixture(scope="module")
def tf_logits(images):
    """The logits of the CNN as TensorFlow computes them from the checkpoint TensorFlow wrote."""
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        folder = EXAMPLES / "model1"
        saver = tf.compat.v1.train.import_meta_graph(str(folder / "my-model-190.meta"))
        saver.restore(sess, tf.train.latest_checkpoint(str(folder)))
        return sess.run("fc2/add:0", {"x:0": images})


def run_onnx(path: Path, feed: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize("source", ["model1", "model1_v1"])
def test_cnn_checkpoint_to_onnx_matches_tensorflow(tmp_path, images, tf_logits, source, capsys):
    out = tmp_path / "cnn.onnx"
    assert main(["tf-ckpt", str(EXAMPLES / source), "--to", "onnx", "--graph", "--check", "-o", str(out)]) == 0
    assert "checked against TensorFlow" in capsys.readouterr().err
    (logits,) = run_onnx(out, {"x:0": images})
    np.testing.assert_allclose(logits, tf_logits, atol=1e-5, rtol=0)
    # dropout's keep_prob stays an input with its default, as in the TF graph
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()][0] == "x:0"


def test_weights_only_source_still_converts(tmp_path, images, tf_logits):
    out = tmp_path / "slim.onnx"
    assert main(["tf-ckpt", str(EXAMPLES / "model1"), "--to", "onnx", "--graph", "--weights-only",
                 "--outputs", "fc2/add", "--inputs", "x", "-o", str(out), "-q"]) == 0
    (logits,) = run_onnx(out, {"x:0": images})
    np.testing.assert_allclose(logits, tf_logits, atol=1e-5, rtol=0)


def test_cnn_to_saved_model_serving_signature(tmp_path, images, tf_logits):
    out = tmp_path / "served"
    assert main(["tf-ckpt", str(EXAMPLES / "model1"), "--to", "saved-model", "-o", str(out), "-q"]) == 0
    loaded = tf.saved_model.load(str(out))
    result = loaded.signatures["serving_default"](x=tf.constant(images))
    np.testing.assert_allclose(result["fc2/add"].numpy(), tf_logits, atol=1e-6, rtol=0)
    # and that SavedModel converts on to ONNX with the same logits
    onnx_out = tmp_path / "served.onnx"
    assert main(["saved-model", str(out), "--to", "onnx", "--graph", "--check", "-o", str(onnx_out), "-q"]) == 0
    (logits,) = run_onnx(onnx_out, {"x:0": images})
    np.testing.assert_allclose(logits, tf_logits, atol=1e-5, rtol=0)


def test_keras_saved_model_to_onnx(tmp_path):
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu", name="d1"),
                              keras.layers.Dense(3, name="d2")])
    model.export(str(tmp_path / "export"), verbose=False)
    out = tmp_path / "keras.onnx"
    assert main(["saved-model", str(tmp_path / "export"), "--to", "onnx", "--graph", "--check", "-o", str(out),
                 "-q"]) == 0
    x = np.random.default_rng(0).random((3, 6), dtype=np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, model.predict(x, verbose=0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("argv, text", [
    (["safetensors", "{st}", "--to", "onnx", "--graph"], "needs a TensorFlow source with a graph"),
    (["tf-ckpt", "{cnn}", "--to", "onnx", "--graph", "--outputs", "no/such/op"], "no tensor 'no/such/op:0'"),
    (["tf-ckpt", "{cnn}", "--to", "onnx", "--outputs", "fc2/add"], "apply to ONNX with --graph"),
])
def test_graph_usage_errors(tmp_path, capsys, argv, text):
    import convert

    st = tmp_path / "w.safetensors"
    convert.write(convert.TensorDict.from_arrays({"w": np.ones(2, np.float32)}), st, "safetensors")
    argv = [a.replace("{st}", str(st)).replace("{cnn}", str(EXAMPLES / "model1")) for a in argv]
    assert main([*argv, "-o", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert text in err and err.count("\n") == 1
    assert not (tmp_path / "out.onnx").exists()


def test_corpus_tf1_graph_with_legacy_variables_to_onnx(tmp_path):
    """A real TF1 graph from the corpus: pre-1.0 'Variable' ops and a placeholder whose shape only
    the .meta's _output_shapes records. (Its later layers go through a dropout whose random mask TF
    draws even at keep_prob 1.0, and ORT draws differently, so the first conv block is compared.)"""
    folder = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "AloshkaD+traffic-signs@027fba2f9bc6"
    out = tmp_path / "signs.onnx"
    assert main(["tf-ckpt", str(folder), "--to", "onnx", "--graph", "--outputs", "Relu", "--check",
                 "-o", str(out), "-q"]) == 0
    images = np.random.default_rng(3).random((4, 32, 32), dtype=np.float32)
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        saver = tf.compat.v1.train.import_meta_graph(str(folder / "model.ckpt.meta"))
        saver.restore(sess, str(folder / "model.ckpt"))
        expected = sess.run("Relu:0", {"Placeholder:0": images})
    (got,) = run_onnx(out, {"Placeholder:0": images})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(expected).max())))
