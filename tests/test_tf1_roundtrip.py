"""TF1 graphs whole, without TensorFlow: the proofs of issue 13.

Every conversion runs in a subprocess whose environment cannot import TensorFlow
(:func:`tf_helpers.run_without_tensorflow`); TensorFlow 2.21 is only the oracle here: it writes
the sources and restores the outputs with the seeds' own code,
``import_meta_graph(new/*.meta)`` + ``saver.restore(sess, tf.train.latest_checkpoint(new))``.

1. The seed CNN saved by a V1 ``Saver`` migrates to V2 with its graph; every variable restores
   bit-exact, the logits are the same, and a later ``saver.save`` in that graph writes V2.
2. A PyTorch module of the same CNN goes into the committed example's graph with
   ``--template examples/model1``: TF's logits equal torch's within 1e-5; with ``--template-fill``
   the whole graph (Adam slots from the template) restores.
3. LEGACY graphs (``RestoreSlice``, before TF 1.0): three real TF 0.12-era files from
   ``../shared/corpus`` and one built here (with a partitioned variable) restore in TF 2.21
   after migration; one whose rewrite cannot be exact gets the precise note.
"""

from __future__ import annotations

import filecmp
import glob
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from convert.cli import main

from tf_helpers import assert_same, run_without_tensorflow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CORPUS = ROOT.parent / "shared" / "corpus"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("tensorflow")


def _make_cnn():
    spec = importlib.util.spec_from_file_location("make_cnn", EXAMPLES / "make_cnn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _convert(tmp_path, *args) -> str:
    res = run_without_tensorflow(list(args), tmp_path)
    assert res.returncode == 0, res.stderr
    return res.stderr


def _restore(tf, folder: Path, var_list=None):
    """The seed's restore code on ``folder``: a fresh graph from its ``.meta``, restored from
    ``latest_checkpoint``; yields (graph, session, saver)."""
    v1 = tf.compat.v1
    (meta,) = glob.glob(str(folder / "*.meta"))
    graph = tf.Graph()
    sess = v1.Session(graph=graph)
    with graph.as_default():
        saver = v1.train.import_meta_graph(meta)
        if var_list is not None:
            chosen = [v for v in v1.global_variables() if v.op.name in var_list]
            assert len(chosen) == len(var_list)
            saver = v1.train.Saver(var_list=chosen)
        saver.restore(sess, tf.train.latest_checkpoint(str(folder)))
    return graph, sess, saver


def _values(tf, graph, sess) -> dict[str, np.ndarray]:
    with graph.as_default():
        return {v.op.name: sess.run(v) for v in tf.compat.v1.global_variables()}


# ------------------------------------------------------------------ 1. the V1 saver's CNN

@pytest.fixture(scope="module")
def v1_cnn(tf, tmp_path_factory):
    """The seed CNN (examples/make_cnn.py's graph: conv1..fc2 with w/b, Adam) trained 3 steps and
    saved by ``Saver(write_version=V1)``; with its logits on fixed images."""
    make_cnn = _make_cnn()
    v1 = tf.compat.v1
    folder = tmp_path_factory.mktemp("v1_cnn") / "old"
    folder.mkdir()
    xs, ys = make_cnn.synthetic_data(64)
    images = np.random.default_rng(5).random((4, 28, 28, 1), dtype=np.float32)
    graph = tf.Graph()
    with graph.as_default():
        t = make_cnn.build_graph(tf)
        saver = v1.train.Saver(write_version=v1.train.SaverDef.V1)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            for step in range(3):
                sess.run(t["train_op"], {t["x"]: xs[step * 16:(step + 1) * 16], t["labels"]: ys[step * 16:(step + 1) * 16]})
            prefix = saver.save(sess, str(folder / "cnn"), global_step=t["global_step"])
            logits = sess.run(t["logits"], {t["x"]: images})
    assert sorted(os.listdir(folder)) == ["checkpoint", "cnn-3", "cnn-3.meta"]  # a V1 file, not .index/.data
    return folder, prefix, images, logits


def test_v1_saver_cnn_migrates_with_its_graph_without_tensorflow(tf, v1_cnn, tmp_path):
    folder, prefix, images, logits = v1_cnn
    new = tmp_path / "new"
    err = _convert(tmp_path, "tf-ckpt", folder, "--to", "tf-ckpt", "-o", new)
    assert "left out" not in err and "SaveSlices save op as SaveV2" in err, err
    assert sorted(os.listdir(new)) == ["checkpoint", "cnn-3.data-00000-of-00001", "cnn-3.index", "cnn-3.meta"]

    graph, sess, saver = _restore(tf, new)
    with sess:
        original = tf.train.load_checkpoint(prefix)
        values = _values(tf, graph, sess)
        assert sorted(values) == sorted(original.get_variable_to_shape_map())
        for name, value in values.items():
            assert_same(value, original.get_tensor(name), name)
        assert_same(sess.run("fc2/add:0", {"x:0": images}), logits, "logits")
        # the graph now saves V2, and its saver says so
        assert saver.saver_def.version == tf.compat.v1.train.SaverDef.V2
        again = saver.save(sess, str(new / "again"), global_step=4)
    assert sorted(p.name for p in new.glob("again-4*")) == ["again-4.data-00000-of-00001", "again-4.index", "again-4.meta"]
    assert tf.train.latest_checkpoint(str(new)) == again

    # the same bytes whether TensorFlow is importable or not (it is in this process)
    here = tmp_path / "in-process"
    assert main(["tf-ckpt", str(folder), "--to", "tf-ckpt", "-o", str(here), "-q"]) == 0
    fresh = tmp_path / "again"
    _convert(tmp_path, "tf-ckpt", folder, "--to", "tf-ckpt", "-o", fresh)
    names = sorted(os.listdir(fresh))
    assert names == sorted(os.listdir(here))
    assert all(filecmp.cmp(fresh / n, here / n, shallow=False) for n in names)


# ------------------------------------------------------------------ 2. torch weights into the graph

def _torch_cnn():
    torch = pytest.importorskip("torch")

    class CNN(torch.nn.Module):
        """The seed CNN in PyTorch: NCHW convolutions, flattened after permuting to NHWC as TF does."""

        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 8, 5, padding=2)
            self.conv2 = torch.nn.Conv2d(8, 16, 5, padding=2)
            self.fc1 = torch.nn.Linear(7 * 7 * 16, 64)
            self.fc2 = torch.nn.Linear(64, 10)

        def forward(self, x):
            x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
            x = torch.flatten(x.permute(0, 2, 3, 1), 1)
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(13)
    return torch, CNN().eval()


WEIGHTS = ("conv1/w", "conv1/b", "conv2/w", "conv2/b", "fc1/w", "fc1/b", "fc2/w", "fc2/b")


def test_torch_cnn_into_the_example_graph_with_template(tf, tmp_path):
    torch, net = _torch_cnn()
    path = tmp_path / "net.pt"
    torch.save(net.state_dict(), path)
    images = np.random.default_rng(9).random((5, 28, 28, 1), dtype=np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()

    new = tmp_path / "new"
    err = _convert(tmp_path, "torch", path, "--to", "tf-ckpt", "--map", "torch-to-tf1",
                   "--template", EXAMPLES / "model1", "-o", new)
    assert "conv1/kernel -> conv1/w" in err and "--template-fill" in err, err
    assert sorted(os.listdir(new)) == ["checkpoint", "model.ckpt.data-00000-of-00001", "model.ckpt.index",
                                       "model.ckpt.meta"]
    assert filecmp.cmp(new / "model.ckpt.meta", EXAMPLES / "model1" / "my-model-190.meta", shallow=False)
    # the seed's restore code, restoring the eight weights (the Adam slots are not in the checkpoint)
    graph, sess, _ = _restore(tf, new, var_list=WEIGHTS)
    with sess:
        got = sess.run("fc2/add:0", {"x:0": images})
        conv1 = sess.run("conv1/w:0")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert_same(conv1, net.conv1.weight.detach().numpy().transpose(2, 3, 1, 0), "conv1/w")

    # --template-fill: the template's Adam slots, beta powers and global_step too; the whole graph restores
    full = tmp_path / "full"
    err = _convert(tmp_path, "torch", path, "--to", "tf-ckpt", "--map", "torch-to-tf1",
                   "--template", EXAMPLES / "model1", "--template-fill", "-o", full)
    assert "wrote 19 template variables" in err, err
    graph, sess, _ = _restore(tf, full)
    template = tf.train.load_checkpoint(str(EXAMPLES / "model1" / "my-model-190"))
    with sess:
        values = _values(tf, graph, sess)
        got = sess.run("fc2/add:0", {"x:0": images})
    assert len(values) == 27 and values["global_step"] == 190
    for name, value in values.items():
        if name not in WEIGHTS:
            assert_same(value, template.get_tensor(name), name)
    assert_same(values["fc1/w"], net.fc1.weight.detach().numpy().T, "fc1/w")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ 3. LEGACY (pre-1.0) graphs

LEGACY_CORPUS = ["255BITS+vocal-autoencoder@85d64249fe3c", "AloshkaD+traffic-signs@027fba2f9bc6",
                 "tensorflow+serving@27a9c3581077/tensorflow_serving/servables/tensorflow/testdata/half_plus_two/00000123"]


@pytest.mark.skipif(not CORPUS.is_dir(), reason="needs ../shared/corpus")
@pytest.mark.parametrize("folder", LEGACY_CORPUS, ids=lambda f: f.split("@")[0])
def test_real_legacy_graph_migrated_without_tensorflow_restores(tf, folder, tmp_path):
    src = CORPUS / folder
    (meta,) = glob.glob(str(src / "*.meta"))
    original_meta = tf.compat.v1.MetaGraphDef.FromString(Path(meta).read_bytes())
    assert "RestoreSlice" in {n.op for n in original_meta.graph_def.node}  # a LEGACY graph indeed
    old = meta[:-len(".meta")]
    new = tmp_path / "new"
    err = _convert(tmp_path, "tf-ckpt", old, "--to", "tf-ckpt", "-o", new)
    assert "rewrote the pre-1.0 .meta graph" in err, err
    graph, sess, saver = _restore(tf, new)
    with sess:
        values = _values(tf, graph, sess)
        assert values
        reader = tf.train.load_checkpoint(old)  # TensorFlow reads the original V1 file
        for name, value in values.items():
            assert_same(value, reader.get_tensor(name), name)
        assert {n.op for n in graph.as_graph_def().node} >= {"RestoreV2", "SaveV2"}
        assert not {"RestoreSlice", "SaveSlices"} & {n.op for n in graph.as_graph_def().node}
        saver.save(sess, str(new / "again"))
    assert (new / "again.index").is_file()


def _legacy_graph(tf, folder: Path, shared_const: bool = False) -> dict[str, np.ndarray]:
    """A LEGACY saver's graph as TF 0.x built it, made here with TensorFlow's own ops: a
    ``SaveSlices`` save op and one ``RestoreSlice`` + ``Assign`` per variable (scalar Const name
    and slice), ``SaverDef.version`` LEGACY; one variable partitioned in two (``w/part_0``,
    ``w/part_1`` slices of ``w`` [10, 4]). Saved to ``folder/model.ckpt`` (V1) with its ``.meta``
    and ``checkpoint`` state file. With ``shared_const``, a restore Const also feeds another node."""
    v1 = tf.compat.v1
    rng = np.random.default_rng(3)
    values = {"b": rng.standard_normal(4).astype(np.float32), "w": rng.standard_normal((10, 4)).astype(np.float32)}
    graph = tf.Graph()
    with graph.as_default():
        b = v1.Variable(values["b"], name="b", use_resource=False)
        parts = [v1.Variable(values["w"][i * 5:(i + 1) * 5], name=f"w/part_{i}", use_resource=False) for i in (0, 1)]
        specs = [("b", "", b), ("w", "10 4 0,5:-", parts[0]), ("w", "10 4 5,5:-", parts[1])]
        with tf.name_scope("save"):
            filename = v1.placeholder_with_default("model", [], name="Const")
            save = tf.raw_ops.SaveSlices(filename=filename, tensor_names=[s[0] for s in specs],
                                         shapes_and_slices=[s[1] for s in specs], data=[s[2] for s in specs], name="save")
            with tf.control_dependencies([save]):
                saved = tf.identity(filename, name="control_dependency")
            assigns = []
            for i, (name, spec, var) in enumerate(specs):
                with tf.name_scope(f"restore_slice_{i}"):
                    tensor_name = tf.constant(name, name="tensor_name")
                    if shared_const and i == 0:
                        tf.identity(tensor_name, name="debug_copy")
                    restored = tf.raw_ops.RestoreSlice(file_pattern=filename, tensor_name=tensor_name,
                                                       shape_and_slice=tf.constant(spec, name="shape_and_slice"),
                                                       dt=tf.float32)
                assigns.append(v1.assign(var, restored))
            restore_all = tf.group(*assigns, name="restore_all")
        saver_def = v1.train.SaverDef(filename_tensor_name=filename.name, save_tensor_name=saved.name,
                                      restore_op_name=restore_all.name, max_to_keep=5,
                                      version=v1.train.SaverDef.LEGACY)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            sess.run(saved, {filename: str(folder / "model.ckpt")})
        v1.train.export_meta_graph(str(folder / "model.ckpt.meta"), graph=graph, saver_def=saver_def)
    v1.train.update_checkpoint_state(str(folder), "model.ckpt")
    # the graph restores its own V1 file in TF 2.21, as TF 0.x did
    g, sess, _ = _restore(tf, folder)
    with sess:
        restored = _values(tf, g, sess)
    assert_same(restored["w/part_1"], values["w"][5:], "w/part_1")
    return values


def test_built_legacy_graph_with_partitions_migrated_without_tensorflow_restores(tf, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    values = _legacy_graph(tf, old)
    new = tmp_path / "new"
    err = _convert(tmp_path, "tf-ckpt", old, "--to", "tf-ckpt", "-o", new)
    assert "its 3 RestoreSlice ops (a pre-1.0 saver: V1 files only) as RestoreV2" in err, err
    graph, sess, saver = _restore(tf, new)
    with sess:
        restored = _values(tf, graph, sess)
        assert saver.saver_def.version == tf.compat.v1.train.SaverDef.V2
    assert_same(restored["b"], values["b"], "b")
    assert_same(np.concatenate([restored["w/part_0"], restored["w/part_1"]]), values["w"], "w")


def test_legacy_graph_that_cannot_be_rewritten_exactly_gets_the_precise_note(tf, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    _legacy_graph(tf, old, shared_const=True)
    new = tmp_path / "new"
    err = _convert(tmp_path, "tf-ckpt", old, "--to", "tf-ckpt", "-o", new)
    assert ("note: left out the .meta graph" in err and "cannot be rewritten exactly: Const node "
            "'save/restore_slice_0/tensor_name' feeds save/restore_slice_0/debug_copy besides RestoreSlice" in err
            and "write tf-ckpt-v1 to keep the graph" in err), err
    assert sorted(os.listdir(new)) == ["checkpoint", "model.ckpt.data-00000-of-00001", "model.ckpt.index"]
    # as the note says: the V1 output keeps the graph, which restores it as it is
    v1_out = tmp_path / "v1"
    _convert(tmp_path, "tf-ckpt", old, "--to", "tf-ckpt-v1", "-o", v1_out)
    assert filecmp.cmp(v1_out / "model.ckpt.meta", old / "model.ckpt.meta", shallow=False)
    graph, sess, _ = _restore(tf, v1_out)
    with sess:
        assert sorted(_values(tf, graph, sess)) == ["b", "w/part_0", "w/part_1"]
