"""A TF checkpoint variable's role (weight, optimizer slot, step counter), from its name alone:
used by the reader, the ``.meta`` graph check and ``--template`` (one module, so that none of them
imports the package for it)."""

from __future__ import annotations

import re

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
_STEP_NAMES = {"global_step", "global_step/.ATTRIBUTES/VARIABLE_VALUE", "step/.ATTRIBUTES/VARIABLE_VALUE"}
_OTHER_NAMES = {"_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter/.ATTRIBUTES/VARIABLE_VALUE"}


def role_of(name: str) -> str:
    """``step``, ``optimizer``, ``other`` or ``weight``, from the name as TF's savers write it
    (TF1 and Keras optimizers' slot names, TF2 object-graph keys)."""
    if name in _STEP_NAMES:
        return "step"
    if name in _OTHER_NAMES:
        return "other"
    if (_SLOT_RE.search(name) or _POWER_RE.search(name) or _KERAS_SCOPE_RE.match(name)
            or _BERT_SLOT_RE.search(name) or ".OPTIMIZER_SLOT" in name or name.startswith("optimizer/")):
        return "optimizer"
    return "weight"
