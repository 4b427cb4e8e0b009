"""The optional frameworks (TensorFlow, tf2onnx, onnxruntime, torch), imported on first use and quietly.

convert reads and writes weights without any framework; a few writers need one (a SavedModel
holds a graph only TensorFlow builds; ``--graph`` converts it with tf2onnx; ``--check`` runs it
with onnxruntime). Adapters get a framework here, never by importing it themselves, so that:

* a missing one is a :class:`~convert.errors.MissingDependencyError` saying which extra to install;
* its logs are quieted in this one place: TensorFlow's C++ and Python logs, tf2onnx's and
  onnxruntime's warnings would bury our one-line messages;
* importing an adapter stays cheap (NumPy itself is :mod:`convert.lazy`'s business).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .errors import MissingDependencyError


def tensorflow(what: str = "building a TensorFlow graph") -> Any:
    """TensorFlow, imported quietly (``what`` names the task in the error when it is missing)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
    except ImportError:
        raise MissingDependencyError(what, "tensorflow", "tf") from None
    tf.get_logger().setLevel(logging.ERROR)
    tf.autograph.set_verbosity(0)
    return tf


def tf2onnx(what: str = "converting a TensorFlow graph to ONNX") -> Any:
    """tf2onnx, its log quieted."""
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    try:
        import tf2onnx
    except ImportError:
        raise MissingDependencyError(what, "tf2onnx", "tf") from None
    return tf2onnx


def onnxruntime_session(model: Path | str, what: str = "--check") -> Any:
    """An onnxruntime ``InferenceSession`` of ``model`` on the CPU, logging errors only."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError(what, "onnxruntime", "onnx") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def torch(what: str) -> Any:
    """torch (reading and writing ``.pt`` files never needs it; some formats' writers do)."""
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(what, "torch", "torch") from None
    return torch

