"""The adapter contract: everything a format module gives the core, typed.

A format is one module (or package) under ``convert/formats/`` that defines ``FORMAT``, a
:class:`Format`, and one row in :data:`convert.registry.FORMATS` naming that module. The core
(api, cli, registry) reaches a format only through this record, never by its name or by looking
attributes up on strings, so a type checker (``make lint`` runs mypy) verifies that every adapter
provides what the core calls, with the signatures it calls it with.

The callables' shapes are :class:`typing.Protocol` s (callback protocols), in the manner of
onnx's ``ProtoSerializer`` and imageio's ``PluginV3``; the options (``*args, **options``) are
left open, since each format declares its own as :class:`Option` s and receives only those:

* :class:`Detect` -- ``detect(path) -> bool``: cheap, content-based, True only for this format's
  files; "not mine" is False, never an exception (catch only your own parse failures and OSError).
* :class:`Read` -- ``read(path, **read_options) -> TensorDict``: lazy (headers only).
* :class:`Write` -- ``write(td, path, **write_options) -> WriteReport | None``; ``path`` is
  inside a staging folder (convert.fileio) and does not exist yet.
* :class:`WriteSeries` -- several checkpoints (``--all-steps``) into one output.
* :class:`Expand` -- a path that names a series (a TF ``checkpoint`` state file's retained
  steps) -> ``[(label, path of one member)]``, for ``--all-steps``.
* :class:`Prepare` -- a writer's step before writing, e.g. resolving names against a template;
  run before verification so that what is verified is what was meant to be written. It returns
  the TensorDict to write and a :class:`PrepareReport` (or None): its ``notes`` go into the
  summary, its ``facts()`` into ``--json``, its ``to_text()`` is what ``convert map --template``
  prints (the same step, nothing written; the writer is found by its ``takes_template``).
* :class:`ReadBack` -- how verification reads a writer's output back, when plain ``read`` would
  not give the names written (e.g. a writer that took raw keys).

Remote paths (``s3://``, ``memory://``...; :mod:`convert.storage`): a format whose
``Format.remote`` is True takes, in ``detect``, ``read``, ``expand`` and its writers, what
:func:`convert.storage.as_path` returns: a ``pathlib.Path`` for a local path, a
:class:`~convert.storage.RemotePath` for a URL. It uses only the pathlib methods both have
(``p.open("rb")``, ``p.with_name(...)``, ``p.parent.glob(...)``, ``p.stat().st_size``...), never
``open(p)``/``os.path`` on it, makes its tensors' sources with :func:`convert.storage.region`, and
writes through ``path.open("wb")`` (an upload, completed only after the writer returned). A
writer whose output is several files names its *commit objects* in ``Writer.commit`` (glob
patterns relative to the output: the index, the state file): the core completes them last,
after every data object, and a reader of the format refuses an output without them. Formats
that are not remote-capable are refused for URLs with one line naming the format.

A format may have several writers (meshio's "writer ids"): ``tf-ckpt`` writes V2 by default and
V1 as ``tf-ckpt:v1`` (also spelled ``tf-ckpt-v1``, an alias of the registry row). Each writer says
which dtypes it holds, as a predicate over rows of the one dtype table (:mod:`convert.dtypes`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

if TYPE_CHECKING:
    from ..dtypes import DType
    from ..ir import TensorDict


@dataclass(frozen=True)
class Option:
    """A format-specific option, e.g. ``Option("--step", "read", int, "...")``, which the CLI turns
    into a flag.

    ``side`` is "read" or "write"; ``kind`` is ``int``, ``float``, ``str``, ``bool`` (a flag) or
    ``list`` (repeatable string). ``dest`` is the keyword the adapter receives (from the flag name
    unless given). Two formats may declare the same flag (``--template``); it is one flag.
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


class WriteReport(TypedDict, total=False):
    """What a writer may tell the summary (every key optional)."""

    notes: list[str]
    """Lines for the user: what was left out, rewritten, filled in."""
    verify: bool
    """False: the output does not hold the tensors by name (a converted graph); the writer checked
    the output itself and ``checked`` says how."""
    checked: str
    """How the writer checked its output, for the summary ("checked against TensorFlow ...")."""
    facts: dict[str, Any]
    """Machine-readable facts for ``--json`` (e.g. a max abs difference)."""


class Detect(Protocol):
    def __call__(self, path: Path, /) -> bool: ...


class Read(Protocol):
    def __call__(self, path: Path, /, *args: Any, **options: Any) -> TensorDict: ...


class Write(Protocol):
    def __call__(self, td: TensorDict, path: Path, /, *args: Any, **options: Any) -> WriteReport | None: ...


class WriteSeries(Protocol):
    def __call__(self, tds: Sequence[TensorDict], path: Path, /, *args: Any, **options: Any) -> WriteReport | None: ...


class Expand(Protocol):
    def __call__(self, path: Path, /, *args: Any, **read_options: Any) -> list[tuple[str, Path]]: ...


class PrepareReport(Protocol):
    """What a prepare step decided (e.g. :class:`convert.template.Resolution`)."""

    @property
    def notes(self) -> list[str]: ...

    def facts(self) -> dict[str, Any]: ...

    def to_text(self) -> str: ...


class Prepare(Protocol):
    def __call__(self, td: TensorDict, /, *args: Any,
                 **write_options: Any) -> tuple[TensorDict, PrepareReport | None]: ...


class ReadBack(Protocol):
    def __call__(self, path: Path, write_options: Mapping[str, Any], /) -> list[TensorDict]: ...


def holds_all(dtype: DType) -> bool:
    """A writer that holds every dtype of the table."""
    return True


@dataclass(frozen=True)
class Writer:
    """One way a format writes (``id`` ``""`` when a format has only one)."""

    id: str
    write: Write
    holds: Callable[[DType], bool]
    """Whether this writer can hold a dtype (a predicate over :data:`convert.dtypes.TABLE` rows);
    the core refuses, before writing, every tensor it cannot, in one error."""
    suffix: str = ""
    """Ending of a default output file name (``.safetensors``); "" when the output is a folder."""
    description: str = ""
    series: WriteSeries | None = None
    """Writes several checkpoints into one output (``--all-steps``); without it, one output each."""
    prepare: Prepare | None = None
    takes_template: Detect | None = None
    """Whether a path can be this writer's ``--template`` (cheap, never raises): ``convert map
    --template PATH`` runs the ``prepare`` of the first writer that takes PATH."""
    read_back: ReadBack | None = None
    """How verification reads the output; default: the format's ``read`` (and ``expand`` for a series)."""
    keeps_shared_storage: bool = False
    """True when tensors that shared storage in the source stay shared (torch); otherwise the
    summary notes that they were written as separate copies."""
    shards: ShardWriter | None = None
    """How this writer writes one output in parallel pieces (``--split shards``); None: it cannot."""
    needs_template: bool = False
    """True when this writer writes only on a ``--template`` (a ``.keras`` file takes its model's
    config from one); the tests' cross-format matrix leaves it out."""
    commit: tuple[str, ...] = ()
    """Glob patterns (relative to the output) of the files that make a multi-file output whole
    (``model.safetensors.index.json``, a tf-ckpt ``checkpoint``): on object storage they are
    completed last, once every other object is (a single-file output is its own commit object)."""


@dataclass(frozen=True)
class ShardWriter:
    """A writer's parts for ``--split shards`` (:mod:`convert.split`): an output folder of N data
    shards, each written by whichever worker the plan gives it, then commit objects.

    * ``shard_name(td, k, n)``: the file name of data shard ``k`` (0-based) of ``n``;
    * ``write_shard(tensors, path, td) -> [[name, offset, size, crc32c], ...]``: writes one data
      shard file (``td`` gives the metadata), returning where each tensor's bytes lie in it and
      their CRC-32C (numeric tensors: of the raw bytes; others: of what the file stores);
    * ``commit(td, shards) -> [(file name, bytes)]``: the commit objects (index, state file), in
      the order they must appear, from the plan (``shards``: per shard, its file name and the
      tensors with the entries ``write_shard`` returned).
    """

    shard_name: Callable[[TensorDict, int, int], str]
    write_shard: Callable[[Sequence[Any], Path, TensorDict], list]
    commit: Callable[[TensorDict, Sequence[tuple[str, Sequence[tuple[Any, list]]]]], list[tuple[str, bytes]]]


@dataclass(frozen=True)
class Format:
    """Everything the core knows of a format. Defined once per adapter module, as ``FORMAT``."""

    name: str
    description: str
    detect: Detect
    read: Read | None
    writers: tuple[Writer, ...] = ()
    """The first is the default writer."""
    options: tuple[Option, ...] = ()
    expand: Expand | None = None
    suffixes: tuple[str, ...] = ()
    """File-name endings of this format's files: stripped from an input's name to name its default
    output, and, when no format recognises a damaged file's content, the ending that picks the
    reader whose precise error the user gets (only endings no other format uses: not ``.ckpt``)."""
    name_endings: tuple[str, ...] = ()
    """Regular expressions of further endings stripped from an input's name for its default output's
    name that pick no reader (``.ckpt``, shared with torch; ``\\.data-\\d+-of-\\d+``)."""
    checksums: str = ""
    """What the format's own checksums cover (checked whenever the bytes they cover are read;
    ``inspect --verify`` reads them all); "" when it has none."""
    remote: bool = False
    """True when ``detect``, ``read``, ``expand`` and the writers take what
    :func:`convert.storage.as_path` returns (a :class:`~convert.storage.RemotePath` for a URL;
    see the module docstring); the core refuses URLs for the others."""

    def writer(self, id: str | None = None) -> Writer:
        """The writer ``id`` (the default one for None or "")."""
        if not self.writers:
            raise LookupError(f"{self.name} cannot be written")
        if not id:
            return self.writers[0]
        for w in self.writers:
            if w.id == id:
                return w
        raise LookupError(f"{self.name} has no writer '{id}' (writers: {', '.join(w.id for w in self.writers)})")
