"""``lazyfp8.safe_open``: safetensors' ``safe_open`` handle over a whole quantized checkpoint.

Code written against ``safetensors.safe_open(path, framework="pt")`` (``keys()``,
``get_tensor``, ``get_slice``, ``metadata()``) works unchanged on a sharded checkpoint, its
quantized weights dequantized: one line changes. Everything is a :class:`~lazyfp8.LazyFP8View`
underneath, so slices read only their box.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .lazy import LazyTensor
from .view import LazyFP8View

__all__ = ["safe_open", "SafeOpen"]


class SafeOpen:
    """What :func:`safe_open` returns: a context manager with safetensors' handle methods."""

    def __init__(self, view: LazyFP8View):
        self.view = view

    def keys(self) -> list[str]:
        """The tensors' names (runtime names under a ``key_mapping``), sorted as safetensors
        sorts them."""
        return sorted(self.view)

    def offset_keys(self) -> list[str]:
        """The names in the order their data lies in the checkpoint (safetensors'
        ``offset_keys``)."""
        return list(self.view)

    def get_tensor(self, name: str) -> torch.Tensor:
        """The tensor, quantized weights dequantized to the view's ``dtype``."""
        return self.view.get_tensor(name)

    def get_slice(self, name: str) -> LazyTensor:
        """A lazy value: ``get_shape()``, ``get_dtype()``, and ``[index]`` reading only that box."""
        return self.view.get_slice(name)

    def metadata(self) -> dict[str, str] | None:
        """The header metadata: a single file's, or for a sharded checkpoint the entries every
        shard agrees on (``{"format": "pt"}`` for most); ``None`` when there are none."""
        shards = list(self.view._checkpoint.shards.values())
        common = dict(shards[0].metadata) if shards else {}
        for header in shards[1:]:
            common = {k: v for k, v in common.items() if header.metadata.get(k) == v}
        return common or None

    def __enter__(self) -> "SafeOpen":
        return self

    def __exit__(self, *exc: object) -> None:
        self.view.close()


def safe_open(
    filename: str | os.PathLike[str], framework: str = "pt", device: str | torch.device = "cpu", **view_kwargs: Any
) -> SafeOpen:
    """Open a checkpoint (a file, a directory, a sharded directory) as safetensors' ``safe_open``
    would open one file.

    Args:
        filename: the checkpoint, as for :class:`~lazyfp8.LazyFP8View`.
        framework: ``"pt"`` (``"torch"`` too); tensors are torch tensors.
        device: where tensors are produced.
        **view_kwargs: passed to :class:`~lazyfp8.LazyFP8View` (``dtype``, ``key_mapping``...).

    Raises:
        ValueError: another framework.
    """
    if framework not in ("pt", "torch"):
        raise ValueError(f"lazyfp8.safe_open gives torch tensors (framework='pt'), not {framework!r}")
    return SafeOpen(LazyFP8View(filename, device=device, **view_kwargs))
