"""Errors raised by convert. Every one inherits :class:`ConvertError`.

Library code raises these and never prints or exits; ``cli.py`` turns one into a
single line on stderr and exit status 1. Messages name what failed (file, tensor)
and, where there is one, how to fix it.
"""

from __future__ import annotations

import os

DISTRIBUTION = "ckpt-convert"
"""The name to ``pip install`` (the import package and the command are ``convert``)."""


def pip_install(extra: str) -> str:
    """The command that installs an extra: ``pip install 'ckpt-convert[tf]'``."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def printable(text: str) -> str:
    """``text`` with its control and other non-printable characters escaped (``\\n``, ``\\x1b``): names
    come from files, and a name holding a newline or a terminal escape sequence must not split an
    error line or drive the terminal it is printed on."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ConvertError(Exception):
    """Base class of every error convert raises on purpose."""


class UsageError(ConvertError):
    """The request itself is inconsistent (an option that does not apply, ...). Exit status 2."""


class UnknownFormatError(UsageError):
    """No format has that name."""


class UnsupportedDTypeError(ConvertError):
    """A dtype (a TensorFlow, ONNX, safetensors, torch or NumPy code) the dtype table has no row for;
    a reader turns it into a :class:`ReadError` naming the file and tensor."""


class MissingDependencyError(ConvertError):
    """An optional dependency is needed for this operation; the message says what to install."""

    def __init__(self, what: str, module: str, extra: str):
        super().__init__(
            f"{what} needs the Python package '{module}', which is not installed: {pip_install(extra)}"
        )
        self.module = module
        self.extra = extra


class _PathError(ConvertError):
    def __init__(self, path: os.PathLike | str | object | None, message: str, tensor: str | None = None):
        # a storage.RemotePath is not os.PathLike (a local call on it must fail): its URL (str())
        self.path = None if path is None else os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
        self.tensor = tensor
        parts = []
        if self.path is not None:
            parts.append(printable(self.path))
        if tensor is not None:
            parts.append(f"tensor '{printable(tensor)}'")
        prefix = ": ".join(parts)
        # messages quote what files hold (storage keys, shard names, framework errors): one line, escaped
        self.message = printable(" ".join(str(message).split()))
        super().__init__(f"{prefix}: {self.message}" if prefix else self.message)


class ReadError(_PathError):
    """The input cannot be read (missing, unsupported variant, ...)."""


class CorruptFileError(ReadError):
    """The input is damaged: truncated, bad magic, checksum mismatch, inconsistent header."""


class WriteError(_PathError):
    """The output cannot be written (exists, target cannot hold a dtype, ...)."""


class MappingError(ConvertError):
    """A rule file is invalid, or rules do not fit the tensors they are applied to."""


class VerificationError(_PathError):
    """What was written does not read back equal to what was meant to be written."""
