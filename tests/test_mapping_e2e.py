"""Proof by equal outputs: mapped weights make the other framework's model compute the same thing.

- The example MNIST CNN (TF1 graph mode, NHWC, trained with Adam, saved by tf.compat.v1.train.Saver)
  mapped with tf1-to-torch + drop-optimizer + mappings/examples/mnist-cnn-tf1-to-torch.yaml loads with
  load_state_dict(strict=True) into the same architecture in torch (NCHW, torch.flatten) and gives
  TF's logits on the same images; and a torch state_dict mapped with torch-to-tf1 +
  mappings/examples/mnist-cnn-torch-to-tf1.yaml, restored by Saver into the TF graph, gives torch's.
- A BERT-shaped checkpoint with Google's variable names, written by TensorFlow, mapped with
  bert-tf-to-hf, loads strictly into transformers' BertModel with every value where Hugging Face's
  own TF loader put it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import convert
from convert import mapping, registry, suggest
from convert.ir import TensorDict

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "mappings" / "examples"


# --------------------------------------------------------------------------- helpers

def read_tf_checkpoint(prefix: Path) -> TensorDict:
    """Our reader when the tf-ckpt adapter is registered; until then TensorFlow's (to develop the engine)."""
    if "tf-ckpt" in registry.names():
        return convert.read(prefix.parent)  # the folder Saver wrote (with its 'checkpoint' state file)
    else:
        import tensorflow as tf

        reader = tf.train.load_checkpoint(str(prefix))
        names = sorted(reader.get_variable_to_shape_map())
        return TensorDict.from_arrays({n: reader.get_tensor(n) for n in names})


def write_tf_checkpoint(td: TensorDict, prefix: Path) -> None:
    """TensorFlow itself writes the mapped values as a V2 checkpoint (SaveV2), so Saver can restore them."""
    import tensorflow as tf

    names = list(td)
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(td[n].numpy()) for n in names])


def as_state_dict(td: TensorDict):
    import torch

    return {k: torch.from_numpy(np.array(t.numpy())) for k, t in td.items()}


# --------------------------------------------------------------------------- the CNN

def build_tf_cnn():
    """The example CNN, built by examples/make_cnn.py's own build_graph: (graph, x, logits)."""
    import importlib.util

    import tensorflow as tf

    spec = importlib.util.spec_from_file_location("make_cnn", ROOT / "examples" / "make_cnn.py")
    make_cnn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_cnn)
    g = tf.Graph()
    with g.as_default():
        t = make_cnn.build_graph(tf)
    assert t["logits"].op.name == "fc2/add"
    return g, t["x"], t["logits"]


class TorchCNN:
    """Built lazily so torch is imported inside the test only."""

    @staticmethod
    def make():
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = nn.Conv2d(1, 8, 5, padding=2)
                self.conv2 = nn.Conv2d(8, 16, 5, padding=2)
                self.fc1 = nn.Linear(784, 64)
                self.fc2 = nn.Linear(64, 10)

            def forward(self, x):  # x: NCHW
                x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
                x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
                x = torch.flatten(x, 1)
                x = torch.dropout(torch.relu(self.fc1(x)), 0.5, self.training)
                return self.fc2(x)

        return Net()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(3).random((16, 28, 28, 1), dtype=np.float32)


@pytest.fixture(scope="module", params=["model1", "model1_v1"])
def tf_cnn(request, images):
    """The example checkpoint (V2, and the same training saved as V1) and TF's logits on ``images``."""
    import tensorflow as tf

    folder = ROOT / "examples" / request.param
    prefix = Path(tf.train.latest_checkpoint(str(folder)))
    g, x, logits = build_tf_cnn()
    with g.as_default():
        saver = tf.compat.v1.train.Saver()
    with tf.compat.v1.Session(graph=g) as sess:
        saver.restore(sess, str(prefix))
        out = sess.run(logits, {x: images})
    return prefix, out


def test_cnn_tf_to_torch_same_logits(tf_cnn, images):
    import torch

    prefix, tf_logits = tf_cnn
    td = read_tf_checkpoint(prefix)
    assert "conv1/w/Adam" in td and "beta1_power" in td  # the optimizer state is really there
    rule_sets = [mapping.load("tf1-to-torch"), mapping.load("drop-optimizer"),
                 mapping.load(EXAMPLES / "mnist-cnn-tf1-to-torch.yaml")]
    mapped, report = mapping.apply(td, rule_sets)
    assert mapped["conv1.bias"].source is td["conv1/b"].source  # a rename reads nothing, copies nothing
    fc1 = next(r for r in report.rows if r.target == "fc1.weight")
    assert fc1.sources == ("fc1/w",)
    assert fc1.transforms == ("transpose[1,0]", "reshape[64,7,7,16]", "transpose[0,3,1,2]", "reshape[64,784]")

    net = TorchCNN.make().eval()
    net.load_state_dict(as_state_dict(mapped), strict=True)
    with torch.no_grad():
        torch_logits = net(torch.from_numpy(np.transpose(images, (0, 3, 1, 2)).copy())).numpy()
    np.testing.assert_allclose(torch_logits, tf_logits, atol=1e-5, rtol=0)
    assert np.abs(tf_logits).max() > 0.1  # not trivially equal


def test_cnn_cli_diff_after_mapping(tf_cnn, tmp_path, capsys):
    """`convert diff` (our tf-ckpt reader, mapped) against the state_dict torch itself saved."""
    import torch

    from convert.cli import main

    if "tf-ckpt" not in registry.names():
        pytest.skip("the tf-ckpt reader is not registered yet")
    prefix, _ = tf_cnn
    maps = ["tf1-to-torch", "drop-optimizer", str(EXAMPLES / "mnist-cnn-tf1-to-torch.yaml")]
    mapped, _ = mapping.apply(read_tf_checkpoint(prefix), [mapping.load(m) for m in maps])
    net = TorchCNN.make()
    net.load_state_dict(as_state_dict(mapped), strict=True)
    pt = tmp_path / "cnn.pt"
    torch.save(net.state_dict(), pt)
    args = ["diff", str(prefix.parent), str(pt)] + [x for m in maps for x in ("--map", m)]
    assert main(args) == 0, capsys.readouterr()
    assert main(args[:-2]) == 1  # without the flatten fix fc1.weight differs
    assert "fc1.weight" in capsys.readouterr().out


def test_cnn_plain_transpose_of_fc1_is_not_enough(tf_cnn, images):
    """The reshape-transpose-reshape is needed: without the example file the logits differ."""
    import torch

    prefix, tf_logits = tf_cnn
    mapped, _ = mapping.apply(read_tf_checkpoint(prefix), [mapping.load("tf1-to-torch"), mapping.load("drop-optimizer")])
    net = TorchCNN.make().eval()
    net.load_state_dict(as_state_dict(mapped), strict=True)
    with torch.no_grad():
        torch_logits = net(torch.from_numpy(np.transpose(images, (0, 3, 1, 2)).copy())).numpy()
    assert np.abs(torch_logits - tf_logits).max() > 1e-3


def test_cnn_torch_to_tf_same_logits(tmp_path, images):
    import tensorflow as tf
    import torch

    torch.manual_seed(5)
    net = TorchCNN.make().eval()
    with torch.no_grad():
        want = net(torch.from_numpy(np.transpose(images, (0, 3, 1, 2)).copy())).numpy()
    pt = tmp_path / "cnn.pt"
    torch.save(net.state_dict(), pt)
    td = convert.read(pt)
    mapped, report = mapping.apply(td, [mapping.load("torch-to-tf1"),
                                        mapping.load(EXAMPLES / "mnist-cnn-torch-to-tf1.yaml")])
    assert sorted(mapped) == ["conv1/b", "conv1/w", "conv2/b", "conv2/w", "fc1/b", "fc1/w", "fc2/b", "fc2/w"]
    prefixes = [tmp_path / "from_torch.ckpt"]
    write_tf_checkpoint(mapped, prefixes[0])  # TensorFlow writes the mapped values
    if "tf-ckpt" in registry.names():  # and so does our writer
        convert.write(mapped, tmp_path / "ours", "tf-ckpt")
        prefixes.append(Path(tf.train.latest_checkpoint(str(tmp_path / "ours"))))

    g, x, logits = build_tf_cnn()
    with g.as_default():
        model_vars = [v for v in tf.compat.v1.global_variables() if re.fullmatch(r"(conv|fc)\d/[wb]:0", v.name)]
        saver = tf.compat.v1.train.Saver(var_list=model_vars)
    assert len(model_vars) == 8
    for prefix in prefixes:
        with tf.compat.v1.Session(graph=g) as sess:
            saver.restore(sess, str(prefix))
            got = sess.run(logits, {x: images})
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=str(prefix))


# --------------------------------------------------------------------------- BERT

BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, type_vocab_size=2)


def google_bert_variables() -> dict[str, tuple[int, ...]]:
    """Google's original BERT variable names (google-research/bert modeling.py) and shapes."""
    h, i, v = BERT["hidden_size"], BERT["intermediate_size"], BERT["vocab_size"]
    names = {"bert/embeddings/word_embeddings": (v, h),
             "bert/embeddings/token_type_embeddings": (BERT["type_vocab_size"], h),
             "bert/embeddings/position_embeddings": (BERT["max_position_embeddings"], h),
             "bert/embeddings/LayerNorm/gamma": (h,), "bert/embeddings/LayerNorm/beta": (h,)}
    for n in range(BERT["num_hidden_layers"]):
        p = f"bert/encoder/layer_{n}"
        for part in ("query", "key", "value"):
            names[f"{p}/attention/self/{part}/kernel"] = (h, h)
            names[f"{p}/attention/self/{part}/bias"] = (h,)
        names |= {f"{p}/attention/output/dense/kernel": (h, h), f"{p}/attention/output/dense/bias": (h,),
                  f"{p}/attention/output/LayerNorm/gamma": (h,), f"{p}/attention/output/LayerNorm/beta": (h,),
                  f"{p}/intermediate/dense/kernel": (h, i), f"{p}/intermediate/dense/bias": (i,),
                  f"{p}/output/dense/kernel": (i, h), f"{p}/output/dense/bias": (h,),
                  f"{p}/output/LayerNorm/gamma": (h,), f"{p}/output/LayerNorm/beta": (h,)}
    names |= {"bert/pooler/dense/kernel": (h, h), "bert/pooler/dense/bias": (h,),
              "cls/predictions/transform/dense/kernel": (h, h), "cls/predictions/transform/dense/bias": (h,),
              "cls/predictions/transform/LayerNorm/gamma": (h,), "cls/predictions/transform/LayerNorm/beta": (h,),
              "cls/predictions/output_bias": (v,), "cls/seq_relationship/output_weights": (2, h),
              "cls/seq_relationship/output_bias": (2,)}
    return names


@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory):
    import tensorflow as tf

    v1 = tf.compat.v1
    g = tf.Graph()
    with g.as_default():
        v1.set_random_seed(2)
        for name, shape in google_bert_variables().items():
            v1.get_variable(name, shape, initializer=v1.random_normal_initializer(stddev=0.5))
            if name.endswith("kernel") or name.endswith("embeddings"):  # AdamWeightDecayOptimizer's slots
                v1.get_variable(name + "/adam_m", shape, initializer=v1.zeros_initializer())
                v1.get_variable(name + "/adam_v", shape, initializer=v1.zeros_initializer())
        v1.train.get_or_create_global_step()
        prefix = tmp_path_factory.mktemp("bert") / "bert_model.ckpt"
        with v1.Session(graph=g) as sess:
            sess.run(v1.global_variables_initializer())
            path = v1.train.Saver().save(sess, str(prefix))
    return Path(path)


def hf_tf_loader_placement(model, tf_name: str, array: np.ndarray):
    """Where Hugging Face's load_tf_weights_in_bert (transformers 4.x) put a TF variable, and the value.

    Re-stated from that function: split the name on '/', walk the module by attribute
    ('layer_N' -> .layer[N]; kernel/gamma -> weight; beta/output_bias -> bias), take
    '.weight' of '*_embeddings', and transpose 'kernel'. Returns None for what it skipped.
    """
    parts = tf_name.split("/")
    if any(p in ("adam_v", "adam_m", "AdamWeightDecayOptimizer", "AdamWeightDecayOptimizer_1", "global_step")
           for p in parts) or parts[0] == "cls":
        return None
    assert parts[0] == "bert"  # BertModel is the 'bert' part of the pre-training model
    pointer = model
    for p in parts[1:]:
        m = re.fullmatch(r"([A-Za-z]+)_(\d+)", p)
        if m:
            pointer = getattr(pointer, m.group(1))[int(m.group(2))]
        elif p in ("kernel", "gamma"):
            pointer = pointer.weight
        elif p in ("output_bias", "beta"):
            pointer = pointer.bias
        else:
            pointer = getattr(pointer, p)
    if parts[-1].endswith("_embeddings"):
        pointer = pointer.weight
    if parts[-1] == "kernel":
        array = np.transpose(array)
    return pointer, array


def test_bert_tf_to_hf_loads_strictly_where_hf_put_it(bert_checkpoint):
    import tensorflow as tf
    import torch
    from transformers import BertConfig, BertModel

    td = read_tf_checkpoint(bert_checkpoint)
    mapped, report = mapping.apply(td, [mapping.load("bert-tf-to-hf")])
    model = BertModel(BertConfig(**BERT))
    model.load_state_dict(as_state_dict(mapped), strict=True)
    assert {n for d in report.dropped for n in d.sources} >= {"global_step", "cls/predictions/output_bias"}

    reader = tf.train.load_checkpoint(str(bert_checkpoint))  # TensorFlow's values, not ours
    checked = 0
    for name in reader.get_variable_to_shape_map():
        placed = hf_tf_loader_placement(model, name, reader.get_tensor(name))
        if placed is None:
            continue
        param, want = placed
        assert tuple(param.shape) == want.shape, name
        np.testing.assert_array_equal(param.detach().numpy(), want, err_msg=name)
        checked += 1
    assert checked == len(model.state_dict()) == 39
    with torch.no_grad():  # and the model runs on them
        out = model(torch.tensor([[1, 5, 7, 2]])).last_hidden_state
    assert out.shape == (1, 4, 32) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- optimizers and moving averages

OPTIMIZERS = {
    "Momentum": lambda v1: v1.train.MomentumOptimizer(0.1, 0.9), "RMSProp": lambda v1: v1.train.RMSPropOptimizer(0.1),
    "Adagrad": lambda v1: v1.train.AdagradOptimizer(0.1), "Adadelta": lambda v1: v1.train.AdadeltaOptimizer(1.0),
    "Ftrl": lambda v1: v1.train.FtrlOptimizer(0.1), "Adam": lambda v1: v1.train.AdamOptimizer(0.1)}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_drop_optimizer_and_ema_as_weights_on_tf_checkpoints(tmp_path, optimizer):
    """Real TF1 optimizer slots are dropped by name, and EMA shadows land where TF's own
    ExponentialMovingAverage.variables_to_restore() puts them."""
    import tensorflow as tf

    v1 = tf.compat.v1
    g = tf.Graph()
    with g.as_default():
        v1.set_random_seed(4)
        w = v1.get_variable("layer/w", [3, 2])
        b = v1.get_variable("layer/b", [2])
        loss = tf.reduce_sum(tf.square(tf.matmul(tf.ones([1, 3]), w) + b))
        train = OPTIMIZERS[optimizer](v1).minimize(loss, global_step=v1.train.get_or_create_global_step())
        ema = v1.train.ExponentialMovingAverage(0.5)
        with tf.control_dependencies([train]):
            step = ema.apply([w, b])
        with v1.Session(graph=g) as sess:
            sess.run(v1.global_variables_initializer())
            for _ in range(3):
                sess.run(step)
            prefix = v1.train.Saver().save(sess, str(tmp_path / "m"))
        restore_ema = v1.train.Saver(ema.variables_to_restore())
        with v1.Session(graph=g) as sess:
            restore_ema.restore(sess, prefix)
            want = dict(zip(("layer/w", "layer/b"), sess.run([w, b]), strict=True))

    reader = tf.train.load_checkpoint(prefix)
    by_name_only = TensorDict.from_arrays({n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()})
    assert any(n.endswith(optimizer) for n in by_name_only)
    for td in (by_name_only, read_tf_checkpoint(Path(prefix))):  # by the names alone, and as our reader gives it
        mapped, _ = mapping.apply(td, [mapping.load("drop-optimizer"), mapping.load("ema-as-weights")])
        assert sorted(mapped) == ["layer/b", "layer/w"]
        for name, value in want.items():
            np.testing.assert_array_equal(mapped[name].numpy(), value)
        assert not np.array_equal(want["layer/w"], reader.get_tensor("layer/w"))  # the shadows, not the raw


def test_suggest_on_the_cnn_finds_every_pair(tf_cnn):
    """`map suggest` from the TF checkpoint to the torch module's state_dict: right names and shapes
    (the flatten order it cannot see: that is what the example file is for)."""
    prefix, _ = tf_cnn
    net = TorchCNN.make()
    b = TensorDict.from_arrays({k: v.detach().numpy() for k, v in net.state_dict().items()})
    text, ambiguities = suggest.suggest(read_tf_checkpoint(prefix), b)
    assert ambiguities == []
    mapped, _ = mapping.apply(read_tf_checkpoint(prefix), [mapping.loads(text, "suggested.yaml")])
    assert list(mapped) != [] and sorted(mapped) == sorted(b)
    assert all(mapped[n].shape == b[n].shape for n in b)
    np.testing.assert_array_equal(mapped["conv2.weight"].numpy(),
                                  np.transpose(read_tf_checkpoint(prefix)["conv2/w"].numpy(), (3, 2, 0, 1)))


# --------------------------------------------------------------------------- Keras

def test_keras_to_torch_same_outputs(tmp_path):
    """A Keras 3 model (Conv2D, BatchNormalization, DepthwiseConv2D, SeparableConv2D, Dense) mapped with
    keras-to-torch gives the same outputs as the same network built from torch.nn modules."""
    import keras
    import tensorflow as tf
    import torch
    from torch import nn

    keras.utils.set_random_seed(6)
    model = keras.Sequential([
        keras.Input((10, 10, 3)), keras.layers.Conv2D(4, 3, name="conv"), keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(), keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="depthwise"),
        keras.layers.SeparableConv2D(5, 3, depth_multiplier=2, name="sep"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(6, name="fc")], name="net")
    bn = model.get_layer("bn")
    rng = np.random.default_rng(8)
    bn.moving_mean.assign(rng.standard_normal(4).astype(np.float32))
    bn.moving_variance.assign(rng.random(4).astype(np.float32) + 0.5)
    for layer in ("depthwise", "sep", "fc"):  # Keras starts biases at zero: make them count
        model.get_layer(layer).bias.assign(rng.standard_normal(model.get_layer(layer).bias.shape).astype(np.float32))
    x = rng.random((4, 10, 10, 3), dtype=np.float32)
    want = np.asarray(model(x, training=False))

    # The names as Keras itself gives them, and (when the reader offers readable names) as read back.
    inputs = [TensorDict.from_arrays({v.path if v.path.startswith("net/") else f"net/{v.path}": v.numpy()
                                      for v in model.weights})]
    tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    read = read_tf_checkpoint(tmp_path / "ckpt")
    if "net/conv/kernel" in read:
        inputs.append(read)
    assert sorted(inputs[0]) == sorted(["net/conv/kernel", "net/conv/bias", "net/bn/gamma", "net/bn/beta",
                                        "net/bn/moving_mean", "net/bn/moving_variance", "net/depthwise/kernel",
                                        "net/depthwise/bias", "net/sep/depthwise_kernel", "net/sep/pointwise_kernel",
                                        "net/sep/bias", "net/fc/kernel", "net/fc/bias"])

    class Separable(nn.Module):
        def __init__(self):
            super().__init__()
            self.depthwise = nn.Conv2d(8, 16, 3, groups=8, bias=False)
            self.pointwise = nn.Conv2d(16, 5, 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.ModuleDict({"conv": nn.Conv2d(3, 4, 3), "bn": nn.BatchNorm2d(4, eps=1e-3),
                                      "depthwise": nn.Conv2d(4, 8, 3, groups=4), "sep": Separable(),
                                      "fc": nn.Linear(5, 6)})

        def forward(self, x):
            n = self.net
            x = n["depthwise"](torch.relu(n["bn"](n["conv"](x))))
            x = n["sep"].pointwise(n["sep"].depthwise(x))
            return n["fc"](x.mean(dim=(2, 3)))

    for td in inputs:
        mapped, _ = mapping.apply(td, [mapping.load("keras-to-torch"), mapping.load("drop-optimizer")])
        net = Net().eval()
        # strict: torch's BatchNorm fills in its num_batches_tracked counter when a state_dict lacks it
        net.load_state_dict(as_state_dict(mapped), strict=True)
        with torch.no_grad():
            got = net(torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy())).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
