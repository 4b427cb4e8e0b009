"""The role of a checkpoint tensor (weight, optimizer slot, step, other) from the name TF's savers
give it, and TF2 object graphs' readable names (:func:`named`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from ...ir import Tensor
from . import objects

# TF1 optimizers (tf.compat.v1.train.*Optimizer) name a variable's slots after the optimizer:
# "w/Adam", "w/Adam_1", "w/Momentum", "w/RMSProp_1", "w/Ftrl_1"..., plus Adam's "beta1_power".
_SLOT_RE = re.compile(
    r"/(Adam|Adam_1|Momentum|RMSProp|RMSProp_1|Adagrad|AdagradDA|AdagradDA_1|Adadelta|Adadelta_1"
    r"|Ftrl|Ftrl_1|ProximalAdagrad|Nadam|Nadam_1|Adamax|Adamax_1|LazyAdam|LazyAdam_1|AdamW|AdamW_1)(_\d+)?$")
_POWER_RE = re.compile(r"(^|/)beta[12]_power(_\d+)?$")
# Keras optimizers (tf.keras / tf_keras in TF1 graph mode, e.g. inside an Estimator) put their slots
# and hyper-parameters in the optimizer's own scope, "training/" first when compile() made it:
# "training/Adagrad/dense/kernel/accumulator", "training/Ftrl/dense/kernel/linear", "Adam/iter".
_KERAS_SCOPE_RE = re.compile(
    r"^(training(_\d+)?/)?(Adadelta|Adafactor|Adagrad|Adam|Adamax|AdamW|Ftrl|Lamb|LAMB|Lion|Nadam|RMSprop|SGD"
    r"|LossScaleOptimizer)(_\d+)?/")
# BERT's AdamWeightDecayOptimizer (and the LAMB of its successors): "bert/.../kernel/adam_m".
_BERT_SLOT_RE = re.compile(r"/(adam|lamb)_[mv]$")
# one search per name (50,000 names in a checkpoint), TF2's slot and optimizer keys included
_OPTIMIZER_RE = re.compile("|".join(f"(?:{r.pattern})" for r in (_SLOT_RE, _POWER_RE, _KERAS_SCOPE_RE, _BERT_SLOT_RE))
                           + r"|\.OPTIMIZER_SLOT|^optimizer/")
_STEP_NAMES = {"global_step", "global_step/.ATTRIBUTES/VARIABLE_VALUE", "step/.ATTRIBUTES/VARIABLE_VALUE"}
_OTHER_NAMES = {"_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter/.ATTRIBUTES/VARIABLE_VALUE"}
_CONFIG_SUFFIX = "/.ATTRIBUTES/" + objects.CONFIG_ATTRIBUTE


def role_of(name: str) -> str:
    """``step``, ``optimizer``, ``other`` or ``weight``, from the name as TF's savers write it
    (TF1 and Keras optimizers' slot names, TF2 object-graph keys)."""
    if name in _STEP_NAMES:
        return "step"
    if name in _OTHER_NAMES or name.endswith(_CONFIG_SUFFIX):
        return "other"
    if _OPTIMIZER_RE.search(name):
        return "optimizer"
    return "weight"


_ROLE_ATTRS = {role: MappingProxyType({"role": role}) for role in ("weight", "optimizer", "step", "other")}


def role_attrs(name: str) -> Mapping[str, str]:
    """A tensor's attrs: its role (one shared read-only mapping per role)."""
    return _ROLE_ATTRS[role_of(name)]


def named(tensors: list[Tensor], names: str | None, index: str, metadata: dict[str, str],
          saved: tuple[list, list[str]] | None = None) -> list[Tensor]:
    """Checkpoint tensors with their roles (unless read with :func:`role_attrs`) and, unless ``names``
    is "keys", the readable names of a TF2 object graph (:func:`.objects.readable`; dropped copies
    are noted in ``metadata``, and objects' configurations are put there); ``saved``: a
    SavedModel's object graph and variable names (see :func:`.objects.readable`)."""
    tensors = [t if "role" in t.attrs else t.with_attrs(role=role_of(t.name)) for t in tensors]
    if (names or "readable") == "readable":
        tensors, copies, configs = objects.readable(tensors, index, saved)
        metadata.update(configs)
        if copies:
            metadata["tf.duplicate_keys_dropped"] = ",".join(copies)
    return tensors
