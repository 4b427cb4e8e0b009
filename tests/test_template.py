"""convert.template: resolving tensors against a template's variables (one engine, two writers).

The engine alone on hand-made TensorDicts (what it decides is a pure function of names, dtypes,
shapes and roles); then through its writers with the frameworks as oracles: a TF1 graph built
by TensorFlow with hand-named variables (``weights``, ``biases``, ``scale``, ``offset``, ``mean``,
``variance``, ``W_0``...) gets a torch module's weights with ``--template`` in a process that
cannot import TensorFlow, and TensorFlow's output equals torch's; an ONNX model exported by torch
gets renamed weights, and onnxruntime's output equals torch's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import convert
from convert.cli import main
from convert.errors import WriteError
from convert.ir import Tensor, TensorDict
from convert.template import resolve

from tf_helpers import run_without_tensorflow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _td(specs: dict[str, tuple], roles: dict[str, str] | None = None, seed: int = 0) -> TensorDict:
    """name -> shape (float32, random values) or (shape, dtype)."""
    rng = np.random.default_rng(seed)
    out = []
    for name, spec in specs.items():
        shape, dtype = (spec, np.float32) if not spec or isinstance(spec[0], int) else spec
        arr = rng.standard_normal(shape).astype(dtype)
        out.append(Tensor.from_array(name, arr, {"role": (roles or {}).get(name, "weight")}))
    return TensorDict(out)


TEMPLATE = _td({"conv1/w": (5, 5, 1, 8), "conv1/b": (8,), "conv1/w/Adam": (5, 5, 1, 8), "bn/gamma": (8,),
                "bn/beta": (8,), "bn/moving_mean": (8,), "bn/moving_variance": (8,), "head/W_0": (8, 3),
                "head/b_0": (3,), "global_step": ((), np.int64)},
               roles={"conv1/w/Adam": "optimizer", "global_step": "step"}, seed=1)


def test_exact_then_convention_then_shape_in_scope():
    src = _td({"conv1/kernel": (5, 5, 1, 8), "conv1/bias": (8,), "bn/scale": (8,), "bn/offset": (8,),
               "bn/mean": (8,), "bn/variance": (8,), "head/dense_kernel": (8, 3), "head/dense_bias": (3,)})
    out, res = resolve(src, TEMPLATE, template_name="tmpl")
    how = {m.target: (m.source, m.how) for m in res.matches}
    assert how == {"conv1/w": ("conv1/kernel", "convention"), "conv1/b": ("conv1/bias", "convention"),
                   "bn/gamma": ("bn/scale", "convention"), "bn/beta": ("bn/offset", "convention"),
                   "bn/moving_mean": ("bn/mean", "convention"), "bn/moving_variance": ("bn/variance", "convention"),
                   "head/W_0": ("head/dense_kernel", "shape"), "head/b_0": ("head/dense_bias", "shape")}
    assert list(out) == [n for n in TEMPLATE if n in how]  # template order
    assert res.unfilled == ("conv1/w/Adam", "global_step") and res.filled == ()
    # renamed only: the same data source, so a byte copy stays a byte copy
    assert out["conv1/w"].source is src["conv1/kernel"].source
    assert out["conv1/w"].numpy().tobytes() == src["conv1/kernel"].numpy().tobytes()
    # exact names win; --template-fill takes the template's own values
    exact = src.replace([t.renamed("conv1/w") if t.name == "conv1/kernel" else t for t in src.values()])
    out, res = resolve(exact, TEMPLATE, fill=True)
    assert ("conv1/kernel", "conv1/w", "exact") not in [(m.source, m.target, m.how) for m in res.matches]
    assert [m.how for m in res.matches if m.target == "conv1/w"] == ["exact"]
    assert res.filled == ("conv1/w/Adam", "global_step")
    assert out["global_step"].numpy() == TEMPLATE["global_step"].numpy()
    assert "--template-fill" in " ".join(res.notes) and "conv1/bias -> conv1/b" in " ".join(res.notes)


def test_optimizer_slots_follow_their_variable_by_convention():
    tmpl = _td({"fc/w": (4, 2), "fc/w/Adam": (4, 2), "fc/w/Adam_1": (4, 2)}, {"fc/w/Adam": "optimizer", "fc/w/Adam_1": "optimizer"})
    src = _td({"fc/kernel": (4, 2), "fc/kernel/Adam": (4, 2), "fc/kernel/Adam_1": (4, 2)},
              {"fc/kernel/Adam": "optimizer", "fc/kernel/Adam_1": "optimizer"})
    _, res = resolve(src, tmpl)
    assert [(m.source, m.target) for m in res.matches] == [
        ("fc/kernel", "fc/w"), ("fc/kernel/Adam", "fc/w/Adam"), ("fc/kernel/Adam_1", "fc/w/Adam_1")]


def test_every_problem_in_one_error():
    src = _td({"conv1/kernel": (5, 5, 8, 1),                      # convention match, wrong shape
               "bn/scale": (8,), "bn/gamma_2": (8,),               # gamma by convention; then 1 of 2 by shape
               "head/a": (8, 3), "head/c": (8, 3),                 # two of the same shape: ambiguous
               "bn/moving_mean": ((8,), np.float64),               # exact name, wrong dtype
               "stray/x": (2,)})                                   # nothing like it
    with pytest.raises(WriteError) as e:
        resolve(src, TEMPLATE, path="out/", template_name="tmpl/")
    msg = str(e.value)
    assert msg.startswith("out/: tensors do not fit template tmpl/ (7 problems; ")
    for needle in ("'conv1/kernel' (as 'conv1/w', by convention) is float32 [5, 5, 8, 1], the template wants "
                   "float32 [5, 5, 1, 8]",
                   "missing 'conv1/b' (float32 [8])",
                   "ambiguous: 'bn/gamma_2' (source) and 'bn/beta', 'bn/moving_variance' (template) have the same "
                   "scope, dtype and shape",
                   "ambiguous: 'head/a', 'head/c' (source) and 'head/W_0' (template)",
                   "'bn/moving_mean' is float64 [8], the template wants float32 [8]",
                   "missing 'head/b_0' (float32 [3])",
                   "extra 'stray/x' (float32 [2]) is not in the template"):
        assert needle in msg, needle
    assert "conv1/w/Adam" not in msg and "global_step" not in msg  # optional: listed, not errors
    # the same variable twice by convention is ambiguous, never a guess
    with pytest.raises(WriteError, match=r"ambiguous: 'conv1/kernel', 'conv1/weights' \(source\) and 'conv1/w' "):
        resolve(_td({"conv1/kernel": (5, 5, 1, 8), "conv1/weights": (5, 5, 1, 8)}), _td({"conv1/w": (5, 5, 1, 8)}))


def test_a_weight_never_fills_a_slot_by_shape():
    tmpl = _td({"s/v": (3,), "s/m": (3,)}, {"s/m": "optimizer"})
    _, res = resolve(_td({"s/v": (3,)}), tmpl)
    assert res.unfilled == ("s/m",)
    with pytest.raises(WriteError, match="extra 's/q'"):
        resolve(_td({"s/v": (3,), "s/q": (3,)}), tmpl)


# ------------------------------------------------------------------ tf-ckpt writer, TensorFlow as the oracle

@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def tf_template(tf, tmp_path_factory):
    """A TF1 graph with hand-named variables: conv (weights/biases, NHWC), batch norm by hand
    (scale/offset/mean/variance, eps 1e-5), a dense head (W_0/b_0); saved by a V2 Saver with its
    .meta, and exported as a TF1 SavedModel. Returns (folder, SavedModel dir)."""
    v1 = tf.compat.v1
    root = tmp_path_factory.mktemp("tf_template")
    rng = np.random.default_rng(4)
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, 6, 6, 2], name="x")

        def var(name, shape):
            return v1.get_variable(name, initializer=rng.standard_normal(shape).astype(np.float32), use_resource=False)
        with v1.variable_scope("conv"):
            h = tf.nn.conv2d(x, var("weights", [3, 3, 2, 4]), 1, "VALID") + var("biases", [4])
        with v1.variable_scope("bn"):
            mean, variance = var("mean", [4]), tf.abs(var("variance", [4]))
            h = tf.nn.batch_normalization(h, mean, variance, var("offset", [4]), var("scale", [4]), 1e-5)
        h = tf.reshape(tf.nn.relu(h), [-1, 4 * 4 * 4])
        with v1.variable_scope("head"):
            tf.add(tf.matmul(h, var("W_0", [64, 3])), var("b_0", [3]), name="out")
        saver = v1.train.Saver()
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            saver.save(sess, str(root / "ckpt" / "model"))
            builder = v1.saved_model.Builder(str(root / "sm"))
            builder.add_meta_graph_and_variables(sess, [v1.saved_model.tag_constants.SERVING])
            builder.save()
    return root / "ckpt", root / "sm"


def _torch_net():
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)
            self.head = torch.nn.Linear(64, 3)

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x)))
            return self.head(torch.flatten(h.permute(0, 2, 3, 1), 1))

    torch.manual_seed(4)
    net = Net()
    with torch.no_grad():  # running statistics that are not the initial 0 / 1
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-1, 1)
    return torch, net.eval()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "prefix", "meta-only", "saved-model"])
def test_torch_weights_into_a_hand_named_tf_graph(tf, tf_template, tmp_path, kind):
    folder, saved_model = tf_template
    template = {"folder": folder, "prefix": folder / "model", "saved-model": saved_model}.get(kind)
    if kind == "meta-only":
        (tmp_path / "graph").mkdir()
        template = tmp_path / "graph" / "model.meta"
        template.write_bytes((folder / "model.meta").read_bytes())
    torch, net = _torch_net()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    images = np.random.default_rng(5).standard_normal((3, 6, 6, 2)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()

    # the plan, in a process without TensorFlow: every name's resolution, nothing written
    res = run_without_tensorflow(["map", tmp_path / "net.pt", "--map", "torch-to-tf1", "--template", template,
                                  "--json"], tmp_path)
    assert res.returncode == 0, res.stderr
    how = {m["target"]: (m["source"], m["how"]) for m in json.loads(res.stdout)["template"]["matches"]}
    assert how == {"conv/weights": ("conv/kernel", "convention"), "conv/biases": ("conv/bias", "convention"),
                   "bn/scale": ("bn/gamma", "convention"), "bn/offset": ("bn/beta", "convention"),
                   "bn/mean": ("bn/moving_mean", "convention"), "bn/variance": ("bn/moving_variance", "convention"),
                   "head/W_0": ("head/kernel", "shape"), "head/b_0": ("head/bias", "shape")}
    assert sorted(os.listdir(tmp_path)) == sorted(["net.pt", "no-tensorflow-site", *(["graph"] if kind == "meta-only" else [])])

    out = tmp_path / "out"
    res = run_without_tensorflow(["torch", tmp_path / "net.pt", "--to", "tf-ckpt", "--map", "torch-to-tf1",
                                  "--template", template, "-o", out, "--json"], tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)["outputs"][0]
    assert summary["verified"] and summary["tensors"] == 8 and len(summary["template"]["matches"]) == 8
    assert "model.ckpt.meta" in os.listdir(out)
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default(), v1.Session(graph=graph) as sess:
        saver = v1.train.import_meta_graph(str(out / "model.ckpt.meta"))
        saver.restore(sess, tf.train.latest_checkpoint(str(out)))
        got = sess.run("head/out:0", {"x:0": images})
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_mismatch_through_the_cli_is_one_line_and_writes_nothing(tmp_path):
    torch, net = _torch_net()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    out = tmp_path / "out"
    # without torch-to-tf1 the torch layouts and names do not fit the seed CNN's graph
    res = run_without_tensorflow(["torch", tmp_path / "net.pt", "--to", "tf-ckpt", "--template",
                                  EXAMPLES / "model1", "-o", out], tmp_path)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "tensors do not fit template" in res.stderr and "missing 'conv1/w' (float32 [5, 5, 1, 8])" in res.stderr
    assert "extra 'conv.weight' (float32 [4, 2, 3, 3])" in res.stderr
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["net.pt", "no-tensorflow-site"]
    res = run_without_tensorflow(["torch", tmp_path / "net.pt", "--to", "tf-ckpt", "--template-fill", "-o", out],
                                 tmp_path)
    assert res.returncode == 2 and "--template-fill needs --template" in res.stderr


# ------------------------------------------------------------------ onnx writer, onnxruntime as the oracle

def test_onnx_template_uses_the_same_engine(tmp_path):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4 * 6 * 6, 5)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    template = tmp_path / "t.onnx"
    torch.onnx.export(net, (x,), str(template), dynamo=False, input_names=["x"], output_names=["y"])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5 * torch.randn_like(p))
        want = net(x).numpy()
    # other names: 'conv.w' only by shape in scope 'conv', 'conv.b' by convention (b = bias)
    renamed = {"conv.weight": "conv.w", "conv.bias": "conv.b", "fc.weight": "fc.weight", "fc.bias": "fc.biases"}
    td = TensorDict.from_arrays({renamed[k]: v.detach().numpy() for k, v in net.state_dict().items()})
    summary = convert.write(td, tmp_path / "new.onnx", "onnx", template=str(template))
    assert summary["verified"]
    assert {(m["source"], m["target"], m["how"]) for m in summary["template"]["matches"]} == {
        ("conv.w", "conv.weight", "shape"), ("conv.b", "conv.bias", "convention"),
        ("fc.weight", "fc.weight", "exact"), ("fc.biases", "fc.bias", "convention")}
    got = ort.InferenceSession(str(tmp_path / "new.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the plan names the same engine's decisions; ONNX has no optional initializers to fill
    assert main(["map", str(tmp_path / "new.onnx"), "--template", str(template), "--template-fill", "-q"]) == 2
