"""Load a checkpoint into a model, including one whose parameters are on the meta device."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

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

__all__ = ["load_into", "init_empty_weights"]


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
    ``inv_freq``...) are not in any checkpoint, so nothing could fill them. Inside this context
    each parameter is moved to meta as it is registered; its CPU storage is allocated uninitialized
    and released at once, so no parameter memory is ever touched.

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


def _slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str, bool]]]:
    """Every parameter and persistent buffer as (module, attribute, state_dict key, is_param),
    grouped by tensor identity so tied parameters form one group."""
    groups: dict[int, list[tuple[nn.Module, str, str, bool]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in mod._parameters.items():
            if p is not None:
                groups.setdefault(id(p), []).append((mod, name, prefix + name, True))
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                groups.setdefault(id(b), []).append((mod, name, prefix + name, False))
    return groups


def _meta_leftovers(model: nn.Module, loaded: set[int]) -> list[str]:
    names = []
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if t.is_meta and id(t) not in loaded:
            names.append(name)
    return names


def _error(model: nn.Module, msgs: list[str]) -> RuntimeError:
    return RuntimeError(
        "Error(s) in loading state_dict for {}:\n\t{}".format(type(model).__name__, "\n\t".join(msgs))
    )


def load_into(
    model: nn.Module,
    source: Mapping[str, Any] | str | os.PathLike[str],
    *,
    strict: bool = True,
    device: str | torch.device | None = None,
    key_mapping: KeyMappingSpec = None,
    progress: ProgressSpec = None,
    **view_kwargs: Any,
) -> _IncompatibleKeys:
    """Load ``source`` into ``model`` one tensor at a time; parameters may be on the meta device.

    A meta parameter is allocated once, in the model's dtype, on ``device`` (default: the view's
    device, else CPU), and filled straight from the file; any other parameter is filled in place
    (``param.copy_``), so the result is bit-for-bit that of ``model.load_state_dict``. Tied
    parameters (one tensor under several names) are loaded once and stay tied; a tied name absent
    from the checkpoint is not missing when another name of its tensor is present.

    All checks run on headers before any data is read: with ``strict=True`` missing or unexpected
    keys, and tensors that would stay on the meta device, raise; a shape mismatch always raises.

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

    Returns:
        ``NamedTuple`` with ``missing_keys`` and ``unexpected_keys``, as ``load_state_dict``.
    """
    if isinstance(source, (str, os.PathLike)):
        mapping = None if key_mapping == "auto" else key_mapping
        with LazyFP8View(source, key_mapping=mapping, **view_kwargs) as view:
            auto = "auto" if key_mapping == "auto" else None
            return load_into(model, view, strict=strict, device=device, key_mapping=auto, progress=progress)
    if view_kwargs:
        raise TypeError(f"view options {sorted(view_kwargs)} apply only when source is a path")
    if key_mapping is not None:
        if not isinstance(source, LazyFP8View):
            raise TypeError("key_mapping applies to a path or a LazyFP8View source")
        source = _auto_mapped(source, model) if key_mapping == "auto" else source.remap(key_mapping)
    if device is None:
        device = getattr(source, "device", None) or "cpu"
    device = torch.device(device)

    groups = _slots(model)
    model_keys = {slot[2] for slots in groups.values() for slot in slots}
    plan: list[tuple[torch.Tensor, list[tuple[nn.Module, str, str, bool]], str]] = []
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
    if strict:
        if unexpected:
            errors.insert(0, "Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected)))
        if missing:
            errors.insert(0, "Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)))
        left = _meta_leftovers(model, {id(t) for t, _, _ in plan})
        if left:
            shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
            errors.append(
                f"{len(left)} tensor(s) are on the meta device and not in the checkpoint ({shown}); "
                "build the model under lazyfp8.init_empty_weights() so buffers stay real"
            )
    if errors:
        raise _error(model, errors)

    total = sum(t.numel() * t.element_size() for t, _, _ in plan)
    sharded_meta = [key for t, _, key in plan if t.is_meta and is_dtensor(t)]
    if sharded_meta:
        raise RuntimeError(
            f"{len(sharded_meta)} sharded (DTensor) parameter(s) are on the meta device (e.g. "
            f"{sharded_meta[0]!r}); after fully_shard / distribute_tensor call "
            "model.to_empty(device=...) and then load_into"
        )
    with torch.no_grad(), make_progress(progress, total, "loading") as bar:
        for target, slots, key in plan:
            value = source[key]
            if target.is_meta:
                new = torch.empty(target.shape, dtype=target.dtype, device=device)
                _copy(new, value)
                _assign(slots, new, target)
            else:
                _copy(target, value)
            bar.update(target.numel() * target.element_size(), key)
    return _IncompatibleKeys(missing, unexpected)


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


def _assign(slots: list[tuple[nn.Module, str, str, bool]], new: torch.Tensor, old: torch.Tensor) -> None:
    if isinstance(old, nn.Parameter):
        new = type(old)(new, requires_grad=old.requires_grad)
    for mod, name, _, is_param in slots:
        (mod._parameters if is_param else mod._buffers)[name] = new
