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


@contextmanager
def atomic_output(dest: os.PathLike | str, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success make it ``dest``, on failure remove it.

    The body may create a file or a directory at the yielded path.
    """
    dest = Path(dest)
    check_writable(dest, force)
    tmp = _temp_name(dest)
    try:
        yield tmp
        if not tmp.exists():
            raise WriteError(dest, "the writer produced nothing")
        _fsync_tree(tmp)
        if dest.exists() or dest.is_symlink():
            # os.replace cannot put a directory over a file or a non-empty directory:
            # move the old output aside, put the new one in place, then delete the old one.
            old = _temp_name(dest)
            os.replace(dest, old)
            os.replace(tmp, dest)
            remove(old)
        else:
            os.replace(tmp, dest)
        dirfd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    except BaseException:
        remove(tmp)
        raise


def copy_tensor(tensor: Tensor, out: BinaryIO) -> int:
    """Stream a tensor's raw bytes into ``out``; return the number of bytes written."""
    written = 0
    for piece in tensor.chunks():
        out.write(piece)
        written += len(piece)
    return written
