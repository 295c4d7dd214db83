"""``LazyTensor``: a tensor-like value that holds no data until torch asks for it.

``nn.Module.load_state_dict`` starts with ``OrderedDict(state_dict)``, touching every value
before loading any. Values that stay lazy until ``param.copy_(value)`` let each one be read and
dequantized straight into its parameter, so the load streams.
"""

from __future__ import annotations

import functools
import operator
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch.utils._pytree import tree_map

from ._dtensor import copy_into_dtensor, is_dtensor
from .storage.dtypes import by_torch

__all__ = ["LazyTensor"]


class _Source(Protocol):
    key: str
    dtype: torch.dtype
    device: torch.device

    @property
    def shape(self) -> torch.Size: ...

    def read_into(self, dst: torch.Tensor) -> None: ...

    def read_box_into(self, dst: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> None: ...

    def to_tensor(self) -> torch.Tensor: ...


# What the header knows, asked of a meta tensor of the same shape, dtype and (contiguous)
# strides: answering these by reading and dequantizing the whole tensor would cost its size.
_FROM_HEADER = frozenset({
    "stride", "is_contiguous", "layout", "itemsize", "is_floating_point", "is_complex", "is_signed",
    "storage_offset", "dim_order", "is_sparse", "is_sparse_csr", "is_quantized", "is_mkldnn",
    "is_nested", "nelement", "ndimension", "names", "is_inference", "grad", "grad_fn", "is_leaf",
})

# A lazy value has no memory of its own until it is read: asking where its bytes live would
# otherwise read and dequantize the whole tensor to answer about a temporary that is then freed.
_NO_STORAGE = frozenset({"untyped_storage", "storage", "data_ptr"})


class LazyTensor:
    """A stored tensor that reads itself only when used.

    ``shape``, ``dtype`` and ``device`` come from the checkpoint header. Any torch function or
    ``Tensor`` method applied to it reads the tensor into a fresh temporary for that call
    (``torch.equal(lazy, t)``, ``lazy.float()``, ``lazy[0]``), except ``dst.copy_(lazy)``, which
    reads and dequantizes straight into ``dst``. Nothing is kept afterwards: every use reads
    the file again. Call :meth:`materialize` to get a real tensor once and keep it.

    A value fetched from a view pickles as ``(view, key)`` and unpickles to ``view[key]`` of the
    view opened again in the receiving process; ``copy.deepcopy`` does the same. ``torch.save``
    stores its values instead, as a plain tensor.
    """

    __slots__ = ("_source", "_view")

    def __init__(self, source: _Source, view: "Mapping[str, LazyTensor] | None" = None):
        self._source = source
        self._view = view  # the mapping that handed it out (a view): what a pickle reopens

    # --- metadata, from the header -----------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self._source.shape

    @property
    def dtype(self) -> torch.dtype:
        return self._source.dtype

    @property
    def device(self) -> torch.device:
        return self._source.device

    @property
    def key(self) -> str:
        """The runtime name this value was fetched under."""
        return self._source.key

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_meta(self) -> bool:
        return False

    @property
    def requires_grad(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return self.numel() * self.element_size()

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.dtype.itemsize

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyTensor({self.key!r}, shape={list(self.shape)}, dtype={self.dtype}, device={self.device})"

    # --- data -------------------------------------------------------------------------
    def materialize(self) -> torch.Tensor:
        """A new ``torch.Tensor`` of ``dtype`` on ``device`` with the values."""
        return self._source.to_tensor()

    def copy_into(self, dst: torch.Tensor) -> torch.Tensor:
        """``dst.copy_(self.materialize())``, bit for bit, with no temporary of the tensor's size."""
        if tuple(dst.shape) != tuple(self.shape):
            return dst.copy_(self.materialize())  # broadcasting copy_: let torch decide
        if is_dtensor(dst):
            copy_into_dtensor(self._source, dst)  # this rank's box only
            return dst
        with torch.no_grad():
            self._source.read_into(dst)
        return dst

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_ and len(args) == 2 and isinstance(args[1], LazyTensor):
            dst, src = args
            if isinstance(dst, torch.Tensor) and not isinstance(dst, LazyTensor):
                return src.copy_into(dst)
        if func is torch.Tensor.module_load and isinstance(args[1], LazyTensor):
            # Under swap_module_params_on_conversion: as Tensor.module_load does, copy into the
            # parameter and hand back a detached alias (never self or other).
            dst, src = args
            if kwargs.get("assign", False):
                return src.materialize()
            return src.copy_into(dst).detach()
        unwrap = lambda x: x.materialize() if isinstance(x, LazyTensor) else x  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))

    def __reduce_ex__(self, protocol: Any) -> tuple:
        if _pickled_by_torch_save():
            # torch.save(view[key]) means "save this tensor": store its values, which torch.load
            # (weights_only too) returns as a plain tensor, not a handle on the checkpoint.
            return self.materialize().__reduce_ex__(protocol)
        if self._view is None:
            raise TypeError(
                f"{self!r} was not fetched from a LazyFP8View, so there is no checkpoint to reopen "
                "when it is unpickled; pickle lazy.materialize() instead"
            )
        return (operator.getitem, (self._view, self.key))

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    def get_device(self) -> int:
        return -1 if self.device.type == "cpu" else (self.device.index or 0)

    def get_shape(self) -> list[int]:
        """The shape as a list, as safetensors' ``get_slice(...).get_shape()``."""
        return list(self.shape)

    def get_dtype(self) -> str:
        """The safetensors code of the dtype indexing returns (``"BF16"``...), as safetensors'
        ``get_slice(...).get_dtype()``."""
        return by_torch(self.dtype).code  # type: ignore[union-attr]

    def __getattr__(self, name: str) -> Any:
        if name in _FROM_HEADER:
            return getattr(torch.empty(self.shape, dtype=self.dtype, device="meta"), name)
        if name in _NO_STORAGE:
            return functools.partial(_no_storage, self, name)
        # Any other Tensor method or attribute: on a temporary that lives for this call only.
        if not name.startswith("_") and hasattr(torch.Tensor, name):
            return getattr(self.materialize(), name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def __getitem__(self, index: Any) -> torch.Tensor:
        """``lazy[index]``: basic indexing (ints, slices of step 1, ``...``) reads only the box it
        selects; any other index reads the whole tensor and indexes it."""
        box = _basic_box(index, tuple(self.shape))
        if box is None:
            return self.materialize()[index]
        offsets, lengths, picked = box
        out = torch.empty(lengths, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            self._source.read_box_into(out, offsets, lengths)
        return out[tuple(0 if d in picked else slice(None) for d in range(len(lengths)))]

    def __array__(self, dtype: Any = None) -> Any:
        arr = self.materialize().numpy()
        return arr if dtype is None else arr.astype(dtype)


def _no_storage(lazy: LazyTensor, name: str, *args: Any, **kwargs: Any) -> Any:
    raise TypeError(
        f"{lazy!r}.{name}(): a lazy value has no storage; its bytes are read when it is copied "
        "into a tensor. Use lazy.materialize() for a tensor that has one"
    )


def _basic_box(index: Any, shape: tuple[int, ...]) -> tuple[list[int], list[int], set[int]] | None:
    """``(offsets, lengths, dims indexed by an int)`` of the box a basic index selects, or
    ``None`` for an index that is not one (steps, ``None``, tensors, lists, booleans).

    Raises:
        IndexError: an int out of range, or more indices than dimensions, as torch would.
    """
    items = index if isinstance(index, tuple) else (index,)
    if sum(i is Ellipsis for i in items) > 1:
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + (slice(None),) * (len(shape) - len(items) + 1) + items[at + 1 :]
    if len(items) > len(shape):
        raise IndexError(f"too many indices for tensor of dimension {len(shape)}")
    offsets, lengths, picked = [], [], set()
    for d, size in enumerate(shape):
        item = items[d] if d < len(items) else slice(None)
        if isinstance(item, int) and not isinstance(item, bool):
            if not -size <= item < size:
                raise IndexError(f"index {item} is out of bounds for dimension {d} with size {size}")
            offsets.append(item % size)
            lengths.append(1)
            picked.add(d)
        elif isinstance(item, slice) and item.step in (None, 1) and all(
            v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (item.start, item.stop)
        ):
            start, stop, _ = item.indices(size)
            offsets.append(start)
            lengths.append(max(stop - start, 0))
        else:
            return None
    return offsets, lengths, picked


def _pickled_by_torch_save() -> bool:
    """Whether the pickler calling ``__reduce_ex__`` is torch.save's. The C pickler leaves no
    frame of its own, so the caller two frames up is whoever called ``dump`` (the pure-Python
    pickler's frames are skipped)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") in ("pickle", "copyreg"):
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__") == "torch.serialization"


def _forward(name: str) -> Any:
    def op(self: LazyTensor, *args: Any) -> Any:
        return getattr(self.materialize(), name)(*args)

    op.__name__ = name
    return op


# Python looks operators up on the type, not through __getattr__: forward each explicitly.
for _name in (
    *(f"__{p}{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor", "lshift", "rshift") for p in ("", "r")),
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "__neg__", "__pos__", "__abs__", "__invert__", "__bool__", "__float__", "__int__", "__index__", "__iter__",
):
    setattr(LazyTensor, _name, _forward(_name))
LazyTensor.__hash__ = object.__hash__  # type: ignore[method-assign]  # __eq__ is elementwise; keep identity hashing
