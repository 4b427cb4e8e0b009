"""Which formats exist, how a path is recognised, and lazy import of their adapters.

The table below is the only place a format is listed: its name and aliases, the module that
defines its :class:`~convert.formats.base.Format` (as ``FORMAT``), and the optional packages its
reader and writers need with the pip extra that installs them. Everything else about a format
comes from that record (the contract: :mod:`convert.formats.base`). Adapter modules import heavy
frameworks inside functions only, so importing one is cheap.

A destination is a format name, optionally with a writer id (``tf-ckpt:v1``); an alias may name
a writer too (``tf-ckpt-v1``).

Detection order: an explicit format name, then content (each adapter's ``detect``, in table
order), then an unambiguous file-name ending as a hint only (so that a damaged ``model.onnx``
gets the ONNX reader's precise error); never ``.ckpt`` or ``.bin``, which TensorFlow and PyTorch
both use.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from .errors import MissingDependencyError, ReadError, UnknownFormatError, UsageError
from .formats.base import Format, Option, Writer


@dataclass(frozen=True)
class FormatInfo:
    """A row of the table."""

    name: str
    module: str
    aliases: tuple[str, ...] = ()
    needs_to_read: tuple[tuple[str, str], ...] = ()
    needs_to_write: tuple[tuple[str, str], ...] = ()
    """(Python module, pip extra) pairs without which the reader/writers cannot work."""
    optional: tuple[tuple[str, str, str], ...] = ()
    """(Python module, pip extra, the option it serves) for optional features: ``("onnxruntime", "onnx", "--check")``."""
    writer_aliases: Mapping[str, str] = field(default_factory=dict)
    """Other names of this format that pick a writer: ``{"tf-ckpt-v1": "v1"}``."""

    @property
    def format(self) -> Format:
        """The adapter's record (imports its module on first use)."""
        return _load(self.module)


FORMATS: tuple[FormatInfo, ...] = (
    FormatInfo("safetensors", "convert.formats.safetensors", aliases=("st",)),
    FormatInfo("saved-model", "convert.formats.saved_model", aliases=("savedmodel", "tf-saved-model"),
               needs_to_write=(("tensorflow", "tf"),)),
    FormatInfo("tf-ckpt", "convert.formats.tf_checkpoint", aliases=("tf", "tf-checkpoint", "tensorflow"),
               writer_aliases={"tf-ckpt-v1": "v1", "tf-v1": "v1"}),
    FormatInfo("torch", "convert.formats.torch", aliases=("pt", "pytorch", "pth")),
    FormatInfo("onnx", "convert.formats.onnx",
               optional=(("tensorflow", "tf", "--graph"), ("tf2onnx", "tf", "--graph"), ("onnxruntime", "onnx", "--check"))),
    FormatInfo("dcp", "convert.formats.dcp", aliases=("torch-dcp", "distcp")),
    FormatInfo("tflite", "convert.formats.tflite", aliases=("litert",), needs_to_read=(("flatbuffers", "tflite"),)),
    FormatInfo("gguf", "convert.formats.gguf", needs_to_write=(("gguf", "gguf"),),
               optional=(("gguf", "gguf", "--dtype (dequantizing quantized tensors)"),)),
    FormatInfo("npz", "convert.formats.npz", aliases=("numpy",)),
    FormatInfo("keras", "convert.formats.keras", aliases=("h5", "keras3", "hdf5"),
               needs_to_read=(("h5py", "keras"),), needs_to_write=(("h5py", "keras"),),
               writer_aliases={"keras-legacy": "legacy", "keras2": "legacy"}),
)


@functools.cache
def _load(module: str) -> Format:
    fmt = importlib.import_module(module).FORMAT
    if not isinstance(fmt, Format):  # pragma: no cover - a broken adapter is a bug of ours
        raise TypeError(f"{module}.FORMAT is not a convert.formats.base.Format")
    return fmt


def names() -> list[str]:
    return [f.name for f in FORMATS]


def get(name: str) -> FormatInfo:
    """The format called ``name`` (one of its aliases, writer aliases and ``FORMAT:WRITER`` included)."""
    return target(name)[0]


def target(name: str) -> tuple[FormatInfo, str]:
    """The format and writer id a destination names: ``tf-ckpt`` (the default writer, ""),
    ``tf-ckpt:v1``, ``tf-ckpt-v1``."""
    key, _, writer_id = name.lower().partition(":")
    for info in FORMATS:
        if key in info.writer_aliases:
            if writer_id:
                raise UsageError(f"'{name}': '{key}' already names a writer of {info.name}")
            return info, info.writer_aliases[key]
        if key == info.name or key in info.aliases:
            return info, writer_id
    raise UnknownFormatError(f"unknown format '{name}'; known formats: {', '.join(names())}")


def writer(name: str) -> tuple[FormatInfo, Writer]:
    """The format and the :class:`~convert.formats.base.Writer` a destination names."""
    info, writer_id = target(name)
    try:
        return info, info.format.writer(writer_id)
    except LookupError as e:
        raise UsageError(str(e)) from None


def missing(info: FormatInfo, side: str) -> list[tuple[str, str]]:
    """The (module, extra) pairs this format needs for ``side`` ("read"/"write") that are not installed."""
    needs = info.needs_to_read if side == "read" else info.needs_to_write
    return [(m, e) for m, e in needs if not _importable(m)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # blocked, or a broken installation: as good as missing
        return False


def dependencies() -> dict[tuple[str, str], list[str]]:
    """Every optional dependency the formats name, (Python module, pip extra) -> what needs it
    (``["writing saved-model", "onnx --graph"]``), in table order (``convert --version``)."""
    out: dict[tuple[str, str], list[str]] = {}
    for info in FORMATS:
        for side, needs in (("reading", info.needs_to_read), ("writing", info.needs_to_write)):
            for module, extra in needs:
                out.setdefault((module, extra), []).append(f"{side} {info.name}")
        for module, extra, option in info.optional:
            out.setdefault((module, extra), []).append(f"{info.name} {option}")
    return out


def require(info: FormatInfo, side: str) -> None:
    """Raise :class:`MissingDependencyError` when ``side`` of this format cannot run here."""
    for module, extra in missing(info, side):
        verb = "reading" if side == "read" else "writing"
        raise MissingDependencyError(f"{verb} {info.name}", module, extra)


def remote_formats() -> list[str]:
    """The formats that read and write remote paths (``Format.remote``)."""
    return [info.name for info in FORMATS if info.format.remote]


def detect(path: os.PathLike | str) -> FormatInfo:
    """The format of ``path``, from its content; a URL's among the formats that take remote paths
    (the others only by their file-name ending, so that the caller can say which one is refused)."""
    from . import storage

    remote = storage.is_remote(path)
    p = storage.as_path(path) if remote else storage.local(path)
    for info in FORMATS:  # a path that does not exist may still name something (a TF checkpoint prefix)
        if info.format.read is not None and (info.format.remote or not remote) and info.format.detect(cast(Path, p)):
            return info
    if not p.exists():
        raise ReadError(p, "no such file or directory")
    for info in FORMATS:  # the ending, as a hint only: its reader says what is wrong with the file
        if info.format.suffixes and p.is_file() and p.name.lower().endswith(info.format.suffixes):
            return info
    if remote:
        raise ReadError(p, f"not a checkpoint convert reads from remote storage (formats read there: "
                           f"{', '.join(remote_formats())}; copy others locally)")
    raise ReadError(p, f"not a weight file convert recognises (formats: {', '.join(names())})")


def options() -> list[tuple[FormatInfo, Option]]:
    """Every format-specific option with the format that declares it, in table order."""
    return [(info, opt) for info in FORMATS for opt in info.format.options]
