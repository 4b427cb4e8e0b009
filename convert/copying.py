"""Copying many tensors' bytes at once: what a writer with thousands of small tensors calls
instead of one :meth:`convert.ir.Tensor.copy_into` (or :func:`convert.ir.digest`) per tensor.

A run of small tensors whose bytes follow each other in one file is read with one ``pread`` (or
copied with one ``copy_file_range``) and each tensor's checksums are checked on its slice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from .errors import CorruptFileError
from .ir import NO_COPY_RANGE, FileRegion, Tensor, descriptor, digest, has_fd


def _runs(tensors: Sequence[Tensor], gap: int = 0
          ) -> Iterator[tuple[list[tuple[Tensor, FileRegion]], Tensor | None]]:
    """Consecutive tensors whose bytes are small regions (no ``span``) following each other in one
    file, grouped into runs of at most :data:`convert.ir.RUN` bytes; each other tensor alone, as ``([], t)``.
    ``gap``: bytes a run may skip between two regions (a reader's, not a copy's: a zip member's
    header and padding lie between two tensors of a torch file)."""
    run: list[tuple[Tensor, FileRegion]] = []
    start = end = 0
    path = None
    limits: dict[type, tuple[int, int]] = {}  # run_limits() of each kind of region (a constant of its class)
    for t in tensors:  # 50,000 tensors at a time: kept lean
        r = t.source.region() if t.dtype.kind != "string" else None
        if r is not None:
            kind = type(r)
            small, limit = limits.get(kind) or limits.setdefault(kind, r.run_limits())
        if r is None or r.length >= small or r.span is not None or r.length != t.nbytes:
            if run:
                yield run, None
                run = []
            yield [], t
            continue
        if run and (not end <= r.offset <= end + gap or r.path != path or r.offset + r.length - start > limit):
            yield run, None
            run = []
        if not run:
            start = r.offset
        run.append((t, r))
        path, end = r.path, r.offset + r.length
    if run:
        yield run, None


def _read_run(run: list[tuple[Tensor, FileRegion]]) -> bytes:
    first = run[0][1]
    length = run[-1][1].offset + run[-1][1].length - first.offset
    data = first.read_at(first.offset, length)
    if len(data) != length:
        raise CorruptFileError(first.path, "file is truncated", first.label)
    return data  # sliced per tensor: a copy of a few KB costs less than a memoryview google_crc32c refuses


def copy_many(tensors: Sequence[Tensor], out: BinaryIO) -> list[int]:
    """``t.copy_into(out)`` for each tensor in turn; their CRC-32Cs. A run of small tensors whose
    bytes follow each other in one file (a checkpoint of 50,000 biases and norms) is read with one
    ``pread`` and written with one ``write``, each tensor's checksums checked on its slice: per
    tensor, no system call. What a writer with many tensors calls instead of ``copy_into``."""
    crcs = []
    kernel = getattr(os, "copy_file_range", None) is not None and has_fd(out)
    for run, single in _runs(tensors):
        if single is not None:
            crcs.append(single.copy_into(out))
            continue
        if kernel and type(run[0][1]) is FileRegion and all(
                t.source.verified_after() and r.crc32c is not None and r.crc32 is None for t, r in run):
            # the output is read back and compared with the CRC-32Cs the source stores: copied in the kernel
            if _copy_run(run, out):
                for t, r in run:
                    assert r.crc32c is not None  # the run was taken for the CRC-32Cs its source stores
                    t.source.copied(r.crc32c)
                    crcs.append(r.crc32c)
                continue
            kernel = False
        data = _read_run(run)
        pos = 0
        for t, r in run:
            crc = r._check_slice(data[pos:pos + r.length])
            t.source.copied(crc)
            crcs.append(crc)
            pos += r.length
        out.write(data)
    return crcs


def _copy_run(run: list[tuple[Tensor, FileRegion]], out: BinaryIO) -> bool:
    """The run's bytes copied into ``out`` at its position by ``copy_file_range``; False (nothing
    copied) where the kernel refuses it (another file system)."""
    first = run[0][1]
    length = run[-1][1].offset + run[-1][1].length - first.offset
    out.flush()
    dst, start = out.fileno(), out.tell()
    done = 0
    with descriptor(first.path, first.label) as src:
        while done < length:
            try:
                n = os.copy_file_range(src, dst, length - done, first.offset + done, start + done)
            except OSError as e:
                if done or e.errno not in NO_COPY_RANGE:
                    raise
                return False
            if n <= 0:
                raise CorruptFileError(first.path, "file is truncated", first.label)
            done += n
    out.seek(start + length)
    return True


def digest_many(tensors: Sequence[Tensor]) -> list[int]:
    """:func:`digest` of each tensor, runs of small regions near each other in one file read at once."""
    crcs = []
    for run, single in _runs(tensors, GAP):
        if single is not None:
            crcs.append(digest(single))
            continue
        data = _read_run(run)
        first = run[0][1].offset
        for _, r in run:
            pos = r.offset - first
            crcs.append(r._check_slice(data[pos:pos + r.length]))
    return crcs


GAP = 4096
"""Bytes :func:`digest_many` reads past between two small regions rather than starting a new read."""
