"""Sharded loads on torch.distributed: each rank reads and dequantizes only its own slice.

Two entry points, both built on torch.distributed rather than beside it:

- ``DTensor`` parameters (FSDP2 ``fully_shard``, tensor parallel ``distribute_tensor``):
  ``model.load_state_dict(view)`` and ``lazyfp8.load_into(model, view)`` work unchanged. When a
  lazy value is copied into a DTensor, the rank's box of the global tensor comes from torch's
  own ``compute_local_shape_and_global_offset`` and only that box is read from the file.
- :class:`LazyFP8StorageReader`, a ``torch.distributed.checkpoint`` storage reader:
  ``dcp.load(state_dict, storage_reader=LazyFP8StorageReader(path, key_mapping=...))`` resolves
  every read request through a :class:`~lazyfp8.LazyFP8View`, for every scale format it reads.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from ._dtensor import copy_into_dtensor, is_dtensor, local_box
from .view import LazyFP8View

__all__ = ["LazyFP8StorageReader", "is_dtensor", "local_box", "copy_into_dtensor"]


class LazyFP8StorageReader:
    """A ``torch.distributed.checkpoint`` ``StorageReader`` over an FP8 safetensors checkpoint.

    Keys are the runtime names of a :class:`~lazyfp8.LazyFP8View` (``key_mapping``), values are
    dequantized to ``dtype`` (FP8) or kept in their stored dtype, and every scale format the view
    reads works here too, including the per-tensor 0-d and per-channel scales that torch's
    ``QuantizedHuggingFaceStorageReader`` rejects. Each read request reads only its box.

    It takes torch's ``QuantizedHuggingFaceStorageReader`` arguments too, so code written for that
    reader (torchtitan's) swaps one line: ``thread_count`` is the view's ``threads``,
    ``target_dtype`` its ``dtype`` and an int ``block_size`` a square block.

    Args:
        path: the checkpoint (as for :class:`~lazyfp8.LazyFP8View`).
        thread_count: threads reading each tensor (the view's ``threads``).
        target_dtype: what quantized tensors dequantize to (the view's ``dtype``; default bf16).
        block_size: the block of block-scaled weights, an int ``b`` (``b x b``, as torch's
            reader takes it) or ``(rows, cols)``; by default the config's.
        **view_kwargs: ``key_mapping``, ``dtype``, ``scheme``... passed to the view.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        thread_count: int | None = None,
        target_dtype: torch.dtype | None = None,
        block_size: int | tuple[int, int] | None = None,
        **view_kwargs: Any,
    ):
        _register()
        self.path = os.fspath(path)
        if target_dtype is not None:
            if view_kwargs.get("dtype", target_dtype) != target_dtype:
                raise ValueError(f"target_dtype={target_dtype} and dtype={view_kwargs['dtype']} disagree")
            view_kwargs["dtype"] = target_dtype
        if thread_count is not None:
            view_kwargs["threads"] = thread_count
        if block_size is not None:
            view_kwargs["block_size"] = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
        self._view_kwargs = view_kwargs
        self._view: "LazyFP8View | None" = None

    @property
    def view(self) -> "LazyFP8View":
        if self._view is None:
            self._view = LazyFP8View(self.path, **self._view_kwargs)
        return self._view

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None and os.fspath(checkpoint_id) != self.path:
            self.path = os.fspath(checkpoint_id)
            self._view = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata,
            Metadata,
            TensorProperties,
            TensorStorageMetadata,
        )

        md = {}
        for key in self.view:
            value = self.view[key]
            size = torch.Size(value.shape)
            md[key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=value.dtype),
                size=size,
                chunks=[ChunkStorageMetadata(offsets=torch.Size([0] * len(size)), sizes=size)],
            )
        return Metadata(state_dict_metadata=md)

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.view  # noqa: B018 - open the headers on every rank before reads start

    def prepare_local_plan(self, plan: Any) -> Any:
        return plan

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        return plans

    def read_data(self, plan: Any, planner: Any) -> "torch.futures.Future[None]":
        from torch.distributed.checkpoint.planner import LoadItemType

        view = self.view
        for item in plan.items:
            key = item.storage_index.fqn
            if item.type != LoadItemType.TENSOR:
                raise NotImplementedError(f"{self.path} holds tensors only; {key!r} was requested as bytes")
            target = planner.resolve_tensor(item).detach()
            view.read_box(key, target, item.storage_offsets, item.lengths)
            planner.commit_tensor(item, target)
        fut: torch.futures.Future[None] = torch.futures.Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        from .storage.hub import is_repo_id

        return os.path.exists(checkpoint_id) or is_repo_id(os.fspath(checkpoint_id))


@functools.cache
def _register() -> None:
    # A virtual subclass of torch's abstract StorageReader, registered on first use: importing
    # torch.distributed.checkpoint costs half a second that plain loads should not pay.
    try:
        from torch.distributed.checkpoint.storage import StorageReader
    except ImportError:  # pragma: no cover - builds without torch.distributed
        return
    StorageReader.register(LazyFP8StorageReader)
