"""The plan: which rectangles of a stored tensor cover a box, and where each lands.

Every tensor is seen as a ``[rows, cols]`` matrix (all leading dimensions folded into rows). A box
(a whole tensor, a rank's shard, a slice) becomes rectangles of that matrix, each at most one
chunk of elements, with its offset in the flat destination and the byte spans of the file it
touches. Pure arithmetic: no file, no tensor, no device.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence

from ..formats.schemes import matrix_shape

__all__ = ["Rect", "Plan", "plan_box", "code_span"]


def code_span(c0: int, c1: int, bits: int) -> tuple[int, int]:
    """The bytes ``[b0, b1)`` of a stored row that hold its codes ``c0:c1`` of ``bits`` bits each
    (a 4-bit code at an odd column shares its byte with its left neighbour)."""
    return c0 * bits // 8, -(-c1 * bits // 8)


def plan_box(
    shape: Sequence[int],
    offsets: Sequence[int],
    lengths: Sequence[int],
    budget: int,
    data_offset: int,
    itemsize: int,
    *,
    bits: int | None = None,
    row_bytes: int | None = None,
) -> "Plan":
    """The rectangles covering box ``[offsets, offsets + lengths)`` of a tensor of ``shape``
    stored at byte ``data_offset``, each at most ``budget`` elements. Elements are ``itemsize``
    bytes, or ``bits`` bits packed into rows of ``row_bytes`` bytes."""
    shape, offsets, lengths = tuple(shape), tuple(offsets), tuple(lengths)
    rows, cols = matrix_shape(shape)
    bits = itemsize * 8 if bits is None else bits
    row_bytes = code_span(0, cols, bits)[1] if row_bytes is None else row_bytes
    chunks: list[Rect] = []
    spans: list[tuple[int, int]] = []
    for r0, r1, c0, c1, local in _box_rects(shape, offsets, lengths, rows, cols):
        first, last = code_span(c0, c1, bits)
        spans.append((data_offset + r0 * row_bytes + first, data_offset + (r1 - 1) * row_bytes + last))
        chunks.extend(_split(r0, r1, c0, c1, local, budget))
    return Plan(chunks, spans)


@dataclasses.dataclass(frozen=True)
class Rect:
    """Rows ``r0:r1`` x columns ``c0:c1`` of the ``[rows, cols]`` view; ``local`` is where its
    first element lands in the (flat, row-major) destination box."""

    r0: int
    r1: int
    c0: int
    c1: int
    local: int

    @property
    def numel(self) -> int:
        return (self.r1 - self.r0) * (self.c1 - self.c0)


@dataclasses.dataclass(frozen=True)
class Plan:
    chunks: list[Rect]
    spans: list[tuple[int, int]]  # byte ranges of the file the box touches

    @property
    def largest(self) -> int:
        return max((r.numel for r in self.chunks), default=0)


def _box_rects(
    shape: tuple[int, ...], offsets: tuple[int, ...], lengths: tuple[int, ...], rows: int, cols: int
) -> Iterator[tuple[int, int, int, int, int]]:
    """The box as rectangles ``(r0, r1, c0, c1, local)`` of the ``[rows, cols]`` view.

    With the last partial dim ``k`` before the last dim, every dim after ``k`` is whole: each
    rectangle is a band of whole rows. With the last dim partial, each is a column range over
    the consecutive rows of dim ``n - 2``. One rectangle per index of the dims before the band.
    """
    n = len(shape)
    if n <= 1:
        o, m = (offsets[0], lengths[0]) if n == 1 else (0, 1)
        yield 0, 1, o, o + m, 0
        return
    partial = [d for d in range(n) if offsets[d] != 0 or lengths[d] != shape[d]]
    k = partial[-1] if partial else 0
    strides = [1] * (n - 1)  # rows of the view spanned by one step of each dim before the last
    for d in range(n - 3, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    if k == n - 1:
        band_dim, c0, c1 = n - 2, offsets[-1], offsets[-1] + lengths[-1]
    else:
        band_dim, c0, c1 = k, 0, cols
    band = lengths[band_dim] * strides[band_dim]
    ranges = [range(offsets[d], offsets[d] + lengths[d]) for d in range(band_dim)]
    for i, idx in enumerate(itertools.product(*ranges)):
        row = sum(j * strides[d] for d, j in enumerate(idx)) + offsets[band_dim] * strides[band_dim]
        yield row, row + band, c0, c1, i * band * (c1 - c0)


def _split(r0: int, r1: int, c0: int, c1: int, local: int, budget: int) -> Iterator[Rect]:
    """Cut a rectangle into rectangles of at most ``budget`` elements: bands of rows, or, when one
    row is wider than the budget, row segments."""
    w = c1 - c0
    if w <= budget:
        step = max(budget // max(w, 1), 1)
        for r in range(r0, r1, step):
            yield Rect(r, min(r + step, r1), c0, c1, local + (r - r0) * w)
        return
    for r in range(r0, r1):
        for c in range(c0, c1, budget):
            yield Rect(r, r + 1, c, min(c + budget, c1), local + (r - r0) * w + (c - c0))
