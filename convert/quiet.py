"""Importing a framework without its log lines reaching our output.

TensorFlow 2.21 prints ``oneDNN custom operations are on ...`` (twice) and CPU-feature notes from
C++ while it is imported, whatever ``TF_CPP_MIN_LOG_LEVEL`` says, ahead of absl's logging setup;
other frameworks print similar lines. Our output is one line per result or error, so the import
runs with the process's stdout and stderr (file descriptors 1 and 2, where C++ writes) sent to a
temporary file. When the import fails, what it printed is put back on stderr, since it then
explains the failure; when it succeeds, it is dropped. Log levels for later messages are set by
the caller (``TF_CPP_MIN_LOG_LEVEL``, the framework's Python logger).

Use it where a framework is imported for a feature, and only there::

    tf = import_quietly("tensorflow")
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from types import ModuleType

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
