"""The optional frameworks (TensorFlow, tf2onnx, onnxruntime, torch), imported on first use and quietly.

convert reads and writes weights without any framework; a few writers need one (a SavedModel
holds a graph only TensorFlow builds; ``--graph`` converts it with tf2onnx; ``--check`` runs it
with onnxruntime). Adapters get a framework here, never by importing it themselves, so that:

* a missing one is a :class:`~convert.errors.MissingDependencyError` saying which extra to install;
* its logs are quieted in this one place: TensorFlow's C++ and Python logs, tf2onnx's and
  onnxruntime's warnings would bury our one-line messages;
* importing an adapter stays cheap (NumPy itself is :mod:`convert.lazy`'s business).

Imports go through :func:`import_quietly`: TensorFlow 2.21 prints ``oneDNN custom operations are
on ...`` (twice) and CPU-feature notes from C++ while it is imported, whatever
``TF_CPP_MIN_LOG_LEVEL`` says, ahead of absl's logging setup; other frameworks print similar lines.
The import runs with the process's stdout and stderr (file descriptors 1 and 2, where C++ writes)
sent to a temporary file, put back on stderr only when the import fails (it then explains the
failure). Log levels for later messages are set here too.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import MissingDependencyError


def tensorflow(what: str = "building a TensorFlow graph") -> Any:
    """TensorFlow, imported quietly (``what`` names the task in the error when it is missing)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        tf = import_quietly("tensorflow")  # its C++ prints at import time, whatever the level says
    except ImportError:
        raise MissingDependencyError(what, "tensorflow", "tf") from None
    tf.get_logger().setLevel(logging.ERROR)
    tf.autograph.set_verbosity(0)
    return tf


def tf2onnx(what: str = "converting a TensorFlow graph to ONNX") -> Any:
    """tf2onnx, its log quieted."""
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    try:
        tf2onnx = import_quietly("tf2onnx")
    except ImportError:
        raise MissingDependencyError(what, "tf2onnx", "tf") from None
    return tf2onnx


def onnxruntime_session(model: Path | str, what: str = "--check") -> Any:
    """An onnxruntime ``InferenceSession`` of ``model`` on the CPU, logging errors only."""
    try:
        ort = import_quietly("onnxruntime")
    except ImportError:
        raise MissingDependencyError(what, "onnxruntime", "onnx") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def torch(what: str) -> Any:
    """torch (reading and writing ``.pt`` files never needs it; some formats' writers do)."""
    try:
        torch = import_quietly("torch")
    except ImportError:
        raise MissingDependencyError(what, "torch", "torch") from None
    return torch


_lock = threading.Lock()


def import_quietly(name: str) -> ModuleType:
    """``importlib.import_module(name)``, with whatever the import prints at the file-descriptor
    level (C++ logs included) kept from stdout and stderr unless the import fails."""
    if name in sys.modules:
        return sys.modules[name]
    with _lock, _captured() as captured:
        try:
            return importlib.import_module(name)
        except BaseException:
            captured.replay = True
            raise


class _Capture:
    replay = False


@contextlib.contextmanager
def _captured() -> Iterator[_Capture]:
    state = _Capture()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no descriptors to redirect (a closed stdout): nothing to hide either
        yield state
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield state
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if state.replay:
                sink.seek(0)
                sys.stderr.write(sink.read().decode("utf-8", "replace"))
