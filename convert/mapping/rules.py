"""The validated rule objects :func:`convert.mapping.load` builds (see :mod:`convert.mapping`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..dtypes import DType
from ..errors import MappingError
from ..ir import Tensor
from .transforms import Concat, Split, Transform

UNMATCHED_POLICIES = ("error", "keep", "drop")


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
    metadata: tuple[tuple[str, object], ...] = ()
    """Metadata entries set on the result: (key, value holding references; see :mod:`.references`)."""

    @property
    def name(self) -> str:
        return Path(self.path).stem if self.path and not self.path.startswith("<") else self.path
