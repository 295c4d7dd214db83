"""Load a checkpoint into a model, including one whose parameters are on the meta device, placed
by a device map (accelerate's planner, ``"cpu"`` and ``"disk"`` offload)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Union

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from ._dtensor import is_dtensor
from ._progress import ProgressSpec, make_progress
from .conversion import TransformersMapping
from .errors import KeyMappingError
from .keymap import KeyMapping, KeyMappingSpec
from .lazy import LazyTensor
from .view import LazyFP8View

_log = logging.getLogger("lazyfp8")

__all__ = ["load_into", "init_empty_weights", "DeviceMapSpec"]

#: ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` (accelerate's planner), or
#: ``{module name: device}`` with devices as accelerate takes them (an int, ``"cpu"``, ``"disk"``,
#: ``"cuda:1"``, a ``torch.device``).
DeviceMapSpec = Union[str, Mapping[str, Union[int, str, torch.device]], None]

_PLANNERS = ("auto", "balanced", "balanced_low_0", "sequential")
_DISK = "disk"

#: A tensor that takes longer than this to read is logged (INFO) with its rate: a cold disk, a
#: network file system or a materialized conversion shows up by name.
SLOW_TENSOR_SECONDS = 5.0


# The patch of nn.Module.register_parameter is installed while any thread is inside
# init_empty_weights, and acts only where the context variable says so: a model built at the same
# time in another thread, or in a task of another context, gets real parameters.
_empty_weights: contextvars.ContextVar[bool] = contextvars.ContextVar("lazyfp8_empty_weights", default=False)
_patch_lock = threading.Lock()
_patch_users = 0
_original_register_parameter = nn.Module.register_parameter  # re-read at each install


def _register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _original_register_parameter(module, name, param)
    if param is not None and _empty_weights.get() and param.device.type != "meta":
        cls = type(param)
        module._parameters[name] = cls(param.to("meta"), requires_grad=param.requires_grad)


@contextlib.contextmanager
def init_empty_weights() -> Iterator[None]:
    """Build a model whose **parameters** are on the meta device while buffers stay real.

    ``with torch.device("meta")`` puts buffers on meta too, and non-persistent buffers (rotary
    ``inv_freq``...) are not in any checkpoint, so nothing could fill them (``load_into``
    re-creates them for a transformers model only). Inside this context each parameter is moved
    to meta as it is registered; its CPU storage is allocated uninitialized and released at once,
    so no parameter memory is ever touched.

    Thread-safe and scoped: only modules built in this thread (or asyncio task) while inside the
    context are affected; other threads building models at the same time get ordinary parameters.
    Contexts nest. ``nn.Module.register_parameter`` is wrapped while any thread is inside one and
    restored when the last one exits.
    """
    global _patch_users, _original_register_parameter
    with _patch_lock:
        if _patch_users == 0:
            _original_register_parameter = nn.Module.register_parameter
            nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]
        _patch_users += 1
    token = _empty_weights.set(True)
    try:
        yield
    finally:
        _empty_weights.reset(token)
        with _patch_lock:
            _patch_users -= 1
            # Someone who patched it after us keeps their patch (and restores ours' original).
            if _patch_users == 0 and nn.Module.register_parameter is _register_parameter:
                nn.Module.register_parameter = _original_register_parameter  # type: ignore[method-assign]


Slot = tuple[nn.Module, str, str, bool]  # (module, attribute, state_dict key, is_param)


def _slots(model: nn.Module) -> dict[int, list[Slot]]:
    """Every parameter and persistent buffer as (module, attribute, state_dict key, is_param),
    grouped by tensor identity so tied parameters form one group."""
    groups: dict[int, list[Slot]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in mod._parameters.items():
            if p is not None:
                groups.setdefault(id(p), []).append((mod, name, prefix + name, True))
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                groups.setdefault(id(b), []).append((mod, name, prefix + name, False))
    return groups


def _meta_leftovers(model: nn.Module, loaded: set[int], recreated: set[int]) -> list[str]:
    names = []
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if t.is_meta and id(t) not in loaded and id(t) not in recreated:
            names.append(name)
    return names


def _error(model: nn.Module, msgs: list[str]) -> RuntimeError:
    return RuntimeError(
        "Error(s) in loading state_dict for {}:\n\t{}".format(type(model).__name__, "\n\t".join(msgs))
    )


def _shown(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_into(
    model: nn.Module,
    source: Mapping[str, Any] | str | os.PathLike[str],
    *,
    strict: bool = True,
    device: str | torch.device | None = None,
    key_mapping: KeyMappingSpec = None,
    progress: ProgressSpec = None,
    device_map: DeviceMapSpec = None,
    max_memory: Mapping[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    **view_kwargs: Any,
) -> _IncompatibleKeys:
    """Load ``source`` into ``model`` one tensor at a time; parameters may be on the meta device.

    A meta parameter is allocated once, in the model's dtype, on ``device`` (default: the view's
    device, else CPU) or where ``device_map`` puts it, and filled straight from the file; any
    other parameter is filled in place (``param.copy_``), so the result is bit-for-bit that of
    ``model.load_state_dict``. Tied parameters (one tensor under several names) are loaded once
    and stay tied; a tied name absent from the checkpoint is not missing when another name of its
    tensor is present.

    A model built the way transformers builds one (under ``torch.device("meta")``) has its
    non-persistent buffers (rotary ``inv_freq``...) on meta too; no checkpoint holds them. For a
    transformers model (a ``PreTrainedModel``, or inside one) they are re-created on their device
    and filled by the model's own initializer, as ``from_pretrained`` does (``initialize_weights``
    with every loaded tensor marked initialized, so only those buffers are written). Any other
    model keeps them on meta, which ``strict`` refuses: build it under :func:`init_empty_weights`.

    All checks run on headers before any data is read: with ``strict=True`` missing or unexpected
    keys, and tensors that would stay on the meta device, raise; a shape mismatch always raises.
    What is skipped (unexpected keys, hidden quantization parameters), materialized (key-mapping
    conversions that are not layouts) or slow is logged on the ``lazyfp8`` logger.

    Args:
        model (`nn.Module`): the model to fill.
        source (`Mapping` or path): a :class:`LazyFP8View`, any state-dict-like Mapping, or a
            checkpoint path (opened with ``view_kwargs`` and closed afterwards).
        strict (`bool`, defaults to `True`): as in ``load_state_dict``.
        device (`str` or `torch.device`, *optional*): where meta parameters are materialized.
        key_mapping (*optional*): for a path or a :class:`LazyFP8View` source, the key mapping to
            apply (see :class:`LazyFP8View`), or ``"auto"``: infer prefix rules that map the
            checkpoint's keys onto this model's (logged at INFO on the ``lazyfp8`` logger;
            ``KeyMappingError`` when no consistent set exists).
        progress (*optional*): ``True`` for a bar on stderr (tqdm), or a callback
            ``(done_bytes, total_bytes, key)`` called after each tensor.
        device_map (`str` or `dict`, *optional*): where each module goes, as in transformers'
            ``from_pretrained``: ``"auto"`` / ``"balanced"`` / ``"balanced_low_0"`` /
            ``"sequential"`` ask accelerate's planner (``infer_auto_device_map``, within
            ``max_memory``, not splitting the model's ``_no_split_modules``), or a dict
            ``{module name: device}`` (``""`` for the whole model). Each meta parameter is
            allocated once on its device; a module mapped to ``"disk"`` has its parameters read
            one at a time, dequantized, and written in accelerate's offload format
            (``offload_weight``, ``index.json``) to ``offload_folder``, and stays on meta; then
            accelerate's ``dispatch_model`` attaches its hooks (``model.hf_device_map`` is the
            map). Needs accelerate; not with ``device``.
        max_memory (`dict`, *optional*): for a planned ``device_map``, accelerate's budget per
            device (``{0: "20GiB", "cpu": "60GiB"}``); what does not fit goes to ``"disk"``.
        offload_folder (`str`, *optional*): where ``"disk"`` modules are written.

    Returns:
        ``NamedTuple`` with ``missing_keys`` and ``unexpected_keys``, as ``load_state_dict``.

    Raises:
        RuntimeError: missing/unexpected keys (strict), shape mismatches, tensors left on meta.
        ValueError: a device map that leaves a tensor without a device, or maps one to ``"disk"``
            without an ``offload_folder``.
        ImportError: ``device_map`` without accelerate.
    """
    if isinstance(source, (str, os.PathLike)):
        mapping = None if key_mapping == "auto" else key_mapping
        with LazyFP8View(source, key_mapping=mapping, **view_kwargs) as view:
            auto = "auto" if key_mapping == "auto" else None
            return load_into(
                model, view, strict=strict, device=device, key_mapping=auto, progress=progress,
                device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
            )  # fmt: skip
    if view_kwargs:
        raise TypeError(f"view options {sorted(view_kwargs)} apply only when source is a path")
    source = _mapped(source, model, key_mapping)
    loaded = _load(
        model, source, strict=strict, device=device, progress=progress,
        device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
    )  # fmt: skip
    if loaded.device_map is not None:
        _dispatch(model, loaded.device_map, offload_folder)
    return loaded.result


def _mapped(source: Mapping[str, Any], model: nn.Module, key_mapping: KeyMappingSpec) -> Mapping[str, Any]:
    if key_mapping is None:
        return source
    if not isinstance(source, LazyFP8View):
        raise TypeError("key_mapping applies to a path or a LazyFP8View source")
    return _auto_mapped(source, model) if key_mapping == "auto" else source.remap(key_mapping)


@dataclasses.dataclass
class _Loaded:
    result: _IncompatibleKeys
    device_map: dict[str, Any] | None  # the resolved map, for dispatch


def _load(
    model: nn.Module,
    source: Mapping[str, Any],
    *,
    strict: bool,
    device: str | torch.device | None,
    progress: ProgressSpec,
    device_map: DeviceMapSpec,
    max_memory: Mapping[int | str, int | str] | None,
    offload_folder: str | os.PathLike[str] | None,
) -> _Loaded:
    """Everything ``load_into`` does but dispatching: checks, reads, buffers re-created."""
    if device_map is not None and device is not None:
        raise TypeError("pass device or device_map, not both (device_map={'': device} is the same as device)")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise TypeError("max_memory and offload_folder apply only with a device_map")
    if device is None:
        device = getattr(source, "device", None) or "cpu"
    device = torch.device(device)

    groups = _slots(model)
    model_keys = {slot[2] for slots in groups.values() for slot in slots}
    plan: list[tuple[torch.Tensor, list[Slot], str]] = []
    missing: list[str] = []
    errors: list[str] = []
    for slots in groups.values():
        present = [key for _, _, key, _ in slots if key in source]
        if not present:
            missing.extend(key for _, _, key, _ in slots)
            continue
        mod, name, _, is_param = slots[0]
        target = (mod._parameters if is_param else mod._buffers)[name]
        shape = tuple(source[present[0]].shape)
        if shape != tuple(target.shape):
            errors.append(
                f"size mismatch for {present[0]}: copying a param with shape {torch.Size(shape)} "
                f"from checkpoint, the shape in current model is {target.shape}."
            )
            continue
        plan.append((target, slots, present[0]))
    unexpected = [k for k in source if k not in model_keys]
    buffers = _RecreatedBuffers.find(model)
    if strict:
        if unexpected:
            errors.insert(0, "Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected)))
        if missing:
            errors.insert(0, "Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)))
        left = _meta_leftovers(model, {id(t) for t, _, _ in plan}, buffers.ids())
        if left:
            errors.append(
                f"{len(left)} tensor(s) are on the meta device and not in the checkpoint ({_shown(left)}); "
                "build the model under lazyfp8.init_empty_weights() so buffers stay real"
            )
    if errors:
        raise _error(model, errors)

    sharded_meta = [key for t, _, key in plan if t.is_meta and is_dtensor(t)]
    if sharded_meta:
        raise RuntimeError(
            f"{len(sharded_meta)} sharded (DTensor) parameter(s) are on the meta device (e.g. "
            f"{sharded_meta[0]!r}); after fully_shard / distribute_tensor call "
            "model.to_empty(device=...) and then load_into"
        )
    placement = _Placement.plan(model, device_map, max_memory, offload_folder, device)
    _log_skipped(source, unexpected, missing, strict)

    total = sum(t.numel() * t.element_size() for t, _, _ in plan)
    started, slowest = time.perf_counter(), (0.0, "")
    with torch.no_grad(), make_progress(progress, total, "loading") as bar:
        for target, slots, key in plan:
            t0 = time.perf_counter()
            value = source[key]
            where = placement.of(slots)
            if where.disk:
                placement.offload(value, target, [k for _, _, k, _ in slots if k in where.disk])
            if where.device is None:
                pass  # on disk only: the parameter stays on meta until accelerate's hook loads it
            elif target.is_meta:
                new = torch.empty(target.shape, dtype=target.dtype, device=where.device)
                _copy(new, value)
                _assign(slots, new, target)
            else:
                _copy(target, value)
            nbytes = target.numel() * target.element_size()
            seconds = time.perf_counter() - t0
            slowest = max(slowest, (seconds, key))
            _log.debug("%s: %d bytes in %.3f s", key, nbytes, seconds)
            if seconds > SLOW_TENSOR_SECONDS:
                _log.info("slow: %s took %.1f s (%.2f GB/s)", key, seconds, nbytes / seconds / 1e9)
            bar.update(nbytes, key)
    placement.finish()
    buffers.recreate(model, placement)
    seconds = time.perf_counter() - started
    if plan:
        _log.info(
            "loaded %d tensor(s), %.1f MiB, in %.2f s (%.2f GB/s); slowest %s (%.2f s)",
            len(plan), total / 2**20, seconds, total / max(seconds, 1e-9) / 1e9, slowest[1], slowest[0],
        )  # fmt: skip
    return _Loaded(_IncompatibleKeys(missing, unexpected), placement.device_map)


def _log_skipped(source: Mapping[str, Any], unexpected: list[str], missing: list[str], strict: bool) -> None:
    if unexpected:
        _log.warning("skipped %d key(s) of the checkpoint the model does not have: %s", len(unexpected), _shown(unexpected))
    if missing and not strict:
        _log.warning("%d key(s) of the model are not in the checkpoint and were left as they are: %s", len(missing), _shown(missing))
    if not isinstance(source, LazyFP8View):
        return
    # The view's catalogue knows which quantization parameters it hides (it has no public name).
    catalogue = getattr(source, "_catalogue", None)
    hidden = [] if catalogue is None else sorted(set(catalogue.pairing.quant_params) - set(catalogue.exposed))
    if hidden:
        _log.info(
            "skipped %d quantization parameter(s) of quantized modules (static activation / KV-cache "
            "scales, e.g. %s); LazyFP8View(..., include_quant_params=True) exposes them",
            len(hidden), _shown(hidden, 3),
        )  # fmt: skip
    if source.materialized:
        biggest = max(source.materialized, key=lambda k: math.prod(source[k].shape))
        mib = math.prod(source[biggest].shape) * source[biggest].dtype.itemsize / 2**20
        _log.info(
            "materialized %d value(s) whose key-mapping conversion is not a layout (read whole, then "
            "converted: a temporary of the value's size, %.1f MiB for %s): %s",
            len(source.materialized), mib, biggest, _shown(source.materialized, 3),
        )  # fmt: skip


# --- device maps: accelerate's planner and offload format ---------------------------------------


def _accelerate() -> Any:
    try:
        import accelerate  # noqa: F401
        from accelerate import utils
    except ImportError as e:
        raise ImportError(f"device_map places modules with accelerate, which is not importable here ({e}); pip install accelerate") from None
    return utils


@dataclasses.dataclass(frozen=True)
class _Where:
    device: torch.device | None  # where the tensor lives (None: only on disk)
    disk: frozenset[str] = frozenset()  # its names that go to the offload folder


class _Placement:
    """Where each tensor of the model goes: one device, or a device map (with disk offload)."""

    def __init__(self, device: torch.device, device_map: dict[str, Any] | None = None, folder: str | None = None):
        self.device = device
        self.device_map = device_map
        self.folder = folder
        self.index: dict[str, Any] = {}
        # module prefixes, longest first: a key belongs to the deepest module the map names
        self._prefixes = sorted(device_map or {}, key=len, reverse=True)
        self._devices = {m: _device(m, d) for m, d in (device_map or {}).items()}

    @classmethod
    def plan(
        cls,
        model: nn.Module,
        device_map: DeviceMapSpec,
        max_memory: Mapping[int | str, int | str] | None,
        offload_folder: str | os.PathLike[str] | None,
        device: torch.device,
    ) -> "_Placement":
        """The placement, every key checked against the map before anything is read."""
        if device_map is None:
            return cls(device)
        utils = _accelerate()
        if isinstance(device_map, str):
            if device_map not in _PLANNERS:
                raise ValueError(f"device_map must be a dict or one of {', '.join(map(repr, _PLANNERS))}; got {device_map!r}")
            no_split = list(getattr(model, "_no_split_modules", None) or []) or None
            if device_map == "sequential":
                budget = utils.get_max_memory(dict(max_memory) if max_memory is not None else None)
            else:
                budget = utils.get_balanced_memory(
                    model, max_memory=dict(max_memory) if max_memory is not None else None,
                    no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0",
                )  # fmt: skip
            resolved = dict(utils.infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split))
            _log.info("device_map=%r planned by accelerate: %s", device_map, resolved)
        elif isinstance(device_map, Mapping):
            resolved = dict(device_map)
        else:
            raise TypeError(f"device_map must be a dict or one of {', '.join(map(repr, _PLANNERS))}; got {device_map!r}")
        folder = None if offload_folder is None else os.fspath(offload_folder)
        placement = cls(device, resolved, folder)
        names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
        unplaced = [k for k in names if placement._module_of(k) is None]
        if unplaced:
            raise ValueError(
                f"device_map places no module holding {len(unplaced)} tensor(s) ({_shown(unplaced)}); "
                "add their modules (or '' for everything else) to the map"
            )
        if _DISK in resolved.values():
            if folder is None:
                disk = [m for m, d in resolved.items() if d == _DISK]
                raise ValueError(
                    f"device_map sends {_shown(disk)} to 'disk': pass offload_folder=... for accelerate's "
                    "offload files (one per parameter, dequantized)"
                )
            os.makedirs(folder, exist_ok=True)
        return placement

    def _module_of(self, key: str) -> str | None:
        for prefix in self._prefixes:
            if prefix == "" or key == prefix or key.startswith(prefix + "."):
                return prefix
        return None

    def device_of(self, key: str) -> torch.device | str:
        """``key``'s device, or ``"disk"``."""
        if self.device_map is None:
            return self.device
        return self._devices[self._module_of(key)]  # type: ignore[index]

    def of(self, slots: list[Slot]) -> _Where:
        """Where one tensor (all its names) goes: the device of its first name not on disk, and
        the names whose modules are on disk. A buffer is never offloaded (accelerate keeps them
        in memory unless asked): on disk it stays on the CPU."""
        devices = [(key, self.device_of(key), is_param) for _, _, key, is_param in slots]
        real = [d for _, d, _ in devices if d != _DISK]
        disk = frozenset(k for k, d, is_param in devices if d == _DISK and is_param)
        if real:
            return _Where(real[0], disk)  # type: ignore[arg-type]
        return _Where(None if disk else torch.device("cpu"), disk)

    def offload(self, value: Any, target: torch.Tensor, keys: list[str]) -> None:
        """Read ``value`` into a temporary of the parameter's dtype and write it under each of
        ``keys`` with accelerate's ``offload_weight`` (one ``.dat`` file each)."""
        utils = _accelerate()
        tmp = torch.empty(target.shape, dtype=target.dtype)
        _copy(tmp, value)
        for key in sorted(keys):
            utils.offload_weight(tmp, key, self.folder, index=self.index)

    def finish(self) -> None:
        if self.index:
            _accelerate().save_offload_index(self.index, self.folder)
            _log.info("offloaded %d parameter(s) to %s", len(self.index), self.folder)

    def buffer_device(self, key: str) -> torch.device:
        d = self.device_of(key)
        return torch.device("cpu") if d == _DISK else d  # type: ignore[return-value]


def _device(module: str, d: Any) -> torch.device | str:
    """A device map's value as a device (an int is an accelerator index, as in accelerate)."""
    if d == _DISK:
        return _DISK
    try:
        return torch.device(d)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device_map puts {module or 'the model'!r} on {d!r}, which is not a device here ({e})") from None


def _dispatch(model: nn.Module, device_map: dict[str, Any], offload_folder: str | os.PathLike[str] | None) -> None:
    """accelerate's hooks: modules on ``"cpu"`` (with an accelerator) or ``"disk"`` are brought to
    the execution device for their forward; ``model.hf_device_map`` is set."""
    from accelerate import dispatch_model

    skip = getattr(model, "_skip_keys_device_placement", None)
    dispatch_model(
        model,
        device_map=device_map,
        offload_dir=None if offload_folder is None else os.fspath(offload_folder),
        skip_keys=skip,
    )


# --- non-persistent buffers of models built on meta ----------------------------------------------


class _RecreatedBuffers:
    """The meta non-persistent buffers a transformers model's own initializer re-creates."""

    def __init__(self, owners: list[tuple[str, nn.Module]], buffers: list[tuple[str, nn.Module, str, torch.Tensor]]):
        self.owners = owners  # (name, the outermost PreTrainedModel holding such buffers)
        self.buffers = buffers  # (full name, module, attribute, meta buffer)

    def ids(self) -> set[int]:
        return {id(b) for _, _, _, b in self.buffers}

    @classmethod
    def find(cls, model: nn.Module) -> "_RecreatedBuffers":
        transformers = sys.modules.get("transformers")  # no transformers model without it imported
        base = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
        if base is None:
            return cls([], [])
        owners: dict[str, nn.Module] = {}
        buffers = []
        for mod_name, mod in model.named_modules():
            for name, b in mod._buffers.items():
                if b is None or not b.is_meta or name not in mod._non_persistent_buffers_set:
                    continue
                owner = _outermost(model, mod_name, base)
                if owner is None:
                    continue
                owners.setdefault(owner[0], owner[1])
                buffers.append((f"{mod_name}.{name}" if mod_name else name, mod, name, b))
        return cls(list(owners.items()), buffers)

    def recreate(self, model: nn.Module, placement: _Placement) -> None:
        """As transformers' ``_move_missing_keys_from_meta_to_device`` then
        ``_initialize_missing_keys``: each buffer allocated on its module's device, every other
        tensor marked ``_is_hf_initialized``, then ``initialize_weights()``. Float buffers start
        as NaN so one the initializer does not write is an error, not garbage."""
        if not self.buffers:
            return
        mine = self.ids()
        for _, owner in self.owners:
            for t in [*owner.parameters(), *owner.buffers()]:
                if id(t) not in mine:
                    t._is_hf_initialized = True  # type: ignore[attr-defined]
        new = []
        for full, mod, name, b in self.buffers:
            fill = math.nan if b.dtype.is_floating_point else 0
            mod._buffers[name] = torch.full(b.shape, fill, dtype=b.dtype, device=placement.buffer_device(full))
            new.append((full, mod._buffers[name]))
        for _, owner in self.owners:
            owner.initialize_weights()
        left = [full for full, t in new if t.is_floating_point() and bool(torch.isnan(t).any())]
        if left:
            raise RuntimeError(
                f"{type(model).__name__}'s initializer (transformers' initialize_weights) left "
                f"{len(left)} non-persistent buffer(s) unset ({_shown(left)}); build the model under "
                "lazyfp8.init_empty_weights() so buffers keep the values computed at construction"
            )
        _log.info("re-created %d non-persistent buffer(s) with the model's initializer: %s", len(new), _shown([f for f, _ in new], 4))


def _outermost(model: nn.Module, mod_name: str, base: type) -> tuple[str, nn.Module] | None:
    """The outermost module of type ``base`` on the path from ``model`` to ``mod_name``."""
    parts = mod_name.split(".") if mod_name else []
    for i in range(len(parts) + 1):
        name = ".".join(parts[:i])
        mod = model.get_submodule(name)
        if isinstance(mod, base):
            return name, mod
    return None


def _auto_mapped(view: LazyFP8View, model: nn.Module) -> LazyFP8View:
    """``view`` under the mapping that fits ``model``: for a transformers model, the conversion
    mapping ``from_pretrained`` would apply (fused experts included) when it leaves fewer of the
    model's keys missing; otherwise prefix rules inferred from the two key sets."""
    model_keys = set(model.state_dict(keep_vars=True).keys())
    theirs = TransformersMapping.for_model(model)
    converted = view.remap(theirs) if theirs is not None else None
    try:
        inferred = KeyMapping.infer(view.disk_keys(), model_keys)
    except KeyMappingError:
        if converted is None:
            raise
        best, how = converted, "transformers' conversion mapping for this model"
    else:
        best, how = view.remap(inferred), "; ".join(inferred.describe()) or "identity"
        if converted is not None and len(model_keys - set(converted)) < len(model_keys - set(best)):
            best, how = converted, "transformers' conversion mapping for this model"
    _log.info("key_mapping='auto' chose: %s", how)
    return best


def _copy(dst: torch.Tensor, value: Any) -> None:
    if isinstance(value, LazyTensor):
        value.copy_into(dst)
    else:
        dst.copy_(value)


def _assign(slots: list[Slot], new: torch.Tensor, old: torch.Tensor) -> None:
    if isinstance(old, nn.Parameter):
        new = type(old)(new, requires_grad=old.requires_grad)
    for mod, name, _, is_param in slots:
        (mod._parameters if is_param else mod._buffers)[name] = new
