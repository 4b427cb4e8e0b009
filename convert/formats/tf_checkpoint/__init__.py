"""TensorFlow checkpoints, V1 and V2, read and written without TensorFlow.

Formats:

* V2 ("tensor bundle", TF >= 0.12 default): ``prefix.index`` + ``prefix.data-0000K-of-0000N``
  (:mod:`.bundle`; spec: tensorflow/core/util/tensor_bundle/tensor_bundle.h).
* V1 (``SavedTensorSlices``): one table file such as ``model.ckpt`` or
  ``export-00000-of-00001`` (:mod:`.slices`; spec: tensorflow/core/util/tensor_slice_writer.h).
* The ``checkpoint`` state file naming the latest and the retained checkpoints (:mod:`.state`).

Both containers are LevelDB tables (:mod:`.sstable`) holding a few protobuf messages
(:mod:`.protowire`). TensorFlow's classes for them ship only inside the ``tensorflow``
package, so everything here is written by hand against the published formats, and
tested against TensorFlow 2.21 as the oracle.

``read`` accepts a directory with a ``checkpoint`` state file (its latest checkpoint, as
``tf.train.latest_checkpoint``; ``step=N`` picks a retained one), a prefix
(``dir/my-model-190``), an ``.index``, ``.data-*`` or ``.meta`` file, or a V1 file.
``write`` creates a directory holding a one-shard V2 checkpoint, a ``checkpoint`` state
file and, when the source had one, the ``.meta`` graph, so that
``saver = tf.compat.v1.train.import_meta_graph(meta); saver.restore(sess, tf.train.latest_checkpoint(dir))``
works on the result. ``write_v1`` writes the V1 format the same way.

Remote checkpoints (URLs, :mod:`convert.storage`): V2 only. A remote folder is read through its
``checkpoint`` state file, which is required there (no lone-``.index`` fallback: our writer
completes it last, so a folder without one is an unfinished output); a prefix or ``.index`` in
such a folder may be named too. A remote output is written as uploads, the ``checkpoint`` state
file (``Writer.commit``) completed after every other file.

Example:
    >>> from convert.formats import tf_checkpoint
    >>> td = tf_checkpoint.read("examples/model1")            # latest checkpoint
    >>> td["conv1/w"].attrs["role"], td["conv1/w/Adam"].attrs["role"], td.metadata["tf.global_step"]
    ('weight', 'optimizer', '190')
    >>> tf_checkpoint.write(td, "/tmp/migrated")              # V2, + checkpoint + .meta
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ... import dtypes, storage
from ...errors import ConvertError, ReadError, UsageError, WriteError
from ...ir import Tensor, TensorDict
from ..base import Format, Option, ShardWriter, Writer, WriteReport
from . import metagraph, objects, templates
from .bundle import bundle_index_bytes, data_path, read_bundle, write_bundle, write_data_shard
from .slices import GET_TENSOR_REFUSES_V1, check_v1_dtypes, read_v1, write_v1_file
from .sstable import has_table_magic
from .state import STATE_FILE, candidates, format_state, read_state, state_paths

NAME = "tf-ckpt"

DEFAULT_PREFIX = "model.ckpt"

_DATA_RE = re.compile(r"^(.*)\.data-\d{5}-of-\d{5}$")
_V1_SHARD_RE = re.compile(r"^(.*)-(\d{5})-of-(\d{5})$")
_STEP_RE = re.compile(r"-(\d+)$")
# A sharded V1 Saver records its checkpoint as a glob pattern: "model.ckpt-1-?????-of-00002".
_V1_PATTERN_RE = re.compile(r"^(.*)-(?:\?{5}|\d{5})-of-(\d{5})$")


@dataclass(frozen=True)
class Located:
    """A checkpoint found on disk: its version, prefix and (V1) files."""

    version: int
    prefix: str
    files: tuple[str, ...] = ()
    note: str = ""
    """Said to the user when the checkpoint was found otherwise than asked (a stale state file)."""

    @property
    def concrete(self) -> Path:
        """An existing file that :func:`read` resolves back to this checkpoint."""
        p = self.prefix + ".index" if self.version == 2 else self.files[0]
        return storage.as_path(p) if storage.is_remote(p) else Path(p)  # type: ignore[return-value]


# ------------------------------------------------------------------ locating

def _v1_shards(prefix: str, of: str = "?????") -> list[str]:
    return sorted(glob.glob(glob.escape(prefix) + f"-?????-of-{of}"))


def _locate_prefix(s: str, strict: bool = False) -> Located | None:
    """The checkpoint of prefix ``s`` (a string: the prefix may be empty, ``dir/``, the files then
    being ``dir/.index``...). ``strict`` (for detect) wants the table magic on an ``.index``;
    reading does not, so that a damaged index gives a CorruptFileError rather than "not found"."""
    if os.path.isfile(s + ".index") and (not strict or has_table_magic(s + ".index")):
        return Located(2, s)
    m = _V1_PATTERN_RE.match(s)
    if m and "?" in s:
        shards = [f for f in _v1_shards(m.group(1), m.group(2)) if has_table_magic(f)]
        return Located(1, m.group(1), tuple(shards)) if shards else None
    if os.path.isfile(s) and has_table_magic(s):
        return _locate_v1_file(Path(s))
    shards = [f for f in _v1_shards(s) if has_table_magic(f)]
    if shards:
        return Located(1, s, tuple(shards))
    return None


def _locate_v1_file(p: Path) -> Located:
    m = _V1_SHARD_RE.match(str(p))
    if m:
        shards = _v1_shards(m.group(1), m.group(3))
        if str(p) in shards:
            return Located(1, m.group(1), tuple(shards))
    return Located(1, str(p), (str(p),))


def _locate_file(p: Path, strict: bool = False) -> Located | None:
    s = str(p)
    if s.endswith(".index") and (not strict or has_table_magic(p)):
        return Located(2, s[:-len(".index")])
    m = _DATA_RE.match(s)
    if m:
        return _locate_prefix(m.group(1), strict)
    if s.endswith(".meta"):  # a graph names the checkpoint beside it (if any)
        return _locate_prefix(s[:-len(".meta")], strict)
    if has_table_magic(p):
        return _locate_v1_file(p)
    return None


def _step_of(path: str) -> int | None:
    base = re.split(r"[\\/]", path)[-1]
    m = _V1_PATTERN_RE.match(base)
    m = _STEP_RE.search(m.group(1) if m else base)
    return int(m.group(1)) if m else None


def _locate_in_state(directory: Path, path: str) -> Located | None:
    for cand in candidates(directory, path):
        loc = _locate_prefix(cand)
        if loc is not None:
            return loc
    return None


def _prefixes_in(d: Path) -> list[str]:
    """The V2 checkpoints of a folder, as prefixes (``d/`` for files named ``.index``...)."""
    try:
        names = sorted(x.name for x in d.iterdir() if x.name.endswith(".index") and has_table_magic(x))
    except OSError as e:
        raise ReadError(d, f"cannot list the directory: {e.strerror}") from None
    return [os.path.join(str(d), n[:-len(".index")]) for n in names]


def _shown(prefix: str) -> str:
    return os.path.basename(prefix) or "(empty prefix: .index, .data-*)"


def _locate_dir(d: Path) -> Located:
    st = read_state(d)
    if st is not None:
        loc = _locate_in_state(d, st.model_checkpoint_path)
        if loc is not None:
            return loc
        found = _prefixes_in(d)
        stale = f"the '{STATE_FILE}' file names checkpoint '{st.model_checkpoint_path}', which is not there"
        if len(found) == 1:  # moved since it was written, renamed...: the folder's only checkpoint
            return Located(2, found[0], note=f"{stale}; read the folder's only checkpoint, {_shown(found[0])}")
        if found:
            raise ReadError(d, f"{stale} (nor its basename in this directory), and the directory holds "
                            f"{len(found)} checkpoints ({', '.join(map(_shown, found))}); name one")
        raise ReadError(d, f"{stale} (nor its basename in this directory)")
    found = _prefixes_in(d)
    if len(found) == 1:
        return Located(2, found[0])
    if not found:
        raise ReadError(d, f"no '{STATE_FILE}' state file and no checkpoint in this directory")
    raise ReadError(d, f"no '{STATE_FILE}' state file and several checkpoints "
                    f"({', '.join(map(_shown, found))}); name one")


def locate(path: os.PathLike | str, step: int | None = None) -> Located:
    """Find the checkpoint ``path`` designates (see module docstring)."""
    if storage.is_remote(path):
        return _locate_remote(storage.as_path(path), step)  # type: ignore[arg-type]
    p = Path(path)
    if step is not None:
        return _locate_step(p, step)
    if p.is_dir():
        return _locate_dir(p)
    if p.is_file():
        loc = _locate_file(p)
        if loc is None:
            raise ReadError(p, "not a TensorFlow checkpoint (no table magic at the end of the file)")
        return loc
    loc = _locate_prefix(os.fspath(path))
    if loc is None:
        raise ReadError(p, "no such file, directory or checkpoint prefix")
    return loc


# ------------------------------------------------------------------ remote checkpoints (V2)

_NOT_LOCAL = re.compile(r"^(/|[A-Za-z]:[\\/]|\\\\)")  # an absolute local path of the machine that saved it


def _remote_prefix(d: storage.RemotePath, s: str) -> str | None:
    """The V2 prefix (a URL) that path ``s`` of the state file of remote folder ``d`` names: as
    given when relative (or a URL), else its basename in ``d``; None when no ``.index`` is there."""
    cands = []
    if storage.is_remote(s):
        cands.append(s)
    elif not _NOT_LOCAL.match(s):
        cands.append(str(d / s))
    base = re.split(r"[\\/]", s)[-1]
    if base:
        cands.append(str(d / base))
    for c in dict.fromkeys(cands):
        if storage.as_path(c + ".index").is_file():
            return c
    return None


def _file_prefix(s: str) -> str | None:
    """The prefix a V2 checkpoint's own file names (``.index``, ``.data-*``, ``.meta``), or None."""
    m = _DATA_RE.match(s)
    return s[:-len(".index")] if s.endswith(".index") else m.group(1) if m else \
        s[:-len(".meta")] if s.endswith(".meta") else None


def _at_step(d, paths: list[str], step: int, find: Callable[[str], Located | None]) -> Located:
    """The checkpoint of ``step`` among a state file's ``paths`` (``find``: where one is, or None)."""
    for s in paths:
        if _step_of(s) == step:
            loc = find(s)
            if loc is None:
                raise ReadError(d, f"checkpoint '{s}' of step {step} is listed but not there")
            return loc
    steps = [str(n) for n in (_step_of(s) for s in paths) if n is not None]
    raise UsageError(f"{d}: no retained checkpoint of step {step}; available steps: {', '.join(steps) or 'none'}")


def _remote_located(d: storage.RemotePath, s: str) -> Located | None:
    prefix = _remote_prefix(d, s)
    return None if prefix is None else Located(2, prefix)


def _remote_state(d: storage.RemotePath):
    st = read_state(d)
    if st is None:
        raise ReadError(d, f"no '{STATE_FILE}' state file: a remote checkpoint folder is read through it "
                           "(it is written last: a folder without one is an unfinished output)")
    return st


def _locate_remote(p: storage.RemotePath, step: int | None) -> Located:
    """A remote V2 checkpoint: a folder (through its state file), or a prefix / ``.index`` /
    ``.data-*`` / ``.meta`` / the state file in a folder that has a state file."""
    named: str | None = None
    if p.is_dir():
        d = p
    else:
        d = p.parent
        if p.name != STATE_FILE:
            named = _file_prefix(str(p)) or str(p)
    st = _remote_state(d)
    if step is not None:
        return _at_step(d, state_paths(d, st), step, lambda s: _remote_located(d, s))
    if named is not None:
        if not storage.as_path(named + ".index").is_file():
            raise ReadError(p, "no such checkpoint (no .index; remote checkpoints are read in the V2 format only)")
        return Located(2, named)
    prefix = _remote_prefix(d, st.model_checkpoint_path)
    if prefix is None:
        raise ReadError(d, f"the '{STATE_FILE}' file names checkpoint '{st.model_checkpoint_path}', which is not "
                           "there (remote checkpoints are read in the V2 format only)")
    return Located(2, prefix)


def _expand_remote(p: storage.RemotePath, step: int | None) -> list[tuple[str, Path]]:
    if step is not None:
        loc = _locate_remote(p, step)
        return [(_label(loc), loc.concrete)]
    d = p if p.is_dir() else p.parent
    st = _remote_state(d)
    out = []
    for s in state_paths(d, st):
        found = _remote_located(d, s)
        if found is None:
            raise ReadError(d, f"the '{STATE_FILE}' file lists checkpoint '{s}', which is not there")
        out.append((_label(found), found.concrete))
    return out


def _detect_remote(p: storage.RemotePath) -> bool:
    if p.is_dir():
        return read_state(p) is not None or any(x.name.endswith(".index") and has_table_magic(x) for x in p.iterdir())
    if p.name == STATE_FILE:  # a state file names its folder's checkpoints (convert batch 's3://runs/*/checkpoint')
        return read_state(p.parent) is not None
    prefix = _file_prefix(str(p))
    if prefix is None:
        if p.is_file():
            return False  # a V1 file: read from local paths only
        prefix = str(p)
    return has_table_magic(prefix + ".index")


def _state_dir(p: Path) -> Path:
    """The folder whose ``checkpoint`` file governs ``p`` (a folder, a prefix or a file in it)."""
    return p if p.is_dir() else p.parent


def _locate_step(p: Path, step: int) -> Located:
    d = _state_dir(p)
    st = read_state(d)
    if st is None:
        raise ReadError(d, f"--step needs a '{STATE_FILE}' state file listing the retained checkpoints")
    return _at_step(d, state_paths(d, st), step, lambda s: _locate_in_state(d, s))


def expand(path: os.PathLike | str, step: int | None = None, all_steps: bool = False,
           **_: object) -> list[tuple[str, Path]]:
    """Every checkpoint the state file next to ``path`` retains, as (label, concrete path).

    The label is the step number (``"190"``) or the prefix's basename when it has none;
    the path is an existing file :func:`read` accepts. Without a state file: just ``path``.
    """
    if storage.is_remote(path):
        return _expand_remote(storage.as_path(path), step)  # type: ignore[arg-type]
    p = Path(path)
    if step is not None:
        loc = _locate_step(p, step)
        return [(_label(loc), loc.concrete)]
    d = _state_dir(p)
    st = read_state(d)
    if st is None:
        loc = locate(p)
        return [(_label(loc), loc.concrete)]
    out = []
    for s in state_paths(d, st):
        found = _locate_in_state(d, s)
        if found is None:
            raise ReadError(d, f"the '{STATE_FILE}' file lists checkpoint '{s}', which is not there")
        out.append((_label(found), found.concrete))
    return out


def _label(loc: Located) -> str:
    n = _step_of(loc.prefix)
    return str(n) if n is not None else os.path.basename(loc.prefix) or "ckpt"


# ------------------------------------------------------------------ detect / read

def detect(path: os.PathLike | str) -> bool:
    """True for a TF checkpoint directory, prefix, ``.index``/``.data-*`` file or V1 file.

    Content-based: a table file must end with the table magic (so a PyTorch ``.ckpt``,
    a zip or a pickle, is not claimed); a directory must hold a parseable ``checkpoint``
    state file or an ``.index`` table.
    """
    try:
        if storage.is_remote(path):
            return _detect_remote(storage.as_path(path))  # type: ignore[arg-type]
        p = Path(path)
        if p.is_dir():
            if read_state(p) is not None:
                return True
            return any(x.name.endswith(".index") and has_table_magic(x) for x in p.iterdir())
        if p.is_file():
            return _locate_file(p, strict=True) is not None
        return _locate_prefix(os.fspath(path), strict=True) is not None
    except (OSError, ValueError, ReadError):  # ReadError: a remote path's
        return False


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


def read(path: os.PathLike | str, step: int | None = None, all_steps: bool = False, names: str | None = None,
         **unknown) -> TensorDict:
    """Read a V1 or V2 checkpoint lazily (see module docstring for what ``path`` may be).

    Args:
        path: directory, prefix, ``.index``/``.data-*``/``.meta`` file or V1 file.
        step: with a ``checkpoint`` state file, the retained checkpoint of this step.
        all_steps: accepted for the CLI's sake; looping over steps is :func:`expand`'s job.
        names: TF2 object-based checkpoints: "readable" (default) names tensors after their
            variables (:mod:`.objects`), "keys" keeps the raw keys and the object graph tensor.

    Returns:
        The tensors in TF's order (bytewise by name), with ``attrs["role"]``; metadata
        ``source.format``, ``tf.checkpoint_version``, ``tf.prefix``, and when present
        ``tf.global_step`` and ``local.tf.meta_graph_path``.
    """
    if unknown:
        raise UsageError(f"tf-ckpt reader does not take option(s) {', '.join(sorted(unknown))}")
    loc = locate(path, step)
    if loc.version == 2:
        tensors, _ = read_bundle(loc.prefix, role_attrs)
    else:
        tensors, _ = read_v1(list(loc.files))
    metadata = {
        "source.format": NAME,
        "tf.checkpoint_version": str(loc.version),
        "tf.prefix": os.path.basename(loc.prefix),
    }
    if loc.note:
        metadata["local.note.tf.state_file"] = loc.note
    tensors = named(tensors, names, loc.prefix + ".index", metadata)
    for t in tensors:
        if t.name in ("global_step", "global_step/.ATTRIBUTES/VARIABLE_VALUE") and t.numel == 1 \
                and t.dtype.kind in ("int", "uint"):
            metadata["tf.global_step"] = str(int(t.numpy().reshape(-1)[0]))
            break
    meta = loc.prefix + ".meta"
    if os.path.isfile(meta):
        metadata["local.tf.meta_graph_path"] = os.path.abspath(meta)
    return TensorDict(tensors, metadata)


# ------------------------------------------------------------------ write

def _prefix_for(td: TensorDict) -> str:
    prefix = td.metadata.get("tf.prefix") or DEFAULT_PREFIX
    if prefix in (".", "..") or "/" in prefix or "\\" in prefix or "\x00" in prefix:
        return DEFAULT_PREFIX
    return prefix


def _write_checkpoints(tds: Sequence[TensorDict], path: os.PathLike | str, opts: dict,
                       write_files: Callable[[TensorDict, Any], None], version: int,
                       meta_graph: bool = True) -> WriteReport:
    """A new directory at ``path`` with one checkpoint per TensorDict, named after its
    ``tf.prefix``, each with its ``.meta`` graph when known, ``meta_graph`` and it fits
    (:func:`.metagraph.meta_for`), and a ``checkpoint`` state file listing them all, the last
    as the latest. Returns notes on graphs left out or rewritten."""
    if opts:
        raise UsageError(f"tf-ckpt writer does not take option(s) {', '.join(sorted(opts))}")
    out = storage.as_path(path)  # remote: the RemotePath of storage.atomic_output, each file an upload
    remote = isinstance(out, storage.RemotePath)
    prefixes = [_prefix_for(td) for td in tds]
    if len(set(prefixes)) != len(prefixes):
        raise WriteError(out, f"two checkpoints would have the same prefix: {', '.join(prefixes)}")
    metas = [metagraph.meta_for(td, version, partial=templates.TEMPLATE_KEY in td.metadata) if meta_graph
             else (None, None) for td in tds]
    try:
        out.mkdir()
    except FileExistsError:
        raise WriteError(out, "already exists") from None
    for td, prefix, (meta, _) in zip(tds, prefixes, metas, strict=True):
        write_files(td, out / prefix if remote else str(out / prefix))
        if meta is not None:
            (out / (prefix + ".meta")).write_bytes(meta)
    (out / STATE_FILE).write_text(format_state(prefixes[-1], prefixes))
    notes = list(dict.fromkeys(note for _, note in metas if note))
    return {"notes": notes} if notes else {}


def write(td: TensorDict, path: os.PathLike | str, object_graph: bool = False, **opts) -> WriteReport:
    """Write a V2 checkpoint directory at ``path`` (which must not exist).

    It holds ``<prefix>.index``, ``<prefix>.data-00000-of-00001``, a ``checkpoint`` state
    file and, when ``td.metadata["local.tf.meta_graph_path"]`` names an existing file, that
    graph as ``<prefix>.meta`` when it can restore the checkpoint (:mod:`.metagraph`: carried
    over, or its saver rewritten for V2). ``prefix`` is ``td.metadata["tf.prefix"]`` or
    ``model.ckpt``. Tensors are streamed one by one; the bytes depend only on ``td``. With
    ``object_graph``, a TF2 object-based checkpoint instead (see :func:`.objects.object_based`).
    With ``template`` (and ``template_fill``), the names are resolved against a template's
    variables and its graph is written (:mod:`.templates`).
    """
    return write_steps([td], path, object_graph, **opts)


def _prepared(tds: Sequence[TensorDict], opts: dict, object_graph: bool = False) -> list[TensorDict]:
    """``tds`` resolved against ``opts``' template, when a caller did not :func:`.templates.prepare` them."""
    template, fill = opts.pop("template", None), opts.pop("template_fill", False)
    return [templates.prepare(td, template, fill, object_graph)[0] for td in tds]


def write_steps(tds: Sequence[TensorDict], path: os.PathLike | str, object_graph: bool = False,
                **opts) -> WriteReport:
    """Several V2 checkpoints (``--all-steps``) in one directory, as :func:`write` writes one;
    the state file lists them all, so ``tf.train.latest_checkpoint`` finds the last."""
    tds = _prepared(tds, opts, object_graph)

    def write_files(td: TensorDict, prefix) -> None:
        tensors = objects.object_based(list(td.values()), str(prefix)) if object_graph else td.values()
        write_bundle(tensors, prefix)

    # a TF1 graph does not go with object-based keys
    return _write_checkpoints(tds, path, opts, write_files, 2, meta_graph=not object_graph)


def write_v1(td: TensorDict, path: os.PathLike | str, **opts) -> WriteReport:
    """Write a V1 checkpoint directory at ``path``: the ``<prefix>`` table file, a
    ``checkpoint`` state file and the ``.meta`` graph when known (see :func:`write`).

    V1 cannot hold bfloat16, float8, uint32 or uint64 (TensorFlow refuses them); such
    tensors raise one :class:`WriteError` listing them all.
    """
    return write_steps_v1([td], path, **opts)


def write_steps_v1(tds: Sequence[TensorDict], path: os.PathLike | str, **opts) -> WriteReport:
    """Several V1 checkpoints in one directory (see :func:`write_steps`)."""
    if storage.is_remote(path):
        raise WriteError(path, "V1 checkpoints are written to local paths only; write V2 (tf-ckpt) to remote storage")
    tds = _prepared(tds, opts)
    for td in tds:
        check_v1_dtypes(list(td.values()), path)
    report = _write_checkpoints(tds, path, opts, lambda td, prefix: write_v1_file(list(td.values()), prefix), 1)
    unreadable = list(dict.fromkeys(t.name for td in tds for t in td.values() if t.dtype.name in GET_TENSOR_REFUSES_V1))
    if unreadable:
        report.setdefault("notes", []).append(
            f"TensorFlow's Saver.restore and RestoreV2/RestoreSlice read every tensor written, but its "
            f"tf.train.load_checkpoint(...).get_tensor refuses V1 {', '.join(GET_TENSOR_REFUSES_V1)} tensors "
            f"('Data type not supported'): {', '.join(unreadable)}; a V2 checkpoint (tf-ckpt) has no such gap")
    return report


def read_back(path: Path, write_options: Mapping[str, object]) -> list[TensorDict]:
    """What verification compares with what was written: every checkpoint of the output folder,
    named as written (raw keys, unless the writer made the keys itself from readable names)."""
    names = "readable" if write_options.get("object_graph") else "keys"
    return [read(p, names=names) for _, p in expand(path, all_steps=True)]


# --split shards (convert.split): data shards written in parallel, then the .index, then 'checkpoint'
def _shard_name(td: TensorDict, k: int, n: int) -> str:
    return os.path.basename(data_path(_prefix_for(td), k, n))


def _write_shard(tensors: Sequence[Tensor], path: Path, td: TensorDict) -> list:
    return write_data_shard(list(tensors), path if isinstance(path, storage.RemotePath) else str(path))


def _commit(td: TensorDict, shards: Sequence[tuple[str, Sequence[tuple[Tensor, list]]]]) -> list[tuple[str, bytes]]:
    prefix = _prefix_for(td)
    shard_of = {t.name: k for k, (_, tensors) in enumerate(shards) for t, _ in tensors}
    placed = [(t, entry) for _, tensors in shards for t, entry in tensors]
    index = bundle_index_bytes(placed, len(shards), shard_of.__getitem__)
    return [(prefix + ".index", index), (STATE_FILE, format_state(prefix, [prefix]).encode("utf-8"))]


FORMAT = Format(
    name=NAME,
    description="TensorFlow checkpoint, V1 or V2 (dir with 'checkpoint', prefix, .index, V1 file); writes V2",
    detect=detect,
    read=read,
    writers=(
        Writer("v2", write, dtypes.held_by("tf"), series=write_steps, read_back=read_back,
               prepare=templates.prepare, takes_template=templates.accepts_template,
               shards=ShardWriter(_shard_name, _write_shard, _commit), commit=(STATE_FILE,),
               description="a folder with a V2 checkpoint, its 'checkpoint' state file and the .meta graph"),
        Writer("v1", write_v1, dtypes.held_by("tf_v1"), series=write_steps_v1, read_back=read_back,
               prepare=templates.prepare, takes_template=templates.accepts_template,
               description="the V1 format (SavedTensorSlices), for legacy consumers"),
    ),
    options=(
        Option("--step", "read", int, "read the retained checkpoint of this global step "
               "(from the directory's 'checkpoint' state file) instead of the latest"),
        Option("--all-steps", "read", bool, "convert every checkpoint the 'checkpoint' state file retains"),
        objects.NAMES_OPTION,
        objects.OBJECT_GRAPH_OPTION,
        *templates.OPTIONS,
    ),
    expand=expand,
    suffixes=(".index",),
    name_endings=(r"\.data-\d+-of-\d+", r"\.ckpt"),
    checksums="V2: CRC-32C of every tensor and of every index block; V1: CRC-32C of every table block",
    remote=True,
)

__all__ = ["NAME", "FORMAT", "detect", "read", "named", "write", "write_v1", "write_steps", "write_steps_v1", "expand",
           "locate", "role_of", "Located", "ConvertError"]
