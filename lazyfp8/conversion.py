"""``key_mapping="transformers"``: the installed transformers' own conversion mapping, read lazily.

transformers 5 declares, per ``model_type``, how checkpoint tensors become the model's
parameters (``transformers.conversion_mapping``): ``WeightRenaming`` rewrites names, and
``WeightConverter`` merges several tensors into one (``MergeModulelist`` stacks experts,
``Concatenate`` joins gate and up) or splits one (``Chunk``). lazyfp8 asks transformers itself
which runtime key each on-disk key becomes (``core_model_loading.rename_source_key``, the
function ``from_pretrained`` uses), and interprets the operations as layouts
(:mod:`lazyfp8.composite`): the fused value reads each expert straight into its slice of the
destination. An operation that is not a layout (``PermuteForRope``, a model's own) falls back to
materializing that one value, counted in :attr:`Conversion.materialized`. No table of models
here: when transformers adds a model, lazyfp8 follows.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .composite import (
    CompositeSource,
    Conversion,
    Layout,
    cat,
    chunk,
    interleave,
    leaf,
    missing_indices,
    stack,
    transpose,
)
from .errors import KeyMappingError
from .keymap import KeyMapping, KeyMappingSpec

__all__ = ["Conversion", "TransformersMapping", "transformers_conversion", "mapping_of", "TRANSFORMERS"]

#: The key-mapping spec that selects transformers' conversion mapping.
TRANSFORMERS = "transformers"


def mapping_of(spec: "KeyMappingSpec | TransformersMapping") -> "KeyMapping | TransformersMapping":
    """A key-mapping argument as the object that converts keys: ``"transformers"`` (or a
    :class:`TransformersMapping`) asks transformers; anything else is a :class:`KeyMapping`."""
    if isinstance(spec, TransformersMapping):
        return spec
    return TransformersMapping() if isinstance(spec, str) and spec == TRANSFORMERS else KeyMapping.from_spec(spec)


def _transformers() -> tuple[Any, Any]:
    try:
        from transformers import conversion_mapping, core_model_loading
    except ImportError as e:
        raise KeyMappingError(
            "key_mapping='transformers' applies the installed transformers' conversion mapping, and "
            f"transformers >= 5 is not importable here ({e}); pip install 'transformers>=5'"
        ) from None
    return conversion_mapping, core_model_loading


def transforms_for(config: Mapping[str, Any] | None, where: str) -> list[Any]:
    """transformers' transforms for the checkpoint's ``model_type`` (and its legacy renames).

    Raises:
        KeyMappingError: no transformers, or no ``model_type`` in ``config.json``.
    """
    conversion_mapping, _ = _transformers()
    model_type = (config or {}).get("model_type")
    if not isinstance(model_type, str):
        raise KeyMappingError(
            f"{where}: key_mapping='transformers' needs config.json's model_type beside the "
            "checkpoint, to find transformers' conversion mapping for it"
        )
    found = conversion_mapping.get_checkpoint_conversion_mapping(model_type) or []
    return [*found, *(conversion_mapping.get_checkpoint_conversion_mapping("legacy") or [])]


@dataclasses.dataclass(frozen=True)
class TransformersMapping:
    """The key mapping ``from_pretrained`` applies: transformers' conversion mapping.

    ``LazyFP8View(path, key_mapping="transformers")`` takes the mapping of ``config.json``'s
    ``model_type``; :meth:`for_model` takes the one transformers builds for a model instance
    (class-specific mappings and sub-model scopes included), which ``load_into(...,
    key_mapping="auto")`` uses for a transformers model.
    """

    transforms: tuple[Any, ...] | None = None
    name: str = TRANSFORMERS

    @classmethod
    def for_model(cls, model: Any) -> "TransformersMapping | None":
        """The mapping transformers uses for ``model``, or ``None`` if it is not a transformers
        model (or transformers is not installed)."""
        if getattr(getattr(model, "config", None), "model_type", None) is None:
            return None
        try:
            conversion_mapping, _ = _transformers()
        except KeyMappingError:
            return None
        return cls(tuple(conversion_mapping.get_model_conversion_mapping(model)))

    def resolve(self, config: Mapping[str, Any] | None, where: str) -> list[Any]:
        """Fresh copies of the transforms (transformers' transforms keep state while matching)."""
        if self.transforms is None:
            return transforms_for(config, where)
        import copy

        return copy.deepcopy(list(self.transforms))

    def convert(self, disk_keys: Sequence[str], source_of: Callable[[str], Any], where: str, config: Any = None) -> Conversion:
        """As :meth:`lazyfp8.KeyMapping.convert`, with transformers' transforms (those of
        ``config``'s ``model_type`` unless given)."""
        return transformers_conversion(list(disk_keys), source_of, self.resolve(config, where), where)

    def describe(self) -> list[str]:
        if self.transforms is None:
            return ["transformers' conversion mapping for config.json's model_type"]
        return [repr(t) for t in self.transforms]


def _expert_index(pattern: str, key: str) -> int | None:
    """The number a ``*`` of ``pattern`` stands for in ``key`` (``experts.*.w1.weight``)."""
    if "*" not in pattern:
        return None
    body = re.escape(pattern.lstrip("^")).replace(r"\*", r"(\d+)")
    m = re.search(body, key)
    return int(m.group(1)) if m else None


def transformers_conversion(
    keys: Sequence[str],
    source_of: Callable[[str], Any],
    transforms: Sequence[Any],
    where: str,
) -> Conversion:
    """Apply ``transforms`` to the on-disk ``keys`` as ``from_pretrained`` would, lazily.

    ``source_of(disk_key)`` gives the stored tensor a layout reads from. Every check (a missing
    expert, shapes that do not stack or concatenate, two keys for one name) runs here, on
    header shapes, before any data is read.

    Raises:
        KeyMappingError: naming the runtime key and the on-disk keys involved.
    """
    _, core = _transformers()
    renamings = [t for t in transforms if isinstance(t, core.WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, core.WeightConverter)]
    renamed: dict[str, str] = {}
    groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    converter_of: dict[str, Any] = {}
    for key in sorted(keys, key=core.dot_natural_key):
        runtime, pattern = core.rename_source_key(key, renamings, converters)
        if pattern is None:
            if runtime in renamed:
                raise KeyMappingError(f"{where}: {renamed[runtime]!r} and {key!r} both become {runtime!r}")
            renamed[runtime] = key
            continue
        groups[runtime][pattern].append(key)
        converter_of[runtime] = next(c for c in converters if pattern in c.source_patterns)
    composites: dict[str, CompositeSource] = {}
    materialized: list[str] = []
    for runtime, by_pattern in groups.items():
        converter = converter_of[runtime]
        _check_experts(runtime, converter, by_pattern, where)
        try:
            layouts = _interpret(converter, {p: [leaf(source_of(k)) for k in ks] for p, ks in by_pattern.items()})
        except _NotALayout as e:
            # Materialized lazily: the converter runs on the whole inputs when the value is read.
            targets = _targets(runtime, converter)
            for target_key in targets:
                composites[target_key] = _Materialized(target_key, runtime, converter, by_pattern, source_of, str(e))  # type: ignore[assignment]
                materialized.append(target_key)
            continue
        for target_key, layout in _name_targets(runtime, converter, layouts).items():
            if target_key in renamed or target_key in composites:
                raise KeyMappingError(f"{where}: two values for {target_key!r}")
            composites[target_key] = CompositeSource(target_key, layout)
    return Conversion(renamed, composites, materialized)


class _NotALayout(Exception):
    pass


def _check_experts(runtime: str, converter: Any, by_pattern: Mapping[str, list[str]], where: str) -> None:
    """Each ``*`` pattern's keys number 0..n-1 with none missing, and the patterns agree on n."""
    counts = {}
    for pattern, keys in by_pattern.items():
        numbers = [_expert_index(pattern, k) for k in keys]
        if None in numbers:
            continue
        seen: dict[int, str] = {}
        for n, k in zip(numbers, keys):
            if n in seen:
                raise KeyMappingError(f"{where}: {seen[n]!r} and {k!r} are both expert {n} of {runtime!r}")
            seen[n] = k
        missing = missing_indices(seen)
        if missing:
            example = keys[0]
            raise KeyMappingError(
                f"{where}: {runtime!r} is missing expert(s) {missing[:8]} of {pattern!r} "
                f"(found {len(seen)}, e.g. {example!r})"
            )
        counts[pattern] = len(seen)
    for pattern in converter.source_patterns:
        if counts and pattern not in by_pattern:
            raise KeyMappingError(f"{where}: {runtime!r} has no tensor matching {pattern!r}")
    if len(set(counts.values())) > 1:
        raise KeyMappingError(f"{where}: {runtime!r} has different expert counts per part: {counts}")


def _interpret(converter: Any, state: dict[str, list[Layout]]) -> dict[str, Layout | list[Layout]]:
    """The converter's operations, applied to layouts instead of tensors. The naming of
    intermediate results follows each operation's own rules (transformers')."""
    _, core = _transformers()
    current: dict[str, Any] = dict(state)
    sources, targets = converter.source_patterns, converter.target_patterns
    for op in converter.operations:
        kind = type(op)
        if kind is core.MergeModulelist:
            n = len(current)
            current = {op.get_target_pattern(n, p, targets): stack(_as_list(v), op.dim) for p, v in current.items()}
        elif kind is core.Concatenate:
            parts: list[Layout] = []
            for p in [*sources, *[k for k in current if k not in sources]]:
                if p in current:
                    parts.extend(_as_list(current.pop(p)))
            current = {op.get_target_pattern(targets): cat(parts, op.dim)}
        elif kind is core.Chunk and op.num_shards_attribute is None:
            if len(current) != 1:
                raise _NotALayout(f"{type(op).__name__} of {len(current)} inputs")
            (value,) = current.values()
            pieces = chunk(_as_list(value)[0], len(targets), op.dim)
            current = dict(zip(targets, pieces))
        elif kind is core.Interleave and len(current) == 1:
            (value,) = current.values()
            try:
                current = {targets[0]: interleave(_as_list(value)[0], op.dim, op.inverse)}
            except KeyMappingError as e:
                raise _NotALayout(str(e)) from None
        elif kind is core.Transpose and not op.check_dims and len(current) == 1:
            # (check_dims asks the model whether to transpose: a view has no model to ask)
            (value,) = current.values()
            current = {op.get_target_pattern(current, sources, targets): transpose(_as_list(value)[0], op.dim0, op.dim1)}
        else:
            raise _NotALayout(f"{type(op).__name__} is not a layout")
    return current


def _as_list(v: Layout | list[Layout]) -> list[Layout]:
    return v if isinstance(v, list) else [v]


def _targets(runtime: str, converter: Any) -> list[str]:
    first = converter.target_patterns[0]
    return [runtime.replace(first, t, 1) for t in converter.target_patterns] if first in runtime else [runtime]


def _name_targets(runtime: str, converter: Any, layouts: Mapping[str, Any]) -> dict[str, Layout]:
    """Full runtime keys of the results: the runtime key rename_source_key gave names the first
    target; the others share its prefix and suffix (as transformers expands them)."""
    first = converter.target_patterns[0]
    out = {}
    for pattern, value in layouts.items():
        lay = _as_list(value)
        if len(lay) != 1:
            raise KeyMappingError(f"{runtime!r}: the conversion leaves {len(lay)} tensors for {pattern!r}")
        out[runtime.replace(first, pattern, 1) if first in runtime else runtime] = lay[0]
    return out


class _Materialized:
    """A converted value whose operations are not layouts: reads its inputs whole and runs
    transformers' own operations on them, then copies the result (a temporary of its size)."""

    __slots__ = ("key", "_runtime", "_converter", "_by_pattern", "_source_of", "reason", "dtype", "device", "_shape", "materialized")

    def __init__(self, key: str, runtime: str, converter: Any, by_pattern: Mapping[str, list[str]], source_of: Callable, reason: str):
        self.key = key
        self._runtime = runtime
        self._converter = converter
        self._by_pattern = {p: list(ks) for p, ks in by_pattern.items()}
        self._source_of = source_of
        self.reason = reason
        self.materialized = True
        first = source_of(next(iter(self._by_pattern.values()))[0])
        self.dtype, self.device = first.dtype, first.device
        # The shape comes from running the operations on meta tensors of the stored shapes.
        self._shape = self._convert(lambda k: torch.empty(source_of(k).shape, dtype=self.dtype, device="meta")).shape

    def _convert(self, tensor_of: Callable[[str], torch.Tensor]) -> torch.Tensor:
        data: dict[str, Any] = {p: [tensor_of(k) for k in ks] for p, ks in self._by_pattern.items()}
        for op in self._converter.operations:
            try:
                data = op.convert(
                    data,
                    source_patterns=self._converter.source_patterns,
                    target_patterns=self._converter.target_patterns,
                    full_layer_name=self._runtime,
                )
            except Exception as e:  # transformers' op, on inputs it may not expect without a model
                sources = ", ".join(k for ks in self._by_pattern.values() for k in ks)
                raise KeyMappingError(
                    f"{self.key!r}: transformers' {type(op).__name__} on {sources} failed without the model "
                    f"({type(e).__name__}: {e}); load with transformers' from_pretrained for this model type"
                ) from e
        first = self._converter.target_patterns[0]
        pattern = next((t for t in self._converter.target_patterns if self._runtime.replace(first, t, 1) == self.key), first)
        value = data.get(pattern, next(iter(data.values())))
        return value[0] if isinstance(value, list) else value

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._shape)

    def to_tensor(self) -> torch.Tensor:
        return self._convert(lambda k: self._source_of(k).to_tensor()).contiguous()

    def read_into(self, dst: torch.Tensor) -> None:
        dst.copy_(self.to_tensor())

    def read_box_into(self, dst: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> None:
        full = self.to_tensor()
        dst.copy_(full[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))])

    def stored(self) -> list[Any]:
        """The stored tensors it is converted from."""
        return [self._source_of(k) for ks in self._by_pattern.values() for k in ks]

    def describe(self) -> list[str]:
        return [f"{', '.join(ks)} -> materialized ({self.reason})" for ks in self._by_pattern.values()]
