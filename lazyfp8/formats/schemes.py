"""Scale granularities: how one FP8 weight's scale tensor covers the weight.

Every granularity is a block size over the weight's 2-D view ``[rows, cols]`` (an N-d weight is
viewed as ``[prod(shape[:-1]), shape[-1]]``; a 0-d or 1-d weight as ``[1, numel]``):
the scale is a grid of ``ceil(rows / b0) x ceil(cols / b1)`` multipliers and element ``[i, j]``
dequantizes to ``float32(w[i, j]) * float32(scale[i // b0, j // b1])``, rounded once to the
target dtype. Edge blocks may be partial.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

from ..errors import ScaleShapeError

__all__ = [
    "PerTensor",
    "PerChannel",
    "PerBlock",
    "Granularity",
    "Scheme",
    "MX_BLOCK",
    "grid_shape",
    "matrix_shape",
    "auto_scheme",
    "make_scheme",
]


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The 2-D ``[rows, cols]`` view a granularity works on."""
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return math.prod(shape[:-1]), shape[-1]


def grid_shape(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """``(ceil(rows / b0), ceil(cols / b1))``."""
    return -(-rows // block[0]), -(-cols // block[1])


class Granularity:
    """How one scale tensor covers one weight: a grid of multipliers over the weight's
    ``[rows, cols]`` view, one per ``block_size`` tile. Each subclass carries every fact that
    depends on which granularity it is (shapes, how a scale shape is recognised, its description
    and its form in a ``quantization_config``), so no caller asks which one it holds.
    """

    #: ``False`` only when one multiplier covers the whole tensor (one lookup table per tensor).
    grid: ClassVar[bool] = True
    #: A weight of 3 or more dims is a stack of matrices, each tiled on its own.
    stacked: ClassVar[bool] = False
    #: Its scale has one entry per row, which only a weight of 2 or more dims has.
    needs_rows: ClassVar[bool] = False

    def block_size(self, weight_shape: Sequence[int]) -> tuple[int, int]:
        """The tile one multiplier covers, for a weight of this shape."""
        raise NotImplementedError

    def scale_shape(self, weight_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of the scale tensor this granularity gives a weight of this shape."""
        raise NotImplementedError

    def period(self, weight_shape: Sequence[int]) -> int:
        """Rows of the ``[rows, cols]`` view after which the scale grid starts again."""
        return max(matrix_shape(weight_shape)[0], 1)

    def matches(self, weight_shape: Sequence[int], scale_shape: Sequence[int]) -> bool:
        """Whether a stored scale of ``scale_shape`` is this granularity for this weight. One
        scale (``()``, ``[1]``, ``[1, 1]``) fits any granularity whose grid here is one cell."""
        scale_shape = tuple(scale_shape)
        if math.prod(scale_shape) == 1 and len(scale_shape) <= 2:
            return math.prod(self.scale_shape(weight_shape)) == 1
        return self._matches_grid(weight_shape, scale_shape)

    def _matches_grid(self, weight_shape: Sequence[int], scale_shape: tuple[int, ...]) -> bool:
        return scale_shape == tuple(self.scale_shape(weight_shape))

    def describe(self, weight_shape: Sequence[int]) -> str:
        """The scale shape expected for this weight, in words (for error messages)."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """A short name for reports (``PerTensor``, ``PerChannel``, ``block[128, 128]``)."""
        return type(self).__name__

    @property
    def weight_block_size(self) -> list[int] | None:
        """The HF ``fp8`` quantization_config's ``weight_block_size``: the block, or ``None``
        for a granularity that is not a block tiling."""
        return None

    def compressed_tensors_strategy(self) -> dict[str, Any]:
        """The ``strategy`` fields of a compressed-tensors weights config describing it."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole weight. Scale shape ``()`` (also accepted: ``[1]``, ``[1, 1]``)."""

    grid: ClassVar[bool] = False

    def block_size(self, weight_shape: Sequence[int]) -> tuple[int, int]:
        rows, cols = matrix_shape(weight_shape)
        return max(rows, 1), max(cols, 1)

    def scale_shape(self, weight_shape: Sequence[int]) -> tuple[int, ...]:
        return ()

    def _matches_grid(self, weight_shape: Sequence[int], scale_shape: tuple[int, ...]) -> bool:
        return False

    def describe(self, weight_shape: Sequence[int]) -> str:
        return "() per-tensor"

    def compressed_tensors_strategy(self) -> dict[str, Any]:
        return {"strategy": "tensor"}


@dataclasses.dataclass(frozen=True)
class PerChannel(Granularity):
    """One scale per output row. Scale shape ``[rows, 1]`` (also accepted: ``[rows]``)."""

    needs_rows: ClassVar[bool] = True

    def block_size(self, weight_shape: Sequence[int]) -> tuple[int, int]:
        return 1, max(matrix_shape(weight_shape)[1], 1)

    def scale_shape(self, weight_shape: Sequence[int]) -> tuple[int, ...]:
        return matrix_shape(weight_shape)[0], 1

    def _matches_grid(self, weight_shape: Sequence[int], scale_shape: tuple[int, ...]) -> bool:
        expected = self.scale_shape(weight_shape)
        return len(weight_shape) >= 2 and scale_shape in (expected, expected[:1])

    def describe(self, weight_shape: Sequence[int]) -> str:
        return f"{list(self.scale_shape(weight_shape))} per-channel"

    def compressed_tensors_strategy(self) -> dict[str, Any]:
        return {"strategy": "channel"}


@dataclasses.dataclass(frozen=True)
class PerBlock(Granularity):
    """One scale per ``block_size`` tile. For a ``[300, 200]`` weight and ``(128, 128)`` blocks the
    scale is ``[3, 2]`` and the last row and column of tiles are partial.

    A weight of 3 or more dims (fused MoE experts ``[E, R, C]``) is a stack of matrices, each
    tiled on its own: the scale is ``[E, ceil(R / b0), ceil(C / b1)]``."""

    block: tuple[int, int] = (128, 128)
    stacked: ClassVar[bool] = True

    def __post_init__(self) -> None:
        b = tuple(self.block)
        if len(b) != 2 or not all(isinstance(x, int) and x > 0 for x in b):
            raise ValueError(f"block size must be two positive integers, got {self.block!r}")
        object.__setattr__(self, "block", b)

    def block_size(self, weight_shape: Sequence[int]) -> tuple[int, int]:
        return self.block

    def scale_shape(self, weight_shape: Sequence[int]) -> tuple[int, ...]:
        if len(weight_shape) >= 3:
            return (*weight_shape[:-2], *grid_shape(weight_shape[-2], weight_shape[-1], self.block))
        rows, cols = matrix_shape(weight_shape)
        return grid_shape(rows, cols, self.block)

    def period(self, weight_shape: Sequence[int]) -> int:
        """Rows of each matrix in the stack: the block grid restarts every ``period`` rows of
        the ``[rows, cols]`` view."""
        return weight_shape[-2] if len(weight_shape) >= 3 else max(matrix_shape(weight_shape)[0], 1)

    def describe(self, weight_shape: Sequence[int]) -> str:
        return f"{list(self.scale_shape(weight_shape))} for blocks of {list(self.block)}"

    @property
    def name(self) -> str:
        return f"block{list(self.block)}"

    @property
    def weight_block_size(self) -> list[int] | None:
        return list(self.block)

    def compressed_tensors_strategy(self) -> dict[str, Any]:
        if self.block[0] == 1:
            return {"strategy": "group", "group_size": self.block[1]}
        return {"strategy": "block", "block_structure": list(self.block)}


#: The OCP MX block: 32 consecutive elements of a row share one power-of-two (ue8m0) scale.
MX_BLOCK = (1, 32)

#: Scale dtypes holding ue8m0 exponents rather than values.
EXPONENT_SCALE_CODES = frozenset({"U8", "F8_E8M0"})


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How a checkpoint's FP8 weights are scaled.

    Attributes:
        name: where it came from (``"fp8"``, ``"compressed-tensors"``, ``"auto"``...).
        granularities: the granularities a scale may have, tried in order against each scale's
            shape; the first that fits is used, none fitting is a ``ScaleShapeError``.
        scale_suffixes: scale key = weight key + suffix; ``"_scale_inv"`` is the HF fp8 /
            DeepSeek / Mistral convention, ``"_scale"`` (``weight`` -> ``weight_scale``) that of
            compressed-tensors, ModelOpt and fbgemm.
        fallback: granularities a scale may still have when none of ``granularities`` fits its
            shape, the first that fits used. A config's scheme has the shape-only ones
            (per-tensor, per-channel): a 0-d scale in a checkpoint whose config declares blocks
            is per-tensor, as transformers reads it. The config decides between shapes that fit
            several; only a shape that fits none is an error. An explicit ``scheme=`` has none.
        int_bits: bits of an int code (compressed-tensors ``num_bits``), which an int32-packed
            weight's header cannot tell; ``None`` when the config declares no int weights.
        module_scales: scale names beside a module's ``weight`` rather than derived from it:
            ``<module>.scale`` (DeepSeek-V4), ``<module>.qscale_weight`` (Mistral's native format).
    """

    name: str
    granularities: tuple[Granularity, ...]
    scale_suffixes: tuple[str, ...] = ("_scale_inv", "_scale")
    fallback: tuple[Granularity, ...] = ()
    int_bits: int | None = None
    module_scales: tuple[str, ...] = ("scale", "qscale_weight")

    def scale_keys(self, weight_key: str) -> list[str]:
        """Candidate scale names for ``weight_key``. ``_scale`` and the module's scales apply to
        ``*.weight`` only."""
        is_weight = weight_key == "weight" or weight_key.endswith(".weight")
        keys = [weight_key + sfx for sfx in self.scale_suffixes if sfx != "_scale" or is_weight]
        if is_weight:
            module = weight_key.removesuffix("weight")
            keys += [module + name for name in self.module_scales]
        return keys

    def granularity(
        self,
        weight_shape: Sequence[int],
        scale_shape: Sequence[int],
        scale_code: str,
        *,
        weight_key: str,
        scale_key: str,
        file: str,
    ) -> Granularity:
        """The granularity of this scale for this weight.

        Raises:
            ScaleShapeError: naming both tensors, both shapes and the expected scale shapes.
        """
        scale_shape = tuple(scale_shape)
        candidates = self.granularities
        if self.name == "auto" and scale_code in EXPONENT_SCALE_CODES:
            candidates = (PerBlock(MX_BLOCK),) + candidates
        for g in (*candidates, *self.fallback):
            if g.matches(weight_shape, scale_shape):
                return g
        expected = " or ".join(dict.fromkeys(g.describe(weight_shape) for g in candidates))
        hint = ""
        if all(g.weight_block_size is None for g in candidates):
            hint = (
                "; a block-scaled checkpoint needs quantization_config.weight_block_size in "
                "config.json or an explicit block_size="
            )
        raise ScaleShapeError(
            f"{file}: scale {scale_key!r} has shape {list(scale_shape)} for the FP8 weight "
            f"{weight_key!r} of shape {list(weight_shape)}; scheme {self.name!r} expects "
            f"{expected}{hint}",
            file=file,
            key=weight_key,
        )


def auto_scheme(block_size: tuple[int, int] | None = None) -> Scheme:
    """Granularity from each scale's shape: per-tensor, per-channel, or blocks of
    ``block_size`` when one is known (ue8m0 exponent scales: MX 1x32 blocks)."""
    gs: tuple[Granularity, ...] = (PerTensor(), PerChannel())
    if block_size is not None:
        gs += (PerBlock(tuple(block_size)),)
    return Scheme("auto", gs)


#: Schemes a user may name with ``scheme="..."``; ``block`` needs ``block_size=``.
NAMED_SCHEMES = ("auto", "per-tensor", "per-channel", "block", "mx")


def make_scheme(spec: "Scheme | Granularity | str | None", block_size: tuple[int, int] | None) -> Scheme | None:
    """A scheme from a user's ``scheme=`` argument, or ``None`` when it is ``None``."""
    if spec is None or isinstance(spec, Scheme):
        return spec
    if isinstance(spec, Granularity):
        return Scheme(type(spec).__name__, (spec,))
    if spec == "auto":
        return auto_scheme(block_size)
    if spec == "per-tensor":
        return Scheme(spec, (PerTensor(),))
    if spec == "per-channel":
        return Scheme(spec, (PerChannel(),))
    if spec == "mx":
        return Scheme(spec, (PerBlock(MX_BLOCK),))
    if spec == "block":
        if block_size is None:
            raise ValueError("scheme='block' needs block_size=(rows, cols)")
        return Scheme(spec, (PerBlock(tuple(block_size)),))
    raise ValueError(
        f"unknown scheme {spec!r}; pass a Scheme, PerTensor(), PerChannel(), PerBlock((r, c)) "
        f"or one of {', '.join(map(repr, NAMED_SCHEMES))}"
    )
