"""Finding and reading TensorFlow checkpoints: a folder's ``checkpoint`` state file, a prefix,
an ``.index``/``.data-*``/``.meta`` file or a V1 file, locally or at a URL (see the package's
docstring), and :func:`read`, which gives their tensors lazily with roles (:mod:`.roles`)."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ... import storage
from ...errors import ReadError, UsageError
from ...ir import TensorDict
from .bundle import read_bundle
from .roles import named, role_attrs
from .slices import read_v1
from .sstable import has_table_magic
from .state import STATE_FILE, CheckpointState, candidates, read_state, state_paths

NAME = "tf-ckpt"

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


def _at_step(d: object, paths: list[str], step: int, find: Callable[[str], Located | None]) -> Located:
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


def _remote_state(d: storage.RemotePath) -> CheckpointState:
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


def _listed(d: object, paths: list[str], find: Callable[[str], Located | None]) -> list[tuple[str, Path]]:
    """(label, concrete path) of every checkpoint a state file lists (``find``: where one is, or None)."""
    out = []
    for s in paths:
        found = find(s)
        if found is None:
            raise ReadError(d, f"the '{STATE_FILE}' file lists checkpoint '{s}', which is not there")
        out.append((_label(found), found.concrete))
    return out


def _expand_remote(p: storage.RemotePath, step: int | None) -> list[tuple[str, Path]]:
    if step is not None:
        loc = _locate_remote(p, step)
        return [(_label(loc), loc.concrete)]
    d = p if p.is_dir() else p.parent
    st = _remote_state(d)
    return _listed(d, state_paths(d, st), lambda s: _remote_located(d, s))


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
    return _listed(d, state_paths(d, st), lambda s: _locate_in_state(d, s))


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


def read(path: os.PathLike | str, step: int | None = None, all_steps: bool = False, names: str | None = None,
         **unknown: object) -> TensorDict:
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
