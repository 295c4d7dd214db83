"""DTensor destinations: this rank's box of a distributed parameter, and reading it.

FSDP2 and tensor-parallel parameters are ``DTensor``s; a rank owns one box of the global tensor.
``copy_into_dtensor`` reads and dequantizes exactly that box from the file (block boundaries
inside a shard included), never the whole tensor. torch.distributed is imported only when a
DTensor is actually met.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Protocol

import torch

__all__ = ["is_dtensor", "local_box", "copy_into_dtensor"]


class _BoxSource(Protocol):
    key: str

    def read_box_into(self, dst: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> None: ...


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (without importing torch.distributed when nothing else did)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_box(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(global offsets, local lengths)`` of this rank's shard of DTensor ``t``.

    Raises:
        NotImplementedError: a placement other than ``Shard`` or ``Replicate``.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(t.placements)
    for i, p in enumerate(placements):
        if type(p) in (Shard, Replicate) or _strided_then_sharded(placements, i, t.device_mesh):
            continue
        raise NotImplementedError(f"loading into a DTensor placed as {p} is not supported; use Shard or Replicate")
    lengths, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, placements)
    return tuple(offsets), tuple(lengths)


def _strided_then_sharded(placements: tuple[Any, ...], i: int, mesh: Any) -> bool:
    """FSDP2 over tensor parallel: ``_StridedShard(d, split_factor=k)`` on one mesh dim, then
    ``Shard(d)`` on a later mesh dim of size ``k``. Each rank's shard is then one contiguous box
    (a slice of its TP slice), which is what ``compute_local_shape_and_global_offset`` returns.
    Other strided layouts interleave rows and are refused."""
    from torch.distributed.tensor import Shard

    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover - older torch
        return False
    p = placements[i]
    if type(p) is not _StridedShard:
        return False
    later = [j for j in range(i + 1, len(placements)) if type(placements[j]) is Shard and placements[j].dim == p.dim]
    return len(later) == 1 and p.split_factor == mesh.size(later[0])


def copy_into_dtensor(source: _BoxSource, dst: torch.Tensor) -> None:
    """Read ``source``'s box for this rank straight into ``dst``'s local tensor."""
    local = dst.to_local()
    offsets, lengths = local_box(dst)
    if tuple(local.shape) != tuple(lengths):
        raise RuntimeError(
            f"{source.key!r}: the local shard has shape {list(local.shape)} but its placement "
            f"describes {list(lengths)} (a padded shard?)"
        )
    with torch.no_grad():
        source.read_box_into(local, offsets, lengths)
