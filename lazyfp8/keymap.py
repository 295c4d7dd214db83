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
from typing import Any, Union

import torch

from .composite import CompositeSource, Conversion, Layout, cat, leaf, missing_indices, narrow, stack
from .errors import KeyMappingError

__all__ = ["Rule", "Fuse", "Split", "KeyMapping", "PRESETS", "KeyMappingSpec", "prefix_rule"]


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
def _part_regex(pattern: str) -> re.Pattern[str]:
    # A part of a dotted name: the key around it is kept; "*" is an integer index.
    body = re.escape(pattern).replace(r"\*", r"(?P<index>\d+)")
    return re.compile(rf"^(?P<pre>(?:.*\.)?){body}(?P<post>(?:\..*)?)$")


@dataclasses.dataclass(frozen=True)
class Fuse:
    """Several on-disk tensors that are one runtime tensor (fused experts, fused QKV).

    ``sources`` are parts of dotted names, each with at most one ``*`` standing for an index
    (``"mlp.experts.*.gate_proj.weight"``); the rest of the key around the part is kept, and
    ``target`` replaces the part in the runtime name. For each source the indexed tensors are
    stacked along ``stack_dim`` (indices 0..n-1, none missing), then the sources are concatenated
    along ``cat_dim`` in the order given. ``sizes``: each source's extent along ``cat_dim`` when
    they differ (fused QKV under GQA), which :func:`~lazyfp8.save` needs to cut a fused tensor
    back into its parts; ``None``: equal parts.

    ``Fuse(["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
    "mlp.experts.gate_up_proj", stack_dim=0, cat_dim=1)`` is transformers 5's fused experts.
    """

    sources: tuple[str, ...]
    target: str
    stack_dim: int = 0
    cat_dim: int = 0
    sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources) if not isinstance(self.sources, str) else (self.sources,))
        if not self.sources or any(s.count("*") > 1 for s in self.sources):
            raise KeyMappingError(f"Fuse needs source parts with at most one '*' each, got {self.sources!r}")
        if self.sizes is not None and len(self.sizes) != len(self.sources):
            raise KeyMappingError(f"Fuse sizes {self.sizes!r} must give one size per source {self.sources!r}")
        object.__setattr__(self, "_regexes", tuple(_part_regex(s) for s in self.sources))

    def group(self, keys: Iterable[str]) -> dict[str, list[dict[int | None, str]]]:
        """``{runtime key: per source, {index: key}}`` for the keys this rule takes."""
        out: dict[str, list[dict[int | None, str]]] = {}
        for key in keys:
            for i, rx in enumerate(self._regexes):  # type: ignore[attr-defined]
                m = rx.match(key)
                if m is None:
                    continue
                runtime = m.group("pre") + self.target + m.group("post")
                parts = out.setdefault(runtime, [{} for _ in self.sources])
                index = int(m.group("index")) if "index" in m.groupdict() else None
                if index in parts[i]:
                    raise KeyMappingError(f"{parts[i][index]!r} and {key!r} are both part {index} of {runtime!r}")
                parts[i][index] = key
                break
        return out

    def layout(self, runtime: str, parts: list[dict[int | None, str]], leaf_of) -> Layout:  # noqa: ANN001
        """The layout of ``runtime`` over the grouped keys (``leaf_of(key)``: a key's layout)."""
        pieces = []
        for source, found in zip(self.sources, parts):
            if not found:
                raise KeyMappingError(f"{runtime!r} has no tensor for {source!r}")
            if "*" not in source:
                pieces.append(leaf_of(found[None]))
                continue
            missing = missing_indices(found)
            if missing:
                raise KeyMappingError(f"{runtime!r} is missing part(s) {missing[:8]} of {source!r} (e.g. {next(iter(found.values()))!r})")
            pieces.append(stack([leaf_of(found[i]) for i in range(len(found))], self.stack_dim))
        return cat(pieces, self.cat_dim) if len(pieces) > 1 else pieces[0]

    def take(self, keys: Iterable[str], leaf_of) -> tuple[dict[str, Layout], set[str]]:  # noqa: ANN001
        """The composites this rule makes of ``keys``, and the keys it consumed."""
        made, used = {}, set()
        for runtime, parts in self.group(keys).items():
            made[runtime] = self.layout(runtime, parts, leaf_of)
            used.update(k for found in parts for k in found.values())
        return made, used

    def write_parts(self, values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """For writing: ``{runtime key: {on-disk part name: view of the value}}``."""
        out = {}
        for key, value in values.items():
            parts = self.split(key, value)
            if parts is not None:
                out[key] = parts
        return out

    def split(self, runtime: str, value: Any) -> dict[str, Any] | None:
        """The inverse, for writing: ``{on-disk part name: view of value}``, or ``None`` if
        ``runtime`` is not a name this rule makes."""
        m = _part_regex(self.target).match(runtime)
        if m is None:
            return None
        extent = value.shape[self.cat_dim] if len(self.sources) > 1 else None
        sizes = list(self.sizes) if self.sizes is not None else None
        if extent is not None and sizes is None:
            if extent % len(self.sources):
                raise KeyMappingError(f"{runtime!r}: dimension {self.cat_dim} ({extent}) does not split into {len(self.sources)} equal parts; give Fuse(sizes=...)")
            sizes = [extent // len(self.sources)] * len(self.sources)
        if extent is not None and sum(sizes) != extent:  # type: ignore[arg-type]
            raise KeyMappingError(f"{runtime!r}: dimension {self.cat_dim} is {extent}, Fuse sizes add up to {sum(sizes)}")  # type: ignore[arg-type]
        out: dict[str, Any] = {}
        start = 0
        for i, source in enumerate(self.sources):
            part = value if extent is None else value.narrow(self.cat_dim, start, sizes[i])  # type: ignore[index]
            start += 0 if extent is None else sizes[i]  # type: ignore[index]
            if "*" in source:
                for e, piece in enumerate(part.unbind(self.stack_dim)):
                    out[m.group("pre") + source.replace("*", str(e)) + m.group("post")] = piece
            else:
                out[m.group("pre") + source + m.group("post")] = part
        return out


@dataclasses.dataclass(frozen=True)
class Split:
    """One on-disk tensor that is several runtime tensors (a fused QKV stored whole, read as
    ``q_proj``, ``k_proj``, ``v_proj``): ``source`` and ``targets`` are parts of dotted names as
    in :class:`Fuse`, cut along ``dim`` into ``sizes`` (``None``: equal parts)."""

    source: str
    targets: tuple[str, ...]
    dim: int = 0
    sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if "*" in self.source or len(self.targets) < 2:
            raise KeyMappingError(f"Split needs a source part without '*' and two targets or more, got {self.source!r} -> {self.targets!r}")
        if self.sizes is not None and len(self.sizes) != len(self.targets):
            raise KeyMappingError(f"Split sizes {self.sizes!r} must give one size per target {self.targets!r}")
        object.__setattr__(self, "_regex", _part_regex(self.source))

    def layouts(self, key: str, whole: Layout) -> dict[str, Layout] | None:
        """``{runtime key: layout}`` of the parts of on-disk ``key``, or ``None`` if this rule
        does not take it."""
        m = self._regex.match(key)  # type: ignore[attr-defined]
        if m is None:
            return None
        extent = whole.shape[self.dim]
        sizes = list(self.sizes) if self.sizes is not None else [extent // len(self.targets)] * len(self.targets)
        if sum(sizes) != extent:
            raise KeyMappingError(f"{key!r}: dimension {self.dim} is {extent}, which does not split into {sizes}")
        out, start = {}, 0
        for target, n in zip(self.targets, sizes):
            out[m.group("pre") + target + m.group("post")] = narrow(whole, self.dim, start, n)
            start += n
        return out

    def take(self, keys: Iterable[str], leaf_of) -> tuple[dict[str, Layout], set[str]]:  # noqa: ANN001
        """The runtime parts this rule makes of ``keys``, and the keys it consumed."""
        made, used = {}, set()
        for key in keys:
            if self._regex.match(key) is None:  # type: ignore[attr-defined]
                continue
            made.update(self.layouts(key, leaf_of(key)) or {})
            used.add(key)
        return made, used

    def write_parts(self, values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """For writing: the runtime parts of one stored tensor joined again (a temporary of the
        stored tensor's size): ``{first part's key: {on-disk name: joined}}`` plus an empty
        entry for each other part, so the writer drops them."""
        rx = [_part_regex(t) for t in self.targets]
        groups: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
        for key in values:
            for i, r in enumerate(rx):
                m = r.match(key)
                if m is not None:
                    groups[(m.group("pre"), m.group("post"))][i] = key
                    break
        out: dict[str, dict[str, Any]] = {}
        for (pre, post), found in groups.items():
            if len(found) != len(self.targets):
                missing = [self.targets[i] for i in range(len(self.targets)) if i not in found]
                raise KeyMappingError(f"cannot write {pre + self.source + post!r}: no value for {missing}")
            keys = [found[i] for i in range(len(self.targets))]
            out[keys[0]] = {pre + self.source + post: torch.cat([values[k] for k in keys], self.dim)}
            out.update({k: {} for k in keys[1:]})
        return out


Composite = Union[Fuse, Split]


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

#: What a family keeps unquantized by convention (runtime-name regexes), which ``save`` follows
#: for its preset unless told otherwise: Mistral 3's releases quantize the language model's
#: Linears only, the vision tower and projector stay BF16.
PRESET_UNQUANTIZED: dict[str, tuple[str, ...]] = {
    "mistral3": (r"(^|\.)vision_tower\.", r"(^|\.)multi_modal_projector\."),
}
PRESET_UNQUANTIZED["llava"] = PRESET_UNQUANTIZED["mistral3"]


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
    #: :class:`Fuse` and :class:`Split` rules, applied to the names the rules give.
    composites: tuple[Composite, ...] = ()
    #: Runtime-name regexes of what the checkpoint family keeps unquantized (a preset's).
    unquantized: tuple[str, ...] = ()

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
            return cls(PRESETS[spec], name=spec, unquantized=PRESET_UNQUANTIZED.get(spec, ()))
        if isinstance(spec, Mapping):
            items: Iterable = spec.items()
        else:
            items = spec
        rules, composites = [], []
        for item in items:
            if isinstance(item, (Fuse, Split)):
                composites.append(item)
            elif isinstance(item, Rule):
                rules.append(item)
            elif isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item):
                rules.append(Rule(*item))
            else:
                raise KeyMappingError(f"key mapping entries must be (regex, replacement) strings, Fuse or Split, got {item!r}")
        return cls(tuple(rules), composites=tuple(composites))

    def convert(self, disk_keys: Iterable[str], source_of, where: str, config: Any = None) -> Conversion:  # noqa: ANN001
        """The runtime keys of ``disk_keys``: the rules rename, then each :class:`Fuse` and
        :class:`Split` makes composites of the renamed keys (``source_of(disk_key)``: the stored
        tensor a layout reads; ``config`` is not needed here). Every check runs on names and
        header shapes.

        Raises:
            KeyMappingError: two values for one name, a missing part, shapes that do not fit.
        """
        renamed = self.build(disk_keys)
        left = dict(renamed)
        composites: dict[str, CompositeSource] = {}
        for rule in self.composites:
            made, used = rule.take(list(left), lambda k: leaf(source_of(renamed[k])))
            for runtime, layout in made.items():
                if runtime in composites:
                    raise KeyMappingError(f"{where}: two composite rules make {runtime!r}")
                composites[runtime] = CompositeSource(runtime, layout)
            for k in used:
                del left[k]
        clash = sorted(set(composites) & set(left))
        if clash:
            raise KeyMappingError(f"{where}: {clash[0]!r} is both a composite and the name of {left[clash[0]]!r}")
        return Conversion(left, composites, [])

    def write_names(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """For writing: ``values`` (runtime key -> tensor) with every composite cut back into
        its on-disk parts (views where the parts are slices), under the names the rules invert."""
        out = dict(values)
        for rule in self.composites:
            for key, parts in rule.write_parts(out).items():
                del out[key]
                for name, part in parts.items():
                    if name in out:
                        raise KeyMappingError(f"writing {key!r} makes {name!r}, which is also a value of its own")
                    out[name] = part
        return out

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
"""A preset name, ``{regex: replacement}``, a list of :class:`Rule` / pairs / :class:`Fuse` /
:class:`Split`, or a :class:`KeyMapping`."""
