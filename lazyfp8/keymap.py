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
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Union

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

    def literal_prefixes(self) -> tuple[str, str] | None:
        """``(disk_prefix, runtime_prefix)`` if this rule renames one literal prefix to another
        (an anchored pattern of literal characters, ``\\.`` or ``.`` standing for a dot, and a
        replacement without back-references); else ``None``."""
        if not self.pattern.startswith("^") or "\\" in self.replacement.replace("\\\\", ""):
            return None
        body, out, i = self.pattern[1:], [], 0
        while i < len(body):
            c = body[i]
            if c == "\\" and i + 1 < len(body) and not body[i + 1].isalnum():
                out.append(body[i + 1])
                i += 2
            elif c == "." or c.isalnum() or c in "_-/:":
                out.append(c)
                i += 1
            else:
                return None
        return "".join(out), self.replacement.replace("\\\\", "\\")

    def inverse(self) -> "Rule":
        """The runtime -> disk rule of a literal-prefix rule.

        Raises:
            KeyMappingError: the rule is not a literal-prefix rewrite.
        """
        lit = self.literal_prefixes()
        if lit is None:
            raise KeyMappingError(
                f"key mapping rule {self.pattern!r} -> {self.replacement!r} cannot be inverted "
                "automatically (only anchored literal prefixes can); pass the runtime -> disk "
                "rules as KeyMapping(rules, inverse=...)"
            )
        return prefix_rule(lit[1], lit[0])


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
    """Ordered disk -> runtime rules and their runtime -> disk inverse.

    Build one with :meth:`from_spec` (presets, dicts) or :meth:`infer` (from a model's keys).
    ``inverse`` defaults to the inverse of each literal-prefix rule, longest runtime prefix first;
    give it explicitly for other rules. Every use is checked over the actual keys.
    """

    rules: tuple[Rule, ...] = ()
    name: str | None = None
    inverse: tuple[Rule, ...] | None = None

    def inverse_rules(self) -> tuple[Rule, ...]:
        """Runtime -> disk rules.

        Raises:
            KeyMappingError: a rule that cannot be inverted and no explicit inverse.
        """
        if self.inverse is not None:
            return self.inverse
        inv = [r.inverse() for r in self.rules]
        return tuple(sorted(inv, key=lambda r: -len(r.literal_prefixes()[0])))  # type: ignore[index]

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

    def to_disk(self, runtime_key: str) -> str:
        """The on-disk name of one runtime key (first matching inverse rule)."""
        for rule in self.inverse_rules():
            out = rule.apply(runtime_key)
            if out is not None:
                return out
        return runtime_key

    def build_inverse(self, runtime_keys: Iterable[str]) -> dict[str, str]:
        """``{disk_key: runtime_key}`` over ``runtime_keys``, checked to round-trip.

        Raises:
            KeyMappingError: a runtime key whose disk name maps back to another name, or two
                runtime keys with one disk name (naming the keys).
        """
        out: dict[str, str] = {}
        for runtime in runtime_keys:
            disk = self.to_disk(runtime)
            back = self.to_runtime(disk)
            if back != runtime:
                raise KeyMappingError(
                    f"key mapping is not invertible on {runtime!r}: it is written as {disk!r}, "
                    f"which reads back as {back!r}"
                )
            other = out.get(disk)
            if other is not None:
                raise KeyMappingError(f"key mapping writes both {other!r} and {runtime!r} as {disk!r}")
            out[disk] = runtime
        return out

    def bijection(self, disk_keys: Iterable[str]) -> dict[str, str]:
        """``{runtime_key: disk_key}`` over ``disk_keys``, checked in both directions: every key
        maps to a distinct runtime name and the inverse rules give each disk key back.

        Raises:
            KeyMappingError: naming the keys that collide or do not come back.
        """
        table = self.build(disk_keys)
        for runtime, disk in table.items():
            back = self.to_disk(runtime)
            if back != disk:
                raise KeyMappingError(
                    f"key mapping is not invertible on {disk!r}: it reads as {runtime!r}, "
                    f"which is written back as {back!r}"
                )
        return table

    @classmethod
    def infer(cls, disk_keys: Iterable[str], runtime_keys: Iterable[str]) -> "KeyMapping":
        """Prefix rules that map checkpoint keys onto a model's keys (``key_mapping="auto"``).

        Each checkpoint key absent from the model is matched to the model key sharing its longest
        dotted suffix; the differing prefixes become rules. Rules for several sub-modules under
        the same non-empty prefix pair merge into one (``language_model.model.`` ->
        ``model.language_model.``). The result is checked to map every checkpoint key to a
        distinct model key.

        Raises:
            KeyMappingError: a key with no or several candidates, or no consistent rule set.
        """
        disk = list(disk_keys)
        runtime = set(runtime_keys)
        left = runtime - set(disk)
        by_suffix: dict[str, list[str]] = defaultdict(list)
        for r in left:
            parts = r.split(".")
            for i in range(len(parts)):
                by_suffix[".".join(parts[i:])].append(r)
        groups: dict[tuple[str, str], set[str]] = defaultdict(set)
        exact: list[Rule] = []
        unmatched: list[str] = []
        ambiguous: list[tuple[str, list[tuple[str, str, str, bool]]]] = []

        def record(d: str, cand: tuple[str, str, str, bool]) -> None:
            dp, rp, first, whole = cand
            if whole:
                exact.append(Rule("^" + re.escape(d) + "$", (rp + first).replace("\\", "\\\\")))
            else:
                groups[(dp, rp)].add(first)

        for d in disk:
            if d in runtime:
                continue
            parts = d.split(".")
            for i in range(len(parts)):
                suffix = ".".join(parts[i:])
                cands = by_suffix.get(suffix)
                if cands:
                    break
            else:
                unmatched.append(d)
                continue
            # (disk prefix, runtime prefix, first shared component, suffix is one component)
            options = [(d[: len(d) - len(suffix)], r[: len(r) - len(suffix)], parts[i], i == len(parts) - 1) for r in cands]
            if len(options) == 1:
                record(d, options[0])
            else:
                ambiguous.append((d, options))
        # A key whose suffix fits several model keys takes the one whose prefixes other keys
        # already agreed on ("norm.weight" under the text model, not under the projector).
        still = []
        for d, options in ambiguous:
            agreed = [o for o in options if (o[0], o[1]) in groups]
            if len(agreed) == 1:
                record(d, agreed[0])
            else:
                still.append((d, sorted(o[1] + o[2] for o in options)[:3]))
        if unmatched or still:
            msg = []
            if unmatched:
                msg.append(f"{len(unmatched)} checkpoint key(s) match no model key by suffix (e.g. {unmatched[:3]})")
            if still:
                d, c = still[0]
                msg.append(f"{len(still)} checkpoint key(s) match several model keys (e.g. {d!r} -> {c})")
            raise KeyMappingError("key_mapping='auto' found no consistent rules: " + "; ".join(msg))
        rules = list(exact)
        for (dp, rp), firsts in groups.items():
            if dp and len(firsts) > 1:
                rules.append(prefix_rule(dp, rp))
            else:
                rules.extend(prefix_rule(f"{dp}{f}.", f"{rp}{f}.") for f in sorted(firsts))
        rules.sort(key=lambda r: -len(r.pattern))  # most specific first
        mapping = cls(tuple(rules), name="auto")
        table = mapping.build(disk)
        stray = [r for r in table if r not in runtime]
        if stray:
            raise KeyMappingError(
                f"key_mapping='auto' rules {[(r.pattern, r.replacement) for r in rules]} send "
                f"{len(stray)} key(s) to names the model does not have (e.g. {stray[:3]})"
            )
        return mapping

    def describe(self) -> list[str]:
        """One ``pattern -> replacement`` line per rule."""
        return [f"{r.pattern} -> {r.replacement}" for r in self.rules]


KeyMappingSpec = Union[None, str, Mapping[str, str], Iterable, KeyMapping]
