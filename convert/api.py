"""The public operations: read, write, convert, inspect.

Data flows one way: path -> adapter.read -> TensorDict -> selection, mapping, cast
-> TensorDict -> adapter.write -> path, then verification of what was written.
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import google_crc32c

from . import compare, dtypes, fileio, outputs, registry, storage
from .copying import digest_many
from .errors import ConvertError, ReadError, UsageError, VerificationError, WriteError
from .formats.base import Format, Writer, WriteReport
from .ir import CHUNK, Source, Tensor, TensorDict, array_digest, derived, digest, open_files
from .lazy import np

PathLike = os.PathLike | str
DROPPED_BY_WEIGHTS_ONLY = ("optimizer", "step")
READ_NOTE = "local.note."
"""Metadata keys of this prefix hold what a reader tells the user (``local.``: never written out)."""


def _local_only(info: registry.FormatInfo, path: PathLike | storage.RemotePath | None, verb: str) -> None:
    """Refuse a URL for a format whose adapter takes local paths only (``Format.remote``)."""
    if path is not None and storage.is_remote(path) and not info.format.remote:
        where = "from" if verb == "reading" else "to"
        raise UsageError(f"{storage.redact(str(path))}: {verb} {info.name} {where} remote paths is not supported "
                         f"yet; copy the files locally (formats read and written remotely: "
                         f"{', '.join(registry.remote_formats())})")


def _path(info: registry.FormatInfo, path: PathLike | storage.RemotePath) -> Path:
    """What the adapter takes: a ``Path`` or, for a remote-capable format, a RemotePath for a URL."""
    if info.format.remote:
        return _adapter_path(storage.as_path(path))
    assert not isinstance(path, storage.RemotePath)  # _local_only refused it
    return storage.local(path)


def _adapter_path(p: storage.AnyPath) -> Path:
    """``p`` as the contract's ``Path``: a RemotePath is given only to formats with ``remote``, whose
    adapters use the pathlib methods it has (the contract's types cannot say "Path, or for these
    formats a RemotePath")."""
    return cast(Path, p)


def _format(path: PathLike, format: str | None) -> registry.FormatInfo:
    info = registry.detect(path) if format is None or format == "auto" else registry.get(format)
    _local_only(info, path, "reading")
    return info


def _options(info: registry.FormatInfo, side: str, opts: Mapping[str, object]) -> dict:
    """Keep the options that are set; refuse any the format's reader/writer does not take."""
    declared = {o.keyword: o for o in info.format.options if o.side == side}
    given = {k: v for k, v in opts.items() if v is not None and v is not False and v != []}
    for key in given:
        if key not in declared:
            verb = "reading" if side == "read" else "writing"
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} does not apply to {verb} {info.name}")
    return given


def read(path: PathLike, format: str | None = None, **opts) -> TensorDict:
    """Read a checkpoint lazily: tensors are listed, their data is read only when asked for.

    Args:
        path: a file or folder; a URL (``s3://...``, ``memory://...``) for the formats that take remote
            paths (``convert.registry.remote_formats()``: safetensors, tf-ckpt V2, torch, npz, gguf, dcp, onnx).
        format: a format name from ``convert formats``; None or "auto" detects it from content.
        **opts: format-specific reading options (e.g. ``step=190`` for tf-ckpt).

    Returns:
        The :class:`~convert.TensorDict`.

    Example:
        A TensorFlow checkpoint folder (the bundled ``examples/model1``); only its index is read here:

        >>> td = convert.read("model1/")
        >>> td["conv1/w"]
        Tensor('conv1/w', float32, [5, 5, 1, 8])
        >>> td["conv1/w"].attrs["role"], td.metadata["tf.global_step"]
        ('weight', '190')
        >>> float(td["conv1/w"].numpy().std()) > 0   # the values, read now
        True
    """
    info = _format(path, format)
    reader = info.format.read
    if reader is None:
        raise UsageError(f"{info.name} cannot be read")
    registry.require(info, "read")
    kwargs = _options(info, "read", opts)
    return reader(_path(info, path), **kwargs)


def label(info: registry.FormatInfo, writer: Writer) -> str:
    """How the summary names a destination: the format, and the writer when it is not the default
    (by the alias that names it, if one does: ``tf-ckpt-v1``)."""
    if writer is info.format.writers[0]:
        return info.name
    return next((a for a, w in info.writer_aliases.items() if w == writer.id), f"{info.name}:{writer.id}")


def check_dtypes(td: TensorDict, info: registry.FormatInfo, writer: Writer, path: PathLike) -> None:
    """Fail before writing anything when the writer cannot hold some tensor's dtype, listing them all."""
    held: dict[str, bool] = {}  # by dtype name: a checkpoint has a few dtypes and 50,000 tensors
    bad = [t for t in td.values()
           if not (held[t.dtype.name] if t.dtype.name in held else held.setdefault(t.dtype.name, writer.holds(t.dtype)))]
    if bad:
        kinds = ", ".join(sorted({t.dtype.name for t in bad}))
        names = ", ".join(t.name for t in bad)
        fix = "leave them out with --exclude"
        wider = next((d for d in (dtypes.FLOAT32, dtypes.by_name("float16")) if writer.holds(d)), None)
        if wider is not None and all(t.dtype.is_floating for t in bad):  # quantized, float8...: cast them
            fix = f"convert them with --dtype {wider.name} (or another float dtype it holds), or {fix}"
        raise WriteError(path, f"{label(info, writer)} cannot hold {kinds} tensors: {names} ({fix})")


def write(td: TensorDict, path: PathLike, format: str, *, force: bool = False, verify: bool = True,
          progress: Callable[[int], None] | None = None, **opts) -> dict:
    """Write a TensorDict atomically, then (by default) read it back and compare every tensor.

    Args:
        td: what to write.
        path: the output file or folder (or a URL, as for :func:`convert.read`); must not exist unless ``force``.
        format: a format name from ``convert formats``, optionally with a writer id (``tf-ckpt:v1``).
        force: replace an existing output.
        verify: re-read the output with the format's reader and compare each tensor's values.
        progress: called with the number of bytes each time a piece of tensor data is written.
        **opts: format-specific writing options.

    Returns:
        The summary of what was written (``output``, ``format``, ``tensors``, ``bytes``, ``verified``, ``notes``).

    Example:
        >>> td = convert.read("model1/")
        >>> summary = convert.write(td, "model1.safetensors", "safetensors")
        >>> summary["tensors"], summary["verified"]
        (27, True)
        >>> convert.write(td, "model1-v1", "tf-ckpt:v1")["format"]      # a writer id: the V1 format
        'tf-ckpt-v1'
    """
    info, writer = registry.writer(format)
    return _write([td], path, info, writer, force, verify, opts, progress, series=False)


def write_steps(tds: Sequence[TensorDict], path: PathLike, format: str, *, force: bool = False,
                verify: bool = True, progress: Callable[[int], None] | None = None, **opts) -> dict:
    """Write several checkpoints (the steps of a training run) into one output, for a writer
    that has a ``series`` function; verified like :func:`write`, each one."""
    info, writer = registry.writer(format)
    if writer.series is None:
        raise UsageError(f"{label(info, writer)} holds one checkpoint per output")
    return _write(list(tds), path, info, writer, force, verify, opts, progress, series=True)


def _read_back(fmt: Format, writer: Writer, path: Path, series: bool, opts: Mapping[str, object]) -> list[TensorDict]:
    """The output as verification sees it: the writer's own way, or the format's reader (each step
    of a series, through ``expand``)."""
    if writer.read_back is not None:
        return writer.read_back(path, opts)
    assert fmt.read is not None
    if series and fmt.expand is not None:
        return [fmt.read(p) for _, p in fmt.expand(path, all_steps=True)]
    return [fmt.read(path)]


Companions = Callable[[Path], Mapping[str, bytes]]
"""Files to publish beside an output, together with it and before it: given the output's path,
their names (in its folder) and bytes. convert batch's provenance record is one."""


def _write(tds: list[TensorDict], path: PathLike | storage.RemotePath, info: registry.FormatInfo, writer: Writer, force: bool,
           verify: bool, opts: Mapping[str, object], progress: Callable[[int], None] | None, series: bool,
           companions: Companions | None = None) -> dict:
    """Write one checkpoint (``writer.write``) or, with ``series``, several into one output
    (``writer.series``), atomically, then verify what was written; ``companions`` are written
    into the staging folder once it is verified, so they appear with the output, never without."""
    _local_only(info, path, "writing")
    registry.require(info, "write")
    kwargs = _options(info, "write", opts)
    fmt, path = info.format, _path(info, path)
    remote = isinstance(path, storage.RemotePath)
    notes: list[str] = []
    reports = []
    if writer.prepare is not None:  # before the checks: what is written and verified is what it returns
        prepared = [writer.prepare(td, **kwargs) for td in tds]
        tds = [td for td, _ in prepared]
        reports = [r for _, r in prepared if r is not None]
        notes += list(dict.fromkeys(n for r in reports for n in r.notes))
    for td in tds:
        check_dtypes(td, info, writer, path)
    if path.is_dir() and not path.is_symlink() and not fmt.detect(path):
        # --force replaces an output, never a folder of something else (its files would go with it)
        raise WriteError(path, f"is a folder that holds no {info.name} output; remove it or name another output")
    seen: list[dict[str, int]] = [{} for _ in tds]
    verified = False
    # remote: uploads completed once the writer returned (outputs.readable), the commit objects last
    with outputs.atomic_output(path, force, writer.commit) as tmp, open_files():
        try:
            will_verify = verify and fmt.read is not None and not registry.missing(info, "read")
            recorded = [_recording(td, s, progress, will_verify, writer.keeps_shared_storage)
                        for td, s in zip(tds, seen, strict=True)]
            reported: WriteReport
            if series:
                assert writer.series is not None
                reported = writer.series(recorded, _adapter_path(tmp), **kwargs) or {}
            else:
                reported = writer.write(recorded[0], _adapter_path(tmp), **kwargs) or {}
            # "verify": False means the output does not hold the tensors by name (a converted
            # graph) and the writer checked the output itself
            writer_checked = not reported.get("verify", True)
            if writer_checked and will_verify:  # the sources of byte copies are still to be checked
                for td, s in zip(tds, seen, strict=True):
                    for name in s:
                        digest(td[name])
            elif will_verify:
                got = _read_back(fmt, writer, _adapter_path(outputs.readable(tmp)), series, kwargs)
                if len(got) != len(tds):
                    raise VerificationError(path, f"holds {len(got)} checkpoints, wrote {len(tds)}")
                for td, s, g in zip(tds, seen, got, strict=True):
                    _verify(td, s, g, path)
                verified = True
            for name, data in (companions(path) if companions else {}).items():
                if remote:  # beside the output, not in it: an object of its own, before the output's finish
                    with outputs.atomic_output(path.parent / name, force=True) as record:
                        record.write_bytes(data)
                else:
                    (tmp.parent / name).write_bytes(data)
        except ConvertError as e:  # name the output, not the staging folder it is written in
            _rename_path(e, str(tmp.parent), str(path.parent))
            raise
        except OSError as e:  # disk full, permissions...: the output's problem, not a bug
            raise WriteError(path, f"cannot write: {e.strerror or e}") from None
    notes += reported.get("notes", [])
    shared = [t.name for td in tds for t in td.values() if "torch.shared_with" in t.attrs]
    if shared and not writer.keeps_shared_storage:
        notes.append(f"{len(shared)} tensors shared storage in the source; {info.name} has no shared storage, "
                     f"so each was written as its own copy: {', '.join(shared)}")
    summary = {"output": str(path), "format": label(info, writer), "tensors": sum(len(td) for td in tds),
               "bytes": sum(td.nbytes for td in tds), "verified": verified, "notes": notes,
               **(_prepared_facts(reports) if reports else {}), **reported.get("facts", {})}
    if "checked" in reported:
        summary["checked"] = reported["checked"]
    return summary


def _prepared_facts(reports: list) -> dict:
    """The prepare reports' facts for the summary (one list per key for a series of several)."""
    if len(reports) == 1:
        return reports[0].facts()
    facts: dict[str, list] = {}
    for r in reports:
        for key, value in r.facts().items():
            facts.setdefault(key, []).append(value)
    return facts


def resolve_template(td: TensorDict, template: PathLike, to: str | None = None, fill: bool = False):
    """``td`` resolved against ``template`` by the ``prepare`` step of the writer of ``to``
    (default: the first writer that ``takes_template(template)``), as writing with ``--template``
    would; returns (TensorDict, report). Nothing is written (``convert map --template``)."""
    if to is not None:
        info, writer = registry.writer(to)
    else:
        found = [(i, w) for i in registry.FORMATS for w in i.format.writers
                 if w.takes_template is not None and w.takes_template(Path(template))]
        if not found:
            raise UsageError(f"{template}: no format takes this as a template (name the output format with --to)")
        info, writer = found[0]
    if writer.prepare is None:
        raise UsageError(f"{label(info, writer)} output takes no --template")
    return writer.prepare(td, **_options(info, "write", {"template": str(template), "template_fill": fill}))


def _rename_path(e: ConvertError, old: str, new: str) -> None:
    e.args = tuple(a.replace(old, new) if isinstance(a, str) else a for a in e.args)
    if isinstance(e, (ReadError, WriteError)) and e.path is not None:
        e.path = e.path.replace(old, new)


class _Recording(Source):
    """Passes a tensor's data through unchanged, noting its digest for verification (under every
    name in ``names``: for a writer that keeps shared storage, tensors of one source share one
    recording, see :func:`_recording`) and telling ``progress`` how many bytes went by."""

    __slots__ = ("tensor", "names", "seen", "progress", "verify")  # one per source

    def __init__(self, tensor: Tensor, seen: dict[str, int], progress: Callable[[int], None] | None,
                 verify: bool):
        self.tensor, self.seen, self.progress, self.verify = tensor, seen, progress, verify
        self.names = [tensor.name]

    def _seen(self, crc: int) -> None:
        for name in self.names:
            self.seen[name] = crc

    def chunks(self, nbytes, size=CHUNK):
        crc = 0
        for piece in self.tensor.source.chunks(nbytes, size):
            crc = google_crc32c.extend(crc, piece)
            if self.progress:
                self.progress(len(piece))
            yield piece
        self._seen(crc)

    def copy_into(self, out, nbytes, progress=None, verified_after=False):
        crc = self.tensor.source.copy_into(out, nbytes, self.progress, self.verify)
        self._seen(crc)
        return crc

    def region(self):
        return self.tensor.source.region()

    def verified_after(self):
        return self.verify

    def copied(self, crc32c):
        self._seen(crc32c)
        if self.progress:
            self.progress(self.tensor.nbytes)

    def array(self, dtype, shape):
        arr = self.tensor.numpy()
        self._seen(array_digest(arr))
        if self.progress and arr.dtype.kind != "O":
            self.progress(arr.nbytes)
        return arr


def _recording(td: TensorDict, seen: dict[str, int], progress: Callable[[int], None] | None,
               verify: bool, shared_storage: bool) -> TensorDict:
    """``td`` with every tensor's data passing through a :class:`_Recording`. For a writer that
    keeps shared storage (``shared_storage``), tensors of one source share one recording: the writer
    sees them as one and writes their bytes once, and ``progress`` hears them once for every name."""
    shared: dict[int, _Recording] = {}
    out = []
    for t in td.values():
        rec = shared.get(id(t.source)) if shared_storage else None
        if rec is not None and rec.tensor.dtype == t.dtype and rec.tensor.shape == t.shape:
            rec.names.append(t.name)
        else:
            rec = shared[id(t.source)] = _Recording(t, seen, progress, verify)
        out.append(t.with_source(rec))
    if progress is not None:
        for rec in shared.values():
            if len(rec.names) > 1:
                rec.progress = functools.partial(_times, progress, len(rec.names))
    return td.replace(out)


def _times(progress: Callable[[int], None], k: int, n: int) -> None:
    progress(n * k)


def _verify(expected: TensorDict, seen: Mapping[str, int], got: TensorDict, path: Path) -> None:
    back = dict(got.items())
    for name, t in expected.items():  # 50,000 tensors at a time: kept lean
        g = back.get(name)
        if g is None:
            raise VerificationError(path, "missing from the written output", name)
        if g.dtype is not t.dtype and g.dtype != t.dtype or g.shape != t.shape:
            raise VerificationError(path, f"reads back as {g.dtype} {list(g.shape)}, wrote {t.dtype} {list(t.shape)}", name)
    # in the output's order, so that runs of small tensors are read in one go (copying.digest_many)
    order = sorted(expected, key=lambda n: (r.path, r.offset) if (r := back[n].source.region()) else ("", 0))
    got_digests = digest_many([back[n] for n in order])
    for name, crc in zip(order, got_digests, strict=True):
        want = seen.get(name)
        if want is None:
            want = digest(expected[name])
        if crc != want:
            digest(expected[name])  # a copy returns the checksum its source stores unchecked: a damaged source fails here
            raise VerificationError(path, "reads back with different values", name)


def _patterns(regexes: Iterable[str | re.Pattern]) -> list[re.Pattern]:
    try:
        return [re.compile(p) for p in regexes]
    except re.error as e:
        pattern = e.pattern if isinstance(e.pattern, str) else repr(e.pattern)
        raise UsageError(f"bad regular expression '{pattern}': {e}") from None


def select(td: TensorDict, include: Iterable[str | re.Pattern] = (), exclude: Iterable[str | re.Pattern] = (),
           weights_only: bool = False) -> TensorDict:
    """Keep tensors whose name matches any ``include`` regex (all when none), minus ``exclude`` matches,
    minus optimizer state and step counters when ``weights_only``."""
    inc, exc = _patterns(include), _patterns(exclude)
    kept = [t for name, t in td.items()
            if (not inc or any(r.search(name) for r in inc))
            and not any(r.search(name) for r in exc)
            and not (weights_only and t.attrs.get("role") in DROPPED_BY_WEIGHTS_ONLY)]
    return td.replace(kept)


def _float_dtype(name: str) -> dtypes.DType:
    target = dtypes.by_name(name)
    if not target.is_floating:
        raise UsageError(f"--dtype must be a floating dtype, not {target}")
    if target.is_quantized:
        raise UsageError(f"--dtype {target}: quantizing is not offered (quantized tensors are kept as they are "
                         "when written to GGUF, and dequantized by --dtype float32/float16/bfloat16)")
    return target


def cast_floating(td: TensorDict, dtype: str) -> TensorDict:
    """Cast every floating tensor to ``dtype`` (lazily), refusing values the target cannot hold."""
    target = _float_dtype(dtype)

    def cast(t: Tensor) -> Tensor:
        def fn(arr: np.ndarray) -> np.ndarray:
            with np.errstate(over="ignore", invalid="ignore"):
                out = arr.astype(target.numpy)
                wide_in, wide_out = arr.astype(np.float64), out.astype(np.float64)
                # a finite value that became inf or NaN, or an infinity the target has not (float8_e4m3fn)
                lost = (np.isfinite(wide_in) & ~np.isfinite(wide_out)) | (np.isinf(wide_in) & ~np.isinf(wide_out))
            if lost.any():
                bad = wide_in[lost]
                worst = bad[np.argmax(np.where(np.isinf(bad), np.inf, np.abs(bad)))]
                raise WriteError(None, f"value {worst:g} cannot be held by {target}; "
                                       "leave it out with --exclude or pick a wider --dtype", t.name)
            return out
        return derived(t, fn, target, t.shape)

    return td.replace(cast(t) if t.dtype.is_floating and t.dtype != target else t for t in td.values())


def apply_maps(td: TensorDict, maps: Sequence):
    """Apply rule files / presets (names, or rule sets :func:`convert.mapping.load` gave) in order;
    returns (TensorDict, report or None)."""
    if not maps:
        return td, None
    from . import mapping

    return mapping.apply(td, [mapping.load(m) if isinstance(m, (str, os.PathLike)) else m for m in maps])


def _endings() -> re.Pattern:
    """Every format's file-name endings, to be stripped from an input's name (``.index``, ``.pt``...)."""
    parts = [re.escape(s) for info in registry.FORMATS for s in info.format.suffixes]
    parts += [e for info in registry.FORMATS for e in info.format.name_endings]
    return re.compile(f"({'|'.join(parts)})$")


def _absolute(path: PathLike | storage.RemotePath) -> Path | storage.RemotePath:
    p = storage.as_path(path)
    return p if isinstance(p, storage.RemotePath) else Path(os.path.abspath(p))


def default_output(src: PathLike, info: registry.FormatInfo, writer: Writer,
                   step: str | None = None) -> storage.AnyPath:
    """Beside the input, named after it: ``model1/`` -> ``model1.safetensors`` (a URL's: a URL)."""
    p = _absolute(src)
    stem = _endings().sub("", p.name) or p.name
    if step:
        stem = f"{stem}-{step}"
    return p.parent / (stem + writer.suffix if writer.suffix else f"{stem}.{info.name}")


def _labelled(path: Path, label: str) -> Path:
    if path.suffix and path.suffix != ".":
        return path.with_name(f"{path.stem}-{label}{path.suffix}")
    return path.with_name(f"{path.name}-{label}")


def convert(src: PathLike, dst: PathLike | None = None, *, to: str, src_format: str | None = None,
            include: Iterable[str] = (), exclude: Iterable[str] = (), dtype: str | None = None,
            maps: Sequence[str] = (), weights_only: bool = False, force: bool = False, verify: bool = True,
            read_opts: Mapping[str, object] | None = None, write_opts: Mapping[str, object] | None = None,
            progress: Callable[[int, int], None] | None = None, companions: Companions | None = None) -> dict:
    """Convert one checkpoint (or, with ``read_opts={"all_steps": True}``, every retained one).

    Args:
        src: input file or folder (or a URL, as for :func:`convert.read`).
        dst: output path (or a URL); default beside the input, named after it.
        to: destination format name.
        src_format: source format name; None or "auto" detects it from content.
        include, exclude: regexes on source names.
        dtype: cast floating tensors to this dtype.
        maps: rule files or preset names, applied in order.
        weights_only: drop optimizer state and step counters.
        force: overwrite an existing output.
        verify: read the output back and compare.
        read_opts, write_opts: format-specific options.
        progress: called as ``progress(done, total)`` with byte counts while data is written.
        companions: files published beside each output, with it and before it: called with the
            output's path, returns their names (in its folder) and bytes (convert batch's record).

    Returns:
        A JSON-able summary of what was done (one entry per output under ``outputs``).

    Example:
        A TF1 checkpoint to a PyTorch ``state_dict``, renamed and transposed by the presets
        (``convert mappings`` lists them), without the optimizer's slots:

        >>> summary = convert.convert("model1/", "model1.pt", to="torch",
        ...                           maps=["tf1-to-torch", "drop-optimizer"])
        >>> out = summary["outputs"][0]
        >>> out["output"], out["tensors"], out["verified"]
        ('model1.pt', 8, True)
        >>> convert.read("model1.pt")["conv1.weight"]
        Tensor('conv1.weight', float32, [8, 1, 5, 5])
    """
    started = time.perf_counter()
    src_info = _format(src, src_format)
    dst_info, dst_writer = registry.writer(to)
    _local_only(dst_info, dst, "writing")
    # Check the whole request before touching any file.
    read_opts = _options(src_info, "read", read_opts or {})
    write_opts = _options(dst_info, "write", write_opts or {})
    patterns = _patterns(include), _patterns(exclude)
    if dtype:
        _float_dtype(dtype)
    rule_sets: Sequence = maps
    if maps:
        from . import mapping

        rule_sets = [mapping.load(m) for m in maps]  # once, and a bad rule file fails before any reading
    expand = src_info.format.expand
    jobs: list[tuple[str | None, Path]]
    if read_opts.get("all_steps"):
        if expand is None:
            raise UsageError(f"--all-steps does not apply to {src_info.name}")
        read_opts.pop("all_steps")
        jobs = [(step, path) for step, path in expand(_path(src_info, src), **read_opts)]
    else:
        jobs = [(None, _path(src_info, src))]
    if len(jobs) > 1 and dst_writer.series:  # every step into one output (a tf-ckpt folder)
        outs = [_path(dst_info, dst) if dst is not None else default_output(src, dst_info, dst_writer)]
    elif dst is None:
        outs = [default_output(src, dst_info, dst_writer, step) for step, _ in jobs]
    else:
        outs = [_path(dst_info, dst) if step is None else _labelled(_path(dst_info, dst), step) for step, _ in jobs]
    _local_only(dst_info, outs[0], "writing")  # a default output beside a remote input is remote
    inputs = [_absolute(p) for p in (src, *(p for _, p in jobs))]
    for out in outs:
        if any(_absolute(out) in (p, *p.parents) for p in inputs):
            raise UsageError(f"{out}: the output would replace the input; name another with -o")
        if isinstance(out, storage.RemotePath):
            if out.exists() and not force:
                raise WriteError(out, "already exists (use --force to overwrite)")
        else:
            fileio.check_writable(out, force)
    prepared = []
    for step, path in jobs:
        td = read(path, src_info.name, **read_opts)
        source_count = len(td)
        td = select(td, *patterns, weights_only)
        if not td and source_count:
            raise UsageError(f"{src}: no tensor is left after --include/--exclude/--weights-only")
        td, report = apply_maps(td, rule_sets)
        if dtype:
            td = cast_floating(td, dtype)
        info: dict[str, Any] = {"source": str(path), "source_format": src_info.name, "source_tensors": source_count,
                # what the reader had to say (a stale state file...) comes before the writer's notes
                "read_notes": [v for k, v in td.metadata.items() if k.startswith(READ_NOTE)]}
        if step is not None:
            info["label"] = step
        if report is not None:
            info["mapping"] = report.to_dict()
        prepared.append((td, info))
    tick = None
    if progress is not None:
        total, done = sum(td.nbytes for td, _ in prepared), 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            progress(done, total)
    if len(outs) == 1 and len(prepared) > 1:
        result = _write([td for td, _ in prepared], outs[0], dst_info, dst_writer, force, verify, write_opts, tick,
                        series=True, companions=companions)
        outputs = [{**result, "notes": [n for _, info in prepared for n in info.pop("read_notes")] + result["notes"],
                    "sources": [info for _, info in prepared]}]
    else:
        outputs = []
        for (td, info), out in zip(prepared, outs, strict=True):
            result = _write([td], out, dst_info, dst_writer, force, verify, write_opts, tick, series=False,
                            companions=companions)
            outputs.append({**result, "notes": info.pop("read_notes") + result["notes"], **info})
    return {"outputs": outputs, "seconds": round(time.perf_counter() - started, 3)}


def inspect(path: PathLike, format: str | None = None, *, verify: bool = False,
            progress: Callable[[int, int], None] | None = None, **opts) -> dict:
    """What a checkpoint holds: format, every tensor's name, dtype, shape, bytes and role, totals, metadata.

    Only headers/indexes are read (string tensors, which are small, are read to count their bytes).
    With ``verify``, every tensor's bytes are read too, checking every checksum the format has
    (a damaged file raises :class:`~convert.errors.CorruptFileError`); ``progress(done, total)``
    is told the bytes read.

    Args:
        path: a file or folder.
        format: a format name; None or "auto" detects it from content.
        verify: read every byte and check every checksum.
        progress: called as ``progress(done, total)`` with byte counts when verifying.
        **opts: format-specific reading options.

    Returns:
        A JSON-able dict with ``path``, ``format``, ``count``, ``total_bytes``, ``metadata`` and
        ``tensors`` (each with ``name``, ``dtype``, ``shape``, ``bytes`` and its attributes).

    Example:
        >>> info = convert.inspect("model1/", verify=True)
        >>> info["format"], info["count"], info["total_bytes"]
        ('tf-ckpt', 27, 651784)
        >>> info["tensors"][0]
        {'name': 'beta1_power', 'dtype': 'float32', 'shape': [], 'bytes': 4, 'role': 'optimizer'}
        >>> info["verified"]["bytes"]                       # every byte read, every checksum checked
        651784
    """
    info = _format(path, format)
    td = read(path, info.name, **opts)
    tensors = [{"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape), "bytes": t.nbytes, **t.attrs}
               for t in td.values()]
    report = {"path": str(path), "format": info.name, "tensors": tensors, "count": len(tensors),
              "total_bytes": sum(t.nbytes for t in td.values()), "metadata": dict(td.metadata)}
    if verify:
        done, total = 0, td.nbytes
        for t in td.values():
            digest(t)
            done += t.nbytes if t.dtype.kind != "string" else 0
            if progress:
                progress(done, total)
        report["verified"] = {"tensors": len(td), "bytes": total, "checksums": info.format.checksums or None}
    return report


def diff(a: PathLike | TensorDict, b: PathLike | TensorDict, *, maps: Sequence = (), atol: float = 0.0,
         rtol: float = 0.0, format_a: str | None = None, format_b: str | None = None,
         **read_opts) -> compare.DiffReport:
    """Compare two checkpoints tensor by tensor: names, dtypes, shapes and values.

    Values are read one tensor at a time. Two values agree when ``|a - b| <= atol + rtol * |b|``
    (NumPy's ``isclose``; NaN agrees with NaN in the same place); with the defaults only equal
    values agree.

    Args:
        a, b: paths (any format :func:`read` takes) or TensorDicts.
        maps: rule files or preset names applied to ``a`` first, to compare across naming schemes.
        atol, rtol: absolute and relative tolerance.
        format_a, format_b: format names; None or "auto" detects them from content.
        **read_opts: format-specific reading options, given to both reads.

    Returns:
        A :class:`~convert.compare.DiffReport`: ``ok`` is True when the two agree; ``tensors``
        holds each common name's errors, ``only_in_a`` / ``only_in_b`` the names one side lacks.

    Example:
        >>> td = convert.read("model1/")
        >>> _ = convert.write(td, "model1.safetensors", "safetensors")
        >>> report = convert.diff("model1/", "model1.safetensors")
        >>> report.ok, len(report.tensors), report.only_in_a
        (True, 27, ())
        >>> renamed = convert.diff("model1/", "model1.safetensors", maps=["tf1-to-torch"])
        >>> renamed.ok, renamed.only_in_a[:2], renamed.only_in_b[:2]   # A has torch's names now
        (False, ('conv1.bias', 'conv1.weight'), ('conv1/b', 'conv1/w'))
    """
    if atol < 0 or rtol < 0:
        raise UsageError("atol and rtol must be >= 0")
    ta = a if isinstance(a, TensorDict) else read(a, format_a, **read_opts)
    tb = b if isinstance(b, TensorDict) else read(b, format_b, **read_opts)
    ta, _ = apply_maps(ta, maps)
    return compare.diff(ta, tb, atol=atol, rtol=rtol)
