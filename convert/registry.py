"""Which formats exist, how a path is recognised, and lazy import of their adapters.

The table below is the only place a format is listed. An adapter module provides
``detect(path) -> bool`` (cheap; False for "not mine", never an exception),
``read(path, **opts) -> TensorDict`` and ``write(td, path, **opts)``, and may
declare ``OPTIONS``: the :class:`Option` s its reader and writer accept, which the
CLI turns into flags. Adapter modules import heavy frameworks inside functions only,
so importing one is cheap.

Detection order: an explicit format name, then content (each adapter's ``detect``,
in table order), then an unambiguous extension as a hint only (so that a damaged
``model.onnx`` gets the ONNX reader's precise error); never ``.ckpt`` or ``.bin``,
which TensorFlow and PyTorch both use.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .errors import MissingDependencyError, ReadError, UnknownFormatError


@dataclass(frozen=True)
class Option:
    """A format-specific option, e.g. ``Option("--step", "read", int, "...")``.

    ``side`` is "read" or "write"; ``kind`` is ``int``, ``float``, ``str``, ``bool``
    (a flag) or ``list`` (repeatable string). ``dest`` is the keyword the adapter
    receives (from the flag name unless given).
    """

    flag: str
    side: str
    kind: type
    help: str
    choices: tuple[str, ...] | None = None
    default: object = None
    dest: str | None = None

    @property
    def keyword(self) -> str:
        return self.dest or self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class FormatInfo:
    name: str
    module: str
    description: str
    aliases: tuple[str, ...] = ()
    suffix: str = ""
    """Suffix of a default output file; "" when the output is a directory."""
    dtype_column: str = "name"
    """The :class:`~convert.dtypes.DType` field that is None for dtypes this format cannot hold."""
    needs_to_read: tuple[tuple[str, str], ...] = ()
    needs_to_write: tuple[tuple[str, str], ...] = ()
    """(Python module, pip extra) pairs without which the reader/writer cannot work."""
    reader: str | None = "read"
    writer: str | None = "write"
    detector: str | None = "detect"
    hint_suffixes: tuple[str, ...] = ()
    """File name endings that only this format uses: when no format recognises a file's content,
    the one its ending names reads it, so that a damaged file gets that reader's precise error."""
    series_writer: str | None = None
    """A function writing several checkpoints (``--all-steps``) into one output, listed by the
    module's ``expand``; formats without one get an output per checkpoint."""
    checksums: str = ""
    """What the format's own checksums cover (the reader checks them whenever it reads the bytes
    they cover); "" when it has none."""


FORMATS: tuple[FormatInfo, ...] = (
    FormatInfo("safetensors", "convert.formats.safetensors", "safetensors file, or a Hugging Face sharded folder / index.json",
               aliases=("st",), suffix=".safetensors", dtype_column="safetensors", hint_suffixes=(".safetensors",)),
    FormatInfo("saved-model", "convert.formats.saved_model", "TensorFlow SavedModel directory (its variables)",
               aliases=("savedmodel", "tf-saved-model"), dtype_column="tf", needs_to_write=(("tensorflow", "tf"),),
               checksums="CRC-32C of every variable and of every block of the variables index"),
    FormatInfo("tf-ckpt", "convert.formats.tf_checkpoint", "TensorFlow checkpoint, V1 or V2 (dir with 'checkpoint', prefix, .index, V1 file); writes V2",
               aliases=("tf", "tf-checkpoint", "tensorflow"), suffix="", dtype_column="tf", series_writer="write_steps",
               hint_suffixes=(".index",),
               checksums="V2: CRC-32C of every tensor and of every index block; V1: CRC-32C of every table block"),
    FormatInfo("tf-ckpt-v1", "convert.formats.tf_checkpoint", "TensorFlow V1 checkpoint (SavedTensorSlices), for legacy consumers",
               aliases=("tf-v1",), suffix="", dtype_column="tf", writer="write_v1", detector=None,
               series_writer="write_steps_v1", checksums="CRC-32C of every table block"),
    FormatInfo("torch", "convert.formats.torch", "PyTorch state_dict (.pt/.pth/.bin/.ckpt)",
               aliases=("pt", "pytorch", "pth"), suffix=".pt", dtype_column="torch", hint_suffixes=(".pt", ".pth"),
               checksums="zip layouts: CRC-32 of every storage record (legacy pickle files have none)"),
    FormatInfo("onnx", "convert.formats.onnx", "ONNX model (weights: initializers, Constant nodes, subgraphs, external data)",
               suffix=".onnx", dtype_column="onnx", hint_suffixes=(".onnx",)),
)


def names() -> list[str]:
    return [f.name for f in FORMATS]


def get(name: str) -> FormatInfo:
    """The format called ``name`` (or one of its aliases)."""
    key = name.lower()
    for info in FORMATS:
        if key == info.name or key in info.aliases:
            return info
    raise UnknownFormatError(f"unknown format '{name}'; known formats: {', '.join(names())}")


def load(info: FormatInfo) -> ModuleType:
    """Import the adapter of a format (cheap: adapters import frameworks lazily)."""
    return importlib.import_module(info.module)


def missing(info: FormatInfo, side: str) -> list[tuple[str, str]]:
    """The (module, extra) pairs this format needs for ``side`` ("read"/"write") that are not installed."""
    needs = info.needs_to_read if side == "read" else info.needs_to_write
    return [(m, e) for m, e in needs if importlib.util.find_spec(m) is None]


def require(info: FormatInfo, side: str) -> None:
    """Raise :class:`MissingDependencyError` when ``side`` of this format cannot run here."""
    for module, extra in missing(info, side):
        verb = "reading" if side == "read" else "writing"
        raise MissingDependencyError(f"{verb} {info.name}", module, extra)


def detect(path: os.PathLike | str) -> FormatInfo:
    """The format of ``path``, from its content."""
    p = Path(path)
    for info in FORMATS:  # a path that does not exist may still name something (a TF checkpoint prefix)
        if info.detector is not None and getattr(load(info), info.detector)(p):
            return info
    if not p.exists():
        raise ReadError(p, "no such file or directory")
    for info in FORMATS:  # the extension, as a hint only: its reader says what is wrong with the file
        if info.hint_suffixes and p.is_file() and p.name.lower().endswith(info.hint_suffixes):
            return info
    raise ReadError(p, f"not a weight file convert recognises (formats: {', '.join(names())})")


def options() -> list[tuple[FormatInfo, Option]]:
    """Every format-specific option with the format that declares it, in table order."""
    out = []
    for info in FORMATS:
        for opt in getattr(load(info), "OPTIONS", ()):
            out.append((info, opt))
    return out
