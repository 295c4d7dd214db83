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
from typing import Any, Sequence, Union

from .errors import CorruptCheckpointError, ScaleShapeError

__all__ = [
    "PerTensor",
    "PerChannel",
    "PerBlock",
    "Granularity",
    "grid_shape",
    "matrix_shape",
    "detect_granularity",
    "block_size_from_config",
]


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The 2-D ``[rows, cols]`` view a granularity works on."""
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return math.prod(shape[:-1]), shape[-1]


def grid_shape(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """``(ceil(rows / b0), ceil(cols / b1))``."""
    return -(-rows // block[0]), -(-cols // block[1])


@dataclasses.dataclass(frozen=True)
class PerTensor:
    """One scale for the whole weight. Scale shape ``()`` (also accepted: ``[1]``, ``[1, 1]``)."""

    def block_size(self, weight_shape: Sequence[int]) -> tuple[int, int]:
        rows, cols = matrix_shape(weight_shape)
        return max(rows, 1), max(cols, 1)

    def scale_shape(self, weight_shape: Sequence[int]) -> tuple[int, ...]:
        return ()


@dataclasses.dataclass(frozen=True)
class PerChannel:
    """One scale per output row. Scale shape ``[rows, 1]`` (also accepted: ``[rows]``)."""

    def block_size(self, weight_shape: Sequence[int]) -> tuple[int, int]:
        return 1, max(matrix_shape(weight_shape)[1], 1)

    def scale_shape(self, weight_shape: Sequence[int]) -> tuple[int, ...]:
        return matrix_shape(weight_shape)[0], 1


@dataclasses.dataclass(frozen=True)
class PerBlock:
    """One scale per ``block_size`` tile. For a ``[300, 200]`` weight and ``(128, 128)`` blocks the
    scale is ``[3, 2]`` and the last row and column of tiles are partial."""

    block: tuple[int, int] = (128, 128)

    def __post_init__(self) -> None:
        b = tuple(self.block)
        if len(b) != 2 or not all(isinstance(x, int) and x > 0 for x in b):
            raise ValueError(f"block size must be two positive integers, got {self.block!r}")
        object.__setattr__(self, "block", b)

    def block_size(self, weight_shape: Sequence[int]) -> tuple[int, int]:
        return self.block

    def scale_shape(self, weight_shape: Sequence[int]) -> tuple[int, ...]:
        rows, cols = matrix_shape(weight_shape)
        return grid_shape(rows, cols, self.block)


Granularity = Union[PerTensor, PerChannel, PerBlock]


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def detect_granularity(
    weight_shape: Sequence[int],
    scale_shape: Sequence[int],
    *,
    block_size: tuple[int, int] | None,
    weight_key: str,
    scale_key: str,
    file: str,
) -> Granularity:
    """Which granularity a scale of ``scale_shape`` has for a weight of ``weight_shape``.

    Decided by shapes and the configured ``block_size`` only, never by names: one element is
    per-tensor; ``ceil(shape / block_size)`` is per-block (only when a block size is configured);
    ``[rows, 1]`` or ``[rows]`` is per-channel.

    Raises:
        ScaleShapeError: naming both tensors, their shapes and what was expected.
    """
    scale_shape = tuple(scale_shape)
    if math.prod(scale_shape) == 1 and len(scale_shape) <= 2:
        return PerTensor()
    rows, cols = matrix_shape(weight_shape)
    if block_size is not None:
        block = PerBlock(tuple(block_size))
        if scale_shape == block.scale_shape(weight_shape):
            return block
    if len(weight_shape) >= 2 and scale_shape in ((rows, 1), (rows,)):
        return PerChannel()
    expected = ["() per-tensor"]
    if len(weight_shape) >= 2:
        expected.append(f"{(rows, 1)} per-channel")
    if block_size is not None:
        expected.append(f"{PerBlock(tuple(block_size)).scale_shape(weight_shape)} for blocks of {tuple(block_size)}")
    hint = (
        ""
        if block_size is not None
        else "; a block-scaled checkpoint needs quantization_config.weight_block_size in config.json "
        "or an explicit block_size="
    )
    raise ScaleShapeError(
        f"{file}: scale {scale_key!r} has shape {list(scale_shape)} for the FP8 weight {weight_key!r} "
        f"of shape {list(weight_shape)}; expected {' or '.join(expected)}{hint}",
        file=file,
        key=weight_key,
    )


def block_size_from_config(config: dict[str, Any] | None, path: str) -> tuple[int, int] | None:
    """``quantization_config.weight_block_size`` of the parsed ``config.json`` at ``path``, or ``None``."""
    if not config:
        return None
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    bs = qc.get("weight_block_size")
    if bs is None:
        return None
    if (
        not isinstance(bs, (list, tuple))
        or len(bs) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in bs)
    ):
        raise CorruptCheckpointError(
            f"{path}: quantization_config.weight_block_size must be two positive integers, "
            f"found {bs!r}",
            file=path,
        )
    return int(bs[0]), int(bs[1])
