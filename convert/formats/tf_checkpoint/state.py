"""The ``checkpoint`` state file: a text-format ``CheckpointState`` proto.

Format (tensorflow/python/checkpoint/checkpoint_state.proto; written by
``tf.train.update_checkpoint_state``)::

    model_checkpoint_path: "my-model-190"
    all_model_checkpoint_paths: "my-model-160"
    all_model_checkpoint_paths: "my-model-190"
    all_model_checkpoint_timestamps: 1734403158.65
    last_preserved_timestamp: 1734403157.48

Paths are relative to the directory holding the file, or absolute. We parse the
few scalar fields with a small text-format reader (strings with C escapes), since
the generated proto class ships only inside TensorFlow.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import ReadError

if TYPE_CHECKING:
    from ...storage import AnyPath

STATE_FILE = "checkpoint"
_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.*?)\s*$")
_ESCAPES = {b"n": b"\n", b"t": b"\t", b"r": b"\r", b"\\": b"\\", b"'": b"'", b'"': b'"',
            b"a": b"\a", b"b": b"\b", b"f": b"\f", b"v": b"\v", b"?": b"?"}


@dataclass
class CheckpointState:
    model_checkpoint_path: str = ""
    all_model_checkpoint_paths: list[str] = field(default_factory=list)


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] not in "\"'" or text[-1] != text[0]:
        raise ValueError(f"expected a quoted string, got {text!r}")
    raw = text[1:-1].encode("utf-8")
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i:i + 1]
        if c != b"\\":
            out += c
            i += 1
            continue
        nxt = raw[i + 1:i + 2]
        if nxt in _ESCAPES:
            out += _ESCAPES[nxt]
            i += 2
        elif nxt == b"x":
            m = re.match(rb"[0-9a-fA-F]{1,2}", raw[i + 2:])
            if not m:
                raise ValueError("bad \\x escape")
            out.append(int(m.group(), 16))
            i += 2 + len(m.group())
        elif nxt[:1].isdigit():
            m = re.match(rb"[0-7]{1,3}", raw[i + 1:])
            if not m:
                raise ValueError("bad octal escape")
            out.append(int(m.group(), 8) & 0xFF)
            i += 1 + len(m.group())
        else:
            raise ValueError(f"bad escape \\{nxt!r}")
    return out.decode("utf-8")


def _quote(s: str) -> str:
    # Like protobuf's CEscape: printable ASCII kept, everything else escaped in octal.
    out = []
    for b in s.encode("utf-8"):
        ch = chr(b)
        if ch in "\"'\\":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif 0x20 <= b < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def parse_state(text: str) -> CheckpointState:
    """Parse the text of a ``checkpoint`` file; ValueError when it is not one."""
    st = CheckpointState()
    seen = False
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise ValueError(f"not a text-format field: {line!r}")
        key, value = m.groups()
        if key == "model_checkpoint_path":
            st.model_checkpoint_path = _unquote(value)
            seen = True
        elif key == "all_model_checkpoint_paths":
            st.all_model_checkpoint_paths.append(_unquote(value))
        elif key in ("all_model_checkpoint_timestamps", "last_preserved_timestamp"):
            float(value)
        else:
            raise ValueError(f"unknown field {key!r}")
    if not seen:
        raise ValueError("no model_checkpoint_path")
    return st


def format_state(model_checkpoint_path: str, all_paths: list[str] | None = None) -> str:
    """Text of a ``checkpoint`` file (no timestamps, so that output is deterministic)."""
    lines = [f"model_checkpoint_path: {_quote(model_checkpoint_path)}"]
    for p in all_paths if all_paths is not None else [model_checkpoint_path]:
        lines.append(f"all_model_checkpoint_paths: {_quote(p)}")
    return "\n".join(lines) + "\n"


def read_state(directory: AnyPath) -> CheckpointState | None:
    """The state file of ``directory``, or None when there is none or it does not parse."""
    try:
        text = (directory / STATE_FILE).read_bytes()
        if len(text) > 1 << 20:
            return None
        return parse_state(text.decode("utf-8"))
    except (OSError, ValueError, ReadError):  # ReadError: a remote folder's (convert.storage)
        return None


def state_paths(directory: AnyPath, st: CheckpointState) -> list[str]:
    """Every path the state names (retained ones, then the latest if not among them), as written."""
    paths = list(st.all_model_checkpoint_paths)
    if st.model_checkpoint_path and st.model_checkpoint_path not in paths:
        paths.append(st.model_checkpoint_path)
    return paths


def candidates(directory: Path, p: str) -> list[str]:
    """Where a path from the state file may be: as given (relative to ``directory``), then its
    basename inside ``directory`` (for checkpoints moved since they were written). Strings, not
    Paths: a prefix may end with a separator (``run/``: the files are ``run/.index``...)."""
    given = p if os.path.isabs(p) else os.path.join(str(directory), p)
    out = [given]
    local = os.path.join(str(directory), re.split(r"[\\/]", p)[-1])  # also Windows paths
    if local != given:
        out.append(local)
    return out
