"""Name mapping: YAML rule files -> renames, drops and layout transforms of a TensorDict.

A rule file (schema documented in ``mappings/README.md``) is loaded into frozen
:class:`RuleSet` / :class:`Rule` objects and fully validated at load time; every
error is a :class:`~convert.errors.MappingError` reading ``file:line: message``
(line numbers come from ``yaml.compose``, which keeps each node's position).

:func:`apply` runs rule sets in order, each on the previous result. Within a set
the first rule whose regex fully matches a name (and whose conditions hold) wins.
Applying rules does no I/O: a rename returns ``tensor.renamed(new)`` (same source,
zero bytes touched) and a transform returns a lazy tensor whose dtype and shape are
computed from the rule, so only that tensor is read, and only when a writer asks.

Example::

    from convert import mapping
    rules = [mapping.load("tf1-to-torch"), mapping.load("drop-optimizer")]
    new_td, report = mapping.apply(td, rules)
    print(report.to_text())
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import dtypes
from .dtypes import DType
from .errors import ConvertError, MappingError
from .ir import ArraySource, Tensor, TensorDict, derived
from .lazy import np

SCHEMA_VERSION = 1
# Installed from a wheel the presets are convert/mappings; in the source tree, the top-level mappings/.
MAPPINGS_DIR = next((d for d in (Path(__file__).resolve().parent / "mappings",
                                 Path(__file__).resolve().parent.parent / "mappings") if d.is_dir()),
                    Path(__file__).resolve().parent.parent / "mappings")
"""Where presets live: ``mappings/<name>.yaml`` next to the package (the lead handles packaging)."""

UNMATCHED_POLICIES = ("error", "keep", "drop")


# --------------------------------------------------------------------------- transforms

class _RuleFailure(Exception):
    """A rule does not fit a tensor; turned into a MappingError naming rule and tensor."""


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _axis(axis: int, rank: int, what: str) -> int:
    if not -rank <= axis < rank:
        raise _RuleFailure(f"{what}: axis {axis} is out of range for rank {rank}")
    return axis % rank


@dataclass(frozen=True)
class Transform:
    """One layout step. ``spec`` computes the result's dtype and shape without data."""

    where: str

    def spec(self, dtype: DType, shape: tuple[int, ...]) -> tuple[DType, tuple[int, ...]]:
        raise NotImplementedError

    def __call__(self, array: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Transpose(Transform):
    perm: tuple[int, ...]

    def spec(self, dtype, shape):
        if len(shape) != len(self.perm):
            raise _RuleFailure(f"transpose {list(self.perm)} needs rank {len(self.perm)}, tensor has rank {len(shape)}")
        return dtype, tuple(shape[p] for p in self.perm)

    def __call__(self, array):
        # Contiguous so that reshapes after it follow the logical (C) order, and writers stream it.
        return np.ascontiguousarray(np.transpose(array, self.perm))

    def describe(self):
        return f"transpose{_fmt_shape(self.perm)}"


@dataclass(frozen=True)
class Reshape(Transform):
    """New dims: -1 (at most once) is inferred; 0 copies the input's size at that position (as in ONNX)."""

    dims: tuple[int, ...]

    def _resolved(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        dims = []
        for i, d in enumerate(self.dims):
            if d == 0:
                if i >= len(shape):
                    raise _RuleFailure(f"reshape {list(self.dims)}: 0 at position {i} copies a size, "
                                       f"but shape {_fmt_shape(shape)} has rank {len(shape)}")
                d = shape[i]
            dims.append(d)
        numel = math.prod(shape)
        known = math.prod(d for d in dims if d != -1)
        if -1 in dims:
            if known == 0 or numel % known:
                raise _RuleFailure(f"reshape {list(self.dims)} does not fit shape {_fmt_shape(shape)} ({numel} elements)")
            dims = [numel // known if d == -1 else d for d in dims]
        if math.prod(dims) != numel:
            raise _RuleFailure(f"reshape {list(self.dims)} does not fit shape {_fmt_shape(shape)} ({numel} elements)")
        return tuple(dims)

    def spec(self, dtype, shape):
        return dtype, self._resolved(shape)

    def __call__(self, array):
        return np.reshape(np.ascontiguousarray(array), self._resolved(array.shape))

    def describe(self):
        return f"reshape{_fmt_shape(self.dims)}"


@dataclass(frozen=True)
class Cast(Transform):
    dtype: DType

    def spec(self, dtype, shape):
        if (dtype.kind == "string") != (self.dtype.kind == "string"):
            raise _RuleFailure(f"cannot cast {dtype} to {self.dtype}")
        return self.dtype, shape

    def __call__(self, array):
        return array.astype(self.dtype.numpy)

    def describe(self):
        return f"cast({self.dtype.name})"


@dataclass(frozen=True)
class Squeeze(Transform):
    axes: tuple[int, ...] | None  # None: every axis of size 1

    def _resolved(self, shape) -> tuple[int, ...]:
        if self.axes is None:
            return tuple(i for i, d in enumerate(shape) if d == 1)
        axes = tuple(_axis(a, len(shape), "squeeze") for a in self.axes)
        for a in axes:
            if shape[a] != 1:
                raise _RuleFailure(f"squeeze: axis {a} of shape {_fmt_shape(shape)} has size {shape[a]}, not 1")
        return axes

    def spec(self, dtype, shape):
        axes = self._resolved(shape)
        return dtype, tuple(d for i, d in enumerate(shape) if i not in axes)

    def __call__(self, array):
        return np.squeeze(array, axis=self._resolved(array.shape))

    def describe(self):
        return "squeeze" if self.axes is None else f"squeeze{_fmt_shape(self.axes)}"


@dataclass(frozen=True)
class Unsqueeze(Transform):
    axes: tuple[int, ...]

    def spec(self, dtype, shape):
        rank = len(shape) + len(self.axes)
        axes = sorted(_axis(a, rank, "unsqueeze") for a in self.axes)
        if len(set(axes)) != len(axes):
            raise _RuleFailure(f"unsqueeze: repeated axis in {list(self.axes)}")
        out = list(shape)
        for a in axes:
            out.insert(a, 1)
        return dtype, tuple(out)

    def __call__(self, array):
        return np.expand_dims(array, self.axes)

    def describe(self):
        return f"unsqueeze{_fmt_shape(self.axes)}"


@dataclass(frozen=True)
class Split:
    """Cut the (transformed) tensor along ``axis`` into ``len(targets)`` tensors."""

    axis: int
    targets: tuple[str, ...]
    sizes: tuple[int, ...] | None  # None: equal parts; one entry may be -1 (the rest)

    def bounds(self, shape: tuple[int, ...]) -> tuple[int, list[tuple[int, int]]]:
        axis = _axis(self.axis, len(shape), "split")
        dim = shape[axis]
        n = len(self.targets)
        if self.sizes is None:
            if dim % n:
                raise _RuleFailure(f"split: axis {axis} of shape {_fmt_shape(shape)} has size {dim}, not divisible into {n} equal parts")
            sizes = [dim // n] * n
        else:
            rest = dim - sum(s for s in self.sizes if s != -1)
            sizes = [rest if s == -1 else s for s in self.sizes]
            if sum(sizes) != dim or min(sizes) < 0:
                raise _RuleFailure(f"split: sizes {list(self.sizes)} do not add up to size {dim} of axis {axis} (shape {_fmt_shape(shape)})")
        out, start = [], 0
        for s in sizes:
            out.append((start, start + s))
            start += s
        return axis, out


@dataclass(frozen=True)
class Concat:
    """Join every tensor the rule matches with the same target along ``axis``."""

    axis: int
    part: int | str | None  # regex group telling each piece's place in ``order``
    order: tuple[str, ...] | None


# --------------------------------------------------------------------------- rules

@dataclass(frozen=True)
class Rule:
    """One rule of a :class:`RuleSet`. Built and validated by :func:`load`."""

    where: str  # "file:line" of the rule, named by every error it causes
    pattern: re.Pattern
    to: str | None = None  # template (``\\1``, ``\\g<name>``); None: the name itself
    drop: bool = False
    rank: tuple[int, ...] | None = None
    shape: tuple[int | None, ...] | None = None
    dtype: tuple[DType, ...] | None = None
    role: tuple[str, ...] | None = None
    exists: str | None = None  # template of a name that must be in the input
    transforms: tuple[Transform, ...] = ()
    split: Split | None = None
    concat: Concat | None = None
    replace: tuple[tuple[str, str], ...] = ()

    def match(self, tensor: Tensor, names: frozenset[str] | set[str]) -> re.Match | None:
        """The regex match if this rule applies to ``tensor`` (``names``: all input names)."""
        m = self.pattern.fullmatch(tensor.name)
        if m is None:
            return None
        if self.rank is not None and len(tensor.shape) not in self.rank:
            return None
        if self.shape is not None and (len(self.shape) != len(tensor.shape) or any(
                want is not None and want != got for want, got in zip(self.shape, tensor.shape, strict=False))):
            return None
        if self.dtype is not None and tensor.dtype not in self.dtype:
            return None
        if self.role is not None and tensor.attrs.get("role") not in self.role:
            return None
        if self.exists is not None and self.expand(m, self.exists, replace=False) not in names:
            return None
        return m

    def expand(self, m: re.Match, template: str, replace: bool = True) -> str:
        """``template`` filled from the match; ``replace`` pairs applied to targets (not to ``exists``)."""
        try:
            out = m.expand(template)
        except (re.error, IndexError) as e:
            raise MappingError(f"{self.where}: cannot build a name from template '{template}' for '{m.string}': {e}") from None
        for old, new in (self.replace if replace else ()):
            out = out.replace(old, new)
        return out

    def target(self, m: re.Match) -> str:
        return m.string if self.to is None else self.expand(m, self.to)


@dataclass(frozen=True)
class RuleSet:
    """A validated rule file."""

    path: str
    rules: tuple[Rule, ...]
    unmatched: str = "error"
    description: str = ""

    @property
    def name(self) -> str:
        return Path(self.path).stem if self.path and not self.path.startswith("<") else self.path


# --------------------------------------------------------------------------- loading

def _presets_dir() -> Path:
    return MAPPINGS_DIR


def presets() -> list[tuple[str, str]]:
    """Every preset shipped in ``mappings/``: (name, one-line description from its header)."""
    out = []
    for path in sorted(_presets_dir().glob("*.yaml")):
        out.append((path.stem, _header_description(path.read_text(encoding="utf-8"))))
    return out


def preset_text(name: str) -> str:
    """The full text of a preset (header comment included)."""
    path = _preset_path(name)
    if path is None:
        raise MappingError(f"no preset named '{name}'; presets: {', '.join(n for n, _ in presets())}")
    return path.read_text(encoding="utf-8")


def _preset_path(name: str) -> Path | None:
    base = _presets_dir()
    for candidate in (base / name, base / f"{name}.yaml"):
        try:
            candidate.resolve().relative_to(base.resolve())
        except ValueError:
            continue
        if candidate.is_file():
            return candidate
    return None


def _header_description(text: str) -> str:
    """First comment line of a file, without ``#`` and without a leading ``name:``."""
    for line in text.splitlines():
        s = line.strip()
        if not s:
            continue
        if not s.startswith("#"):
            break
        s = s.lstrip("#").strip()
        if s:
            head, sep, rest = s.partition(": ")
            return rest.strip() if sep and " " not in head else s
    return ""


def load(spec: str | os.PathLike) -> RuleSet:
    """Load and validate a rule file.

    Args:
        spec: a path to a YAML rule file, or the name of a preset in ``mappings/``
            (``tf1-to-torch``, ``examples/mnist-cnn-tf1-to-torch``...).

    Returns:
        The frozen, validated :class:`RuleSet`.

    Raises:
        MappingError: ``file:line: message`` for the first problem found.

    Example:
        >>> import convert.mapping
        >>> rules = convert.mapping.load("tf1-to-torch")      # a preset (convert mappings), or a YAML path
        >>> td, report = convert.mapping.apply(convert.read("model1/"),
        ...                                    [rules, convert.mapping.load("drop-optimizer")])
        >>> td["conv1.weight"], len(report.dropped)
        (Tensor('conv1.weight', float32, [8, 1, 5, 5]), 19)
    """
    path = Path(spec)
    if not path.is_file():
        preset = _preset_path(os.fspath(spec))
        if preset is None:
            if path.suffix in (".yaml", ".yml") or os.sep in os.fspath(spec):
                raise MappingError(f"{os.fspath(spec)}: no such rule file")
            raise MappingError(f"'{os.fspath(spec)}' is neither a rule file nor a preset; "
                               f"presets: {', '.join(n for n, _ in presets())}")
        path = preset
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MappingError(f"{path}: cannot read rule file: {e}") from None
    return loads(text, os.fspath(path))


def loads(text: str, filename: str = "<string>") -> RuleSet:
    """Validate a rule file's text; ``filename`` is used in error messages."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        line = mark.line + 1 if mark is not None else 1
        raise MappingError(f"{filename}:{line}: invalid YAML: {problem}") from None
    return _Builder(filename).ruleset(root, _header_description(text))


_TOP_KEYS = ("schema", "unmatched", "rules", "description")
_RULE_KEYS = ("match", "to", "drop", "rank", "shape", "dtype", "role", "exists",
              "transforms", "split", "concat", "replace")
_TRANSFORM_KEYS = ("transpose", "reshape", "cast", "squeeze", "unsqueeze")
_GROUP_REF = re.compile(r"\\(?:g<([^>]*)>|(\d{1,2}))")


class _Builder:
    """Turns composed YAML nodes into rule objects, raising ``file:line: ...`` errors."""

    def __init__(self, filename: str):
        self.filename = filename
        self._construct = yaml.constructor.SafeConstructor()

    def error(self, node, message: str) -> MappingError:
        line = node.start_mark.line + 1 if node is not None else 1
        return MappingError(f"{self.filename}:{line}: {message}")

    def where(self, node) -> str:
        return f"{self.filename}:{node.start_mark.line + 1}"

    # -- typed readers
    def value(self, node):
        try:
            return self._construct.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            raise self.error(node, f"invalid value: {getattr(e, 'problem', e)}") from None

    def mapping(self, node, what: str, known: tuple[str, ...]) -> dict[str, tuple]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"{what} must be a mapping")
        out: dict[str, tuple] = {}
        for knode, vnode in node.value:
            key = self.value(knode)
            if not isinstance(key, str):
                raise self.error(knode, f"{what}: keys must be strings, got {key!r}")
            if key in out:
                raise self.error(knode, f"{what}: key '{key}' given twice")
            if key not in known:
                raise self.error(knode, f"{what}: unknown key '{key}'; known keys: {', '.join(known)}")
            out[key] = (knode, vnode)
        return out

    def string(self, node, what: str) -> str:
        v = self.value(node)
        if not isinstance(v, str):
            raise self.error(node, f"{what} must be a string, got {v!r}")
        return v

    def integer(self, node, what: str) -> int:
        v = self.value(node)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(node, f"{what} must be an integer, got {v!r}")
        return v

    def boolean(self, node, what: str) -> bool:
        v = self.value(node)
        if not isinstance(v, bool):
            raise self.error(node, f"{what} must be true or false, got {v!r}")
        return v

    def seq(self, node, what: str, allow_scalar: bool = False) -> list:
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        if allow_scalar and isinstance(node, yaml.ScalarNode):
            return [node]
        raise self.error(node, f"{what} must be a list")

    def int_list(self, node, what: str, allow_scalar: bool = False) -> tuple[int, ...]:
        return tuple(self.integer(n, f"{what} entries") for n in self.seq(node, what, allow_scalar))

    def str_list(self, node, what: str, allow_scalar: bool = False) -> tuple[str, ...]:
        return tuple(self.string(n, f"{what} entries") for n in self.seq(node, what, allow_scalar))

    def dtype(self, node, what: str) -> DType:
        name = self.string(node, what)
        try:
            return dtypes.by_name(name)
        except ConvertError as e:
            raise self.error(node, f"{what}: {e}") from None

    def template(self, node, what: str, pattern: re.Pattern) -> str:
        text = self.string(node, what)
        for m in _GROUP_REF.finditer(text):
            ref = m.group(1) if m.group(1) is not None else m.group(2)
            if ref.isdigit():
                if int(ref) > pattern.groups:
                    raise self.error(node, f"{what} '{text}' refers to group {ref}, but 'match' has "
                                           f"{pattern.groups} group(s)")
            elif ref not in pattern.groupindex:
                raise self.error(node, f"{what} '{text}' refers to group '{ref}', which 'match' does not define")
        if re.search(r"(?<!\\)(?:\\\\)*\\$", text):
            raise self.error(node, f"{what} '{text}' ends with a lone backslash")
        return text

    # -- the file
    def ruleset(self, root, description: str) -> RuleSet:
        if root is None:
            raise MappingError(f"{self.filename}:1: empty rule file; it needs at least 'schema: {SCHEMA_VERSION}' and 'rules'")
        top = self.mapping(root, "rule file", _TOP_KEYS)
        if "schema" not in top:
            raise self.error(root, f"missing 'schema: {SCHEMA_VERSION}'")
        knode, vnode = top["schema"]
        schema = self.value(vnode)
        if schema != SCHEMA_VERSION or isinstance(schema, bool):
            raise self.error(vnode, f"unsupported schema {schema!r}; this version of convert reads schema {SCHEMA_VERSION}")
        unmatched = "error"
        if "unmatched" in top:
            vnode = top["unmatched"][1]
            unmatched = self.string(vnode, "unmatched")
            if unmatched not in UNMATCHED_POLICIES:
                raise self.error(vnode, f"unmatched must be one of {', '.join(UNMATCHED_POLICIES)}, got '{unmatched}'")
        if "description" in top:
            description = self.string(top["description"][1], "description")
        if "rules" not in top:
            raise self.error(root, "missing 'rules' (a list of rules)")
        rules = tuple(self.rule(n, i + 1) for i, n in enumerate(self.seq(top["rules"][1], "rules")))
        return RuleSet(self.filename, rules, unmatched, description)

    def rule(self, node, number: int) -> Rule:
        what = f"rule {number}"
        keys = self.mapping(node, what, _RULE_KEYS)
        if "match" not in keys:
            raise self.error(node, f"{what}: missing 'match' (a regular expression for the names it applies to)")
        mnode = keys["match"][1]
        source = self.string(mnode, f"{what}: match")
        try:
            pattern = re.compile(source)
        except re.error as e:
            raise self.error(mnode, f"{what}: match '{source}' is not a valid regular expression: {e}") from None
        kw: dict = {"where": self.where(node), "pattern": pattern}

        if "drop" in keys:
            kw["drop"] = self.boolean(keys["drop"][1], f"{what}: drop")
            if kw["drop"]:
                for other in ("to", "transforms", "split", "concat", "replace"):
                    if other in keys:
                        raise self.error(keys[other][0], f"{what}: '{other}' makes no sense with 'drop: true'")
        if "to" in keys:
            kw["to"] = self.template(keys["to"][1], f"{what}: to", pattern)
        if "rank" in keys:
            ranks = self.int_list(keys["rank"][1], f"{what}: rank", allow_scalar=True)
            if any(r < 0 for r in ranks):
                raise self.error(keys["rank"][1], f"{what}: rank must be >= 0")
            kw["rank"] = ranks
        if "shape" in keys:
            shape = []
            for n in self.seq(keys["shape"][1], f"{what}: shape"):
                v = self.value(n)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                    raise self.error(n, f"{what}: shape entries must be sizes >= 0 or null (any size), got {v!r}")
                shape.append(v)
            kw["shape"] = tuple(shape)
        if "dtype" in keys:
            kw["dtype"] = tuple(self.dtype(n, f"{what}: dtype") for n in self.seq(keys["dtype"][1], f"{what}: dtype", True))
        if "role" in keys:
            kw["role"] = self.str_list(keys["role"][1], f"{what}: role", allow_scalar=True)
        if "exists" in keys:
            kw["exists"] = self.template(keys["exists"][1], f"{what}: exists", pattern)
        if "replace" in keys:
            pairs = self.mapping(keys["replace"][1], f"{what}: replace", _AnyKey())
            kw["replace"] = tuple((k, self.string(v, f"{what}: replace '{k}'")) for k, (_, v) in pairs.items())
            if any(not k for k, _ in kw["replace"]):
                raise self.error(keys["replace"][1], f"{what}: replace: cannot replace the empty string")
        if "transforms" in keys:
            kw["transforms"] = tuple(self.transform(n, what) for n in self.seq(keys["transforms"][1], f"{what}: transforms"))
        if "split" in keys:
            if "to" in keys:
                raise self.error(keys["to"][0], f"{what}: with 'split', give the target names in split: to: [...]")
            kw["split"] = self.split(keys["split"][1], what, pattern)
        if "concat" in keys:
            if "split" in keys:
                raise self.error(keys["concat"][0], f"{what}: a rule cannot both split and concat")
            if "to" not in keys:
                raise self.error(keys["concat"][0], f"{what}: 'concat' needs 'to' (the one target the pieces go to)")
            kw["concat"] = self.concat(keys["concat"][1], what, pattern)
        return Rule(**kw)

    def transform(self, node, what: str) -> Transform:
        keys = self.mapping(node, f"{what}: transform", _TRANSFORM_KEYS)
        if len(keys) != 1:
            raise self.error(node, f"{what}: each transform is a mapping with exactly one of {', '.join(_TRANSFORM_KEYS)}")
        (kind, (knode, vnode)), = keys.items()
        where = self.where(knode)
        label = f"{what}: {kind}"
        if kind == "transpose":
            perm = self.int_list(vnode, label)
            if sorted(perm) != list(range(len(perm))):
                raise self.error(vnode, f"{label} {list(perm)} is not a permutation of 0..{len(perm) - 1}")
            return Transpose(where, perm)
        if kind == "reshape":
            dims = self.int_list(vnode, label)
            if any(d < -1 for d in dims) or dims.count(-1) > 1:
                raise self.error(vnode, f"{label} {list(dims)}: sizes must be >= 0 (0: keep the input's size), with at most one -1")
            return Reshape(where, dims)
        if kind == "cast":
            return Cast(where, self.dtype(vnode, label))
        if kind == "squeeze":
            if self.value(vnode) is None:
                return Squeeze(where, None)
            return Squeeze(where, self.int_list(vnode, label, allow_scalar=True))
        axes = self.int_list(vnode, label, allow_scalar=True)
        if not axes:
            raise self.error(vnode, f"{label} needs at least one axis")
        return Unsqueeze(where, axes)

    def split(self, node, what: str, pattern: re.Pattern) -> Split:
        keys = self.mapping(node, f"{what}: split", ("axis", "to", "sizes"))
        axis = self.integer(keys["axis"][1], f"{what}: split: axis") if "axis" in keys else 0
        if "to" not in keys:
            raise self.error(node, f"{what}: split needs 'to': the list of target names")
        tnodes = self.seq(keys["to"][1], f"{what}: split: to")
        if len(tnodes) < 2:
            raise self.error(keys["to"][1], f"{what}: split: to needs at least two targets")
        targets = tuple(self.template(n, f"{what}: split: to", pattern) for n in tnodes)
        sizes = None
        if "sizes" in keys:
            sizes = self.int_list(keys["sizes"][1], f"{what}: split: sizes")
            if len(sizes) != len(targets):
                raise self.error(keys["sizes"][1], f"{what}: split: {len(sizes)} sizes for {len(targets)} targets")
            if any(s < -1 for s in sizes) or sizes.count(-1) > 1:
                raise self.error(keys["sizes"][1], f"{what}: split: sizes must be >= 0, with at most one -1")
        return Split(axis, targets, sizes)

    def concat(self, node, what: str, pattern: re.Pattern) -> Concat:
        keys = self.mapping(node, f"{what}: concat", ("axis", "part", "order"))
        axis = self.integer(keys["axis"][1], f"{what}: concat: axis") if "axis" in keys else 0
        part = order = None
        if "part" in keys:
            pnode = keys["part"][1]
            part = self.value(pnode)
            if isinstance(part, bool) or not isinstance(part, (int, str)):
                raise self.error(pnode, f"{what}: concat: part must be a group number or name")
            if isinstance(part, int) and not 1 <= part <= pattern.groups:
                raise self.error(pnode, f"{what}: concat: part {part}: 'match' has {pattern.groups} group(s)")
            if isinstance(part, str) and part not in pattern.groupindex:
                raise self.error(pnode, f"{what}: concat: part '{part}' is not a group of 'match'")
        if "order" in keys:
            if part is None:
                raise self.error(keys["order"][0], f"{what}: concat: 'order' needs 'part' (the group whose value is ordered)")
            order = self.str_list(keys["order"][1], f"{what}: concat: order")
            if len(set(order)) != len(order):
                raise self.error(keys["order"][1], f"{what}: concat: order lists a value twice")
        return Concat(axis, part, order)


class _AnyKey(tuple):
    """Accepts every key (for free-form mappings such as ``replace``)."""

    def __contains__(self, key) -> bool:
        return True


# --------------------------------------------------------------------------- applying

@dataclass(frozen=True)
class _Lineage:
    sources: tuple[str, ...]
    before: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, dtype, shape) of each original
    steps: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    matched: bool = False


@dataclass(frozen=True)
class MappingRow:
    """How one output tensor was made."""

    sources: tuple[str, ...]
    target: str
    transforms: tuple[str, ...]
    before: tuple[tuple[str, str, tuple[int, ...]], ...]
    dtype: str
    shape: tuple[int, ...]
    rules: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "sources": list(self.sources), "target": self.target, "transforms": list(self.transforms),
            "before": [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in self.before],
            "after": {"dtype": self.dtype, "shape": list(self.shape)}, "rules": list(self.rules),
        }


@dataclass(frozen=True)
class Dropped:
    sources: tuple[str, ...]
    reason: str  # "file:line" of the drop rule, or "file: unmatched"

    def to_dict(self) -> dict:
        return {"sources": list(self.sources), "reason": self.reason}


@dataclass(frozen=True)
class MappingReport:
    """What :func:`apply` did: one row per mapped output, the drops, the untouched names."""

    rows: tuple[MappingRow, ...]
    dropped: tuple[Dropped, ...]
    kept_unmatched: tuple[str, ...]
    rule_files: tuple[str, ...] = ()
    tensors_in: int = 0

    def to_dict(self) -> dict:
        return {
            "rule_files": list(self.rule_files),
            "tensors_in": self.tensors_in,
            "tensors_out": len(self.rows) + len(self.kept_unmatched),
            "rows": [r.to_dict() for r in self.rows],
            "dropped": [d.to_dict() for d in self.dropped],
            "kept_unmatched": list(self.kept_unmatched),
        }

    def to_text(self) -> str:
        """The ``--plan`` table: plain text, aligned columns."""
        def spec(d, s):
            return f"{d}{_fmt_shape(s)}"

        lines = []
        header = ("SOURCE", "TARGET", "TRANSFORMS", "BEFORE", "AFTER")
        table = []
        for r in self.rows:
            before = " + ".join(spec(d, s) for _, d, s in r.before)
            renamed_only = not r.transforms
            table.append((", ".join(r.sources), r.target,
                          "(rename)" if renamed_only else " ".join(r.transforms), before, spec(r.dtype, r.shape)))
        if table:
            widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
            for row in [header, *table]:
                lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
        else:
            lines.append("no tensor matched a rule")
        if self.dropped:
            lines.append("")
            lines.append(f"dropped ({len(self.dropped)}):")
            w = max(len(", ".join(d.sources)) for d in self.dropped)
            for d in self.dropped:
                lines.append(f"  {', '.join(d.sources).ljust(w)}  {d.reason}")
        if self.kept_unmatched:
            lines.append("")
            lines.append(f"kept unchanged, no rule matched ({len(self.kept_unmatched)}):")
            lines.extend(f"  {n}" for n in self.kept_unmatched)
        lines.append("")
        out = len(self.rows) + len(self.kept_unmatched)
        lines.append(f"{self.tensors_in} tensors in, {out} out: {len(self.rows)} mapped, "
                     f"{len(self.kept_unmatched)} kept unchanged, {len(self.dropped)} dropped")
        return "\n".join(lines) + "\n"


def apply(td: TensorDict, rule_sets: Sequence[RuleSet]) -> tuple[TensorDict, MappingReport]:
    """Apply rule sets in order, each on the previous result.

    Args:
        td: the input; not modified, and no tensor data is read.
        rule_sets: from :func:`load`.

    Returns:
        The mapped TensorDict (same metadata) and a :class:`MappingReport`.

    Raises:
        MappingError: names no rule matched (``unmatched: error``; all listed at
            once), several sources mapped to one target, or a transform that does
            not fit a tensor's shape or dtype (all problems of a rule set at once).
    """
    if isinstance(rule_sets, RuleSet):
        rule_sets = [rule_sets]
    lineage = {name: _Lineage((name,), ((name, t.dtype.name, t.shape),)) for name, t in td.items()}
    dropped: list[Dropped] = []
    cur = td
    for rs in rule_sets:
        cur, lineage = _apply_set(cur, rs, lineage, dropped)
    rows, kept = [], []
    for name, t in cur.items():
        lin = lineage[name]
        if lin.matched:
            rows.append(MappingRow(lin.sources, name, lin.steps, lin.before, t.dtype.name, t.shape, lin.rules))
        else:
            kept.append(name)
    return cur, MappingReport(tuple(rows), tuple(dropped), tuple(kept), tuple(rs.path for rs in rule_sets), len(td))


def _merge_steps(parts: list[_Lineage]) -> tuple[str, ...]:
    steps = [p.steps for p in parts]
    if all(s == steps[0] for s in steps):
        return steps[0]
    return tuple(f"({src}: {' '.join(s) or 'as is'})" for p, s in zip(parts, steps, strict=False) for src in p.sources[:1])


def _chain(transforms: tuple[Transform, ...]) -> Callable[[np.ndarray], np.ndarray]:
    def run(array: np.ndarray) -> np.ndarray:
        for tr in transforms:
            array = tr(array)
        return array
    return run


def _spec(transforms, dtype, shape):
    for tr in transforms:
        dtype, shape = tr.spec(dtype, shape)
    return dtype, shape


def _slice(axis: int, start: int, stop: int, then: Callable) -> Callable[[np.ndarray], np.ndarray]:
    index = (slice(None),) * axis + (slice(start, stop),)

    def run(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(then(array)[index])
    return run


def _apply_set(td: TensorDict, rs: RuleSet, lineage: dict[str, _Lineage],
               dropped: list[Dropped]) -> tuple[TensorDict, dict[str, _Lineage]]:
    names = frozenset(td)
    errors: list[str] = []
    unmatched: list[str] = []
    # Outputs in input order; a concat group sits where its first piece was.
    slots: list = []
    groups: dict[tuple[int, str], list[tuple[Tensor, re.Match]]] = {}

    for name, t in td.items():
        found = _first_match(rs, t, names)
        if found is None:
            unmatched.append(name)
            if rs.unmatched == "keep":
                slots.append(("keep", t))
            elif rs.unmatched == "drop":
                dropped.append(Dropped(lineage[name].sources, f"{rs.path}: no rule matched (unmatched: drop)"))
            continue
        index, rule, m = found
        if rule.drop:
            dropped.append(Dropped(lineage[name].sources, f"dropped by rule at {rule.where}"))
            continue
        try:
            if rule.concat is not None:
                key = (index, rule.target(m))
                if key not in groups:
                    groups[key] = []
                    slots.append(("concat", rule, key))
                groups[key].append((t, m))
            elif rule.split is not None:
                slots.append(("made", rule, [name], _split(t, rule, m)))
            else:
                slots.append(("made", rule, [name], [_transformed(t, rule, rule.target(m))]))
        except _RuleFailure as e:
            errors.append(f"{rule.where}: tensor '{name}' {t.dtype.name}{_fmt_shape(t.shape)}: {e}")

    if unmatched and rs.unmatched == "error":
        listing = "".join(f"\n  {n}" for n in unmatched)
        errors.insert(0, f"{rs.path}: {len(unmatched)} tensor name(s) match no rule (the file says "
                         f"'unmatched: error'; add rules, or set 'unmatched: keep' or 'drop'):{listing}")

    out: list[Tensor] = []
    producers: dict[str, list[str]] = {}
    new_lineage: dict[str, _Lineage] = {}
    for slot in slots:
        if slot[0] == "keep":
            t = slot[1]
            out.append(t)
            producers.setdefault(t.name, []).append(f"'{t.name}' (no rule matched, kept)")
            new_lineage.setdefault(t.name, lineage[t.name])
            continue
        if slot[0] == "concat":
            _, rule, key = slot
            members = groups[key]
            try:
                made = [_concat(members, rule, key[1])]
            except _RuleFailure as e:
                errors.append(f"{rule.where}: concat into '{key[1]}' of {', '.join(repr(t.name) for t, _ in members)}: {e}")
                continue
            inputs = [t.name for t, _ in _ordered(members, rule.concat)] if rule.concat.order else [t.name for t, _ in members]
            step = (f"concat(axis={rule.concat.axis})",)
        else:
            _, rule, inputs, made = slot
            step = ()
        parts = [lineage[n] for n in inputs]
        base = _Lineage(tuple(s for p in parts for s in p.sources), tuple(b for p in parts for b in p.before),
                        _merge_steps(parts) + step, tuple(dict.fromkeys(r for p in parts for r in p.rules)) + (rule.where,),
                        True)
        for i, t in enumerate(made):
            out.append(t)
            label = " + ".join(repr(n) for n in inputs)
            producers.setdefault(t.name, []).append(f"{label} (rule at {rule.where})")
            extra = []
            if rule.split is not None:
                extra.append(f"split(axis={rule.split.axis}, part {i + 1}/{len(made)})")
            tr = tuple(x.describe() for x in rule.transforms)
            if slot[0] == "concat":
                new_lineage[t.name] = _Lineage(base.sources, base.before, base.steps + tr, base.rules, True)
            else:
                new_lineage[t.name] = _Lineage(base.sources, base.before, base.steps + tr + tuple(extra), base.rules, True)

    clashes = {k: v for k, v in producers.items() if len(v) > 1}
    for target, who in clashes.items():
        errors.append(f"{rs.path}: {len(who)} tensors map to '{target}': {'; '.join(who)}")
    if errors:
        raise MappingError("\n".join(errors))
    return TensorDict(out, td.metadata), new_lineage


def _first_match(rs: RuleSet, t: Tensor, names: frozenset[str]) -> tuple[int, Rule, re.Match] | None:
    for index, rule in enumerate(rs.rules):
        m = rule.match(t, names)
        if m is not None:
            return index, rule, m
    return None


def _transformed(t: Tensor, rule: Rule, target: str) -> Tensor:
    if not rule.transforms:
        return t if target == t.name else t.renamed(target)
    dtype, shape = _spec(rule.transforms, t.dtype, t.shape)
    return derived(t, _chain(rule.transforms), dtype, shape, name=target)


def _split(t: Tensor, rule: Rule, m: re.Match) -> list[Tensor]:
    dtype, shape = _spec(rule.transforms, t.dtype, t.shape)
    axis, bounds = rule.split.bounds(shape)
    run = _chain(rule.transforms)
    out = []
    for template, (start, stop) in zip(rule.split.targets, bounds, strict=False):
        part_shape = shape[:axis] + (stop - start,) + shape[axis + 1:]
        # Each part reads the source again: memory stays at one tensor, not all parts at once.
        out.append(derived(t, _slice(axis, start, stop, run), dtype, part_shape, name=rule.expand(m, template)))
    return out


def _ordered(members: list[tuple[Tensor, re.Match]], concat: Concat) -> list[tuple[Tensor, re.Match]]:
    if concat.order is None:
        return members
    placed: dict[str, tuple[Tensor, re.Match]] = {}
    for t, m in members:
        value = m.group(concat.part)
        if value not in concat.order:
            raise _RuleFailure(f"'{t.name}' has part '{value}', which is not in order {list(concat.order)}")
        placed[value] = (t, m)
    missing = [v for v in concat.order if v not in placed]
    if missing:
        raise _RuleFailure(f"no piece for part(s) {', '.join(missing)} of order {list(concat.order)}")
    return [placed[v] for v in concat.order]


def _concat(members: list[tuple[Tensor, re.Match]], rule: Rule, target: str) -> Tensor:
    pieces = [t for t, _ in _ordered(members, rule.concat)]
    first = pieces[0]
    rank = len(first.shape)
    axis = _axis(rule.concat.axis, rank, "concat")
    for p in pieces[1:]:
        if p.dtype != first.dtype:
            raise _RuleFailure(f"pieces have different dtypes ({first.dtype}, {p.dtype}); cast them first")
        if len(p.shape) != rank or any(a != b for i, (a, b) in enumerate(zip(p.shape, first.shape, strict=False)) if i != axis):
            raise _RuleFailure(f"shapes {_fmt_shape(first.shape)} and {_fmt_shape(p.shape)} differ outside axis {axis}")
    shape = first.shape[:axis] + (sum(p.shape[axis] for p in pieces),) + first.shape[axis + 1:]
    dtype, shape = _spec(rule.transforms, first.dtype, shape)
    run = _chain(rule.transforms)

    def produce() -> np.ndarray:
        out = np.asarray(run(np.concatenate([p.numpy() for p in pieces], axis=axis)))
        return out if out.dtype == dtype.numpy or dtype.kind == "string" else out.astype(dtype.numpy)
    return Tensor(target, dtype, shape, ArraySource(produce), first.attrs)
