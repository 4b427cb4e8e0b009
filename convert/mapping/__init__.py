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

from .engine import apply
from .references import Reference
from .report import Dropped, MappingReport, MappingRow
from .rules import UNMATCHED_POLICIES, Rule, RuleSet
from .schema import MAPPINGS_DIR, SCHEMA_VERSION, load, loads, preset_text, presets
from .transforms import Cast, Concat, PermuteRope, Reshape, Split, Squeeze, Transform, Transpose, Unsqueeze

__all__ = [
    "apply", "load", "loads", "presets", "preset_text", "MAPPINGS_DIR", "SCHEMA_VERSION", "UNMATCHED_POLICIES",
    "Rule", "RuleSet", "MappingReport", "MappingRow", "Dropped",
    "Transform", "Transpose", "Reshape", "Cast", "Squeeze", "Unsqueeze", "Split", "Concat", "PermuteRope", "Reference",
]
