"""Atomic outputs, local or remote: :func:`atomic_output` is :func:`convert.fileio.atomic_output`
for a local path and :func:`atomic_remote_output` for a URL (paths and reads: :mod:`convert.storage`).

Atomic outputs on object storage (no rename there), :func:`atomic_output` for a URL:

1. A leftover of a killed writer of the same output is cleaned first: its journal's objects
   are deleted and the incomplete multipart uploads under the output's key are aborted.
2. The writer writes; its uploads stay incomplete, so nothing is visible yet. Any failure
   (or Ctrl-C) aborts them all; a SIGKILL leaves only incomplete uploads, which no listing
   shows (the next writer aborts them, as does a bucket lifecycle rule).
3. :func:`readable` (the core calls it once the writer returned) writes a journal object
   beside the output (``.NAME.convert-journal.json``: the keys about to appear), then
   completes the data objects, then the *commit objects* last (the names the caller gives:
   a tf-ckpt folder's ``checkpoint`` state file, ``model.safetensors.index.json``; for a
   single-object output, the object itself). With ``force`` over an existing folder output,
   its old commit object is deleted before anything new appears, and its other old objects
   once the new commit object is in place: a reader sees the old output, none, or the new
   one, never a mix.
4. Verification reads the output back remotely (through the format's reader on this
   RemotePath) and compares checksums, as locally. If it fails, or anything after step 3
   does, the commit objects are deleted first, then the data objects, then the journal.
5. Success deletes the journal. A run killed between 3 and 5 leaves its journal; the next
   writer of the output removes what it lists.

So a failed or killed run leaves no commit object (or a complete output, if it was killed
after completing it), and our readers refuse a folder with no commit object (phase 2: the
tf-ckpt reader must not fall back to a lone ``.index`` in a remote folder). One writer per
output at a time is assumed (``convert batch`` gives each output to one job).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from . import fileio
from .errors import ConvertError, WriteError
from .storage import PART_SIZE, RemotePath, as_path, is_remote, local, redact


class _Upload:
    """One object being written: an fsspec file opened with ``autocommit=False`` (on S3 a
    multipart upload that is only completed by :meth:`commit`)."""

    def __init__(self, target: RemotePath):
        self.target = target
        self.file = target._call("write", target.fs.open, target.path, "wb", autocommit=False, block_size=PART_SIZE)
        self.state = "open"

    def write(self, data) -> int:
        return self.target._call("write", self.file.write, data)

    def tell(self) -> int:
        return self.file.tell()

    def flush(self) -> None:
        pass  # parts go up as they fill; nothing to force

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        import io

        raise io.UnsupportedOperation("an upload has no file descriptor")

    def close(self) -> None:
        if self.state == "open":
            self.target._call("write", self.file.close)  # uploads the last part, completes nothing
            self.state = "closed"

    def __enter__(self) -> _Upload:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def commit(self) -> None:
        self.close()
        self.target._call("write", self.file.commit)
        self.state = "committed"

    def discard(self) -> None:
        if self.state in ("open", "closed"):
            with contextlib.suppress(Exception):
                self.file.discard()
            self.file.closed = True  # an fsspec file would upload its buffer when garbage-collected
            self.state = "discarded"


def _journal_of(dest: RemotePath) -> RemotePath:
    return dest.with_name(f".{dest.name}.convert-journal.json")


class RemoteOutput:
    """The objects of one remote output being written (see the module docstring)."""

    def __init__(self, dest: RemotePath, force: bool, commit: Iterable[str]):
        self.dest, self.force = dest, force
        self.commit_patterns = tuple(commit)
        self.uploads: list[_Upload] = []
        self.completed: list[RemotePath] = []
        self.journal = _journal_of(dest)
        self.old: list[RemotePath] = []
        self.published = False
        self._lock = threading.Lock()

    def root(self) -> RemotePath:
        return RemotePath(str(self.dest), fs=self.dest.fs, path=self.dest.path, output=self)

    def open(self, target: RemotePath, mode: str) -> _Upload:
        if "w" not in mode and "x" not in mode or "b" not in mode:
            raise ValueError(f"remote outputs open in 'wb' mode, not {mode!r}")
        if target.path != self.dest.path and not target.path.startswith(self.dest.path + "/"):
            raise WriteError(redact(str(target)), f"is outside the output {redact(str(self.dest))}")
        upload = _Upload(target)
        with self._lock:
            self.uploads.append(upload)
        return upload

    def _is_commit(self, p: RemotePath) -> bool:
        if p.path == self.dest.path:
            return True  # a single-object output is its own commit object
        rel = p.relative_to(self.dest)
        return any(PurePosixPath(rel).match(pat) for pat in self.commit_patterns)

    def publish(self) -> RemotePath:
        """Complete every upload, the commit objects last; return the output, readable."""
        if self.published:
            return self.dest
        for u in self.uploads:
            if u.state == "open":
                raise WriteError(redact(str(u.target)), "was still open when the writer returned")
        ordered = sorted(self.uploads, key=lambda u: self._is_commit(u.target))
        keys = [str(u.target) for u in ordered]
        self.journal.fs.pipe_file(self.journal.path, json.dumps({"output": str(self.dest), "objects": keys}).encode())
        old_commits = [p for p in self.old if self._is_commit(p)]
        for p in old_commits:  # the old output disappears before any new object appears
            p.unlink(missing_ok=True)
        for u in ordered:
            u.commit()
            self.completed.append(u.target)
        new = {u.target.path for u in ordered}
        for p in self.old:
            if p.path not in new and p not in old_commits:
                p.unlink(missing_ok=True)
        self.published = True
        self.dest.fs.invalidate_cache()
        return self.dest

    def rollback(self) -> None:
        """Abort what is pending; delete what was completed, commit objects first."""
        for u in self.uploads:
            u.discard()
        for p in sorted(self.completed, key=lambda p: not self._is_commit(p)):
            with contextlib.suppress(Exception):
                p.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            self.journal.unlink(missing_ok=True)
        self.dest.fs.invalidate_cache()

    def finish(self) -> None:
        self.publish()
        with contextlib.suppress(Exception):
            self.journal.unlink(missing_ok=True)


def pending_uploads(dest: RemotePath) -> list[tuple[str, str]]:
    """``(key, upload id)`` of the incomplete multipart uploads at or under ``dest`` (S3 only)."""
    call = getattr(dest.fs, "call_s3", None)
    if call is None:
        return []
    bucket, _, key = dest.path.partition("/")
    out, kwargs = [], {"Bucket": bucket, "Prefix": key}
    while True:
        page = dest._call("read", call, "list_multipart_uploads", **kwargs)
        out += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", []) or []
                if u["Key"] == key or u["Key"].startswith(key.rstrip("/") + "/")]
        if not page.get("IsTruncated"):
            return out
        kwargs.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))


def recover(dest: os.PathLike | str | RemotePath) -> list[str]:
    """Remove what a killed writer of ``dest`` left: the objects its journal lists (it was killed
    while completing them or verifying) and the incomplete uploads under ``dest``. Returns what
    was removed."""
    dest = as_path(dest) if not isinstance(dest, RemotePath) else dest
    assert isinstance(dest, RemotePath)
    removed = []
    journal = _journal_of(dest)
    if journal.exists():
        try:
            listed = json.loads(journal.read_bytes())["objects"]
        except (ValueError, KeyError, TypeError, ConvertError):
            listed = []
        for url in sorted(listed, key=lambda u: u == str(dest)):  # the commit objects went last: they go first
            obj = RemotePath(url, fs=dest.fs, path=dest.fs._strip_protocol(url))
            if obj.path == dest.path or obj.path.startswith(dest.path + "/"):
                with contextlib.suppress(FileNotFoundError):
                    obj.unlink()
                    removed.append(url)
        journal.unlink(missing_ok=True)
    bucket = dest.path.partition("/")[0]
    for key, upload_id in pending_uploads(dest):
        with contextlib.suppress(Exception):
            dest.fs.abort_mpu(bucket, key, upload_id)
            removed.append(f"{dest.protocol}://{bucket}/{key} (incomplete upload)")
    dest.fs.invalidate_cache()
    return removed


@contextmanager
def atomic_remote_output(dest: os.PathLike | str | RemotePath, force: bool = False,
                         commit: Iterable[str] = ()) -> Iterator[RemotePath]:
    """Yield ``dest`` as a :class:`RemotePath` whose files are uploads held back until the body
    ends (or :func:`readable` is called), the data objects completed first and the objects
    matching ``commit`` (glob patterns relative to ``dest``) last; on any failure nothing
    new stays visible. See the module docstring."""
    dest = dest if isinstance(dest, RemotePath) else RemotePath(os.fspath(dest))
    recover(dest)
    out = RemoteOutput(dest, force, commit)
    if dest.is_file():
        out.old = [dest]
    elif dest.is_dir():
        out.old = [p for p, _ in dest.files()]
    if out.old and not force:
        raise WriteError(redact(str(dest)), "already exists (use --force to overwrite)")
    try:
        yield out.root()
        out.finish()
    except BaseException:
        out.rollback()
        raise


def readable(tmp: os.PathLike | str | RemotePath) -> Path | RemotePath:
    """Where the output being written at ``tmp`` (what :func:`atomic_output` yielded) can be read
    back for verification: locally the staged copy itself; remotely, the output, once its
    uploads are completed (commit objects last)."""
    if isinstance(tmp, RemotePath) and isinstance(tmp._output, RemoteOutput):
        return tmp._output.publish()
    return Path(tmp) if not isinstance(tmp, RemotePath) else tmp


@contextmanager
def atomic_output(dest: os.PathLike | str | RemotePath, force: bool = False,
                  commit: Iterable[str] = ()) -> Iterator[Path | RemotePath]:
    """:func:`convert.fileio.atomic_output` for a local path, :func:`atomic_remote_output` for a URL."""
    if isinstance(dest, RemotePath) or is_remote(dest):
        with atomic_remote_output(dest, force, commit) as tmp:
            yield tmp
    else:
        with fileio.atomic_output(local(dest), force) as tmp:
            yield tmp
