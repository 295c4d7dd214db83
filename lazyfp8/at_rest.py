"""Quantized at rest (``lazyfp8.offload``): a model whose quantized weights stay quantized.

The chosen modules' weights are kept as the checkpoint stores them (FP8 codes, packed FP4 or
int4 codes, and their scales: the same bytes), and each is dequantized into a reused buffer just
before its module runs and let go right after. A model whose bf16 weights do not fit runs in
about its quantized size.

Nothing here dequantizes by itself. Each held tensor's bytes sit in a :class:`HeldBytes`, which
reads like a shard (``check``, ``read_into``, ``will_need``), and the weight is a
``kernels.source.TensorSource`` over those bytes: the same planner, the same kernels (compiled
or torch), the same threads and per-thread workspaces as a load from the file, so a forward
sees exactly the bits ``load_into`` would have put in the parameter.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .composite import CompositeSource, Layout
from .errors import CheckpointError
from .kernels.dequant import Workspace
from .kernels.source import TensorSource, TransposedSource
from .keymap import KeyMappingSpec
from .lazy import LazyTensor
from .load import load_into
from .storage.header import TensorEntry
from .view import LazyFP8View

_log = logging.getLogger("lazyfp8")

__all__ = ["offload", "Offloaded", "HeldBytes"]

#: Which modules to offload: a predicate ``(name, module) -> bool``, regexes searched in the
#: module names, or ``None`` (every ``nn.Linear`` whose weight is stored quantized).
ModuleSelector = Union[Callable[[str, nn.Module], bool], str, Iterable[str], None]


class HeldBytes:
    """One stored tensor's bytes, held in memory and read like a shard.

    ``TensorSource`` reads a tensor through its shard's ``check``, ``read_into`` and
    ``will_need``; this object answers them from a ``uint8`` tensor (on any device) instead of
    a file, at the offsets of an entry whose ``offset`` is 0. Reads copy the bytes asked for
    into the caller's buffer (device to device where both are on one device).

    Attributes:
        path: the checkpoint file the bytes were read from (for error messages).
        data: the bytes, exactly as stored in the file.
    """

    __slots__ = ("path", "data")

    def __init__(self, path: str, data: torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise ValueError(f"HeldBytes holds a 1-d uint8 tensor, not {data.dtype} of shape {list(data.shape)}")
        self.path = path
        self.data = data

    @classmethod
    def read(cls, shard: Any, entry: TensorEntry, device: torch.device) -> tuple["HeldBytes", TensorEntry]:
        """The bytes of ``entry`` read from ``shard`` (a ``ShardFile``, or another
        ``HeldBytes``), placed on ``device``, and the entry that addresses them (offset 0)."""
        raw = torch.empty(entry.nbytes, dtype=torch.uint8)
        shard.check(entry.name)
        shard.read_into(raw, entry.offset, entry.name)
        if device.type != "cpu":
            raw = raw.to(device)
        return cls(shard.path, raw), dataclasses.replace(entry, offset=0)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    def check(self, key: str) -> None:
        """Nothing to check: memory is not rewritten under a reader the way a file can be."""

    def will_need(self, offset: int, nbytes: int) -> None:
        """Nothing to read ahead: the bytes are in memory."""

    def read_into(self, dst: torch.Tensor, offset: int, key: str) -> None:
        """Fill contiguous ``dst`` (any dtype, any device) with its size in bytes from
        ``offset``.

        Raises:
            CheckpointError: the range falls outside the held bytes (naming the file and key).
        """
        flat = dst.reshape(-1).view(torch.uint8)
        n = flat.numel()
        if offset < 0 or offset + n > self.data.numel():
            raise CheckpointError(
                f"{self.path}: reading {key!r}: bytes {offset}:{offset + n} are outside the "
                f"{self.data.numel()} bytes held for it",
                file=self.path,
                key=key,
            )
        flat.copy_(self.data[offset : offset + n])

    def close(self) -> None:
        """Nothing to close."""

    def __repr__(self) -> str:
        return f"HeldBytes({self.path!r}, {self.nbytes} bytes on {self.device})"


class _DeviceWork:
    """The workspaces of every held source of one ``offload`` on a device other than the CPU
    (one per device, so its memory is one chunk's buffers however many weights there are), and
    a lock: the parts of a fused value may be read from several threads at once, and a chunk's
    codes must not be overwritten before the kernel reading them is queued."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._by_device: dict[torch.device, Workspace] = {}

    def on(self, device: torch.device) -> Workspace:
        work = self._by_device.get(device)
        if work is None:
            work = self._by_device[device] = Workspace(device)
        return work


class _HeldSource(TensorSource):
    """A ``TensorSource`` whose shard is a :class:`HeldBytes`. Destinations on the CPU, and on a
    device while the bytes are in host memory, take ``TensorSource``'s own paths (threads and
    compiled kernels; pinned double buffers to a GPU). With the bytes on the destination's
    device, codes are dequantized there, with no trip through host memory."""

    __slots__ = ("work",)

    def read_box_into(self, dst: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> None:
        if dst.device.type == "cpu" or dst.device != self.shard.device:
            super().read_box_into(dst, offsets, lengths)
            return
        self._read_on_device(dst, offsets, lengths)

    def _read_on_device(self, dst: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> None:
        """The box into ``dst`` on the held bytes' device: each planned rectangle's codes
        copied out of the held bytes (device to device) and dequantized by ``kernel(device)``,
        as ``TensorSource`` does on the CPU with one worker."""
        offsets, lengths = tuple(int(o) for o in offsets), tuple(int(n) for n in lengths)
        if tuple(dst.shape) != lengths:
            raise ValueError(f"the box of {self.key!r} has shape {list(lengths)}, the destination {list(dst.shape)}")
        if dst.numel() == 0:
            return
        dst = dst.detach()
        if not dst.is_contiguous():
            tmp = torch.empty(lengths, dtype=self.dtype, device=dst.device)
            self._read_on_device(tmp, offsets, lengths)
            dst.copy_(tmp)
            return
        kernel = self.kernel(dst.device)
        flat = dst.view(-1)
        direct = dst.dtype == self.dtype
        with self.work.lock:
            self.fill_rects(flat, self.plan(offsets, lengths).chunks, kernel, self.work.on(dst.device), direct)


class _HeldTransposedSource(TransposedSource, _HeldSource):
    """:class:`_HeldSource` for a weight exposed transposed (gpt-oss's MXFP4 experts)."""

    __slots__ = ()


class _Holder:
    """Reads stored tensors into :class:`HeldBytes`, each once however many sources use it
    (two boxes of one stored tensor in fused experts), and counts what it holds."""

    def __init__(self, codes_device: torch.device, device: torch.device):
        self.codes_device = codes_device
        self.device = device  # where values are produced (the sources' device)
        self._held: dict[tuple[str, str], tuple[HeldBytes, TensorEntry]] = {}
        self._sources: dict[int, Any] = {}
        self.work = _DeviceWork()

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h, _ in self._held.values())

    def _bytes(self, shard: Any, entry: TensorEntry, device: torch.device) -> tuple[HeldBytes, TensorEntry]:
        k = (shard.path, entry.name)
        got = self._held.get(k)
        if got is None:
            got = self._held[k] = HeldBytes.read(shard, entry, device)
        return got

    def source(self, src: Any) -> Any:
        """``src`` (a view's source) over held bytes: codes on ``codes_device``, scales, zero
        points, global scales and shape tensors in host memory (the kernels read them there)."""
        got = self._sources.get(id(src))
        if got is not None:
            return got
        if isinstance(src, CompositeSource):
            pieces = tuple(dataclasses.replace(p, source=self.source(p.source)) for p in src.layout.pieces)
            got = CompositeSource(src.key, Layout(src.layout.shape, pieces), materialized=src.materialized)
        elif isinstance(src, TensorSource):
            shard, entry = self._bytes(src.shard, src.entry, self.codes_device)
            scale = src.scale
            if scale is not None:
                cpu = torch.device("cpu")

                def part(p: tuple[Any, TensorEntry] | None) -> tuple[HeldBytes, TensorEntry] | None:
                    return None if p is None else self._bytes(p[0], p[1], cpu)

                s_shard, s_entry = self._bytes(scale.shard, scale.entry, cpu)
                scale = dataclasses.replace(
                    scale, shard=s_shard, entry=s_entry, global_scale=part(scale.global_scale),
                    zero_point=part(scale.zero_point), declared_shape=part(scale.declared_shape),
                )  # fmt: skip
            cls = _HeldTransposedSource if isinstance(src, TransposedSource) else _HeldSource
            got = cls(
                src.key, shard, entry, scale=scale, dtype=src.dtype, device=self.device,
                chunk=src.chunk, threads=src.threads,
            )  # fmt: skip
            got.work = self.work
        else:  # offload() only holds the two kinds above
            raise TypeError(f"{src.key!r}: cannot hold a {type(src).__name__}")
        self._sources[id(src)] = got
        return got


def _is_quantized(src: Any) -> bool:
    """Whether a view's source stores quantized codes (any part of a composite)."""
    if isinstance(src, CompositeSource):
        return any(_is_quantized(p.source) for p in src.layout.pieces)
    return isinstance(src, TensorSource) and src.scale is not None


class _Buffers:
    """The dequantized weights' memory: buffers kept per (shape, dtype, device) and handed out
    again to the next module of that shape, so the memory above the held bytes is one buffer
    per distinct shape (more only for weights of one shape in use at the same time: modules
    nested inside a chosen one). Each buffer is an ``nn.Parameter`` (``requires_grad=False``)
    made outside inference mode, so it can be written again whatever mode the next forward runs
    in."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[nn.Parameter]] = {}
        self._lock = threading.Lock()
        self.nbytes = 0  #: bytes of the buffers kept (free or in use)
        self.peak = 0  #: the most bytes of buffers there ever were at once
        self.fresh = 0  #: weights dequantized into memory of their own (grad mode: see take)

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device, *, keep: bool) -> nn.Parameter:
        """A buffer of that shape; ``keep=False`` gives one that is never handed out again (a
        graph that autograd records may still read it after the forward)."""
        k = (tuple(shape), dtype, device)
        with self._lock:
            free = self._free.get(k)
            if keep and free:
                return free.pop()
            n = math.prod(shape) * dtype.itemsize
            if keep:
                self.nbytes += n
                self.peak = max(self.peak, self.nbytes)
            else:
                self.fresh += 1
        with torch.inference_mode(False):
            return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)

    def give(self, buf: nn.Parameter) -> None:
        with self._lock:
            self._free.setdefault((tuple(buf.shape), buf.dtype, buf.device), []).append(buf)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self.nbytes = 0


@dataclasses.dataclass
class _HeldParam:
    """One parameter held quantized: its runtime key, the held source, the meta placeholder its
    modules show between forwards, and every (module, attribute) it is set on."""

    key: str
    source: Any
    placeholder: nn.Parameter
    slots: list[tuple[nn.Module, str]]


class _Unit:
    """A chosen module and the held parameters under it, with its two hooks."""

    def __init__(self, name: str, module: nn.Module, params: list[tuple[_HeldParam, list[tuple[nn.Module, str]]]], buffers: _Buffers):
        self.name = name
        self.module = module
        self.params = params  # each held parameter with its slots inside this module
        self.buffers = buffers
        self.depth = 0  # a module may call itself (or be called again from inside its forward)
        self.in_use: list[tuple[nn.Parameter, bool]] = []
        self.hooks: list[RemovableHandle] = [
            module.register_forward_pre_hook(self.before),
            module.register_forward_hook(self.after, always_call=True),
        ]

    def before(self, module: nn.Module, args: Any) -> None:
        self.depth += 1
        if self.depth > 1:
            return
        # Under grad mode autograd may keep a weight for the backward pass after the forward
        # returns: such a weight gets memory of its own, never reused by the next module.
        keep = not torch.is_grad_enabled()
        try:
            for p, slots in self.params:
                buf = self.buffers.take(p.placeholder.shape, p.placeholder.dtype, p.source.device, keep=keep)
                self.in_use.append((buf, keep))
                with torch.no_grad():
                    p.source.read_into(buf)
                for mod, name in slots:
                    mod._parameters[name] = buf
        except BaseException:
            self._release()
            raise

    def after(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.depth == 0:
            return  # the pre-hook failed and released already (the hook is always called)
        self.depth -= 1
        if self.depth == 0:
            self._release()

    def _release(self) -> None:
        self.depth = 0
        for p, slots in self.params:
            for mod, name in slots:
                mod._parameters[name] = p.placeholder
        for buf, keep in self.in_use:
            if keep:
                self.buffers.give(buf)
        self.in_use.clear()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


@dataclasses.dataclass(repr=False)
class Offloaded:
    """What :func:`offload` returns: the hooks it installed and what they hold.

    Attributes:
        modules: the names of the modules whose weights are held quantized, in model order.
        keys: the runtime keys held quantized.
        held_bytes: bytes held for them: the stored codes and scales (zero points, global
            scales, shape tensors), exactly the checkpoint's bytes.
        dense_bytes: what those parameters take dequantized, in the model's dtypes.
        codes_device: where the codes are held (scales are always in host memory).
        device: where weights are dequantized, and the rest of the model was loaded.
    """

    modules: list[str]
    keys: list[str]
    held_bytes: int
    dense_bytes: int
    codes_device: torch.device
    device: torch.device
    _units: list[_Unit] = dataclasses.field(repr=False)
    _params: list[_HeldParam] = dataclasses.field(repr=False)
    _buffers: _Buffers = dataclasses.field(repr=False)

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the reusable buffers kept now: about one dequantized weight per distinct
        shape, once each shape has run."""
        return self._buffers.nbytes

    @property
    def peak_buffer_bytes(self) -> int:
        """The most bytes of reusable buffers there were at once."""
        return self._buffers.peak

    @property
    def fresh_buffers(self) -> int:
        """How many weights were dequantized into memory of their own, not a reused buffer,
        because the forward ran under grad mode (run under ``torch.no_grad()`` or
        ``torch.inference_mode()`` to keep memory at the held bytes)."""
        return self._buffers.fresh

    @property
    def active(self) -> bool:
        """Whether the hooks are installed."""
        return bool(self._units)

    def remove(self, *, materialize: bool = False) -> None:
        """Remove the hooks and let go of the held bytes and buffers.

        Args:
            materialize (`bool`, defaults to `False`): dequantize every held parameter into
                memory of its own first, so the model is the fully loaded one, bit for bit
                (ties kept). Without it, those parameters stay on the meta device.
        """
        if not self._units:
            return
        for unit in self._units:
            unit.remove()
        for p in self._params:
            p.placeholder._lazyfp8_held = False  # type: ignore[attr-defined]  # may be offloaded again
        if materialize:
            with torch.no_grad():
                for p in self._params:
                    new = nn.Parameter(
                        torch.empty(p.placeholder.shape, dtype=p.placeholder.dtype, device=p.source.device),
                        requires_grad=False,
                    )
                    p.source.read_into(new)
                    for mod, name in p.slots:
                        mod._parameters[name] = new
        self._units = []
        self._params = []
        self._buffers.clear()
        self.held_bytes = 0

    def __repr__(self) -> str:
        state = "active" if self._units else "removed"
        return (
            f"Offloaded({len(self.modules)} modules, {len(self.keys)} weights: {self.held_bytes / 2**20:.1f} MiB held "
            f"for {self.dense_bytes / 2**20:.1f} MiB dense, codes on {self.codes_device}, computing on {self.device}, {state})"
        )

    def __enter__(self) -> "Offloaded":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _selector(spec: ModuleSelector) -> Callable[[str, nn.Module], bool] | None:
    if spec is None or callable(spec):
        return spec  # type: ignore[return-value]
    if isinstance(spec, str):
        spec = [spec]  # one regex, not its characters
    try:
        patterns = [re.compile(p) for p in spec]
    except (re.error, TypeError) as e:
        raise ValueError(f"modules= takes a predicate (name, module) -> bool or regexes: {e}") from None
    return lambda name, module: any(p.search(name) for p in patterns)


def _param_groups(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str, str]]]:
    """Every parameter as (owner module name, module, attribute, state_dict key), grouped by
    tensor identity (tied parameters form one group)."""
    groups: dict[int, list[tuple[str, nn.Module, str, str]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in mod._parameters.items():
            if p is not None:
                groups.setdefault(id(p), []).append((mod_name, mod, name, prefix + name))
    return groups


def _under(name: str, root: str) -> bool:
    return root == "" or name == root or name.startswith(root + ".")


class _Without(Mapping[str, LazyTensor]):
    """``view`` without ``keys``: what the rest of the model loads from."""

    def __init__(self, view: LazyFP8View, keys: set[str]):
        self.view = view
        self.keys_ = keys

    def __getitem__(self, key: str) -> LazyTensor:
        if key in self.keys_:
            raise KeyError(key)
        return self.view[key]

    def __contains__(self, key: object) -> bool:
        return key not in self.keys_ and key in self.view

    def __iter__(self) -> Iterator[str]:
        return (k for k in self.view if k not in self.keys_)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def offload(
    model: nn.Module,
    src: LazyFP8View | str | os.PathLike[str],
    *,
    modules: ModuleSelector = None,
    device: str | torch.device | None = None,
    codes_device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    key_mapping: KeyMappingSpec = None,
    **view_kwargs: Any,
) -> Offloaded:
    """Load ``src`` into ``model``, keeping the chosen modules' quantized weights quantized.

    Each chosen module's parameters that the checkpoint stores quantized (FP8, packed FP4 or
    int4 codes with their scales) are held as those stored bytes, and are dequantized into a
    reused buffer by a forward pre-hook just before the module runs, then swapped back for a
    meta placeholder by a forward hook right after. Every other parameter and buffer is loaded
    as :func:`~lazyfp8.load_into` loads it (the model may be on the meta device). The values a
    forward sees are bit for bit those ``load_into`` would have put in the parameters: the same
    kernels dequantize the same bytes.

    Memory: the held bytes (``Offloaded.held_bytes``), plus the rest of the model, plus one
    dequantized buffer per distinct weight shape (kept and reused: ``buffer_bytes``), plus the
    kernels' per-thread chunk buffers (a few MiB). Run forwards under ``torch.no_grad()`` or
    ``torch.inference_mode()`` (``generate`` does): under grad mode autograd may keep a weight
    for the backward pass, so each weight then gets memory of its own (``fresh_buffers``).

    Args:
        model (`nn.Module`): the model; its parameters may be on the meta device (built under
            :func:`~lazyfp8.init_empty_weights`). Held parameters keep the dtype they have in
            the model (as ``load_into`` fills them).
        src (`LazyFP8View` or path): the checkpoint. A path is opened with ``key_mapping`` and
            ``view_kwargs`` (:class:`~lazyfp8.LazyFP8View`'s options) and closed afterwards:
            nothing is read from the files after ``offload`` returns.
        modules (*optional*): which modules to offload: ``None`` (default) for every
            ``nn.Linear`` whose weight is stored quantized; a predicate ``(name, module) ->
            bool``; or regexes searched in module names (as ``save``'s ``quantize=``). A chosen
            module inside another chosen one is covered by the outer one's hooks.
        device (`str` or `torch.device`, *optional*): where weights are dequantized and the rest
            of the model is loaded (default: the view's device, else CPU).
        codes_device (`str` or `torch.device`, *optional*): where the held codes live (default:
            ``device``). ``"cpu"`` with a CUDA ``device`` keeps them in host memory and sends
            each weight's codes over PCIe at its forward; scales are always held in host memory.
        dtype (`torch.dtype`, *optional*): what quantized weights dequantize to before they are
            converted to the parameter's dtype (the view's ``dtype``, default bfloat16), as in
            ``load_into``.
        strict (`bool`, defaults to `True`): as in ``load_into``, for the whole model.
        key_mapping (*optional*): for a path, the view's key mapping (``"transformers"``, a
            preset, rules); ``"auto"`` is not supported here.

    Returns:
        :class:`Offloaded`: ``remove()`` takes the hooks off (``materialize=True`` dequantizes
        the held weights for good); ``held_bytes``, ``dense_bytes``, ``buffer_bytes``,
        ``modules`` and ``keys`` say what is held.

    Raises:
        ValueError: ``modules=`` chose a module with no parameter stored quantized, a
            parameter shared with a module that is not chosen, or a weight a key mapping makes
            with a function rather than a layout; a shape that differs from the checkpoint's.
        RuntimeError: as ``load_into``: missing or unexpected keys, shape mismatches.
    """
    if isinstance(src, (str, os.PathLike)):
        if key_mapping == "auto":
            raise ValueError("offload() takes key_mapping='transformers', a preset or rules, not 'auto'")
        if dtype is not None:
            view_kwargs["dtype"] = dtype
        with LazyFP8View(src, key_mapping=key_mapping, **view_kwargs) as view:
            return offload(model, view, modules=modules, device=device, codes_device=codes_device, strict=strict)
    if view_kwargs or key_mapping is not None or dtype is not None:
        raise TypeError("key_mapping=, dtype= and view options apply only when src is a path (remap or reopen the view)")
    if not isinstance(src, LazyFP8View):
        raise TypeError(f"offload() reads a LazyFP8View or a checkpoint path, not {type(src).__name__}")
    view = src
    device = torch.device(device) if device is not None else (view.device or torch.device("cpu"))
    codes_device = torch.device(codes_device) if codes_device is not None else device

    chosen = _choose(model, view, _selector(modules), explicit=modules is not None)
    groups = _param_groups(model)
    again = [slots[0][3] for slots in groups.values() if getattr(slots[0][1]._parameters[slots[0][2]], "_lazyfp8_held", False)]
    if again:
        raise ValueError(
            f"{type(model).__name__} is already offloaded ({again[0]!r} is held); call remove() on the handle "
            "offload() returned before offloading it again"
        )
    plan: list[tuple[list[tuple[str, nn.Module, str, str]], str]] = []
    errors: list[str] = []
    for slots in groups.values():
        keys = [key for *_, key in slots]
        owners = [any(_under(mod_name, root) for root in chosen) for mod_name, *_ in slots]
        present = [k for k in keys if k in view]
        if not any(owners) or not present:
            continue
        source = view._sources[present[0]]
        if not isinstance(source, (TensorSource, CompositeSource)):
            if modules is not None:
                errors.append(
                    f"{present[0]!r} is made by a function of the key mapping, not laid out from stored tensors, "
                    "so it cannot be held quantized; leave its module out of modules="
                )
            continue
        if not _is_quantized(source):
            continue
        if not all(owners):
            outside = [k for k, inside in zip(keys, owners) if not inside]
            msg = (
                f"{keys[owners.index(True)]!r} is tied to {', '.join(map(repr, outside))} in a module that is "
                "not offloaded; offload both or neither"
            )
            if modules is not None:
                errors.append(msg)
            else:
                _log.info("offload: %s: loading it instead", msg)
            continue
        _, mod, name, _ = slots[0]
        target = mod._parameters[name]
        if tuple(source.shape) != tuple(target.shape):
            errors.append(
                f"size mismatch for {present[0]}: the checkpoint's shape is {list(source.shape)}, "
                f"the model's {list(target.shape)}"
            )
            continue
        plan.append((slots, present[0]))
    if modules is not None:
        holding = {mod_name for slots, _ in plan for mod_name, *_ in slots}
        empty = [root for root in chosen if not any(_under(n, root) for n in holding)]
        if empty:
            shown = ", ".join(map(repr, empty[:8])) + (f" and {len(empty) - 8} more" if len(empty) > 8 else "")
            errors.append(
                f"modules= chose {shown}, which hold no parameter stored quantized in {view.path}; "
                "leave them out of modules= (they would load as usual)"
            )
    if errors:
        raise ValueError(f"offload of {type(model).__name__}:\n\t" + "\n\t".join(errors))

    # Load everything else first, with the held parameters out of the model, so that
    # load_into's checks (missing, unexpected, left on meta) see the model without them.
    held_keys = {key for slots, _ in plan for *_, key in slots}
    order = {id(mod): list(mod._parameters) for slots, _ in plan for _, mod, _, _ in slots}
    removed: dict[tuple[int, str], tuple[nn.Module, str, nn.Parameter]] = {}
    for slots, _ in plan:
        for _, mod, name, _ in slots:
            if (id(mod), name) not in removed:  # a module reachable under two names
                removed[(id(mod), name)] = (mod, name, mod._parameters.pop(name))
    placeholders: dict[str, nn.Parameter] = {}
    try:
        load_into(model, _Without(view, held_keys), strict=strict, device=device)
    except BaseException:
        for mod, name, p in removed.values():
            mod._parameters[name] = p
        _reorder(order, removed)
        raise
    for slots, key in plan:
        _, mod, name, _ = slots[0]
        old = removed[(id(mod), name)][2]
        placeholders[key] = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=False)
        placeholders[key]._lazyfp8_held = True  # type: ignore[attr-defined]
        for _, m, n, _ in slots:
            m._parameters[n] = placeholders[key]
    _reorder(order, removed)
    del removed  # the model's own memory for these parameters (if it had any) is freed here

    holder = _Holder(codes_device, device)
    params = [
        _HeldParam(key, holder.source(view._sources[key]), placeholders[key], [(m, n) for _, m, n, _ in slots])
        for slots, key in plan
    ]
    slot_owner = {id(p): [mod_name for mod_name, *_ in slots] for p, (slots, _) in zip(params, plan)}
    buffers = _Buffers()
    units = []
    for root in chosen:
        mine = []
        for p in params:
            slots = [s for s, owner in zip(p.slots, slot_owner[id(p)]) if _under(owner, root)]
            if slots:
                mine.append((p, slots))
        if mine:
            units.append(_Unit(root, model.get_submodule(root), mine, buffers))
    dense = sum(p.placeholder.numel() * p.placeholder.element_size() for p in params)
    return Offloaded(
        modules=[u.name for u in units],
        keys=[p.key for p in params],
        held_bytes=holder.nbytes,
        dense_bytes=dense,
        codes_device=codes_device,
        device=device,
        _units=units,
        _params=params,
        _buffers=buffers,
    )


def _reorder(order: dict[int, list[str]], removed: dict[tuple[int, str], tuple[nn.Module, str, nn.Parameter]]) -> None:
    """Put each module's parameters back in their original order (``named_parameters``, and so
    ``model.device`` and ``state_dict``, follow it)."""
    mods = {id(mod): mod for mod, _, _ in removed.values()}
    for mid, names in order.items():
        params = mods[mid]._parameters
        items = [(n, params.pop(n)) for n in names if n in params]
        rest = list(params.items())
        params.clear()
        params.update(items)
        params.update(rest)


def _choose(
    model: nn.Module, view: LazyFP8View, select: Callable[[str, nn.Module], bool] | None, *, explicit: bool
) -> list[str]:
    """The names of the chosen modules, outermost only, in model order."""
    chosen: list[str] = []
    for name, mod in model.named_modules():
        if any(_under(name, root) for root in chosen):
            continue  # inside a chosen module: its hooks cover this one
        if select is None:
            key = f"{name}.weight" if name else "weight"
            source = view._sources.get(key) if isinstance(mod, nn.Linear) else None
            if source is not None and _is_quantized(source):
                chosen.append(name)
        elif select(name, mod):
            chosen.append(name)
    if explicit and not chosen:
        raise ValueError(f"modules= chose no module of {type(model).__name__}; check the names (model.named_modules())")
    return chosen
