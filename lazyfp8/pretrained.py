"""``from_pretrained``: a transformers model from a quantized checkpoint in one line, built and
filled the way transformers' own ``from_pretrained`` does, one tensor at a time.

transformers is asked for every fact: the config class (``AutoConfig`` or the model class's own),
the concrete class behind an ``Auto*`` class, the contexts it builds a model in (meta device,
dtype, weights not tied yet), the modules it keeps in float32, the conversion mapping of models
that fuse experts, how tied weights are tied, and how non-persistent buffers are initialized.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._progress import ProgressSpec
from .keymap import KeyMappingSpec
from .load import DeviceMapSpec, _dispatch, _load, _mapped
from .storage.dtypes import TARGETS
from .view import LazyFP8View

__all__ = ["from_pretrained"]

_log = logging.getLogger("lazyfp8")


def from_pretrained(
    model_cls: Any,
    path_or_repo: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device | None = None,
    device_map: DeviceMapSpec = None,
    max_memory: Mapping[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    key_mapping: KeyMappingSpec = "auto",
    strict: bool = True,
    progress: ProgressSpec = None,
    **view_kwargs: Any,
) -> nn.Module:
    """A transformers model of ``model_cls`` with the checkpoint's weights, dequantized.

    ``lazyfp8.from_pretrained(AutoModelForCausalLM, path)`` is transformers'
    ``AutoModelForCausalLM.from_pretrained(path, dtype=...)`` of the quantized checkpoint,
    dequantized on load, with the same parameters and buffers bit for bit, and the memory of
    :func:`load_into`: each parameter allocated once and read straight from the file. Steps:
    the config from ``config.json`` beside the checkpoint (``AutoConfig``, or the class's
    ``config_class``), its ``quantization_config`` dropped (the model is not quantized); the model
    class (an ``Auto*`` class picks it from the config) built on the meta device in transformers'
    own init contexts (``dtype``, modules it keeps in float32 in float32); tied weights tied as
    ``from_pretrained`` ties them (to whichever of the pair the checkpoint holds); :func:`load_into`
    with ``key_mapping`` (by default ``"auto"``: transformers' conversion mapping for models
    whose checkpoints store experts apart, or inferred prefix rules); non-persistent buffers
    (rotary tables) re-created by the model's initializer; ``generation_config.json`` read when
    present; ``eval()``; with a ``device_map``, accelerate's hooks last.

    Args:
        model_cls: a transformers model class (``LlamaForCausalLM``) or ``Auto*`` class
            (``AutoModelForCausalLM``).
        path_or_repo (`str` or `os.PathLike`): the checkpoint, as :class:`LazyFP8View` takes it
            (its ``config.json`` is read from the same directory).
        dtype (`torch.dtype` or ``"auto"``, defaults to `torch.bfloat16`): the model's dtype and
            what quantized weights dequantize to; ``"auto"`` takes ``config.json``'s ``dtype``.
        device (`str` or `torch.device`, *optional*): where parameters are allocated (default:
            the CPU); not with ``device_map``.
        device_map, max_memory, offload_folder: as in :func:`load_into` (accelerate's planner,
            ``"cpu"`` and ``"disk"`` offload).
        key_mapping (*optional*, defaults to ``"auto"``): as in :func:`load_into`; ``None``
            keeps on-disk names.
        strict (`bool`, defaults to `True`): missing or unexpected keys raise (after tying:
            a tied name the checkpoint does not store is not missing).
        progress (*optional*): as in :func:`load_into`.
        **view_kwargs: for :class:`LazyFP8View` (``scheme``, ``block_size``, ``threads``...;
            ``revision``, ``cache_dir``... where it takes them).

    Returns:
        The model, in eval mode.

    Raises:
        ValueError: no ``config.json`` beside the checkpoint, or a config ``model_cls`` has no
            model class for.
        ImportError: transformers is not installed.
    """
    transformers = _transformers()
    if "device" in view_kwargs:
        raise TypeError("from_pretrained's device is where parameters go; the view's device follows it")
    view_dtype = torch.bfloat16 if dtype == "auto" else dtype
    view = LazyFP8View(path_or_repo, dtype=view_dtype, **view_kwargs)
    try:
        if dtype == "auto":
            dtype = _config_dtype(view)
            if dtype != view_dtype:
                view.close()
                view = LazyFP8View(path_or_repo, dtype=dtype, **view_kwargs)
        if dtype not in TARGETS:
            raise ValueError(f"dtype must be one of {', '.join(map(str, TARGETS))} or 'auto'; got {dtype}")
        config = _config(transformers, model_cls, view)
        config.name_or_path = os.fspath(path_or_repo)
        model_class = _model_class(model_cls, config)
        model = _build(model_class, config, dtype)
        source = _mapped(view, model, key_mapping)
        present = set(source)
        _tie(model, present)
        loaded = _load(
            model, source, strict=strict, device=device, progress=progress,
            device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
        )  # fmt: skip
        _retie_both_stored(model, present)
        _generation_config(transformers, model, view)
    finally:
        view.close()
    model.eval()
    if loaded.device_map is not None:
        _dispatch(model, loaded.device_map, offload_folder)
    return model


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            f"lazyfp8.from_pretrained builds transformers models, and transformers is not importable here ({e}); "
            "pip install 'transformers>=5', or build the model yourself and call lazyfp8.load_into"
        ) from None
    return transformers


def _root(view: LazyFP8View) -> str:
    """The directory the view read ``config.json`` from: the checkpoint directory, or for a Hub
    repo id the snapshot it resolved to (``view.path`` stays the repo id). The view keeps it in
    its checkpoint record, which has no public name."""
    return view._checkpoint.root


def _config_dtype(view: LazyFP8View) -> torch.dtype:
    """``dtype="auto"``: ``config.json``'s dtype, else the dtype of the checkpoint's tensors that
    are not quantized (as transformers falls back to the stored weights' dtype)."""
    cfg = view.config or {}
    name = cfg.get("dtype", cfg.get("torch_dtype"))
    if name is None:
        stored = (view.info(k) for k in view)
        found = next((i.dtype for i in stored if i.codec is None and i.dtype in TARGETS), None)
        if found is not None:
            return found
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if dtype not in TARGETS:
        raise ValueError(
            f"{_root(view)}: dtype='auto' takes config.json's dtype, which is {name!r}; pass dtype=torch.bfloat16 (or another)"
        )
    return dtype  # type: ignore[return-value]


def _config(transformers: Any, model_cls: Any, view: LazyFP8View) -> Any:
    """The config as transformers' ``from_pretrained`` reads it, from the view's directory."""
    root = _root(view)
    if view.config is None:
        raise ValueError(
            f"{root} has no config.json: from_pretrained builds the model from it; build the model "
            "yourself (under lazyfp8.init_empty_weights()) and call lazyfp8.load_into"
        )
    if _is_auto(model_cls):
        config = transformers.AutoConfig.from_pretrained(root)
    else:
        config_class = getattr(model_cls, "config_class", None)
        if config_class is None:
            raise ValueError(f"{model_cls.__name__} has no config_class: pass a transformers model class or an Auto* class")
        config = config_class.from_pretrained(root)
    # Dequantized on load, the model is not a quantized one (transformers' dequantizing
    # quantizer removes it too, in remove_quantization_config).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _is_auto(model_cls: Any) -> bool:
    return hasattr(model_cls, "_model_mapping")


def _model_class(model_cls: Any, config: Any) -> Any:
    if not _is_auto(model_cls):
        return model_cls
    from transformers.models.auto.auto_factory import _get_model_class

    if type(config) not in model_cls._model_mapping:
        raise ValueError(
            f"{model_cls.__name__} has no model class for {type(config).__name__} (model_type "
            f"{getattr(config, 'model_type', None)!r}); pass the model class itself"
        )
    return _get_model_class(config, model_cls._model_mapping)


def _build(model_class: Any, config: Any, dtype: torch.dtype) -> nn.Module:
    """``model_class(config)`` on the meta device, in transformers' own init contexts."""
    from transformers.utils.generic import ContextManagers

    config.dtype = dtype
    for name in getattr(config, "sub_configs", {}):
        sub = getattr(config, name, None)
        if sub is not None:
            sub.dtype = dtype
    get_contexts = getattr(model_class, "get_init_context", None)
    contexts = None
    if get_contexts is not None:
        params = inspect.signature(get_contexts).parameters
        known = {"dtype": dtype, "is_quantized": False, "_is_ds_init_called": False, "allow_all_kernels": None}
        if set(params) <= set(known):
            contexts = get_contexts(**{k: known[k] for k in params})
    if contexts is None:  # another transformers: the meta device and the dtype, the essentials
        contexts = [torch.device("meta"), _default_dtype(dtype)]
    with ContextManagers(contexts):
        model = model_class(config)
    _keep_in_fp32(model, dtype)
    return model


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):  # noqa: ANN202
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _keep_in_fp32(model: nn.Module, dtype: torch.dtype) -> None:
    """The parameters transformers keeps in float32 at this dtype (``_keep_in_fp32_modules``),
    made float32 on meta so they are allocated as such."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return
    from transformers.core_model_loading import build_glob_alternation

    alternation, group_of, _ = build_glob_alternation(list(plan))
    for name, p in list(model.named_parameters()):
        m = alternation.search(name)
        if m is not None and p.is_meta:
            keep = plan[group_of[m.lastgroup]]
            parent, _, attr = name.rpartition(".")
            mod = model.get_submodule(parent)
            mod._parameters[attr] = type(p)(p.to(keep), requires_grad=p.requires_grad)


def _tie(model: nn.Module, present: set[str]) -> None:
    """Tie before loading, as ``from_pretrained`` ties after it: each tied pair to whichever the
    checkpoint holds (transformers' ``tie_weights(missing_keys=...)``, which swaps the pair when
    only the target is stored); a pair stored twice stays untied until both are read."""
    if not hasattr(model, "tie_weights"):
        return
    missing = set(model.state_dict(keep_vars=True)) - present
    model.tie_weights(missing_keys=missing, recompute_mapping=False)


def _retie_both_stored(model: nn.Module, present: set[str]) -> None:
    """A tied pair the checkpoint stores twice: transformers ties it if the values are equal and
    warns otherwise; the same call, now that both are loaded."""
    pairs = getattr(model, "all_tied_weights_keys", None) or {}
    if any(a in present and b in present for a, b in pairs.items()):
        model.tie_weights(missing_keys=set(), recompute_mapping=False)


def _generation_config(transformers: Any, model: nn.Module, view: LazyFP8View) -> None:
    """``generation_config.json`` beside the checkpoint, as ``from_pretrained`` reads it."""
    can_generate = getattr(model, "can_generate", None)
    path = os.path.join(_root(view), "generation_config.json")
    if can_generate is None or not can_generate() or not os.path.isfile(path):
        return
    model.generation_config = transformers.GenerationConfig.from_pretrained(_root(view))
