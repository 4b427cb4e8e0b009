"""Output safety: nothing lost, nothing half-written.

Every output is written in a hidden staging folder beside it
(``.NAME.convert-tmp-PID-N/NAME``), flushed to disk (fsync) and then moved into place
with an atomic rename, so that whatever stops a conversion -- an error, a full disk,
Ctrl-C, SIGTERM, SIGKILL, a power cut -- the output path holds either nothing, the
previous output untouched, or the new output complete:

* a new output is published with ``renameat2(RENAME_NOREPLACE)`` (``link(2)`` for a file
  where that call is missing), so that of two conversions racing for the same output
  without ``--force`` exactly one wins and the other says "already exists";
* an existing output (``--force``) is swapped with the new one by
  ``renameat2(RENAME_EXCHANGE)``, which replaces a folder (a tf-ckpt output) as atomically
  as a file; the old output lands in the staging folder and is deleted with it;
* an output with companion files (an ONNX model's external data, same names as the old
  one's) takes several renames: companions first, the output last, the old output moved
  away first so that it never meets the new companions. A journal in the staging folder
  lets the next conversion undo such a publication if it was killed halfway;
* publications into a folder are serialised between conversions by an advisory lock on the
  folder, so an output and its companions always come from the same conversion; SIGINT and
  SIGTERM are held back until the renames and the clean-up are done;
* a staging folder left behind by a killed conversion (SIGKILL, power cut) is removed -- its
  publication undone first, if cut in half -- by the next conversion writing into the same
  folder, once its owner is gone: each owner holds an advisory lock on its staging folder
  while it lives, and the name carries its PID.

Where ``renameat2`` or ``flock`` is missing (not Linux, or a file system without them) the
same steps fall back to plain POSIX renames: replacing a folder is then two renames, and a
kill between them leaves nothing at the output path until the next conversion puts the old
one back (never a mixed or partial output).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import json
import os
import re
import shutil
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import WriteError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]  # no file locks there

_counter = itertools.count()
_STAGE = re.compile(r"\.(?P<output>.+)\.convert-tmp-(?P<pid>\d+)-\d+")
_live_stages: set[str] = set()  # this process's staging folders (another process may have had our PID)
STALE_AFTER = 60.0
"""Seconds after which an unlocked staging folder whose PID is in use by some other program is stale."""
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _fsync_tree(path: Path) -> None:
    """fsync every file and folder under ``path`` (files first, each folder after its entries)."""
    if not _is_dir(path):
        _fsync(path)
        return
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                _fsync(p)
        _fsync(root)


def _fsync(path: os.PathLike | str) -> None:
    fd = os.open(path, os.O_RDONLY)
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


# --- advisory locks (flock): released by the kernel when their owner dies, even by SIGKILL ---

def _open_dir(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None


def _try_lock(fd: int, wait: float = 0.0) -> bool | None:
    """Take an exclusive flock on ``fd``: True when taken, False when another holds it (after
    ``wait`` seconds), None when the file system cannot tell."""
    if fcntl is None:
        return None
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        except OSError:  # ENOLCK, EOPNOTSUPP: a file system without locks
            return None


@contextmanager
def _folder_lock(folder: Path, wait: float = 30.0) -> Iterator[None]:
    """Serialise publications into ``folder`` between conversions. Held for a few renames; if
    someone holds it longer than ``wait`` we go ahead: each rename is atomic on its own."""
    fd = _open_dir(folder)
    try:
        if fd is not None:
            _try_lock(fd, wait)
        yield
    finally:
        if fd is not None:
            os.close(fd)


# --- stale staging folders ---

def _owner_gone(path: Path, pid: int) -> bool:
    if pid == os.getpid():
        return os.path.abspath(path) not in _live_stages  # a killed process that had our PID
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        return False
    return False


def remove_stale_stages(folder: Path) -> list[Path]:
    """Remove the staging folders in ``folder`` that conversions killed before they could clean
    up (SIGKILL, power cut) left behind; return them.

    A staging folder is stale when nobody holds its lock and its PID is gone (or, PIDs being
    reused, is older than :data:`STALE_AFTER`). Where the file system has no locks, a gone PID
    alone decides. A live conversion's staging folder is never touched, nor another user's.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = _STAGE.fullmatch(entry.name)
        if m is None:
            continue
        path = Path(entry.path)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or _euid() not in (None, st.st_uid):
            continue
        if not (_owner_gone(path, int(m["pid"])) or time.time() - st.st_mtime > STALE_AFTER):
            continue
        fd = _open_dir(path)
        if fd is None:
            continue
        try:
            locked = _try_lock(fd)
            if locked is False or (locked is None and not _owner_gone(path, int(m["pid"]))):
                continue  # its owner is alive
            if os.path.lexists(path / _JOURNAL):  # killed while publishing
                with _folder_lock(folder):
                    _recover(path, folder, m["output"])
                    # Settled (undone, or found complete): the journal goes for good before
                    # anything else of the stage does. Else a power cut could keep the journal
                    # and lose the old copies it lists, and a later recovery, finding the output
                    # moved aside by the next publication, would put back half of an old one.
                    try:
                        os.unlink(path / _JOURNAL)
                    except FileNotFoundError:
                        pass
                    _fsync_quietly(path)
            remove(path)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _make_stage(dest: Path) -> tuple[Path, int | None]:
    """Create this conversion's staging folder beside ``dest`` and lock it for our lifetime."""
    for _ in range(1000):
        stage = _temp_name(dest)
        try:
            stage.mkdir()
        except FileExistsError:  # left by a killed process that had our PID
            continue
        except OSError as e:
            raise WriteError(dest, f"cannot write in {dest.parent}: {e.strerror}") from None
        _live_stages.add(os.path.abspath(stage))
        fd = _open_dir(stage)
        if fd is not None:
            _try_lock(fd)
        return stage, fd
    raise WriteError(dest, f"cannot write in {dest.parent}: no free staging name")  # pragma: no cover


# --- renames ---

@functools.cache
def _renameat2_function() -> Callable[[bytes, bytes, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.2
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return lambda src, dst, flags: fn(_AT_FDCWD, src, _AT_FDCWD, dst, flags)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2): True when done, False when this system or file system lacks it (the caller
    falls back); any other failure raises the OSError (FileExistsError, FileNotFoundError...)."""
    fn = _renameat2_function()
    if fn is None:
        return False
    if fn(os.fsencode(src), os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; FileExistsError when ``dst`` exists, even if it appeared a moment ago."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if not _is_dir(src):
        try:
            os.link(src, dst, follow_symlinks=False)  # link(2) never replaces: POSIX's no-clobber publish
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: check, then rename
            pass
        else:
            os.unlink(src)
            return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dst))
    os.rename(src, dst)  # a folder cannot land on a file or a non-empty folder; the window is tiny


def _exchange(src: Path, dst: Path, aside: Path, keep_old: bool) -> None:
    """Put ``src`` at ``dst`` in place of what is there (FileNotFoundError when nothing is); the
    old one ends up at ``src`` (swapped) or ``aside``, inside the staging folder, or, unless
    ``keep_old``, is gone."""
    if _renameat2(src, dst, _RENAME_EXCHANGE):
        return
    if not os.path.lexists(dst):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fspath(dst))
    if not keep_old and not _is_dir(src) and not _is_dir(dst):
        os.replace(src, dst)  # file over file: atomic everywhere
        return
    # No RENAME_EXCHANGE, and a folder, or an old companion the journal may have to put back:
    # move the old one aside first; an interruption between the two renames leaves nothing at
    # dst (until the next conversion puts the old one back), never a mix.
    aside.parent.mkdir(exist_ok=True)
    os.rename(dst, aside)
    try:
        os.rename(src, dst)
    except OSError:
        os.rename(aside, dst)
        raise


def _place(src: Path, dst: Path, force: bool, aside: Path, keep_old: bool = False) -> None:
    """Move ``src`` to ``dst`` atomically, replacing what is there only with ``force``."""
    for _ in range(10):
        try:
            _rename_noreplace(src, dst)
            return
        except FileExistsError:
            if not force:
                raise
        try:
            _exchange(src, dst, aside, keep_old)
            return
        except FileNotFoundError:
            if not os.path.lexists(src):
                raise
            continue  # the old one went away meanwhile
    raise WriteError(dst, "another program keeps replacing it")  # pragma: no cover


# In the staging folder, during a publication: what is being published (to finish or undo it
# if the conversion is killed halfway), and the old outputs that could not be swapped.
_JOURNAL, _OLD = ".convert-journal.json", ".convert-old"


def _identity(path: Path) -> list[int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino]


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name and os.sep not in name


def _euid() -> int | None:
    return os.geteuid() if hasattr(os, "geteuid") else None


def _publish(stage: Path, dest: Path, force: bool) -> None:
    """Move the staged output and its companions into place (see the module docstring)."""
    tmp = stage / dest.name
    companions = [p for p in sorted(stage.iterdir()) if p.name != dest.name]
    placed: list[tuple[Path, Path]] = []
    target = dest
    try:
        with _folder_lock(dest.parent):
            check_writable(dest, force)
            for p in companions:
                check_writable(dest.parent / p.name, force)
            journal = {"output": dest.name, "companions": [p.name for p in companions],
                       "new": {p.name: _identity(p) for p in [*companions, tmp]},
                       "existed": {p.name: os.path.lexists(dest.parent / p.name) for p in companions}}
            (stage / _JOURNAL).write_text(json.dumps(journal), "utf-8")
            _fsync(stage / _JOURNAL)
            _fsync(stage)
            if companions and force and os.path.lexists(dest):
                # The old output would read the new companions (same names): it goes first, so
                # that until the new one is in place the output path holds nothing.
                (stage / _OLD).mkdir(exist_ok=True)
                try:
                    os.rename(dest, stage / _OLD / dest.name)
                except FileNotFoundError:
                    pass
                else:
                    _fsync(dest.parent)  # gone for good before any companion changes
            for p in companions:
                target = dest.parent / p.name
                _place(p, target, force, stage / _OLD / p.name, keep_old=True)
                placed.append((p, target))
            if companions:
                # Renames in one folder may reach the disk in any order until it is fsynced:
                # the companions are there for good before the output that reads them appears
                # (and, where link(2) placed them, their staged names are gone for good: onnx
                # refuses external data with two links).
                _fsync(dest.parent)
                _fsync(stage)
            target = dest
            _place(tmp, dest, force, stage / _OLD / dest.name)
            _fsync(dest.parent)
    except FileExistsError:
        for p, t in reversed(placed):  # ours, placed a moment ago: take them back
            try:
                os.rename(t, p)
            except OSError:
                pass
        raise WriteError(target, "already exists (use --force to overwrite)") from None
    except OSError as e:
        raise WriteError(target, f"cannot move the output into place: {e.strerror or e}") from None


def _recover(stage: Path, folder: Path, output: str) -> None:
    """Undo the publication that a killed conversion left halfway, from its journal: its
    companions placed without the output are taken away and the old ones put back, and so is
    the old output. Once the output itself is in place there is nothing to undo (it goes last).
    Idempotent: a recovery killed in turn is finished by the next."""
    try:
        journal = json.loads((stage / _JOURNAL).read_text("utf-8"))
        companions = [str(n) for n in journal["companions"]]
        new, existed = dict(journal["new"]), dict(journal["existed"])
        if journal["output"] != output:
            return
    except (OSError, ValueError, KeyError, TypeError):
        return  # killed before the journal was complete: nothing had moved
    if not all(_plain_name(n) for n in [output, *companions]):
        return  # not a journal we wrote: touch nothing outside the staging folder
    if _identity(folder / output) == new.get(output):
        return
    lost = False
    for name in companions:
        target = folder / name
        ours = _identity(target) == new.get(name)
        if not ours and os.path.lexists(target):
            continue  # never replaced
        # the old one was moved aside, or swapped with ours (then it is where ours was staged),
        # unless what is staged is ours itself (link(2) placed it and the kill came before unlink)
        olds = [p for p in (stage / _OLD / name, *([stage / name] if ours else []))
                if os.path.lexists(p) and _identity(p) != new.get(name)]
        try:
            if olds:
                os.replace(olds[0], target)
            else:
                if ours:
                    os.unlink(target)
                lost = lost or bool(existed.get(name))
        except OSError:
            lost = True
    # As in _publish: the companions are back for good before the output that reads them, and
    # all of it before the journal goes (the caller removes the staging folder next).
    _fsync_quietly(folder)
    old = stage / _OLD / output
    if not lost and os.path.lexists(old) and not os.path.lexists(folder / output):
        try:
            _rename_noreplace(old, folder / output)
        except OSError:
            pass
        _fsync_quietly(folder)


def _fsync_quietly(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # pragma: no cover - a folder we just listed
        pass


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (handled when the block ends) so that their handlers, which
    raise, cannot cut a publication or a clean-up in half. Main thread only (Python's rule)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for s in _DEFERRED_SIGNALS:
        old = signal.getsignal(s)
        if old is None:  # set outside Python: cannot be restored, leave it
            continue
        signal.signal(s, lambda signum, frame: caught.append(signum))
        previous[s] = old
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


@contextmanager
def _flushing(stage: Path, every: float = 0.25) -> Iterator[None]:
    """While the writer works, a thread keeps asking the kernel to write what is already in the
    staging folder to disk (fdatasync), so the disk works alongside the writer and the fsync
    that makes the output durable finds little left to do."""
    done = threading.Event()

    def flush() -> None:
        while not done.wait(every):
            for root, _, files in os.walk(stage):
                for name in files:
                    try:
                        fd = os.open(os.path.join(root, name), os.O_RDONLY)
                    except OSError:
                        continue
                    try:
                        os.fdatasync(fd)
                    except OSError:  # the final fsync reports what matters
                        pass
                    finally:
                        os.close(fd)
    thread = threading.Thread(target=flush, name="convert-flush", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _discard(stage: Path, fd: int | None) -> None:
    remove(stage)
    _live_stages.discard(os.path.abspath(stage))
    if fd is not None:
        os.close(fd)


@contextmanager
def atomic_output(dest: os.PathLike | str, force: bool = False) -> Iterator[Path]:
    """Yield a path with ``dest``'s name in a hidden staging folder beside ``dest``; on success
    move what was written there into place, on failure remove it all.

    The body may create a file or a directory at the yielded path, and files beside it
    that belong to it (an ONNX model's external data ``model.onnx.data``), named as they
    will be named in place. Those are moved first and the output itself last, each
    refused if it exists, unless ``force``. Staging folders that killed conversions left
    in the destination folder are removed first (:func:`remove_stale_stages`).
    """
    dest = Path(dest)
    check_writable(dest, force)
    remove_stale_stages(dest.parent)
    stage, fd = _make_stage(dest)
    try:
        tmp = stage / dest.name
        with _flushing(stage):
            yield tmp
        if not os.path.lexists(tmp):
            raise WriteError(dest, "the writer produced nothing")
        try:
            _fsync_tree(stage)
        except OSError as e:
            raise WriteError(dest, f"cannot write: {e.strerror or e}") from None
    except BaseException:
        with _signals_deferred():
            _discard(stage, fd)
        raise
    with _signals_deferred():
        try:
            _publish(stage, dest, force)
        finally:
            _discard(stage, fd)
