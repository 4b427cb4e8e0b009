"""Output safety and streaming copies.

Every output is written under a temporary name in the destination folder, flushed
to disk (fsync) and renamed into place, so an interrupted or failed conversion
leaves nothing behind under the output name.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import WriteError
from .ir import Tensor

_counter = itertools.count()


def _temp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.convert-tmp-{os.getpid()}-{next(_counter)}")


def remove(path: Path) -> None:
    """Remove a file or a directory tree, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _fsync_tree(path: Path) -> None:
    paths = [path]
    if path.is_dir():
        paths = [Path(root) / name for root, _, files in os.walk(path) for name in files]
        paths += [Path(root) for root, _, _ in os.walk(path)]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_writable(dest: Path, force: bool) -> None:
    """Refuse an existing output without ``force``, and a destination folder that does not exist."""
    if (dest.exists() or dest.is_symlink()) and not force:
        raise WriteError(dest, "already exists (use --force to overwrite)")
    if not dest.parent.is_dir():
        raise WriteError(dest, f"folder {dest.parent} does not exist")


def _replace(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest``, replacing whatever is there (os.replace cannot put a directory
    over a file or a non-empty directory: the old one is moved aside, then deleted)."""
    if dest.exists() or dest.is_symlink():
        old = _temp_name(dest)
        os.replace(dest, old)
        os.replace(src, dest)
        remove(old)
    else:
        os.replace(src, dest)


@contextmanager
def atomic_output(dest: os.PathLike | str, force: bool = False) -> Iterator[Path]:
    """Yield a path with ``dest``'s name in a hidden staging folder beside ``dest``; on success
    move what was written there into place, on failure remove it all.

    The body may create a file or a directory at the yielded path, and files beside it
    that belong to it (an ONNX model's external data ``model.onnx.data``), named as they
    will be named in place. Those are moved first and the output itself last, each
    refused if it exists, unless ``force``.
    """
    dest = Path(dest)
    check_writable(dest, force)
    stage = _temp_name(dest)
    try:
        stage.mkdir()
    except OSError as e:
        raise WriteError(dest, f"cannot write in {dest.parent}: {e.strerror}") from None
    try:
        tmp = stage / dest.name
        yield tmp
        if not tmp.exists():
            raise WriteError(dest, "the writer produced nothing")
        companions = [p for p in sorted(stage.iterdir()) if p.name != dest.name]
        for p in companions:
            check_writable(dest.parent / p.name, force)
        _fsync_tree(stage)
        for p in [*companions, tmp]:
            _replace(p, dest.parent / p.name)
        dirfd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    finally:
        remove(stage)


def copy_tensor(tensor: Tensor, out: BinaryIO) -> int:
    """Stream a tensor's raw bytes into ``out``; return the number of bytes written."""
    written = 0
    for piece in tensor.chunks():
        out.write(piece)
        written += len(piece)
    return written
