"""The command line: the only module that prints or exits.

    convert SRC_FORMAT SRC_PATH --to DST_FORMAT [-o OUT] [options]
    convert inspect PATH [--json]
    convert formats [--json]
    convert map SRC --map RULES [--template PATH] [--plan]   convert map suggest A B [-o RULES.yaml]
    convert diff A B [--map RULES] [--atol X --rtol Y]
    convert mappings [NAME]
    convert batch 'PATTERN' --to FORMAT -o 'OUT/{run}/{stem}.EXT'    convert batch --jobs FILE

Exit status: 0 done, 1 the input or the conversion failed, 2 a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import api, registry, storage
from .errors import ConvertError, UsageError, pip_install, printable

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SHOW_PROGRESS_AFTER = 1.0  # seconds of work before a progress bar appears


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, status 2
        raise _UsageExit(f"{self.prog}: {message}")


class _UsageExit(Exception):
    pass


def _add_format_options(parser: argparse.ArgumentParser, sides: Sequence[str]) -> None:
    declared: dict[str, tuple[registry.Option, list[str]]] = {}
    for info, opt in registry.options():
        if opt.side in sides:
            declared.setdefault(opt.flag, (opt, []))[1].append(info.name)
    group = parser.add_argument_group("format options")
    for flag, (opt, formats) in declared.items():
        help_text = f"{opt.help} [{opt.side} {', '.join(formats)}]"
        if opt.kind is bool:
            group.add_argument(flag, dest=opt.keyword, action="store_true", help=help_text)
        elif opt.kind is list:
            group.add_argument(flag, dest=opt.keyword, action="append", metavar="VALUE", help=help_text)
        else:
            group.add_argument(flag, dest=opt.keyword, type=opt.kind, choices=opt.choices,
                               metavar=flag.lstrip("-").upper().replace("-", "_"), help=help_text)


def _side_options(args: argparse.Namespace, side: str) -> dict:
    keys = {opt.keyword for _, opt in registry.options() if opt.side == side}
    return {k: getattr(args, k) for k in sorted(keys) if hasattr(args, k)}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--storage-options", metavar="JSON", help="fsspec storage options for remote paths "
                        "(s3://...; or CONVERT_STORAGE_OPTIONS): one object, or one per protocol; never printed")


def _configure_storage(argv: Sequence[str]) -> None:
    """``--storage-options`` set before anything is parsed, so that every message is redacted."""
    for i, a in enumerate(argv):
        if a == "--storage-options" and i + 1 < len(argv):
            storage.configure(argv[i + 1])
        elif a.startswith("--storage-options="):
            storage.configure(a.split("=", 1)[1])


def _conversion_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="convert",
        description="Convert checkpoint weights between formats. Other commands: "
                    + ", ".join(f"'convert {c} ...'" for c in COMMANDS) + ".",
        epilog="Formats: " + ", ".join(registry.names()) + ". Exit status: 0 done, 1 failed, 2 usage error.")
    p.add_argument("src_format", metavar="SRC_FORMAT", help="source format, or 'auto' to detect it from content")
    p.add_argument("src", metavar="SRC_PATH", help="input file or folder")
    p.add_argument("--to", required=True, metavar="DST_FORMAT", help="destination format")
    p.add_argument("-o", "--output", metavar="OUT", help="output path (default: beside the input, named after it)")
    p.add_argument("--map", action="append", default=[], metavar="FILE_OR_PRESET",
                   help="apply a mapping rule file or preset (repeatable, in order)")
    p.add_argument("--include", action="append", default=[], metavar="REGEX",
                   help="keep only source tensors whose name matches (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="leave out source tensors whose name matches (repeatable)")
    p.add_argument("--weights-only", action="store_true", help="leave out optimizer state and step counters")
    p.add_argument("--dtype", metavar="DTYPE", help="cast floating tensors to DTYPE, dequantizing GGUF quantized ones (refuses overflow)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--no-verify", action="store_true", help="do not read the output back to compare")
    p.add_argument("--version", action="store_true",
                   help="print the version and which optional dependencies are installed, then exit")
    p.add_argument("--split", choices=("shards",), help="convert a sharded source in parallel pieces: one output "
                   "shard per source shard, each verified, the index written last")
    p.add_argument("--worker", metavar="I/N", help="with --split: be worker I of N (Slurm arrays, torchrun, xargs...)")
    p.add_argument("--ray", metavar="ADDRESS", help="with --split: one Ray task per output shard on this cluster")
    _common(p)
    _add_format_options(p, ("read", "write"))
    return p


def _split(args: argparse.Namespace) -> int:
    from . import split

    if not args.output:
        raise UsageError("--split shards needs -o OUT (a folder)")
    if args.no_verify:
        raise UsageError("--split shards always verifies every shard")
    worker = split.parse_worker(args.worker) if args.worker else None
    if worker and args.ray:
        raise UsageError("--worker and --ray are two ways to run the workers: give one")
    req = split.Request(args.src, args.output, args.to, None if args.src_format == "auto" else args.src_format,
                        tuple(args.include), tuple(args.exclude), tuple(args.map), args.dtype, args.weights_only,
                        _side_options(args, "read"), _side_options(args, "write"), args.force)
    result = split.run(req, worker, args.ray)
    if args.json:
        print(_json(result))
    elif not args.quiet:
        if result.get("committed"):
            print(f"wrote {result['output']} ({result['format']}): {result['tensors']} tensors in "
                  f"{result['output_shards']} shards, {_human(result['bytes'])}, verified", file=sys.stderr)
        else:
            print(f"wrote shards {', '.join(result['shards'])} of {result['output']}; the last worker to finish "
                  "writes the index", file=sys.stderr)
    return EXIT_OK


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)  # pragma: no cover


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


@contextlib.contextmanager
def _progress_bar(show: bool, verb: str = "writing") -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr for people at a terminal, shown once the work has taken about a
    second (a quick conversion stays one line); nothing for pipelines and logs."""
    if not show:
        yield None
        return
    started, bar, task = time.monotonic(), None, None

    def update(done: int, total: int) -> None:
        nonlocal bar, task
        if bar is None:
            if time.monotonic() - started < SHOW_PROGRESS_AFTER:
                return
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

            bar = Progress(verb, BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                           console=Console(stderr=True), transient=True)
            bar.start()
            task = bar.add_task(verb, total=total)
        bar.update(task, completed=done, total=total)
    try:
        yield update
    finally:
        if bar is not None:
            bar.stop()


def cmd_convert(argv: list[str]) -> int:
    args = _conversion_parser().parse_args(argv)
    if args.split:
        return _split(args)
    if args.worker or args.ray:
        raise UsageError("--worker and --ray go with --split shards")
    with _progress_bar(sys.stderr.isatty() and not (args.quiet or args.json)) as progress:
        summary = api.convert(
            args.src, args.output, to=args.to, src_format=args.src_format, include=args.include,
            exclude=args.exclude, dtype=args.dtype, maps=args.map, weights_only=args.weights_only,
            force=args.force, verify=not args.no_verify,
            read_opts=_side_options(args, "read"), write_opts=_side_options(args, "write"), progress=progress)
    if args.json:
        print(_json(summary))
    elif not args.quiet:
        for out in summary["outputs"]:
            check = out.get("checked") or ("verified" if out["verified"] else "not verified")
            print(f"wrote {out['output']} ({out['format']}): {out['tensors']} tensors, "
                  f"{_human(out['bytes'])}, {check}", file=sys.stderr)
            for note in out["notes"]:
                print(f"note: {note}", file=sys.stderr)
    return EXIT_OK


def _json(obj, depth: int = 0) -> str:
    """``obj`` as JSON, indented two levels deep and one line per item below (a tensor's entry):
    readable, and encoded by json's C encoder, which ``indent`` would turn off (3x slower at 50,000 tensors)."""
    pad = "  " * (depth + 1)
    if depth < 2 and isinstance(obj, dict) and obj:
        items = ",\n".join(f"{pad}{_ENCODE(str(k))}: {_json(v, depth + 1)}" for k, v in obj.items())
        return "{\n" + items + "\n" + "  " * depth + "}"
    if depth < 2 and isinstance(obj, list) and obj:
        return "[\n" + ",\n".join(pad + _json(v, depth + 1) for v in obj) + "\n" + "  " * depth + "]"
    return _ENCODE(obj)


def _encoder():
    """json's C encoder, made once: ``JSONEncoder.encode`` makes one per call (20 µs, at 50,000
    tensors' entries of ``inspect --json``)."""
    plain = json.JSONEncoder(separators=(", ", ": "))
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython has the C accelerator
        return plain.encode
    encode = make(None, plain.default, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)
    return lambda obj: "".join(encode(obj, 0))


_ENCODE = _encoder()


def cmd_inspect(argv: list[str]) -> int:
    p = _Parser(prog="convert inspect", description="List what a checkpoint holds.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--format", default="auto", help="format name (default: detect from content)")
    p.add_argument("--verify", action="store_true",
                   help="read every tensor's bytes and check every checksum the format has (exit 1 if damaged)")
    _common(p)
    _add_format_options(p, ("read",))
    _report_options(p, "sortable tables, sizes by layer and every tensor's value statistics (reads every value)")
    args = p.parse_args(argv)
    if args.report:
        from . import report as html_report

        html_report.check(args.report, args.force)
    with _progress_bar(args.verify and sys.stderr.isatty() and not (args.quiet or args.json), "checking") as progress:
        report = api.inspect(args.path, args.format, verify=args.verify, progress=progress,
                             **_side_options(args, "read"))
    if args.report:
        page = html_report.inspect_page(report, api.read(args.path, report["format"], **_side_options(args, "read")))
        html_report.write(args.report, page, args.force)
        if not args.quiet and not args.json:
            print(f"wrote {args.report}", file=sys.stderr)
    if args.json:
        print(_json(report))
        return EXIT_OK
    if args.quiet:
        return EXIT_OK
    from rich.table import Table
    from rich.text import Text

    console = _console()
    console.print(f"{printable(str(report['path']))}: {report['format']}, {report['count']} tensors, "
                  f"{_human(report['total_bytes'])}", markup=False)
    table = Table(box=None, pad_edge=False)
    extra = [c for c in ("role", "origin") if any(c in t for t in report["tensors"])]
    for col in ("name", "dtype", "shape", "bytes", *extra):
        table.add_column(col, justify="right" if col == "bytes" else "left", overflow="fold")
    for t in report["tensors"]:
        # names and origins come from the file: plain text (not rich markup), control characters escaped
        table.add_row(Text(printable(t["name"])), t["dtype"], str(t["shape"]), str(t["bytes"]),
                      *(Text(printable(str(t.get(c, "")))) for c in extra))
    console.print(table)
    if report["metadata"]:
        console.print("metadata:")
        for k, v in report["metadata"].items():
            console.print(f"  {printable(k)} = {printable(str(v))}", markup=False)
    if "verified" in report:
        checked = report["verified"]["checksums"]
        console.print(f"verified: every tensor read in full ({_human(report['verified']['bytes'])}); "
                      + (f"checked: {checked}" if checked else f"{report['format']} files hold no checksums"),
                      markup=False)
    return EXIT_OK


def cmd_formats(argv: list[str]) -> int:
    p = _Parser(prog="convert formats", description="Formats, and whether they can be read and written here.")
    _common(p)
    args = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for info in registry.FORMATS:
        fmt = info.format
        row = {"name": info.name, "aliases": [*info.aliases, *info.writer_aliases], "description": fmt.description,
               "writers": [w.id or "default" for w in fmt.writers]}
        for side, present in (("read", fmt.read is not None), ("write", bool(fmt.writers))):
            missing = registry.missing(info, side)
            row[side] = ("no" if not present else
                         f"needs {pip_install(missing[0][1])}" if missing else "yes")
        rows.append(row)
    if args.json:
        print(_json(rows))
        return EXIT_OK
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("name", "read", "write", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        writers = r["writers"]
        ids = f" (writers: {', '.join(writers)}; --to {r['name']}:ID)" if len(writers) > 1 else ""
        table.add_row(r["name"], r["read"], r["write"], r["description"] + ids)
    _console().print(table)
    return EXIT_OK


def _read_for(path: str, fmt: str, args: argparse.Namespace):
    return api.read(path, None if fmt == "auto" else fmt, **_side_options(args, "read"))


def cmd_map(argv: list[str]) -> int:
    if argv and argv[0] == "suggest":
        return cmd_map_suggest(argv[1:])
    p = _Parser(prog="convert map", description="Show how rule files map a checkpoint's names and layouts, "
                "without writing anything. 'convert map suggest A B' proposes a rule file.")
    p.add_argument("src", metavar="SRC_PATH")
    p.add_argument("--map", action="append", default=[], metavar="FILE_OR_PRESET",
                   help="rule file or preset (repeatable, applied in order)")
    p.add_argument("--template", metavar="PATH", help="then resolve the names against this template's variables, "
                   "as writing with --template would (a TF checkpoint folder, prefix, .meta, SavedModel, or ONNX model)")
    p.add_argument("--template-fill", action="store_true", help="with --template: show the template variables "
                   "--template-fill would write")
    p.add_argument("--to", metavar="DST_FORMAT", help="with --template: the output format (default: the one that "
                   "takes the template)")
    p.add_argument("--plan", action="store_true", help="print the plan (the default: nothing is written)")
    p.add_argument("--format", default="auto", help="format of SRC_PATH (default: detect from content)")
    _common(p)
    _add_format_options(p, ("read",))
    args = p.parse_args(argv)
    if not args.map and not args.template:
        raise UsageError("convert map needs --map RULES, --template PATH, or both")
    if (args.template_fill or args.to) and not args.template:
        raise UsageError("--template-fill and --to apply with --template")
    td, report = api.apply_maps(_read_for(args.src, args.format, args), args.map)
    resolution = None
    if args.template:
        _, resolution = api.resolve_template(td, args.template, args.to, args.template_fill)
    if args.json:
        out = report.to_dict() if report is not None else {}
        print(_json({**out, "template": resolution.to_dict()} if resolution else out))
    elif not args.quiet:
        texts = [r.to_text() for r in (report, resolution) if r is not None]
        sys.stdout.write("\n".join(texts))
    return EXIT_OK


def cmd_map_suggest(argv: list[str]) -> int:
    p = _Parser(prog="convert map suggest", description="Propose a rule file mapping A's names onto B's, "
                "by shape, order and name similarity; ambiguous matches are flagged for review.")
    p.add_argument("a", metavar="A", help="the checkpoint to be mapped")
    p.add_argument("b", metavar="B", help="the checkpoint whose names are wanted")
    p.add_argument("-o", "--output", metavar="RULES.yaml", help="write the rule file here (default: stdout)")
    p.add_argument("--format-a", default="auto", help="format of A (default: detect)")
    p.add_argument("--format-b", default="auto", help="format of B (default: detect)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    _common(p)
    _add_format_options(p, ("read",))
    args = p.parse_args(argv)
    from . import fileio, suggest

    text, ambiguities = suggest.suggest(_read_for(args.a, args.format_a, args),
                                        _read_for(args.b, args.format_b, args))
    if args.output:
        with fileio.atomic_output(args.output, force=args.force) as tmp:
            tmp.write_text(text, encoding="utf-8")
    if args.json:
        print(_json({"output": args.output, "rules": None if args.output else text, "ambiguities": ambiguities}))
    elif not args.output:
        sys.stdout.write(text)
    if not args.json and not args.quiet:
        if args.output:
            print(f"wrote {args.output}", file=sys.stderr)
        for line in ambiguities:
            print(f"review: {line}", file=sys.stderr)
    return EXIT_OK


def cmd_diff(argv: list[str]) -> int:
    p = _Parser(prog="convert diff", description="Compare two checkpoints tensor by tensor (A after --map). "
                "Exit status 0 when they agree, 1 when they differ.")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--map", action="append", default=[], metavar="FILE_OR_PRESET",
                   help="rule file or preset applied to A first (repeatable, in order)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default 0)")
    p.add_argument("--all", action="store_true", help="list every tensor, not only those that differ")
    p.add_argument("--format-a", default="auto", help="format of A (default: detect)")
    p.add_argument("--format-b", default="auto", help="format of B (default: detect)")
    _report_options(p, "errors per tensor and by layer, histograms of the worst, names one side lacks")
    _common(p)
    _add_format_options(p, ("read",))
    args = p.parse_args(argv)
    if args.atol < 0 or args.rtol < 0:
        raise UsageError("--atol and --rtol must be >= 0")
    if args.report:
        from . import report as html_report

        html_report.check(args.report, args.force)
    a, _ = api.apply_maps(_read_for(args.a, args.format_a, args), args.map)
    b = _read_for(args.b, args.format_b, args)
    result = api.diff(a, b, atol=args.atol, rtol=args.rtol)
    if args.report:
        html_report.write(args.report, html_report.diff_page(result, a, b, args.a, args.b), args.force)
    if args.json:
        print(_json(result.to_dict()))
    elif not args.quiet:
        sys.stdout.write(result.to_text(all_tensors=args.all))
    if args.report and not args.quiet and not args.json:
        print(f"wrote {args.report}", file=sys.stderr)
    return EXIT_OK if result.ok else EXIT_FAILED


def _report_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--report", metavar="FILE.html",
                   help=f"also write a self-contained HTML page: {what} (needs {pip_install('report')})")
    p.add_argument("--force", action="store_true", help="with --report: replace an existing FILE.html")


def cmd_mappings(argv: list[str]) -> int:
    p = _Parser(prog="convert mappings", description="List the mapping presets, or show one.")
    p.add_argument("name", nargs="?", metavar="NAME", help="a preset to show")
    _common(p)
    args = p.parse_args(argv)
    from . import mapping

    if args.name:
        text = mapping.preset_text(args.name)
        print(_json({"name": args.name, "text": text}) if args.json else text, end="" if not args.json else "\n")
        return EXIT_OK
    rows = mapping.presets()
    if args.json:
        print(_json([{"name": n, "description": d} for n, d in rows]))
    elif not args.quiet:
        width = max((len(n) for n, _ in rows), default=0)
        for n, d in rows:
            print(f"{n.ljust(width)}  {d}")
        print("\nShow one with 'convert mappings NAME'; use one with '--map NAME'.")
    return EXIT_OK


def cmd_version(argv: list[str]) -> int:
    """``convert --version``: the version, and each optional dependency the formats (and
    ``--report``) name, with its installed version or the extra that installs it."""
    import importlib.metadata
    import importlib.util

    from . import __version__, report
    from .errors import DISTRIBUTION

    p = _Parser(prog="convert --version", description="The version and the optional dependencies found.")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    args = p.parse_args(argv)
    needs = registry.dependencies()
    needs.setdefault(report.NEEDS, []).append("--report")
    dists = importlib.metadata.packages_distributions()
    rows: list[dict[str, Any]] = []
    for (module, extra), uses in needs.items():
        version = None
        if importlib.util.find_spec(module) is not None:
            version = "installed"
            for dist in dists.get(module, []):
                with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                    version = importlib.metadata.version(dist)
                    break
        rows.append({"module": module, "extra": extra, "version": version, "for": uses})
    if args.json:
        print(_json({"version": __version__, "distribution": DISTRIBUTION, "optional": rows}))
        return EXIT_OK
    print(f"convert {__version__} (pip install {DISTRIBUTION}; also runs as '{DISTRIBUTION}' and 'python -m convert')")
    print("optional dependencies:")
    width = max((len(r["module"]) + len(r["extra"]) for r in rows), default=0) + 3
    for r in rows:
        state = r["version"] or f"not installed: {pip_install(r['extra'])}"
        print(f"  {(r['module'] + ' [' + r['extra'] + ']').ljust(width)}  {', '.join(r['for'])}: {state}")
    return EXIT_OK


def _jobs_bar(show: bool, total: int) -> contextlib.AbstractContextManager[Callable[[int, int], None] | None]:
    """One progress bar across a batch's jobs, on stderr, for people at a terminal only."""
    if not show:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    @contextlib.contextmanager
    def bar():
        progress = Progress("converting", BarColumn(), MofNCompleteColumn(), TextColumn("jobs, {task.fields[data]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        task = progress.add_task("converting", total=total, data="0 B")
        with progress:
            yield lambda done, nbytes: progress.update(task, completed=done, data=_human(nbytes))
    return bar()


def cmd_batch(argv: list[str]) -> int:
    p = _Parser(prog="convert batch", description="Many conversions in one command: every match of a pattern "
                "('runs/*/checkpoint', 's3://bucket/runs/*/checkpoint') or every job of a jobs file (YAML or JSON "
                "lines). Resumable: a job whose output exists with a matching record of its source is skipped. "
                "-o placeholders: {1}.. (what each wildcard matched), {run} (the checkpoint's folder), {name}, "
                "{stem} (the source's name without endings), {step} (one job per retained step). "
                "Exit status 1 if any job failed (the others still run).")
    p.add_argument("pattern", nargs="?", metavar="PATTERN", help="a glob pattern of sources (quote it)")
    p.add_argument("--jobs", metavar="FILE", help="a jobs file (.yaml/.yml, or .jsonl: one JSON job a line)")
    p.add_argument("--to", metavar="DST_FORMAT", help="destination format (default of a jobs file's jobs)")
    p.add_argument("-o", "--output", metavar="TEMPLATE", help="output path with placeholders (for a pattern)")
    p.add_argument("--from", dest="src_format", metavar="SRC_FORMAT", help="source format (default: detect)")
    p.add_argument("--map", action="append", default=[], metavar="FILE_OR_PRESET", help="mapping rules (repeatable)")
    p.add_argument("--include", action="append", default=[], metavar="REGEX", help="keep matching tensors")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX", help="leave out matching tensors")
    p.add_argument("--weights-only", action="store_true", help="leave out optimizer state and step counters")
    p.add_argument("--dtype", metavar="DTYPE", help="cast floating tensors to DTYPE")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="local worker processes (default: one per CPU)")
    p.add_argument("--ray", metavar="ADDRESS", help="run each job as a Ray task on this cluster ('auto': the one "
                   "this machine belongs to); needs ckpt-convert[ray]")
    p.add_argument("--memory", metavar="SIZE", help="memory request of each Ray task (default: 256 MiB plus "
                   "the job's largest source file)")
    p.add_argument("--max-retries", type=int, default=3, metavar="N", help="reruns of a job whose worker died")
    p.add_argument("--force", action="store_true", help="redo every job, replacing existing outputs")
    p.add_argument("--no-verify", action="store_true", help="do not read the outputs back to compare")
    p.add_argument("--dry-run", action="store_true", help="list the jobs, run none")
    _common(p)
    _add_format_options(p, ("read", "write"))
    args = p.parse_args(argv)
    from . import batch

    if args.storage_options is not None:
        storage.configure(args.storage_options)
    if (args.pattern is None) == (args.jobs is None):
        raise UsageError("give a PATTERN or --jobs FILE (one of them)")
    if args.workers < 1 or args.max_retries < 0:
        raise UsageError("--workers must be >= 1 and --max-retries >= 0")
    options = {k: v for side in ("read", "write") for k, v in _side_options(args, side).items()
               if v is not None and v is not False and v != []}
    defaults = {"to": args.to, "from": args.src_format, "map": args.map, "include": args.include,
                "exclude": args.exclude, "weights_only": args.weights_only, "dtype": args.dtype,
                "options": options}
    if args.jobs:
        jobs = batch.jobs_from_file(args.jobs, defaults)
    else:
        if not args.to:
            raise UsageError("a pattern needs --to DST_FORMAT")
        read_keys = {o.keyword for _, o in registry.options() if o.side == "read"}
        jobs = batch.jobs_from_pattern(args.pattern, args.to, args.output or "", defaults,
                                       {k: v for k, v in options.items() if k in read_keys})
    if args.dry_run:
        print(_json(batch.job_dicts(jobs)))
        return EXIT_OK
    memory = batch.parse_memory(args.memory) if args.memory else None
    executor = (batch.RayExecutor(args.ray, args.max_retries, memory) if args.ray
                else batch.LocalExecutor(args.workers, args.max_retries))
    counts = {"done": 0, "skipped": 0, "failed": 0}
    started, nbytes = time.monotonic(), 0
    with _jobs_bar(sys.stderr.isatty() and not (args.quiet or args.json), len(jobs)) as bar:
        def on_result(i: int, result: dict) -> None:
            nonlocal nbytes
            counts[result["status"]] += 1
            nbytes += result.get("bytes") or 0
            if args.json:
                print(json.dumps(result), flush=True)  # one line per job (a stream)
            elif result["status"] == "failed":
                print(f"convert: job {result['job']}: {result['error']}", file=sys.stderr, flush=True)
            if bar:
                bar(sum(counts.values()), nbytes)
        batch.run(jobs, executor, force=args.force, verify=not args.no_verify, on_result=on_result)
    if not args.json and not args.quiet:
        print(f"batch: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed "
              f"({_human(nbytes)}, {time.monotonic() - started:.1f} s)", file=sys.stderr)
    return EXIT_FAILED if counts["failed"] else EXIT_OK


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "batch": cmd_batch,
    "inspect": cmd_inspect,
    "formats": cmd_formats,
    "map": cmd_map,
    "diff": cmd_diff,
    "mappings": cmd_mappings,
}


class _Terminated(BaseException):
    """SIGTERM, raised where the program is so that partial outputs are removed on the way out."""


def _terminate(signum, frame):
    raise _Terminated()


def _one_line(e: BaseException) -> str:
    # errors quoted from frameworks can span lines; a backend's may quote a credential
    return storage.redact(" ".join(str(e).split()))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    previous = signal.signal(signal.SIGTERM, _terminate)
    # A checkpoint's index makes a few small objects per tensor and none of them cycles: at the
    # default threshold (700) the collector would walk them all again and again, a third of the
    # time of reading 50,000 entries. Collections still run, 140 times less often.
    thresholds = gc.get_threshold()
    gc.set_threshold(100_000, 20, 20)
    try:
        _configure_storage(argv)
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        if argv and (argv[0] == "-V" or "--version" in argv):
            return cmd_version([a for a in argv if a == "--json"])
        return cmd_convert(argv)
    except SystemExit as e:  # --help and --version exit through argparse
        return e.code if isinstance(e.code, int) else EXIT_OK
    except _UsageExit as e:
        print(storage.redact(str(e)), file=sys.stderr)
        return EXIT_USAGE
    except UsageError as e:
        if debug:
            raise
        print(f"convert: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except ConvertError as e:
        if debug:
            raise
        print(f"convert: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except (KeyboardInterrupt, _Terminated) as e:
        # a signal that arrives while an output is being moved into place lets that finish first
        # (fileio), so an output may exist: complete, never half-written
        print("convert: interrupted; nothing was left half-written", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 128 + signal.SIGTERM
    except BrokenPipeError:  # `convert inspect ... | head`: the reader has what it wanted
        with contextlib.suppress(OSError):  # and the interpreter's flush of stdout at exit stays quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as e:  # a bug of ours: still one line, with a way to see more
        if debug:
            raise
        print(f"convert: internal error: {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)
        gc.set_threshold(*thresholds)
