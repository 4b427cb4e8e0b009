"""Readable names for Keras 3 weight files, from the model's ``config.json``.

A Keras 3 ``.weights.h5`` stores each layer's variables as ``<path>/vars/0..N-1``, in the
order the layer's ``save_own_variables`` writes them (keras/src/layers/layer.py: trainable
then non-trainable variables), and names the groups after the layers' *classes*
(keras/src/saving/saving_lib.py ``_save_container_state``: ``to_snake_case(class name)``,
``_1``, ``_2``... for repeats, in ``model.layers`` order), not after the layers. The
variable names are not stored at all. So readable names need the config: walking the
model's ``config.layers`` in order and numbering the class names as Keras does gives each
group its layer (name, class, options); the class and its options (``use_bias``,
``center``, ``scale``...) give the variables' names, which this module knows for Keras's
built-in layers (:data:`_VARIABLES`); a class it does not know whose name ends with a known
one's (QKeras's ``QDense``) is named as that one when the count fits, with a note. Sublayers
are followed as Keras nests them: an RNN's ``cell`` (``lstm/lstm_cell/kernel``),
Bidirectional's ``forward_layer``/``backward_layer``, TimeDistributed's ``layer``,
MultiHeadAttention's ``query_dense``... (``query/kernel``), nested models' ``layers``.
A layer it cannot name keeps ``<layer name>/<index>`` names and is listed in a note. Checked
against Keras 3.15's ``variable.path`` and tf_keras 2.21's ``variable.name`` (tests/test_keras.py).

Optimizer variables (``optimizer/vars/N``) are named as Keras names them
(``adam/iteration``, ``adam/conv2d_kernel_momentum``) when the optimizer class is known,
from ``compile_config``, and its variables fit the model's trainable variables one for one in
count and shape; otherwise they keep their HDF5 paths.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field


def snake_case(name: str) -> str:
    """keras.src.utils.naming.to_snake_case."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _kernel_bias(c: dict) -> list[str]:
    return ["kernel"] + (["bias"] if c.get("use_bias", True) else [])


def _norm(c: dict) -> list[str]:
    return (["gamma"] if c.get("scale", True) else []) + (["beta"] if c.get("center", True) else [])


def _recurrent(c: dict) -> list[str]:
    return ["kernel", "recurrent_kernel"] + (["bias"] if c.get("use_bias", True) else [])


_VARIABLES: dict[str, Callable[[dict], list[str]]] = {
    **{k: _kernel_bias for k in ("Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
                                 "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D", "Convolution1D",
                                 "Convolution2D", "Convolution3D")},
    "EinsumDense": lambda c: ["kernel"] + (["bias"] if c.get("bias_axes") else []),
    "SeparableConv1D": lambda c: ["depthwise_kernel", "pointwise_kernel"] + (["bias"] if c.get("use_bias", True) else []),
    "SeparableConv2D": lambda c: ["depthwise_kernel", "pointwise_kernel"] + (["bias"] if c.get("use_bias", True) else []),
    "Embedding": lambda c: ["embeddings"],
    "BatchNormalization": lambda c: _norm(c) + ["moving_mean", "moving_variance"],
    "LayerNormalization": _norm,
    "GroupNormalization": _norm,
    "RMSNormalization": lambda c: ["scale"],
    "PReLU": lambda c: ["alpha"],
    "LSTMCell": _recurrent, "GRUCell": _recurrent, "SimpleRNNCell": _recurrent,
    "ConvLSTMCell": _recurrent,
}
_NON_TRAINABLE = {"moving_mean", "moving_variance"}
_MODELS = {"Functional", "Sequential", "Model"}
_RNN_CELLS = {"LSTM": "LSTMCell", "GRU": "GRUCell", "SimpleRNN": "SimpleRNNCell",
              "ConvLSTM1D": "ConvLSTMCell", "ConvLSTM2D": "ConvLSTMCell", "ConvLSTM3D": "ConvLSTMCell"}
# MultiHeadAttention's EinsumDense sublayers: attribute (the HDF5 group; Keras 3.15 says "query_dense",
# older ones may say "_query_dense": both are looked for)
# -> layer name, in the order Keras creates them
_ATTENTION = {"query_dense": "query", "key_dense": "key", "value_dense": "value", "output_dense": "attention_output"}


@dataclass
class Saveable:
    """A group of the weights file that holds a ``vars`` group (or has children that do)."""

    path: str  # "layers/lstm/cell" ("" for the model)
    name: str | None  # the 'name' attribute Keras 3.15 writes on the vars group (the layer's name); tf_keras writes none
    count: int  # datasets in its vars group


@dataclass
class Naming:
    names: dict[str, str] = field(default_factory=dict)
    """HDF5 dataset path (``layers/conv2d/vars/0``) -> readable name."""
    trainable: list[str] = field(default_factory=list)
    """Readable names of trainable variables, in the model's order (for the optimizer)."""
    unknown: list[str] = field(default_factory=list)
    """Layers whose variables could not be named."""
    by_base: list[str] = field(default_factory=list)
    """Layers of a class convert does not know named as the built-in class its name ends with
    (QKeras's ``QDense`` as ``Dense``), their variables' count fitting."""


def name_model(config: dict, saveables: dict[str, Saveable]) -> Naming:
    """Readable names of every variable of ``saveables`` (by path) from a model ``config``
    (the content of config.json: ``{"class_name": ..., "config": {...}}``)."""
    out = Naming()
    inner = config.get("config") if isinstance(config, dict) else None
    if not isinstance(inner, dict):
        return out
    _name_children(config, inner, "", [], saveables, out, True)
    return out


def _layer_list(inner: dict) -> list[dict]:
    layers = inner.get("layers")
    return [entry for entry in layers if isinstance(entry, dict)] if isinstance(layers, list) else []


def join(*parts: str) -> str:
    return "/".join(x for x in parts if x)


def _name_children(cfg: dict, inner: dict, path: str, prefix: list[str], saveables: dict[str, Saveable],
                   out: Naming, trainable: bool) -> None:
    """The sub-saveables of a layer or model at ``path``."""
    cls = str(cfg.get("class_name", ""))
    if cls in _MODELS or "layers" in inner:
        used: dict[str, int] = {}
        for entry in _layer_list(inner):
            sub = c if isinstance(c := entry.get("config"), dict) else {}
            base = snake_case(str(entry.get("class_name", "")))
            n = used.get(base)
            used[base] = 0 if n is None else n + 1
            group = base if n is None else f"{base}_{n + 1}"
            _name_layer(entry, sub, join(path, "layers", group), prefix, saveables, out, trainable)
        return
    if cls in _RNN_CELLS:  # the cell is named "lstm_cell" whatever the layer's name (the layer's options are its)
        cell = {k: v for k, v in inner.items() if k != "name"}
        _name_layer({"class_name": _RNN_CELLS[cls], "config": cell}, cell, join(path, "cell"), prefix, saveables,
                    out, trainable, default_name=f"{snake_case(cls)}_cell")
    elif cls == "Bidirectional":
        for attr, key, side in (("forward_layer", "layer", "forward"), ("backward_layer", "backward_layer", "backward")):
            wrapped = inner.get(key) or inner.get("layer")
            if isinstance(wrapped, dict):
                subc = c if isinstance(c := wrapped.get("config"), dict) else {}
                name = str(subc.get("name", attr))  # Keras 3 configs say "forward_gru", tf_keras's "gru"
                _name_layer(wrapped, {k: v for k, v in subc.items() if k != "name"}, join(path, attr), prefix, saveables,
                            out, trainable, default_name=name if name.startswith(side + "_") else f"{side}_{name}")
    elif cls in ("TimeDistributed", "Wrapper"):
        wrapped = inner.get("layer")
        if isinstance(wrapped, dict):
            subc = c if isinstance(c := wrapped.get("config"), dict) else {}
            _name_layer(wrapped, subc, join(path, "layer"), prefix, saveables, out, trainable)
    elif cls in ("MultiHeadAttention", "GroupedQueryAttention"):
        use_bias = inner.get("use_bias", True)
        for attr, default in _ATTENTION.items():
            if join(path, attr) not in saveables and join(path, "_" + attr) in saveables:
                attr = "_" + attr
            _name_layer({"class_name": "EinsumDense", "config": {"bias_axes": "x" if use_bias else None}},
                        {"bias_axes": "x" if use_bias else None}, join(path, attr), prefix, saveables, out,
                        trainable, default_name=default)


def _name_layer(cfg: dict, inner: dict, path: str, prefix: list[str], saveables: dict[str, Saveable], out: Naming,
                trainable: bool, default_name: str | None = None) -> None:
    here = saveables.get(path)
    stored = here.name if here is not None and here.name and "/" not in here.name else None
    name = stored or inner.get("name") or default_name \
        or path.rsplit("/", 1)[-1]
    name = str(name)
    trainable = trainable and inner.get("trainable", True) is not False
    chain = [*prefix, name]
    if here is not None and here.count:
        cls = str(cfg.get("class_name", ""))
        guess = _VARIABLES.get(cls)
        var_names = guess(inner) if guess is not None else None
        if guess is None:  # a subclass by its name (QDense, QConv2D, QBatchNormalization): if its count fits
            base = next((k for k in sorted(_VARIABLES, key=len, reverse=True) if cls.endswith(k)), None)
            var_names = _VARIABLES[base](inner) if base else None
            if var_names is not None and len(var_names) == here.count:
                out.by_base.append(f"{'/'.join(chain)} ({cls} as {base})")
        if var_names is None or len(var_names) != here.count:
            out.unknown.append("/".join(chain))
            var_names = [str(i) for i in range(here.count)]
        for i, var in enumerate(var_names):
            readable = "/".join([*chain, var])
            out.names[f"{path}/vars/{i}"] = readable
            if trainable and var not in _NON_TRAINABLE:
                out.trainable.append(readable)
    _name_children(cfg, inner, path, chain, saveables, out, trainable)


# Slot variables per trainable variable, in the order Keras's optimizers create them.
def _slots(cls: str, c: dict) -> list[str] | None:
    if cls in ("Adam", "AdamW"):
        return ["momentum", "velocity"] + (["velocity_hat"] if c.get("amsgrad") else [])
    if cls == "SGD":
        return ["momentum"] if c.get("momentum") else []
    if cls == "RMSprop":
        return ["velocity"] + (["momentum"] if c.get("momentum") else []) + \
            (["average_gradient"] if c.get("centered") else [])
    if cls == "Adagrad":
        return ["accumulator"]
    if cls == "Adamax":
        return ["momentum", "norm"]
    if cls == "Lion":
        return ["momentum"]
    return None


def name_optimizer(compile_config: object, shapes: list[tuple[int, ...]], scalars: list[bool],
                   trainable: list[str], trainable_shapes: dict[str, tuple[int, ...]]) -> list[str] | None:
    """Names of ``optimizer/vars/0..N-1`` (their shapes given), or None when they do not fit."""
    if not isinstance(compile_config, dict) or not isinstance(compile_config.get("optimizer"), dict):
        return None
    opt = compile_config["optimizer"]
    cls = str(opt.get("class_name", ""))
    c = opt.get("config") if isinstance(opt.get("config"), dict) else {}
    slots = _slots(cls, c)
    if slots is None:
        return None
    prefix = str(c.get("name") or snake_case(cls))
    head = ["iteration"] + (["learning_rate"] if isinstance(c.get("learning_rate"), (int, float)) else [])
    if len(shapes) != len(head) + len(slots) * len(trainable) or not all(scalars[:len(head)]):
        return None
    names = [f"{prefix}/{h}" for h in head]
    i = len(head)
    for var in trainable:
        for slot in slots:
            if shapes[i] != trainable_shapes.get(var):
                return None
            names.append(f"{prefix}/{var.replace('/', '_')}_{slot}")
            i += 1
    return names
