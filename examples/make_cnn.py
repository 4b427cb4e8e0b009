"""The seed CNN: a TF1-style graph-mode network, trained briefly and saved with tf.compat.v1.train.Saver.

Writes ``examples/model1/`` (V2: ``my-model-190.index``, ``.data-00000-of-00001``, ``.meta``,
``checkpoint``) and ``examples/model1_v1/`` (the same training saved with
``write_version=SaverDef.V1``). Everything is seeded, so a rerun gives the same values.

Later work (ONNX graph conversion, mapping to PyTorch with equal logits) uses exactly this
network; import :func:`build_graph` rather than copying it::

    from examples.make_cnn import build_graph
    g = tf.Graph()
    with g.as_default():
        t = build_graph()          # t["x"], t["keep_prob"], t["logits"], ...

Graph (names are part of the contract)::

    x            placeholder float32 [None, 28, 28, 1]
    conv1/w [5,5,1,8],  conv1/b [8]   conv SAME, relu, max-pool 2x2
    conv2/w [5,5,8,16], conv2/b [16]  conv SAME, relu, max-pool 2x2
    reshape [-1, 7*7*16]
    fc1/w [784,64], fc1/b [64]        relu, dropout(keep_prob)
    keep_prob    placeholder_with_default(1.0, [])
    fc2/w [64,10], fc2/b [10]         logits = fc2/add:0, in collection "predict"

Variables are classic reference variables (``use_resource=False``), as TF1 code made them, so
``sess.run("conv1/w:0")`` gives the value.

Usage: python examples/make_cnn.py [OUTDIR]   (default: the examples/ folder)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

SEED = 1234
STEPS = 190
BATCH = 32


def build_graph(tf=None) -> dict:
    """Build the CNN in the current default graph; returns its main tensors and ops.

    Keys: ``x``, ``labels``, ``keep_prob``, ``logits``, ``loss``, ``train_op``, ``global_step``.
    """
    if tf is None:
        import tensorflow as tf
    v1 = tf.compat.v1
    tf.compat.v1.set_random_seed(SEED)
    x = v1.placeholder(tf.float32, [None, 28, 28, 1], name="x")
    labels = v1.placeholder(tf.int64, [None], name="labels")
    keep_prob = v1.placeholder_with_default(1.0, [], name="keep_prob")

    def weights(shape, seed):
        return v1.get_variable("w", shape, initializer=v1.truncated_normal_initializer(stddev=0.1, seed=seed))

    def bias(n):
        return v1.get_variable("b", [n], initializer=v1.constant_initializer(0.1))

    h = x
    for i, (scope, shape) in enumerate((("conv1", [5, 5, 1, 8]), ("conv2", [5, 5, 8, 16]))):
        with v1.variable_scope(scope, use_resource=False):
            w, b = weights(shape, SEED + i), bias(shape[-1])
            h = tf.nn.relu(tf.nn.conv2d(h, w, strides=[1, 1, 1, 1], padding="SAME") + b)
            h = tf.nn.max_pool2d(h, ksize=2, strides=2, padding="SAME")
    h = tf.reshape(h, [-1, 7 * 7 * 16])
    with v1.variable_scope("fc1", use_resource=False):
        w, b = weights([7 * 7 * 16, 64], SEED + 2), bias(64)
        h = tf.nn.relu(tf.matmul(h, w) + b)
        h = v1.nn.dropout(h, keep_prob=keep_prob, seed=SEED + 4)
    with v1.variable_scope("fc2", use_resource=False):
        w, b = weights([64, 10], SEED + 3), bias(10)
        logits = tf.add(tf.matmul(h, w), b, name="add")
    v1.add_to_collection("predict", logits)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
    global_step = v1.train.get_or_create_global_step()
    train_op = v1.train.AdamOptimizer(1e-3).minimize(loss, global_step=global_step)
    return {"x": x, "labels": labels, "keep_prob": keep_prob, "logits": logits, "loss": loss,
            "train_op": train_op, "global_step": global_step}


def synthetic_data(n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Fixed random images whose label is a fixed random linear function of the pixels."""
    rng = np.random.default_rng(SEED)
    xs = rng.random((n, 28, 28, 1), dtype=np.float32)
    proj = rng.standard_normal((28 * 28, 10)).astype(np.float32)
    ys = np.argmax((xs.reshape(n, -1) - 0.5) @ proj, axis=1).astype(np.int64)
    return xs, ys


def main(outdir: os.PathLike | str, version: str = "V2", steps: int = STEPS) -> str:
    """Train ``steps`` Adam steps and save to ``outdir/my-model-<steps>``; returns the prefix.

    ``version`` is "V2" or "V1" (``SaverDef`` write version). The ``checkpoint`` state file
    holds relative paths and no timestamps, so the folder can move and reruns are identical.
    """
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    xs, ys = synthetic_data()
    g = tf.Graph()
    with g.as_default():
        t = build_graph(tf)
        saver = tf.compat.v1.train.Saver(write_version=getattr(tf.compat.v1.train.SaverDef, version))
        config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1,
                                          use_per_session_threads=True)  # not a pool made earlier
        with tf.compat.v1.Session(graph=g, config=config) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for step in range(steps):
                i = (step * BATCH) % len(xs)
                sess.run(t["train_op"], {t["x"]: xs[i:i + BATCH], t["labels"]: ys[i:i + BATCH], t["keep_prob"]: 0.75})
            cwd = os.getcwd()
            os.chdir(outdir)  # a relative save path makes TF write relative paths in 'checkpoint'
            try:
                prefix = saver.save(sess, "my-model", global_step=t["global_step"])
            finally:
                os.chdir(cwd)
    state = outdir / "checkpoint"
    lines = [ln for ln in state.read_text().splitlines() if "timestamp" not in ln]
    state.write_text("\n".join(lines) + "\n")
    return str(outdir / prefix)


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    print(main(root / "model1", "V2"))
    print(main(root / "model1_v1", "V1"))
