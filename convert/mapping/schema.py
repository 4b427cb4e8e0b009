"""Loading rule files: the presets, and the YAML schema validated at load time into frozen
:class:`~.rules.RuleSet` s, every error naming ``file:line`` (see :mod:`convert.mapping`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from .. import dtypes
from ..dtypes import DType
from ..errors import MappingError, UsageError
from .references import parse_metadata, parse_permute_rope
from .rules import UNMATCHED_POLICIES, Rule, RuleSet
from .transforms import Cast, Concat, Reshape, Split, Squeeze, Transform, Transpose, Unsqueeze

SCHEMA_VERSION = 1
_PACKAGE = Path(__file__).resolve().parent.parent  # convert/
# Installed from a wheel the presets are convert/mappings; in the source tree, the top-level mappings/.
MAPPINGS_DIR = next((d for d in (_PACKAGE / "mappings", _PACKAGE.parent / "mappings") if d.is_dir()),
                    _PACKAGE.parent / "mappings")
"""Where presets live: ``mappings/<name>.yaml`` next to the package (the lead handles packaging)."""


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


_TOP_KEYS = ("schema", "unmatched", "rules", "description", "metadata")
_RULE_KEYS = ("match", "to", "drop", "rank", "shape", "dtype", "role", "exists",
              "transforms", "split", "concat", "replace")
_TRANSFORM_KEYS = ("transpose", "reshape", "cast", "squeeze", "unsqueeze", "permute_rope")
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
        except UsageError as e:
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
        metadata = parse_metadata(self, top["metadata"][1]) if "metadata" in top else ()
        return RuleSet(self.filename, rules, unmatched, description, metadata)

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
            target = self.dtype(vnode, label)
            if target.is_quantized:
                raise self.error(vnode, f"{label}: quantizing is not offered ({target})")
            return Cast(where, target)
        if kind == "permute_rope":
            return parse_permute_rope(self, vnode, where, label)
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
