"""Composite values: one runtime tensor assembled from several stored tensors, never in memory whole.

transformers 5 holds a mixture-of-experts layer's experts as one fused parameter
(``experts.gate_up_proj`` of shape ``[E, 2*I, H]``) while checkpoints store each expert's
``gate_proj`` and ``up_proj`` apart. A :class:`Layout` says where each stored tensor (or a box of
it) lands in the fused tensor; a :class:`CompositeSource` reads any box of the fused tensor by
reading each stored tensor's part of it straight into its place in the destination.

A layout is built with the operations of a conversion (:func:`stack`, :func:`cat`,
:func:`narrow`, :func:`transpose`), each checked against the stored shapes from the headers:
nothing here reads data until a destination is in hand.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch

from .errors import KeyMappingError
from .kernels.parallel import run_split

__all__ = ["Piece", "Layout", "CompositeSource", "Conversion", "stack", "cat", "narrow", "chunk", "transpose", "interleave", "leaf"]


class _Stored(Protocol):
    """What a piece reads from: a stored tensor as the view exposes it."""

    key: str
    dtype: torch.dtype
    device: torch.device

    @property
    def shape(self) -> torch.Size: ...

    def read_box_into(self, dst: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> None: ...


@dataclasses.dataclass(frozen=True)
class Piece:
    """A box of one stored tensor, placed in the composite.

    ``at``: the piece's offsets in the composite. ``dims[d]``: the stored tensor's dimension that
    composite dimension ``d`` runs along, or ``None`` for a dimension of length 1 the stored
    tensor does not have (the expert index of a stack). ``offsets``/``lengths``: the box of the
    stored tensor, in its own dimensions."""

    source: _Stored
    at: tuple[int, ...]
    dims: tuple[int | None, ...]
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def extent(self) -> tuple[int, ...]:
        """The piece's lengths in the composite's dimensions."""
        return tuple(1 if s is None else self.lengths[s] for s in self.dims)

    def describe(self) -> str:
        box = ", ".join(f"{o}:{o + n}" for o, n in zip(self.offsets, self.lengths))
        whole = all(o == 0 for o in self.offsets) and tuple(self.lengths) == tuple(self.source.shape)
        where = ", ".join(f"{a}:{a + n}" for a, n in zip(self.at, self.extent))
        return f"{self.source.key}{'' if whole else f'[{box}]'} -> [{where}]"


@dataclasses.dataclass(frozen=True)
class Layout:
    """A composite tensor's shape and the pieces that tile it."""

    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(p.source.key for p in self.pieces))


def missing_indices(found: Iterable[int], limit: int = 8) -> list[int]:
    """The first ``limit`` numbers of ``0..max(found)`` not in ``found``, in time and memory
    linear in ``found`` (an index of 10**12 in a hostile header must not build a range)."""
    have = set(found)
    end = min(max(have, default=-1) + 1, len(have) + limit)
    return [n for n in range(end) if n not in have][:limit]


def leaf(source: _Stored) -> Layout:
    """The layout of one stored tensor, whole."""
    shape = tuple(source.shape)
    n = len(shape)
    return Layout(shape, (Piece(source, (0,) * n, tuple(range(n)), (0,) * n, shape),))


def _dim(d: int, n: int, what: str) -> int:
    if not -n <= d < n:
        raise KeyMappingError(f"{what}: dimension {d} is out of range for {n} dimensions")
    return d % n


def stack(layouts: Sequence[Layout], dim: int = 0) -> Layout:
    """``torch.stack`` of the layouts along a new dimension ``dim``."""
    if not layouts:
        raise KeyMappingError("stack of no tensors")
    shape = layouts[0].shape
    for lay in layouts[1:]:
        if lay.shape != shape:
            raise KeyMappingError(
                f"cannot stack {', '.join(lay.sources)} of shape {list(lay.shape)} with "
                f"{', '.join(layouts[0].sources)} of shape {list(shape)}"
            )
    dim = _dim(dim, len(shape) + 1, "stack")
    pieces = tuple(
        dataclasses.replace(p, at=p.at[:dim] + (i,) + p.at[dim:], dims=p.dims[:dim] + (None,) + p.dims[dim:])
        for i, lay in enumerate(layouts)
        for p in lay.pieces
    )
    return Layout(shape[:dim] + (len(layouts),) + shape[dim:], pieces)


def cat(layouts: Sequence[Layout], dim: int = 0) -> Layout:
    """``torch.cat`` of the layouts along ``dim``."""
    if not layouts:
        raise KeyMappingError("concatenation of no tensors")
    first = layouts[0].shape
    dim = _dim(dim, len(first), "cat")
    for lay in layouts[1:]:
        if len(lay.shape) != len(first) or lay.shape[:dim] + lay.shape[dim + 1 :] != first[:dim] + first[dim + 1 :]:
            raise KeyMappingError(
                f"cannot concatenate {', '.join(lay.sources)} of shape {list(lay.shape)} with "
                f"{', '.join(layouts[0].sources)} of shape {list(first)} along dimension {dim}"
            )
    pieces, shift = [], 0
    for lay in layouts:
        for p in lay.pieces:
            at = list(p.at)
            at[dim] += shift
            pieces.append(dataclasses.replace(p, at=tuple(at)))
        shift += lay.shape[dim]
    return Layout(first[:dim] + (shift,) + first[dim + 1 :], tuple(pieces))


def narrow(layout: Layout, dim: int, start: int, length: int) -> Layout:
    """``tensor.narrow(dim, start, length)``: the pieces clipped to that slab."""
    dim = _dim(dim, len(layout.shape), "narrow")
    if start < 0 or length < 0 or start + length > layout.shape[dim]:
        raise KeyMappingError(f"slice {start}:{start + length} is outside dimension {dim} of size {layout.shape[dim]}")
    pieces = []
    for p in layout.pieces:
        lo, hi = max(p.at[dim], start), min(p.at[dim] + p.extent[dim], start + length)
        if lo >= hi:
            continue
        at = list(p.at)
        at[dim] = lo - start
        offsets, lengths = list(p.offsets), list(p.lengths)
        s = p.dims[dim]
        if s is not None:
            offsets[s] += lo - p.at[dim]
            lengths[s] = hi - lo
        pieces.append(dataclasses.replace(p, at=tuple(at), offsets=tuple(offsets), lengths=tuple(lengths)))
    shape = list(layout.shape)
    shape[dim] = length
    return Layout(tuple(shape), tuple(pieces))


def chunk(layout: Layout, chunks: int, dim: int = 0) -> list[Layout]:
    """``torch.chunk``: ``chunks`` slabs along ``dim`` (the last may be shorter)."""
    dim = _dim(dim, len(layout.shape), "chunk")
    size = -(-layout.shape[dim] // chunks)
    return [narrow(layout, dim, s, min(size, layout.shape[dim] - s)) for s in range(0, layout.shape[dim], size)]


#: The most slabs :func:`interleave` makes pieces of; a larger interleave is not read as a layout.
MAX_SLABS = 1 << 16


def interleave(layout: Layout, dim: int, inverse: bool = False) -> Layout:
    """transformers' ``Interleave``: along ``dim`` (of even size ``2n``), the even slabs then the
    odd ones (``inverse``: the first half and the second half taken in turn). A permutation of
    slabs, so one piece per slab: still no read larger than a slab."""
    dim = _dim(dim, len(layout.shape), "interleave")
    size = layout.shape[dim]
    if size % 2:
        raise KeyMappingError(f"cannot interleave {', '.join(layout.sources)}: dimension {dim} has odd size {size}")
    if size > MAX_SLABS:
        raise KeyMappingError(
            f"cannot interleave {', '.join(layout.sources)} as a layout: {size} slabs along dimension {dim} "
            f"(at most {MAX_SLABS})"
        )
    half = size // 2
    order = [half * (i % 2) + i // 2 for i in range(size)] if inverse else [*range(0, size, 2), *range(1, size, 2)]
    return cat([narrow(layout, dim, i, 1) for i in order], dim)


def transpose(layout: Layout, dim0: int, dim1: int) -> Layout:
    """``tensor.transpose(dim0, dim1)``."""
    n = len(layout.shape)
    a, b = _dim(dim0, n, "transpose"), _dim(dim1, n, "transpose")

    def swap(t: tuple) -> tuple:
        t = list(t)
        t[a], t[b] = t[b], t[a]
        return tuple(t)

    return Layout(swap(layout.shape), tuple(dataclasses.replace(p, at=swap(p.at), dims=swap(p.dims)) for p in layout.pieces))


def check_tiling(key: str, layout: Layout) -> None:
    """The pieces cover the composite exactly once: every piece inside it, no two overlapping,
    nothing left uncovered (from the shapes alone).

    Raises:
        KeyMappingError: naming the runtime key and the stored tensors involved.
    """
    total = 0
    for p in layout.pieces:
        if any(a < 0 or a + n > d for a, n, d in zip(p.at, p.extent, layout.shape)):
            raise KeyMappingError(f"{key!r}: {p.describe()} falls outside its shape {list(layout.shape)}")
        total += math.prod(p.extent)
    # Overlaps, found by a sweep along the dimension where the pieces start at the most
    # distinct places (the expert index of a stack, the rows of an interleave), comparing each
    # piece only with those whose span along it is still open.
    if layout.pieces and layout.shape:
        d = max(range(len(layout.shape)), key=lambda i: len({p.at[i] for p in layout.pieces}))
        open_: list[Piece] = []
        for p in sorted(layout.pieces, key=lambda p: p.at[d]):
            open_ = [q for q in open_ if q.at[d] + q.extent[d] > p.at[d]]
            for q in open_:
                if all(max(a, b) < min(a + m, b + n) for a, m, b, n in zip(p.at, p.extent, q.at, q.extent)):
                    raise KeyMappingError(f"{key!r}: two sources for one slice: {q.describe()} and {p.describe()}")
            open_.append(p)
    elif len(layout.pieces) > 1:
        raise KeyMappingError(f"{key!r}: two sources for one 0-d value: {', '.join(layout.sources)}")
    if total != math.prod(layout.shape):
        raise KeyMappingError(
            f"{key!r}: its sources ({', '.join(layout.sources)}) cover {total} of its "
            f"{math.prod(layout.shape)} elements (shape {list(layout.shape)}): a part is missing"
        )


class CompositeSource:
    """A runtime tensor made of the boxes of stored tensors a :class:`Layout` places.

    Reading a box of it reads, from each stored tensor that meets the box, only the part that
    falls inside, into its place in the destination: no temporary of the fused tensor's size.
    """

    __slots__ = ("key", "layout", "dtype", "device", "materialized")

    def __init__(self, key: str, layout: Layout, *, materialized: bool = False):
        dtypes = {p.source.dtype for p in layout.pieces}
        if len(dtypes) != 1:
            raise KeyMappingError(f"{key!r}: its sources come out in different dtypes ({', '.join(map(str, dtypes))})")
        check_tiling(key, layout)
        self.key = key
        self.layout = layout
        self.dtype = dtypes.pop()
        self.device = layout.pieces[0].source.device
        self.materialized = materialized

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.layout.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.layout.shape)

    def to_tensor(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self.read_into(out)
        return out

    def read_into(self, dst: torch.Tensor) -> None:
        self.read_box_into(dst, (0,) * len(self.layout.shape), self.layout.shape)

    def read_box_into(self, dst: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> None:
        """The box ``[offsets, offsets + lengths)`` into ``dst`` (of shape ``lengths``), each
        stored tensor read only where it meets the box."""
        shape = self.layout.shape
        offsets, lengths = tuple(int(o) for o in offsets), tuple(int(n) for n in lengths)
        if len(offsets) != len(shape) or len(lengths) != len(shape) or any(
            o < 0 or n < 0 or o + n > d for o, n, d in zip(offsets, lengths, shape)
        ):
            raise ValueError(f"box at {list(offsets)} of size {list(lengths)} is outside {self.key!r} of shape {list(shape)}")
        if tuple(dst.shape) != lengths:
            raise ValueError(f"the box of {self.key!r} has shape {list(lengths)}, the destination {list(dst.shape)}")
        dst = dst.detach()
        parallel, serial = [], []
        for p in self.layout.pieces:
            lo = [max(a, o) for a, o in zip(p.at, offsets)]
            hi = [min(a + e, o + n) for a, e, o, n in zip(p.at, p.extent, offsets, lengths)]
            if any(x >= y for x, y in zip(lo, hi)):
                continue
            part = dst[tuple(slice(x - o, y - o) for x, y, o in zip(lo, hi, offsets))]
            # Drop the dimensions the stored tensor lacks, then order the rest as it stores them.
            kept = [d for d, s in enumerate(p.dims) if s is not None]
            part = part[tuple(0 if s is None else slice(None) for s in p.dims)]
            order = sorted(range(len(kept)), key=lambda i: p.dims[kept[i]])
            part = part.permute(order)
            src_off, src_len = list(p.offsets), list(p.lengths)
            for d in kept:
                s = p.dims[d]
                src_off[s] = p.offsets[s] + lo[d] - p.at[d]
                src_len[s] = hi[d] - lo[d]
            # A part that is one contiguous run of the destination is written in place; others
            # go through a temporary of the part's size, so those run one at a time to keep the
            # memory bound at one part.
            (parallel if part.is_contiguous() else serial).append((p.source, part, src_off, src_len))

        def read(tasks: Sequence[tuple]) -> None:
            for source, part, src_off, src_len in tasks:
                source.read_box_into(part, src_off, src_len)

        # Experts are often one chunk each: reading them side by side keeps every worker busy.
        run_split(parallel, max((getattr(s, "threads", 1) for s, *_ in parallel), default=1), read)
        read(serial)

    def stored(self) -> list[_Stored]:
        """The stored tensors it is made of, in the order they lie in the value."""
        return list({id(p.source): p.source for p in sorted(self.layout.pieces, key=lambda p: p.at)}.values())

    def describe(self) -> list[str]:
        """One line per piece, in the order they lie in the value: which stored tensor (and which
        box of it) lands where."""
        return [p.describe() for p in sorted(self.layout.pieces, key=lambda p: p.at)]


@dataclasses.dataclass
class Conversion:
    """What a conversion makes of a checkpoint's keys: plain renames, and composite values."""

    renamed: dict[str, str]  #: runtime key -> on-disk key, one to one
    composites: dict[str, Any]  #: runtime key -> its layout over on-disk tensors
    materialized: list[str]  #: runtime keys whose operations are not layouts (read whole, then converted)
