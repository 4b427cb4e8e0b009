"""The command line, through main(argv) and through the installed console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convert
from convert.cli import main

from oracles import safetensors_read

SCRIPT = Path(sys.executable).parent / "convert"


@pytest.fixture
def st_file(tmp_path):
    td = convert.TensorDict.from_arrays({
        "conv1/w": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "conv1/b": np.ones(4, np.float64),
        "step": np.int64(190),
        "big": np.array([1.0, 1e6], np.float32),
    })
    path = tmp_path / "model.safetensors"
    convert.write(td, path, "safetensors")
    return path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_writes_beside_input_and_refuses_to_overwrite(st_file, capsys):
    code, out, err = run(["safetensors", st_file, "--to", "safetensors", "-o", st_file.parent / "copy.safetensors"],
                         capsys)
    assert code == 0 and out == "" and "copy.safetensors" in err
    again = run(["auto", st_file, "--to", "safetensors", "-o", st_file.parent / "copy.safetensors"], capsys)
    assert again[0] == 1 and "already exists" in again[2] and again[2].count("\n") == 1
    assert run(["auto", st_file, "--to", "st", "-o", st_file.parent / "copy.safetensors", "--force", "-q"],
               capsys) == (0, "", "")


def test_default_output_never_replaces_the_input(st_file, capsys):
    code, _, err = run(["auto", st_file, "--to", "safetensors", "--force"], capsys)
    assert code == 2 and "replace the input" in err


def test_default_output_is_named_after_the_input_folder(tmp_path, st_file, capsys):
    folder = tmp_path / "model1"
    folder.mkdir()
    st_file.rename(folder / "model.safetensors")
    code, _, _ = run(["auto", str(folder) + "/", "--to", "safetensors", "-q"], capsys)
    assert code == 0 and (tmp_path / "model1.safetensors").is_file()


def test_json_summary_and_selection(st_file, capsys):
    out_path = st_file.parent / "sel.safetensors"
    code, out, _ = run(["auto", st_file, "--to", "safetensors", "-o", out_path, "--include", "^conv1/",
                        "--exclude", "/b$", "--json"], capsys)
    assert code == 0
    summary = json.loads(out)
    assert summary["outputs"][0]["tensors"] == 1 and summary["outputs"][0]["verified"] is True
    assert list(safetensors_read(out_path)) == ["conv1/w"]


def test_nothing_left_after_selection_is_a_usage_error(st_file, capsys):
    code, _, err = run(["auto", st_file, "--to", "safetensors", "-o", st_file.parent / "x.safetensors",
                        "--include", "nomatch"], capsys)
    assert code == 2 and "no tensor is left" in err and not (st_file.parent / "x.safetensors").exists()


def test_dtype_cast_and_overflow_refusal(st_file, capsys):
    ok = st_file.parent / "half.safetensors"
    code, _, _ = run(["auto", st_file, "--to", "safetensors", "-o", ok, "--dtype", "float16", "--exclude", "big"],
                     capsys)
    assert code == 0
    got = safetensors_read(ok)
    assert got["conv1/w"].dtype == np.float16 and got["conv1/b"].dtype == np.float16
    assert got["step"].dtype == np.int64  # integers are not cast
    assert np.array_equal(got["conv1/w"], np.arange(24, dtype=np.float16).reshape(2, 3, 4))
    bad = st_file.parent / "overflow.safetensors"
    code, _, err = run(["auto", st_file, "--to", "safetensors", "-o", bad, "--dtype", "float16"], capsys)
    assert code == 1 and "big" in err and "-1e+06" not in err and "1e+06 cannot be held by float16" in err and "Traceback" not in err
    assert not bad.exists() and sorted(p.name for p in st_file.parent.iterdir()) == ["half.safetensors",
                                                                                     "model.safetensors"]


@pytest.mark.parametrize("argv, status, text", [
    (["safetensors"], 2, "required"),
    (["nosuchformat", "x", "--to", "safetensors"], 2, "unknown format 'nosuchformat'"),
    (["auto", "/nonexistent/file", "--to", "safetensors"], 1, "no such file"),
    (["safetensors", "{st}", "--to", "safetensors", "--step", "3"], 2, "--step"),
    (["safetensors", "{st}", "--to", "nope"], 2, "unknown format 'nope'"),
    (["safetensors", "{st}", "--to", "safetensors", "--dtype", "int8"], 2, "floating"),
    (["safetensors", "{st}", "--to", "safetensors", "--include", "("], 2, "regular expression"),
])
def test_errors_are_one_line_with_the_right_status(st_file, capsys, argv, status, text):
    argv = [a.replace("{st}", str(st_file)) for a in argv]
    if "--step" in argv and "--step" not in {o.flag for _, o in convert.registry.options()}:
        pytest.skip("no format declares --step yet")
    code, out, err = run(argv, capsys)
    assert code == status and text in err and err.count("\n") == 1 and "Traceback" not in err


def test_junk_input_is_refused_with_one_line(tmp_path, capsys):
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"\x00garbage" * 100)
    code, _, err = run(["auto", junk, "--to", "safetensors"], capsys)
    assert code == 1 and "not a weight file" in err and str(junk) in err
    code, _, err = run(["safetensors", junk, "--to", "safetensors", "-o", tmp_path / "o.safetensors"], capsys)
    assert code == 1 and str(junk) in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def test_inspect_lists_every_tensor(st_file, capsys):
    code, out, _ = run(["inspect", st_file, "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["format"] == "safetensors" and report["count"] == 4
    assert {t["name"]: (t["dtype"], t["shape"], t["bytes"]) for t in report["tensors"]}["conv1/w"] == \
        ("float32", [2, 3, 4], 96)
    code, out, _ = run(["inspect", st_file], capsys)
    assert code == 0 and "conv1/w" in out and "float32" in out and "[2, 3, 4]" in out


def test_formats_lists_the_registry(capsys):
    code, out, _ = run(["formats", "--json"], capsys)
    rows = json.loads(out)
    assert code == 0 and {r["name"] for r in rows} == set(convert.registry.names())
    assert all(r["read"] == "yes" or r["read"].startswith(("no", "needs pip install")) for r in rows)


def test_help_does_not_import_frameworks():
    code = ("import sys; from convert.cli import main; main(['--help']); "
            "print(sorted(m for m in ('tensorflow', 'torch', 'onnxruntime', 'tf2onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")


def test_console_script(st_file):
    assert SCRIPT.exists(), "the package is not installed (make install)"
    res = subprocess.run([SCRIPT, "auto", st_file, "--to", "safetensors", "-o", st_file.parent / "s.safetensors",
                          "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["outputs"][0]["format"] == "safetensors"
    res = subprocess.run([sys.executable, "-m", "convert", "inspect", st_file, "--json"], capture_output=True,
                         text=True)
    assert res.returncode == 0 and json.loads(res.stdout)["count"] == 4
    res = subprocess.run([SCRIPT, "auto", st_file.parent / "missing", "--to", "safetensors"], capture_output=True,
                         text=True)
    assert res.returncode == 1 and res.stderr.count("\n") == 1


def test_progress_reports_every_byte(st_file):
    calls = []
    convert.convert(st_file, st_file.parent / "p.safetensors", to="safetensors", progress=lambda d, t: calls.append((d, t)))
    total = convert.read(st_file).nbytes
    assert calls and calls[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:], strict=False))


def _under_a_terminal(argv: list[str], show_after: float) -> bytes:
    """Run the CLI in a fresh process whose stderr is a pseudo-terminal; what the terminal got."""
    import pty

    code = "import sys, convert.cli as c; c.SHOW_PROGRESS_AFTER = float(sys.argv[1]); sys.exit(c.main(sys.argv[2:]))"
    pid, fd = pty.fork()
    if pid == 0:  # the child
        os.execv(sys.executable, [sys.executable, "-c", code, str(show_after), *map(str, argv)])
    seen = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    assert os.waitpid(pid, 0)[1] == 0, seen
    return seen


def test_progress_bar_at_a_terminal_only(st_file, tmp_path):
    """At a terminal a bar is drawn on stderr once the work has taken SHOW_PROGRESS_AFTER seconds
    (0 here); a quick conversion gets none; piped, stderr holds just the summary line."""
    seen = _under_a_terminal(["auto", st_file, "--to", "safetensors", "-o", tmp_path / "bar.safetensors"], 0)
    assert b"wrote" in seen and (tmp_path / "bar.safetensors").exists()
    assert b"\x1b[" in seen and b"writing" in seen  # the bar, drawn with terminal control codes
    seen = _under_a_terminal(["auto", st_file, "--to", "safetensors", "-o", tmp_path / "quick.safetensors"], 1.0)
    assert b"wrote" in seen and b"\x1b[" not in seen and b"writing" not in seen
    seen = _under_a_terminal(["inspect", st_file, "--verify"], 0)
    assert b"verified" in seen and b"checking" in seen
    res = subprocess.run([SCRIPT, "auto", st_file, "--to", "safetensors", "-o", tmp_path / "piped.safetensors"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr.count("\n") == 1 and "\x1b[" not in res.stderr


def test_output_that_contains_the_input_is_refused(tmp_path, st_file, capsys):
    folder = tmp_path / "inp"
    folder.mkdir()
    src = folder / "m.safetensors"
    st_file.rename(src)
    code, _, err = run(["auto", src, "--to", "tf-ckpt", "-o", folder, "--force"], capsys)
    assert code == 2 and "replace the input" in err and src.exists()


def test_force_never_replaces_a_folder_of_something_else(tmp_path, st_file, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "important.txt").write_text("keep")
    for fmt in ("tf-ckpt", "safetensors"):
        code, _, err = run(["auto", st_file, "--to", fmt, "-o", precious, "--force"], capsys)
        assert code == 1 and "holds no" in err and (precious / "important.txt").read_text() == "keep"
    ours = tmp_path / "ours"
    assert run(["auto", st_file, "--to", "tf-ckpt", "-o", ours, "-q"], capsys)[0] == 0
    assert run(["auto", st_file, "--to", "tf-ckpt", "-o", ours, "--force", "-q"], capsys)[0] == 0  # its own kind


def test_unwritable_destination_is_a_one_line_write_error(st_file, capsys):
    code, _, err = run(["auto", st_file, "--to", "safetensors", "-o", "/proc/x.safetensors"], capsys)
    assert code == 1 and "/proc/x.safetensors" in err and "internal error" not in err and err.count("\n") == 1


def test_sigterm_midway_leaves_nothing(st_file, capsys, monkeypatch):
    import signal

    from convert.formats import safetensors

    real = safetensors.copy_many  # the writer's copy of its tensors' bytes (copying.copy_many)

    def copy_then_terminate(tensors, out):
        crcs = real(tensors, out)
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a CI timeout would, after the bytes are written
        return crcs
    monkeypatch.setattr(safetensors, "copy_many", copy_then_terminate)
    code, _, err = run(["auto", st_file, "--to", "safetensors", "-o", st_file.parent / "t.safetensors"], capsys)
    assert code == 128 + signal.SIGTERM and "interrupted" in err
    assert sorted(p.name for p in st_file.parent.iterdir()) == ["model.safetensors"]


def test_dtype_refuses_infinities_the_target_cannot_hold(tmp_path, capsys):
    src = tmp_path / "inf.safetensors"
    convert.write(convert.TensorDict.from_arrays({"a": np.array([1, -np.inf], np.float32)}), src, "safetensors")
    code, _, err = run(["auto", src, "--to", "safetensors", "--dtype", "float8_e4m3fn", "-o", tmp_path / "o.safetensors"],
                       capsys)
    assert code == 1 and "-inf cannot be held by float8_e4m3fn" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inf.safetensors"]
    assert run(["auto", src, "--to", "safetensors", "--dtype", "float16", "-o", tmp_path / "h.safetensors"],
               capsys)[0] == 0  # float16 has infinities


@pytest.mark.parametrize("fmt, ext, text", [("onnx", ".onnx", "truncated"), ("torch", ".pt", "zip"),
                                            ("safetensors", ".safetensors", "truncated")])
def test_damaged_file_gets_its_readers_precise_error_by_extension(tmp_path, capsys, fmt, ext, text):
    """Content no longer says what a truncated file is; its unambiguous extension picks the reader."""
    good = tmp_path / ("good" + ext)
    convert.write(convert.TensorDict.from_arrays({"w": np.arange(4096, dtype=np.float32)}), good, fmt)
    bad = tmp_path / ("bad" + ext)
    bad.write_bytes(good.read_bytes()[:2000])
    code, _, err = run(["auto", bad, "--to", "safetensors", "-o", tmp_path / "out.safetensors"], capsys)
    assert code == 1 and text in err and str(bad) in err and "not a weight file" not in err
    assert not (tmp_path / "out.safetensors").exists()


def test_inspect_verify_reads_every_byte_and_checks_checksums(tmp_path, capsys):
    """A V2 checkpoint written by TensorFlow: intact, --verify passes and says what it checked;
    one flipped byte in a tensor's data (which plain inspect never reads) fails it, naming the tensor."""
    tf = pytest.importorskip("tensorflow")
    d = tmp_path / "ckpt"
    d.mkdir()
    tf.raw_ops.SaveV2(prefix=str(d / "m"), tensor_names=["a", "b"], shape_and_slices=["", ""],
                      tensors=[tf.constant(np.arange(1000, dtype=np.float32)), tf.constant([1, 2, 3])])
    code, out, _ = run(["inspect", d / "m.index", "--verify", "--json"], capsys)
    assert code == 0 and json.loads(out)["verified"]["bytes"] == 4012
    data = d / "m.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert run(["inspect", d / "m.index"], capsys)[0] == 0  # the index alone is intact
    code, _, err = run(["inspect", d / "m.index", "--verify"], capsys)
    assert code == 1 and "checksum mismatch" in err and "'a'" in err and err.count("\n") == 1


def test_inspect_json_is_one_line_per_tensor_and_quiet_into_a_closed_pipe(tmp_path):
    td = convert.TensorDict.from_arrays({f"layer{i}/w": np.full(3, i, np.float32) for i in range(5000)})
    convert.write(td, tmp_path / "many.safetensors", "safetensors")
    out = subprocess.run([SCRIPT, "inspect", tmp_path / "many.safetensors", "--json"], capture_output=True, check=True)
    lines = out.stdout.decode().splitlines()
    assert json.loads(out.stdout)["count"] == 5000 and sum(line.startswith('    {"name": ') for line in lines) == 5000
    assert json.loads(lines[lines.index('  "tensors": [') + 1].rstrip(",")) == {
        "name": "layer0/w", "dtype": "float32", "shape": [3], "bytes": 12}
    # `convert inspect ... | head -1`: no "internal error: BrokenPipeError" on stderr, the shell's 141
    proc = subprocess.run(f"'{SCRIPT}' inspect '{tmp_path / 'many.safetensors'}' --json | head -1; "
                          "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (141, b"{\n", b"")
