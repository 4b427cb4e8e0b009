"""Values a rule file takes from the checkpoint it is applied to: references, and the rule file's
``metadata:`` section (documented in ``mappings/README.md``, "Values from the source").

Rules may take numbers from the checkpoint they are applied to: a *reference* is a YAML mapping
``{config: NAME}`` (a key of the Hugging Face config.json beside the source, carried as the
metadata ``local.hf.config``; dotted names reach into nested objects: ``rope_parameters.rope_theta``)
or ``{meta: KEY}`` (a metadata value: JSON, a GGUF typed value ``{"uint32": 32}`` gives 32);
a list of names tries each in turn; ``default:`` is used when none is there (``default: null``
leaves a metadata entry out). References are resolved when the rules are applied
(:func:`bind_references`), before any tensor is looked at; a missing one is an error naming the rule.
They are used by the ``permute_rope`` transform and by the rule file's ``metadata:`` section.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import yaml

from ..errors import MappingError
from .rules import RuleSet
from .transforms import PermuteRope

HF_CONFIG_KEY = "local.hf.config"
_NO_DEFAULT = object()


@dataclass(frozen=True)
class Reference:
    """A value to be taken from the source (see the block comment above)."""

    where: str
    source: str  # "config" or "meta"
    names: tuple[str, ...]
    default: object = _NO_DEFAULT

    def resolve(self, metadata) -> object:
        for name in self.names:
            found, value = _lookup_reference(self.source, name, metadata)
            if found:
                return value
        if self.default is not _NO_DEFAULT:
            return self.default
        if self.source == "config" and HF_CONFIG_KEY not in metadata:
            raise MappingError(f"{self.where}: needs the model's config.json beside the source (for "
                               f"{' or '.join(self.names)}), and there is none")
        raise MappingError(f"{self.where}: the source's {'config.json' if self.source == 'config' else 'metadata'} "
                           f"has no {' or '.join(self.names)}")


def _lookup_reference(source: str, name: str, metadata) -> tuple[bool, object]:
    if source == "config":
        try:
            value = json.loads(metadata.get(HF_CONFIG_KEY, "{}"))
        except ValueError:
            return False, None
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value:
                return False, None
            value = value[part]
        return value is not None, value
    if name not in metadata:
        return False, None
    try:
        value = json.loads(metadata[name])
    except ValueError:
        return True, metadata[name]
    if isinstance(value, dict) and len(value) == 1:  # a GGUF typed value
        value = next(iter(value.values()))
    return True, value


def _resolved(tree, metadata):
    """A YAML value with every :class:`Reference` in it replaced by its value (None: left out)."""
    if isinstance(tree, Reference):
        return tree.resolve(metadata)
    if isinstance(tree, dict):
        out = {k: _resolved(v, metadata) for k, v in tree.items()}
        return None if any(v is None for v in out.values()) else out
    if isinstance(tree, list):
        return [_resolved(v, metadata) for v in tree]
    return tree


def bind_references(rs: RuleSet, metadata) -> RuleSet:
    """The rule set with every transform's references resolved against the source's metadata."""
    if not any(isinstance(tr, PermuteRope) and isinstance(tr.heads, Reference) for r in rs.rules for tr in r.transforms):
        return rs
    rules = tuple(replace(r, transforms=tuple(tr.bind(metadata) if isinstance(tr, PermuteRope) else tr
                                              for tr in r.transforms)) for r in rs.rules)
    return replace(rs, rules=rules)


def with_metadata(metadata, rs: RuleSet) -> dict[str, str]:
    """The source's metadata plus the rule file's ``metadata:`` entries (strings as they are,
    anything else as compact JSON); an entry whose reference resolved to null is left out."""
    out = dict(metadata)
    for key, tree in rs.metadata:
        value = _resolved(tree, metadata)
        if value is None:
            continue
        out[key] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return out


def parse_reference(builder, node, what: str):
    """A YAML node that is a reference mapping -> :class:`Reference`; any other node -> its value,
    with references inside mappings and lists parsed too."""
    if isinstance(node, yaml.MappingNode):
        keys = {builder.value(k): (k, v) for k, v in node.value}
        if "config" in keys or "meta" in keys:
            extra = set(keys) - {"config", "meta", "default"}
            if extra or ("config" in keys and "meta" in keys):
                raise builder.error(node, f"{what}: a reference is {{config: NAME}} or {{meta: KEY}}, "
                                          f"with an optional default")
            source = "config" if "config" in keys else "meta"
            names = builder.str_list(keys[source][1], f"{what}: {source}", allow_scalar=True)
            if not names:
                raise builder.error(keys[source][1], f"{what}: {source} needs a name")
            default = builder.value(keys["default"][1]) if "default" in keys else _NO_DEFAULT
            return Reference(builder.where(node), source, names, default)
        return {k: parse_reference(builder, v, what) for k, (_, v) in keys.items()}
    if isinstance(node, yaml.SequenceNode):
        return [parse_reference(builder, v, what) for v in node.value]
    return builder.value(node)


def parse_permute_rope(builder, node, where: str, label: str) -> PermuteRope:
    keys = builder.mapping(node, label, ("heads", "reverse"))
    if "heads" not in keys:
        raise builder.error(node, f"{label} needs heads: a number, or a reference such as {{config: num_attention_heads}}")
    heads = parse_reference(builder, keys["heads"][1], f"{label}: heads")
    if not isinstance(heads, Reference) and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
        raise builder.error(keys["heads"][1], f"{label}: heads must be a positive integer or a reference")
    reverse = builder.boolean(keys["reverse"][1], f"{label}: reverse") if "reverse" in keys else False
    return PermuteRope(where, heads, reverse)


def parse_metadata(builder, node) -> tuple[tuple[str, object], ...]:
    if not isinstance(node, yaml.MappingNode):
        raise builder.error(node, "metadata must be a mapping of keys to values")
    out = []
    for knode, vnode in node.value:
        key = builder.value(knode)
        if not isinstance(key, str) or not key:
            raise builder.error(knode, f"metadata: keys must be strings, got {key!r}")
        out.append((key, parse_reference(builder, vnode, f"metadata {key}")))
    return tuple(out)
