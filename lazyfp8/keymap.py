"""Key mapping: on-disk tensor names -> the runtime module's names.

A mapping is an ordered list of ``(checkpoint_regex, runtime_replacement)`` rules, the convention
of transformers' ``from_pretrained(key_mapping=...)``: each key is rewritten by the first rule
whose pattern matches (``re.search``; the first match is replaced, ``\\1`` back-references
allowed); a key no rule matches keeps its name. A mapping is only accepted over a key set on
which it is one-to-one.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Union

from .errors import KeyMappingError

__all__ = ["Rule", "KeyMapping", "PRESETS", "KeyMappingSpec", "prefix_rule"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rewrite: ``re.sub(pattern, replacement, key, count=1)`` when ``pattern`` matches."""

    pattern: str
    replacement: str

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "_compiled", re.compile(self.pattern))
        except re.error as e:
            raise KeyMappingError(f"key mapping pattern {self.pattern!r} is not a valid regex: {e}") from None

    def apply(self, key: str) -> str | None:
        """The rewritten key, or ``None`` if the pattern does not match."""
        compiled: re.Pattern[str] = self._compiled  # type: ignore[attr-defined]
        if compiled.search(key) is None:
            return None
        return compiled.sub(self.replacement, key, count=1)


def prefix_rule(disk_prefix: str, runtime_prefix: str) -> Rule:
    """A rule renaming the literal prefix ``disk_prefix`` to ``runtime_prefix``."""
    return Rule("^" + re.escape(disk_prefix), runtime_prefix.replace("\\", "\\\\"))


#: Named mappings, disk -> runtime.
PRESETS: dict[str, tuple[Rule, ...]] = {
    # Mistral3 / LLaVA family (transformers >= 4.52 module layout). The lm_head rule comes first
    # because its key also starts with "language_model.".
    "mistral3": (
        prefix_rule("language_model.lm_head.", "lm_head."),
        prefix_rule("language_model.model.", "model.language_model."),
        prefix_rule("vision_tower.", "model.vision_tower."),
        prefix_rule("multi_modal_projector.", "model.multi_modal_projector."),
    ),
}
PRESETS["llava"] = PRESETS["mistral3"]


@dataclasses.dataclass(frozen=True)
class KeyMapping:
    """An ordered rule list. Build one with :meth:`from_spec`."""

    rules: tuple[Rule, ...] = ()
    name: str | None = None

    @classmethod
    def from_spec(cls, spec: "KeyMappingSpec") -> "KeyMapping":
        """Accepts ``None`` (identity), a preset name, a ``{regex: replacement}`` dict, a sequence
        of :class:`Rule` or pairs, or a :class:`KeyMapping`."""
        if spec is None:
            return cls()
        if isinstance(spec, KeyMapping):
            return spec
        if isinstance(spec, str):
            if spec not in PRESETS:
                raise KeyMappingError(
                    f"unknown key mapping preset {spec!r}; presets: {', '.join(sorted(PRESETS))}, "
                    "or pass a {checkpoint_regex: runtime_replacement} dict"
                )
            return cls(PRESETS[spec], name=spec)
        if isinstance(spec, Mapping):
            items: Iterable = spec.items()
        else:
            items = spec
        rules = []
        for item in items:
            if isinstance(item, Rule):
                rules.append(item)
            elif isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item):
                rules.append(Rule(*item))
            else:
                raise KeyMappingError(f"key mapping entries must be (regex, replacement) strings, got {item!r}")
        return cls(tuple(rules))

    def to_runtime(self, disk_key: str) -> str:
        """The runtime name of one on-disk key."""
        for rule in self.rules:
            out = rule.apply(disk_key)
            if out is not None:
                return out
        return disk_key

    def build(self, disk_keys: Iterable[str]) -> dict[str, str]:
        """``{runtime_key: disk_key}`` over ``disk_keys``, in their order.

        Raises:
            KeyMappingError: two on-disk keys map to one runtime name (naming both).
        """
        out: dict[str, str] = {}
        for disk in disk_keys:
            runtime = self.to_runtime(disk)
            other = out.get(runtime)
            if other is not None:
                raise KeyMappingError(
                    f"key mapping{'' if self.name is None else f' {self.name!r}'} sends both "
                    f"{other!r} and {disk!r} to {runtime!r}; every on-disk key must map to its "
                    "own runtime name"
                )
            out[runtime] = disk
        return out


KeyMappingSpec = Union[None, str, Mapping[str, str], Iterable, KeyMapping]
