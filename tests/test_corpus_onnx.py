"""ONNX files by other producers: the corpus, the torch exporter, tf2onnx, onnx's own external-data writer.

Oracle: ``onnx.load(path)`` (which loads external data) and ``onnx.numpy_helper.to_array``
for every tensor, wherever it lives (initializers, Constant nodes, subgraphs).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from convert.formats import onnx as onnx_format
from convert.ir import FileRegion

from contract import same_values

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"  # ../shared/corpus beside the repository
CORPUS_ONNX = sorted(p for p in CORPUS.rglob("*.onnx")) if CORPUS.is_dir() else []


def onnx_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of the model as the onnx library decodes it: initializers and Constant values."""
    model = onnx.load(str(path))
    out: dict[str, np.ndarray] = {}

    def graph(g):
        for t in g.initializer:
            out[t.name] = numpy_helper.to_array(t)
        for node in g.node:
            for a in node.attribute:
                if node.op_type == "Constant" and a.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(a.t)
                elif node.op_type == "Constant" and a.name in ("value_ints", "value_floats"):
                    out[node.output[0]] = np.array(list(a.ints) or list(a.floats),
                                                   np.int64 if a.name == "value_ints" else np.float32)
                if a.HasField("g"):
                    graph(a.g)
                for sub in a.graphs:
                    graph(sub)
    graph(model.graph)
    return out


def assert_matches_onnx(path) -> dict:
    td = onnx_format.read(path)
    oracle = onnx_tensors(path)
    assert set(td) == set(oracle), set(td) ^ set(oracle)
    for name, value in oracle.items():
        ours = td[name].numpy()
        assert ours.dtype == value.dtype and ours.shape == value.shape, name
        assert same_values(ours, value), name
    return td


@pytest.mark.skipif(not CORPUS_ONNX, reason="shared corpus not present")
@pytest.mark.parametrize("path", CORPUS_ONNX, ids=lambda p: p.name)
def test_corpus_file_matches_onnx(path):
    assert onnx_format.detect(path)
    td = assert_matches_onnx(path)
    assert len(td) == 4
    assert td.metadata["onnx.producer"] == "pytorch" and td.metadata["onnx.opset"] == "17"
    external = {k for k, t in td.items() if t.attrs["origin"].startswith("external:")}
    # inline raw_data is located in the .onnx file itself, not loaded through protobuf
    assert all(isinstance(t.source, FileRegion) for t in td.values())
    if path.name == "model_inline.onnx":
        assert external == set()
    else:
        assert external == {"0.bias", "0.weight", "2.weight"}
        assert all(isinstance(td[k].source, FileRegion) for k in external)
        assert td["2.bias"].attrs["origin"] == "initializer"


@pytest.mark.skipif(not CORPUS_ONNX, reason="shared corpus not present")
def test_corpus_external_and_inline_models_hold_the_same_weights():
    folder = CORPUS / "keanulim+tensor-inference-engine@e9fc79a8c608"
    a = onnx_format.read(folder / "model.onnx")
    b = onnx_format.read(folder / "model_inline.onnx")
    for name in a:
        assert same_values(a[name].numpy(), b[name].numpy()), name


@pytest.fixture(scope="module")
def torch_exports(tmp_path_factory):
    torch = pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("torch_onnx")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8, 4)
            self.emb = torch.nn.Embedding(10, 8)

        def forward(self, x, ids):
            h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
            h = h + self.emb(ids).reshape(h.shape[0], -1, 8).sum(1)
            return self.fc(h).reshape(x.shape[0], 2, 2).half().float()

    torch.manual_seed(0)
    net = Net().eval()
    args = (torch.randn(2, 3, 8, 8), torch.tensor([[1, 2], [3, 4]]))
    folded = folder / "folded.onnx"  # BN folded into the conv; shape constants as Constant nodes
    torch.onnx.export(net, args, str(folded), dynamo=False)
    unfolded = folder / "unfolded.onnx"
    torch.onnx.export(net, args, str(unfolded), dynamo=False, do_constant_folding=False, opset_version=13)
    # onnx's own external-data writer, on the torch export
    external = folder / "external.onnx"
    onnx.save_model(onnx.load(str(folded)), str(external), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="external.weights", size_threshold=0)
    return net, folded, unfolded, external


def test_torch_exports_match_onnx(torch_exports):
    net, folded, unfolded, external = torch_exports
    td = assert_matches_onnx(unfolded)
    sd = net.state_dict()
    for name in ("conv.weight", "fc.weight", "emb.weight"):
        assert same_values(td[name].numpy(), sd[name].numpy()), name
    assert any(t.attrs["origin"] == "constant" for t in td.values())
    assert_matches_onnx(folded)
    td = assert_matches_onnx(external)
    assert {t.attrs["origin"] for t in td.values() if t.attrs["onnx.kind"] == "initializer"} == {
        "external:external.weights"}
    assert not any(os.path.basename(p).startswith("external.onnx.") for p in os.listdir(external.parent))


@pytest.mark.parametrize("which", ["folded", "unfolded", "external"])
def test_torch_exports_round_trip_through_safetensors_into_their_template(torch_exports, which, tmp_path):
    """Everything read (initializers and Constant-node values) goes to safetensors and back into the
    export as ``--template``: each value back in its place, and onnxruntime computes what it did."""
    import subprocess
    import sys

    ort = pytest.importorskip("onnxruntime")
    _, *models = torch_exports
    model = dict(zip(["folded", "unfolded", "external"], models, strict=True))[which]
    st, out = tmp_path / "w.safetensors", tmp_path / "back.onnx"
    for argv in (["auto", model, "--to", "safetensors", "-o", st],
                 ["auto", st, "--to", "onnx", "--template", model, "-o", out]):
        res = subprocess.run([sys.executable, "-m", "convert", *map(str, argv)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    before, after = onnx_tensors(model), onnx_tensors(out)
    assert set(after) == set(before) and any(t.op_type == "Constant" for t in onnx.load(str(out)).graph.node)
    for name, value in before.items():
        assert same_values(after[name], value), name
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32), "ids": np.array([[1, 2], [3, 4]])}
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (model, out)]
    names = [i.name for i in sessions[0].get_inputs()]
    feed = dict(zip(names, feed.values(), strict=True))
    expected, got = (s.run(None, feed) for s in sessions)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(g, e)


def test_tf2onnx_export_matches_onnx(tmp_path):
    tf = pytest.importorskip("tensorflow")
    tf2onnx = pytest.importorskip("tf2onnx")
    tf.random.set_seed(0)
    w = tf.Variable(tf.random.normal((4, 3)), name="dense_w")
    b = tf.Variable(tf.random.normal((3,)), name="dense_b")

    @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32, name="x")])
    def model(x):
        y = tf.nn.relu(tf.matmul(x, w) + b)
        return tf.cond(tf.reduce_sum(y) > 0, lambda: y * 2.0, lambda: y - 1.0)

    path = tmp_path / "tf.onnx"
    tf2onnx.convert.from_function(model, input_signature=model.input_signature, opset=17, output_path=str(path))
    # TensorFlow's own protobuf files are not taken for ONNX
    graph_def = model.get_concrete_function().graph.as_graph_def()
    tf.io.write_graph(graph_def, str(tmp_path), "graph.pb", as_text=False)
    assert not onnx_format.detect(tmp_path / "graph.pb")
    tf.saved_model.save(tf.Module(), str(tmp_path / "sm"))
    assert not onnx_format.detect(tmp_path / "sm" / "saved_model.pb")
    assert not any(onnx_format.detect(p) for p in (tmp_path / "sm").rglob("*"))
    td = assert_matches_onnx(path)
    assert td.metadata["onnx.producer"] == "tf2onnx"
    # tf.cond becomes an If whose branches hold their own initializers
    assert {t.attrs["origin"] for t in td.values()} >= {"subgraph:cond/then_branch", "subgraph:cond/else_branch"}
    values = [t.numpy() for t in td.values()]
    assert any(v.shape == (4, 3) and np.array_equal(v, w.numpy()) for v in values)
    assert any(v.shape == (3,) and np.array_equal(v, b.numpy()) for v in values)
