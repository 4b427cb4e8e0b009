"""``convert batch``: many conversions in one command, resumable, on local processes or Ray.

Jobs come from a jobs file or a pattern:

* a **jobs file** (``--jobs FILE``): YAML (a list of jobs, or ``{defaults: {...}, jobs: [...]}``)
  or JSON lines (``.jsonl``/``.ndjson``: one job object a line; ``#`` lines and blank lines
  skipped). Keys of a job: ``source`` (required), ``to``, ``output``, ``from`` (the source
  format, default auto), ``map`` (one or a list), ``include``, ``exclude``, ``weights_only``,
  ``dtype``, ``options`` (format options by keyword: ``{step: 190, max_shard_size: 1GB}``),
  ``memory`` (a Ray task's memory request, e.g. ``2GB``), ``name``. Relative local paths are
  taken from the jobs file's folder. The command line's ``--to``, ``--map``... are defaults.
* a **pattern** (``convert batch 'runs/*/checkpoint' --to safetensors -o 'out/{run}/{step}.safetensors'``):
  every match is a job (a match that is not itself a checkpoint but whose folder is, such as a
  TF ``checkpoint`` state file, stands for its folder). Placeholders of ``-o``:

  ============  ==========================================================================
  ``{1}``...    the text each wildcard (``*``, ``**``, ``?``, ``[...]``) of the pattern matched
  ``{run}``     the name of the folder the checkpoint is in (the match itself if it is a folder)
  ``{name}``    the match's file or folder name
  ``{stem}``    the source's name without its format's endings (``model.ckpt-190.index`` -> ``model.ckpt-190``)
  ``{step}``    one job per retained step (a TF ``checkpoint`` file's list): the step number;
                without it in ``-o``, each match's latest checkpoint is converted
  ============  ==========================================================================

Resumable: a finished job leaves a record beside its output, ``.NAME.convert-batch.json``
(published with the output, before it, so an output never exists without its record): the
digest of the source's files (names, sizes, and mtime or ETag: what changes when content
changes, with no data read), the digest of the job's options, and what was written. A job
whose output exists and whose record matches is skipped; a record that no longer matches (the
source or the options changed) redoes the job, replacing the output; an output with no record
was not made by ``convert batch`` and is refused unless ``--force`` (which redoes every job).
A sidecar rather than the output's own metadata, because only a sidecar works for every format
(a tf-ckpt folder has nowhere to keep it) and on every storage (object metadata is not on local
disks, extended attributes are not on object stores).

Executors behind one interface (:class:`Executor`: submit every job, yield results as they
finish), so another (Dask) is one class: :class:`LocalExecutor`, worker processes
(``--workers N``; each dies with the batch, its partial output removed), and
:class:`RayExecutor` (``--ray ADDRESS|auto``: each job a Ray task named ``run_job``, retried
when its worker is lost, ``max_retries``, with its own memory request: the job's ``memory``,
else ``--memory``, else 256 MiB plus the largest source file, a bound on the largest tensor).
A job that fails does not stop the others; its record says why in one line.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from . import __version__, api, registry, storage
from .errors import ConvertError, ReadError, UsageError, WriteError
from .units import parse_size

RECORD_VERSION = 1
BASE_MEMORY = 256 << 20
MAX_RETRIES = 3
_JOB_KEYS = {"source", "to", "output", "from", "map", "include", "exclude", "weights_only", "dtype", "options",
             "memory", "name"}


@dataclass(frozen=True)
class Job:
    """One conversion of a batch."""

    source: str
    to: str
    output: str | None = None
    src_format: str = "auto"
    maps: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    weights_only: bool = False
    dtype: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    memory: int | None = None
    name: str = ""


# ------------------------------------------------------------------ jobs from a file

def _as_tuple(value: Any, key: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise UsageError(f"{where}: '{key}' must be a string or a list of strings")


def _resolve(path: str, base: Path | None) -> str:
    if base is None or storage.is_remote(path) or os.path.isabs(path):
        return path
    return str(base / path)


def job_from_dict(doc: Mapping[str, Any], defaults: Mapping[str, Any], where: str, base: Path | None = None) -> Job:
    """A :class:`Job` from a jobs file's entry (``where`` names it in errors)."""
    if not isinstance(doc, Mapping):
        raise UsageError(f"{where}: a job must be a mapping of keys ({', '.join(sorted(_JOB_KEYS))})")
    unknown = sorted(set(doc) - _JOB_KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_JOB_KEYS))})")
    merged = {**{k: v for k, v in defaults.items() if v not in (None, (), [])}, **doc}
    for key in ("source", "to"):
        if not isinstance(merged.get(key), str) or not merged[key]:
            raise UsageError(f"{where}: '{key}' is missing" + (" (or give --to)" if key == "to" else ""))
    options = merged.get("options") or {}
    if not isinstance(options, Mapping):
        raise UsageError(f"{where}: 'options' must be a mapping of format options")
    options = {str(k).lstrip("-").replace("-", "_"): v for k, v in options.items()}
    if options.get("all_steps"):
        raise UsageError(f"{where}: all_steps does not apply to a batch job; use {{step}} in a pattern's -o, "
                         "or one job per step")
    memory = merged.get("memory")
    if memory is not None:
        memory = parse_memory(memory, where)
    output = merged.get("output")
    if output is not None and not isinstance(output, str):
        raise UsageError(f"{where}: 'output' must be a path")
    return Job(source=_resolve(merged["source"], base), to=merged["to"],
               output=_resolve(output, base) if output else None, src_format=str(merged.get("from") or "auto"),
               maps=tuple(_resolve(m, base) if os.path.exists(_resolve(m, base)) else m
                          for m in _as_tuple(merged.get("map"), "map", where)),
               include=_as_tuple(merged.get("include"), "include", where),
               exclude=_as_tuple(merged.get("exclude"), "exclude", where),
               weights_only=bool(merged.get("weights_only")), dtype=merged.get("dtype"),
               options=options, memory=memory, name=str(merged.get("name") or ""))


def jobs_from_file(path: os.PathLike | str, defaults: Mapping[str, Any] | None = None) -> list[Job]:
    """The jobs of a YAML or JSON-lines jobs file."""
    defaults = dict(defaults or {})
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except OSError as e:
        raise ReadError(p, f"cannot read the jobs file: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{p}: the jobs file is not UTF-8 text") from None
    base = p.resolve().parent
    jobs = []
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{p}:{n}: not a JSON object ({e.msg})") from None
            jobs.append(job_from_dict(doc, defaults, f"{p}:{n}", base))
    else:
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise UsageError(f"{p}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if isinstance(doc, Mapping):
            file_defaults = doc.get("defaults") or {}
            if not isinstance(file_defaults, Mapping):
                raise UsageError(f"{p}: 'defaults' must be a mapping")
            defaults = {**defaults, **file_defaults}
            doc = doc.get("jobs")
        if not isinstance(doc, list):
            raise UsageError(f"{p}: a jobs file holds a list of jobs (or 'jobs:' with one)")
        jobs = [job_from_dict(d, defaults, f"{p}: job {i}", base) for i, d in enumerate(doc, 1)]
    if not jobs:
        raise UsageError(f"{p}: no jobs")
    return _named(jobs)


def _named(jobs: list[Job]) -> list[Job]:
    seen: dict[str, int] = {}
    for j in jobs:
        if j.output:
            key = storage.redact(j.output)
            if key in seen:
                raise UsageError(f"two jobs write {key}: jobs {seen[key]} and {len(seen) + 1}")
            seen[key] = len(seen) + 1
    return [j if j.name else replace(j, name=str(i)) for i, j in enumerate(jobs, 1)]


# ------------------------------------------------------------------ jobs from a pattern

_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_]+)\}")


def _pattern_regex(pattern: str) -> re.Pattern:
    """A regex with one group per wildcard of a glob pattern (``**`` may cross folders)."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append("(.*)")
            i += 2
        elif c == "*":
            out.append("([^/]*)")
            i += 1
        elif c == "?":
            out.append("([^/])")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1:end]
                body = "^" + body[1:] if body.startswith("!") else body
                out.append(f"([{body}])")
                i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"/?")


def _matches(pattern: str) -> list[str]:
    if storage.is_remote(pattern):
        m = re.search(r"[*?\[]", pattern)
        root = pattern[:m.start()] if m else pattern
        base = storage.as_path(root.rsplit("/", 1)[0] if "/" in root.split("://", 1)[1] else root)
        assert isinstance(base, storage.RemotePath)
        found = base._call("read", base.fs.glob, base.fs._strip_protocol(pattern))
        return sorted(f"{base.protocol}://{p.rstrip('/')}" for p in found)
    return sorted(globlib.glob(pattern, recursive=True))


def _checkpoint_of(match: str) -> str:
    """The match, or its folder when the match is a file no format reads but its folder is
    a checkpoint (a TF ``checkpoint`` state file, a Keras ``model.weights.json``...)."""
    if storage.is_remote(match):
        return match  # formats detect local paths only so far
    p = Path(match)
    if p.is_file():
        try:
            registry.detect(p)
            return match
        except ConvertError:
            pass
        try:
            registry.detect(p.parent)
            return str(p.parent)
        except ConvertError:
            pass
    return match


def fill(template: str, values: Mapping[str, str], where: str) -> str:
    """``template`` with its placeholders replaced; an unknown one is a usage error."""
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise UsageError(f"-o {template}: unknown placeholder {{{key}}} for {where} "
                             f"(known: {', '.join('{' + k + '}' for k in values)})")
        return values[key]
    return _PLACEHOLDER.sub(sub, template)


def jobs_from_pattern(pattern: str, to: str, output: str, defaults: Mapping[str, Any] | None = None,
                      read_options: Mapping[str, Any] | None = None) -> list[Job]:
    """One job per match of ``pattern`` (or per retained step, with ``{step}`` in ``output``)."""
    if not output:
        raise UsageError("a pattern needs -o with placeholders, e.g. -o 'out/{run}/{stem}.safetensors'")
    matches = _matches(pattern)
    if not matches:
        raise UsageError(f"{storage.redact(pattern)}: matches nothing")
    rx = _pattern_regex(pattern)
    endings = api._endings()
    defaults = dict(defaults or {})
    jobs = []
    for match in matches:
        m = rx.fullmatch(match)
        groups = [g or "" for g in m.groups()] if m else []
        source = _checkpoint_of(match)
        is_dir = source != match or (not storage.is_remote(source) and os.path.isdir(source))
        name = match.rstrip("/").rsplit("/", 1)[-1]
        run = source.rstrip("/").rsplit("/", 1)[-1] if is_dir else source.rstrip("/").rsplit("/", 2)[-2]
        values = {str(i): g for i, g in enumerate(groups, 1)}
        values.update(run=run, name=name)
        steps: list[tuple[str | None, str]] = [(None, source)]
        if "{step}" in output:
            steps = _steps(source, defaults.get("from") or "auto", read_options or {})
        for step, path in steps:
            stem = endings.sub("", path.rstrip("/").rsplit("/", 1)[-1]) or name
            vals = {**values, "stem": stem, **({"step": step} if step is not None else {})}
            job = {**defaults, "source": path, "to": to, "output": fill(output, vals, storage.redact(match))}
            if read_options:
                job["options"] = {**dict(read_options), **(job.get("options") or {})}
            jobs.append(job_from_dict(job, {}, storage.redact(match)))
    return _named(jobs)


def _steps(source: str, src_format: str, read_options: Mapping[str, Any]) -> list[tuple[str | None, str]]:
    """(step label, concrete path) of every checkpoint ``source`` retains."""
    if storage.is_remote(source):
        raise UsageError(f"{storage.redact(source)}: {{step}} needs the source's step list, which remote "
                         "paths do not give yet")
    info = api._format(source, None if src_format == "auto" else src_format)
    expand = info.format.expand
    if expand is None:
        raise UsageError(f"{source}: {info.name} has no steps; leave {{step}} out of -o")
    opts = {k: v for k, v in read_options.items() if k != "step"}
    return [(label, str(path)) for label, path in expand(Path(source), all_steps=True, **opts)]


def parse_memory(value: Any, where: str = "--memory") -> int:
    if isinstance(value, int) and value > 0:
        return value
    try:
        return parse_size(str(value), where)
    except UsageError:
        raise UsageError(f"{where}: cannot read memory size '{value}' (examples: 2GB, 512MiB)") from None


# ------------------------------------------------------------------ records (resumption)

def record_name(output: str) -> str:
    return f".{output.rstrip('/').rsplit('/', 1)[-1]}.convert-batch.json"


def record_path(output: str) -> str:
    parent = output.rstrip("/").rsplit("/", 1)[0] if "/" in output.rstrip("/") else "."
    return f"{parent}/{record_name(output)}"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _map_identity(m: str) -> Any:
    if os.path.isfile(m):
        return ["file", hashlib.sha256(Path(m).read_bytes()).hexdigest()]
    from . import mapping

    try:
        return ["preset", m, hashlib.sha256(mapping.preset_text(m).encode()).hexdigest()]
    except ConvertError:
        return ["name", m]


def options_digest(job: Job) -> str:
    """What decides the output's content besides the source: format, maps (by content), selection, options."""
    return _digest({"to": registry.get(job.to).name + ":" + registry.target(job.to)[1], "from": job.src_format,
                    "maps": [_map_identity(m) for m in job.maps], "include": job.include, "exclude": job.exclude,
                    "weights_only": job.weights_only, "dtype": job.dtype, "options": dict(job.options)})


def source_files(job: Job, td) -> list[str]:
    """The files a source is made of: a folder's, or the file itself and those its tensors lie in."""
    if not storage.is_remote(job.source) and os.path.isdir(job.source):
        return [job.source]
    files = {job.source}
    for t in td.values():
        path = getattr(t.source, "path", None)
        if isinstance(path, str):
            files.add(path)
    return sorted(files)


def _exists(path: str) -> bool:
    p = storage.as_path(path)
    return p.exists() or (isinstance(p, Path) and p.is_symlink())


def _read_record(path: str) -> dict | None:
    p = storage.as_path(path)
    try:
        doc = json.loads(p.read_bytes())
    except (OSError, ValueError, ConvertError):
        return None
    return doc if isinstance(doc, dict) else None


# ------------------------------------------------------------------ one job

def run_job(job: Job, force: bool = False, verify: bool = True,
            storage_options: Mapping[str, Any] | None = None) -> dict:
    """Run one job; never raises for the job's own failure: the result says ``status``
    (``done``, ``skipped``, ``failed``), ``seconds``, ``bytes`` and, when failed, ``error``."""
    started = time.perf_counter()
    if storage_options is not None:
        storage.configure(storage_options)
    result: dict[str, Any] = {"job": job.name, "source": storage.redact(job.source),
                              "output": storage.redact(job.output) if job.output else None}
    global _busy
    _busy = True
    try:
        result.update(_run(job, force, verify))
    except ConvertError as e:
        result.update(status="failed", error=storage.redact(" ".join(str(e).split())))
    except (KeyboardInterrupt, SystemExit) as e:
        if _in_worker:  # the partial output is gone (atomic_output); nobody waits for a result
            os._exit(e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130)
        raise
    except Exception as e:  # a bug of ours: one line, the batch goes on
        result.update(status="failed", error=storage.redact(f"internal error: {type(e).__name__}: "
                                                            + " ".join(str(e).split())))
    finally:
        _busy = False
    result.setdefault("bytes", 0)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def _split_options(job: Job, src_info: registry.FormatInfo) -> tuple[dict, dict]:
    dst_info = registry.get(job.to)
    read_keys = {o.keyword for o in src_info.format.options if o.side == "read"}
    write_keys = {o.keyword for o in dst_info.format.options if o.side == "write"}
    read_opts = {k: v for k, v in job.options.items() if k in read_keys}
    write_opts = {k: v for k, v in job.options.items() if k in write_keys}
    unknown = sorted(set(job.options) - read_keys - write_keys)
    if unknown:
        raise UsageError(f"option(s) {', '.join(unknown)} apply to neither reading {src_info.name} "
                         f"nor writing {dst_info.name}")
    return read_opts, write_opts


def _run(job: Job, force: bool, verify: bool) -> dict:
    src_info = api._format(job.source, None if job.src_format == "auto" else job.src_format)
    read_opts, write_opts = _split_options(job, src_info)
    td = api.read(job.source, src_info.name, **read_opts)
    source_digest = _digest(storage.fingerprint(source_files(job, td)))
    opts_digest = options_digest(job)
    dst_info, dst_writer = registry.writer(job.to)
    output = job.output or str(api.default_output(job.source, dst_info, dst_writer))
    record = record_path(output)
    replace_output = force
    if _exists(output):
        old = _read_record(record)
        if not force:
            if old is None:
                raise WriteError(output, "already exists and has no record of convert batch "
                                         "(use --force to replace it)")
            if old.get("source_digest") == source_digest and old.get("options_digest") == opts_digest:
                return {"status": "skipped", "output": storage.redact(output), "bytes": int(old.get("bytes") or 0)}
        replace_output = True
    elif _exists(record):  # the output was removed by hand: its record goes too
        storage.as_path(record).unlink()
    if not storage.is_remote(output):
        Path(output).parent.mkdir(parents=True, exist_ok=True)

    def companions(path: Path) -> dict[str, bytes]:
        doc = {"convert_batch": RECORD_VERSION, "convert": __version__, "source": storage.redact(job.source),
               "source_format": src_info.name, "format": job.to, "source_digest": source_digest,
               "options_digest": opts_digest, "tensors": len(td), "bytes": td.nbytes}
        return {record_name(str(path)): (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()}

    summary = api.convert(job.source, output, to=job.to, src_format=src_info.name, include=job.include,
                          exclude=job.exclude, dtype=job.dtype, maps=job.maps, weights_only=job.weights_only,
                          force=replace_output, verify=verify, read_opts=read_opts, write_opts=write_opts,
                          companions=companions)
    outs = summary["outputs"]
    return {"status": "done", "output": storage.redact(output), "bytes": sum(o["bytes"] for o in outs),
            "tensors": sum(o["tensors"] for o in outs), "verified": all(o["verified"] for o in outs)}


def memory_request(job: Job, default: int | None) -> int:
    """A job's memory request: its own, else ``default``, else a bound from its source's files."""
    if job.memory:
        return job.memory
    if default:
        return default
    try:
        sizes = [row[1] for row in storage.fingerprint([job.source])]
    except ConvertError:
        sizes = []
    return BASE_MEMORY + max(sizes, default=0)


# ------------------------------------------------------------------ executors

class Executor(Protocol):
    """Runs jobs somewhere and yields ``(index, result)`` as each finishes (any order)."""

    def run(self, jobs: Sequence[Job], force: bool, verify: bool) -> Iterator[tuple[int, dict]]: ...


def _failed(job: Job, why: str) -> dict:
    return {"job": job.name, "source": storage.redact(job.source),
            "output": storage.redact(job.output) if job.output else None,
            "status": "failed", "error": why, "bytes": 0, "seconds": 0.0}


_in_worker = False  # this process is a LocalExecutor worker
_busy = False  # ... running a job


def _worker_init(parent: int) -> None:
    """In each local worker: die with the batch (SIGTERM when the parent goes, even by SIGKILL:
    PR_SET_PDEATHSIG, and a watchdog where that is missing). SIGTERM in a job raises, so that its
    partial output is removed on the way out, then the worker exits at once: the pool's queues
    would keep it waiting forever once the parent is gone."""
    import signal
    import threading

    global _in_worker
    _in_worker = True

    def terminate(signum, frame):
        if _busy:
            raise SystemExit(128 + signum)
        os._exit(128 + signum)
    signal.signal(signal.SIGTERM, terminate)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="convert-watchdog", daemon=True).start()


class LocalExecutor:
    """Worker processes on this machine (spawned, so no state is shared by fork)."""

    def __init__(self, workers: int, max_retries: int = MAX_RETRIES):
        self.workers = max(1, workers)
        self.max_retries = max_retries

    def run(self, jobs: Sequence[Job], force: bool, verify: bool) -> Iterator[tuple[int, dict]]:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        options = storage.configured()
        todo = list(range(len(jobs)))
        tries = dict.fromkeys(todo, 0)
        while todo:
            pool = ProcessPoolExecutor(min(self.workers, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_worker_init, initargs=(os.getpid(),))
            futures = {pool.submit(run_job, jobs[i], force, verify, options): i for i in todo}
            todo = []
            try:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        i = futures[f]
                        try:
                            yield i, f.result()
                        except BrokenProcessPool:  # a worker died (OOM killer, SIGKILL): run it again
                            tries[i] += 1
                            if tries[i] > self.max_retries:
                                yield i, _failed(jobs[i], f"worker process died {tries[i]} times")
                            else:
                                todo.append(i)
            except BaseException:
                for p in list(getattr(pool, "_processes", {}).values()):
                    p.terminate()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
            todo.sort()


class RayExecutor:
    """Each job a Ray task (``ray::run_job``), retried by Ray when its worker is lost."""

    def __init__(self, address: str, max_retries: int = MAX_RETRIES, memory: int | None = None):
        self.address, self.max_retries, self.memory = address, max_retries, memory

    def run(self, jobs: Sequence[Job], force: bool, verify: bool) -> Iterator[tuple[int, dict]]:
        try:
            import ray
        except ImportError:
            from .errors import MissingDependencyError

            raise MissingDependencyError("--ray", "ray", "ray") from None
        started_here = not ray.is_initialized()
        if started_here:
            try:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            except ConnectionError as e:
                raise UsageError(f"--ray {self.address}: cannot join the cluster ({' '.join(str(e).split())})") from None
        try:
            task = ray.remote(run_job)
            options = storage.configured()
            refs = {}
            for i, job in enumerate(jobs):
                ref = task.options(name="run_job", max_retries=self.max_retries, num_cpus=1,
                                   memory=memory_request(job, self.memory)).remote(job, force, verify, options)
                refs[ref] = i
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    i = refs[ref]
                    try:
                        yield i, ray.get(ref)
                    except ray.exceptions.RayError as e:  # retries used up, or the task could not run
                        first = " ".join(str(e).split())[:300]
                        yield i, _failed(jobs[i], storage.redact(f"ray: {type(e).__name__}: {first}"))
        finally:
            if started_here:
                ray.shutdown()


def run(jobs: Sequence[Job], executor: Executor, force: bool = False, verify: bool = True,
        on_result: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Run every job; return the results in job order (``on_result`` sees them as they finish)."""
    results: list[dict | None] = [None] * len(jobs)
    for i, result in executor.run(jobs, force, verify):
        result = {"index": i + 1, **result}
        results[i] = result
        if on_result:
            on_result(i, result)
    return [r for r in results if r is not None]


def job_dicts(jobs: Iterable[Job]) -> list[dict]:
    """The jobs as JSON-able dicts (``--dry-run``), credentials redacted."""
    out = []
    for j in jobs:
        d = asdict(j)
        d["source"] = storage.redact(d["source"])
        d["output"] = storage.redact(d["output"]) if d["output"] else None
        out.append(d)
    return out
