"""``--split shards``: one big sharded checkpoint converted in parallel pieces.

A sharded source (Hugging Face safetensors shards, a V2 bundle with several ``.data`` files,
DCP later) is converted into a sharded output by several workers at once: on Ray
(``--ray ADDRESS``: one task per output shard, the driver commits), or as ``--worker I/N``
under any launcher people already use (Slurm arrays, torchrun, xargs, ``make -j``; worker I
of N takes the output shards K with K mod N = I), or alone (all shards, then the commit).

The plan (:func:`make_plan`) is made from headers only and is the same in every worker:
output shard K holds the tensors whose bytes lie in the K-th source file (files in the order
the source lists its tensors; a tensor with no file, e.g. one transformed by a rule, goes by
its position), each shard's tensors in source order. So a worker reads one source shard and
writes one output shard, and memory stays bounded by the largest tensor (renamed-only tensors
are copied as bytes). The plan's digest covers the source's file fingerprint (names, sizes,
mtimes/ETags), the tensors per shard with their dtypes and shapes, and the destination.

Each worker, for each of its shards: writes the shard atomically (:func:`convert.fileio.atomic_output`
beside the others in the output folder), verifies it (every tensor's bytes read back from the
written file, their CRC-32C compared with the CRC-32C of the source bytes taken while copying,
itself checked against the source's stored checksums where it has them), then records a
*receipt* (``.SHARD.convert-receipt.json``: the plan digest and where each tensor lies, with its
checksum). A shard whose receipt matches the plan is not written again (a rerun resumes). The
worker that finds every receipt in place writes the commit objects, last (the writer's
:class:`~convert.formats.base.ShardWriter` says which: ``model.safetensors.index.json``; a V2
``.index`` then ``checkpoint``), identical bytes whoever writes them, then reads the output
with the format's reader and checks that every tensor resolves to the shard, offset, size,
dtype and shape its receipt says (headers only: the bytes were verified by their worker),
and removes the receipts. Parallel export that silently gives wrong weights cannot pass that.

With ``--force``, a worker that starts while the output's commit objects are not this plan's
removes them first (before its receipt; the commit comes after every receipt, so no worker can
remove a new commit). Remote sources and outputs (URLs, for the formats that take them) follow
the same steps through :mod:`convert.storage`: each shard, receipt and commit object is an
upload of its own, completed once written (the shard is then read back remotely for its
check), the commit objects last, once every receipt is in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import api, outputs, registry, storage
from .errors import ConvertError, UsageError, VerificationError, WriteError
from .formats.base import ShardWriter
from .ir import FileRegion, Tensor, TensorDict, digest


@dataclass(frozen=True)
class Request:
    """One ``--split shards`` conversion, as every worker receives it (picklable)."""

    source: str
    output: str
    to: str
    src_format: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    maps: tuple[str, ...] = ()
    dtype: str | None = None
    weights_only: bool = False
    read_opts: Mapping[str, Any] = field(default_factory=dict)
    write_opts: Mapping[str, Any] = field(default_factory=dict)
    force: bool = False


@dataclass(frozen=True)
class Plan:
    names: tuple[str, ...]
    """Output shard file names."""
    shards: tuple[tuple[str, ...], ...]
    """Per output shard, its tensors' names in write order."""
    digest: str


def _file_of(t: Tensor) -> str | None:
    src = getattr(t.source, "tensor", None)  # api's recording wrapper
    src = src.source if src is not None else t.source
    return src.path if isinstance(src, FileRegion) else None


def make_plan(td: TensorDict, shard_writer: ShardWriter, to: str, fingerprint: list) -> Plan:
    """Every tensor assigned to an output shard, deterministically, from headers only."""
    files = list(dict.fromkeys(f for f in (_file_of(t) for t in td.values()) if f is not None)) or [""]
    n = len(files)
    slots: list[list[str]] = [[] for _ in range(n)]
    for i, t in enumerate(td.values()):
        f = _file_of(t)
        slots[files.index(f) if f is not None else i % n].append(t.name)
    slots = [s for s in slots if s] or [[]]
    names = tuple(shard_writer.shard_name(td, k, len(slots)) for k in range(len(slots)))
    layout = [[names[k], [[name, td[name].dtype.name, list(td[name].shape)] for name in s]]
              for k, s in enumerate(slots)]
    plan_digest = hashlib.sha256(json.dumps({"to": to, "layout": layout, "source": fingerprint},
                                            sort_keys=True).encode()).hexdigest()
    return Plan(names, tuple(tuple(s) for s in slots), plan_digest)


def prepare(req: Request) -> tuple[TensorDict, registry.FormatInfo, Any, Plan]:
    """The TensorDict to write (read, selected, mapped, cast), the destination and the plan."""
    src_info = api._format(req.source, req.src_format)
    info, writer = registry.writer(req.to)
    api._local_only(info, req.output, "writing")
    if writer.shards is None:
        raise UsageError(f"--split shards: {api.label(info, writer)} has no sharded output "
                         f"(formats that have one: {', '.join(_sharded())})")
    read_opts = api._options(src_info, "read", req.read_opts)
    if api._options(info, "write", req.write_opts):
        raise UsageError("--split shards: the destination's write options do not apply to a split output")
    td = api.read(req.source, src_info.name, **read_opts)
    td = api.select(td, req.include, req.exclude, req.weights_only)
    if not td:
        raise UsageError(f"{req.source}: no tensor is left to write")
    td, _ = api.apply_maps(td, list(req.maps))
    if req.dtype:
        td = api.cast_floating(td, req.dtype)
    api.check_dtypes(td, info, writer, req.output)
    files = sorted({f for f in (_file_of(t) for t in td.values()) if f} | {req.source})
    plan = make_plan(td, writer.shards, api.label(info, writer), storage.fingerprint(files))
    return td, info, writer, plan


def _sharded() -> list[str]:
    return [api.label(i, w) for i in registry.FORMATS for w in i.format.writers if w.shards is not None]


def _receipt_path(out: storage.AnyPath, name: str) -> storage.AnyPath:
    return out / f".{name}.convert-receipt.json"


def _receipt(out: storage.AnyPath, name: str, plan: Plan) -> list | None:
    try:
        doc = json.loads(_receipt_path(out, name).read_text("utf-8"))
    except (OSError, ValueError, ConvertError):  # ConvertError: a remote one's (convert.storage)
        return None
    if not isinstance(doc, dict) or doc.get("plan") != plan.digest or not (out / name).is_file():
        return None
    return doc.get("entries")


def _commits_are_current(out: storage.AnyPath, plan: Plan) -> bool:
    return all(_receipt(out, n, plan) is not None for n in plan.names)


def _write_shard(td: TensorDict, writer, plan: Plan, out: storage.AnyPath, k: int) -> list:
    name = plan.names[k]
    entries = _receipt(out, name, plan)
    if entries is not None:
        return entries  # done by an earlier attempt with the same plan
    tensors = [td[n] for n in plan.shards[k]]
    with outputs.atomic_output(out / name, force=True) as tmp:  # an old attempt's shard, unreceipted, is replaced
        try:
            entries = writer.shards.write_shard(tensors, tmp, td)
        except OSError as e:
            raise WriteError(out / name, f"cannot write: {e.strerror or e}") from None
        written = outputs.readable(tmp)  # remote: the upload completed, read back by ranged GETs
        for t, (ename, offset, size, crc) in zip(tensors, entries, strict=True):
            back = storage.region(written, offset, size, label=ename).digest(size)
            if ename != t.name or back != crc:
                raise VerificationError(out / name, "reads back with different bytes", t.name)
            if t.dtype.kind != "string" and size == t.nbytes and crc != digest(t):
                raise VerificationError(out / name, "holds other values than the source", t.name)
    text = json.dumps({"plan": plan.digest, "shard": name, "entries": entries}) + "\n"
    with outputs.atomic_output(_receipt_path(out, name), force=True) as tmp:
        tmp.write_text(text, "utf-8")
    return entries


def _finalize(td: TensorDict, info, writer, plan: Plan, out: storage.AnyPath) -> dict:
    shards = []
    for name, tensor_names in zip(plan.names, plan.shards, strict=True):
        entries = _receipt(out, name, plan)
        if entries is None:
            raise WriteError(out / name, "has no receipt of this plan yet")
        shards.append((name, [(td[n], e) for n, e in zip(tensor_names, entries, strict=True)]))
    for name, data in writer.shards.commit(td, shards):
        target = out / name
        if target.is_file() and target.read_bytes() == data:
            continue
        try:
            with outputs.atomic_output(target, force=True) as tmp:
                tmp.write_bytes(data)
        except ConvertError:  # another worker that found every receipt too may have written it meanwhile
            if not (target.is_file() and target.read_bytes() == data):
                raise
    # the index resolves every tensor to where its worker put (and verified) it
    got = info.format.read(out)
    where = {t.name: (name, e) for name, placed in shards for t, e in placed}
    for t in td.values():
        if t.name not in got:
            raise VerificationError(out, "missing from the written output", t.name)
        g = got[t.name]
        if g.dtype != t.dtype or g.shape != t.shape:
            raise VerificationError(out, f"reads back as {g.dtype} {list(g.shape)}, wrote {t.dtype} "
                                         f"{list(t.shape)}", t.name)
        name, (_, offset, size, crc) = where[t.name]
        if isinstance(g.source, FileRegion):
            if (os.path.basename(g.source.path), g.source.offset, g.source.length) != (name, offset, size):
                raise VerificationError(out, "the index points elsewhere than where the tensor was written", t.name)
        elif digest(g) != digest(t):
            raise VerificationError(out, "reads back with different values", t.name)
    for name in plan.names:
        with contextlib.suppress(OSError, ConvertError):
            _receipt_path(out, name).unlink()
    return {"output": str(out), "format": api.label(info, writer), "tensors": len(td), "bytes": td.nbytes,
            "output_shards": len(plan.names), "verified": True}


def run_worker(req: Request, worker: int, workers: int) -> dict:
    """Worker ``worker`` of ``workers``: write and verify its shards; commit if it is the last."""
    started = time.perf_counter()
    td, info, writer, plan = prepare(req)
    out = storage.as_path(req.output)
    if out.exists() and not out.is_dir():
        raise WriteError(out, "exists and is not a folder (a split output is a folder of shards)")
    if not isinstance(out, storage.RemotePath):  # object stores have no folders to make
        if not out.parent.is_dir():
            raise WriteError(out, f"folder {out.parent} does not exist")
        try:
            out.mkdir(exist_ok=True)
        except OSError as e:
            raise WriteError(out, f"cannot create the folder: {e.strerror}") from None
    # commit objects in place that are not this plan's (every receipt of this plan in place means
    # an earlier run was cut while committing: it is finished below)
    names = [n for n, _ in writer.shards.commit(td, [(n, []) for n in plan.names])]
    committed = [out / n for n in names if (out / n).exists()]
    if committed and not _commits_are_current(out, plan):
        if not req.force:
            raise WriteError(out, "already exists (use --force to overwrite)")
        for p in committed:
            p.unlink()
    mine = [k for k in range(len(plan.names)) if k % workers == worker]
    written = 0
    for k in mine:
        _write_shard(td, writer, plan, out, k)
        written += sum(td[n].nbytes for n in plan.shards[k] if td[n].dtype.kind != "string")
    result = {"output": str(out), "worker": f"{worker}/{workers}", "shards": [plan.names[k] for k in mine],
              "bytes": written, "committed": False}
    if _commits_are_current(out, plan):
        result.update(_finalize(td, info, writer, plan, out), committed=True)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def run(req: Request, worker: tuple[int, int] | None = None, ray_address: str | None = None) -> dict:
    """The whole split conversion: here alone, as one ``--worker I/N``, or on Ray."""
    if worker is not None:
        return run_worker(req, *worker)
    if ray_address is None:
        return run_worker(req, 0, 1)
    try:
        import ray
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError("--ray", "ray", "ray") from None
    td, info, writer, plan = prepare(req)  # the plan's size, and its errors, before any task runs
    n = len(plan.names)
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=ray_address, log_to_driver=False, configure_logging=False)
        except ConnectionError as e:
            raise UsageError(f"--ray {ray_address}: cannot join the cluster ({' '.join(str(e).split())})") from None
    try:
        task = ray.remote(_ray_worker)
        options = storage.configured()  # --storage-options, for the workers' own processes
        refs = [task.options(name="split_shard", max_retries=3, num_cpus=1).remote(req, k, n, options)
                for k in range(n)]
        results = ray.get(refs)
    finally:
        if started_here:
            ray.shutdown()
    for r in results:
        if "error" in r:
            raise ConvertError(r["error"])
    final = next((r for r in results if r.get("committed")), None)
    if final is None:
        final = run_worker(req, 0, 1)  # every shard has its receipt: this commits
    return final


def _ray_worker(req: Request, k: int, n: int, options: Mapping[str, Any] | None = None) -> dict:
    try:
        if options:
            storage.configure(options)
        return run_worker(req, k, n)
    except ConvertError as e:  # handed back as a value: the driver raises it
        return {"error": storage.redact(" ".join(str(e).split()))}


def parse_worker(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--worker {text}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise UsageError(f"--worker {text}: I must be in [0, N)")
    return i, n
