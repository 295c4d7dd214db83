"""Tools for testing code that reads FP8 checkpoints: yours, or lazyfp8 itself.

Write a checkpoint laid out the way released FP8 checkpoints are, compute independently what
any correct loader must produce from it, and compare the result bit for bit::

    import torch
    from lazyfp8 import testing

    state = {"proj.weight": torch.randn(256, 384), "norm.weight": torch.ones(384)}
    testing.write_checkpoint(state, "ckpt/", scheme="block", block_size=(128, 128), max_shard_size="100KB")
    expected = testing.reference_state_dict("ckpt/", dtype=torch.bfloat16)
    testing.assert_bitwise_equal(my_loader("ckpt/"), expected)

- :func:`write_checkpoint` writes through :func:`lazyfp8.save`, the library's one writer, with
  the few options a test needs on top (an exact set of quantized keys, Mistral-3's static
  activation scales, a ``quantization_config`` given verbatim).
- :func:`reference_state_dict` reads the files with ``safetensors.torch.load_file`` (not
  lazyfp8's reader) and dequantizes with :func:`reference`, the formula every loader must match.
- :func:`assert_bitwise_equal` compares tensors or state dicts by their raw bits (NaN payloads
  included) and says which key and element differ.

Nothing here is on the load path, and everything here is slow and memory-hungry on purpose
(whole files in memory, float32 copies): it is for checking, not loading.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import torch

from .formats.quantize import quantize as _quantize
from .formats.schemes import Granularity, PerTensor
from .keymap import KeyMapping, KeyMappingSpec
from .writer import DEFAULT_EXCLUDE, SaveResult, save

__all__ = ["write_checkpoint", "reference_state_dict", "reference", "quantize_per_tensor", "assert_bitwise_equal"]

#: Which keys to quantize: a predicate on the runtime key, one regex, or several (any matches).
Selector = Union[Callable[[str], bool], str, Iterable[str]]

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
#: Scale dtypes that hold ue8m0 exponent bytes ``b``, meaning ``2 ** (b - 127)``.
_EXPONENT_SCALES = (torch.uint8, torch.float8_e8m0fnu)
#: Static scales beside an FP8 weight (``<module>.input_scale``) and KV-cache scales on it or on
#: its parent (``self_attn.k_scale``): quantization parameters, not weights, so a loader keys
#: them away with the weight's scale.
_STATIC_SCALES = ("activation_scale", "input_scale", "input_scale_ub")
_KV_SCALES = ("k_scale", "v_scale")


# --------------------------------------------------------------------------------------------
# The formula
# --------------------------------------------------------------------------------------------
def reference(
    w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, block: tuple[int, int] | None = None
) -> torch.Tensor:
    """The reference dequantization ``(w.to(float32) * s.to(float32)).to(dtype)``.

    Args:
        w: FP8 codes (any shape).
        s: float scales (multipliers, not exponent bytes): one value (0-d or one element) for a
            per-tensor scale, or a grid over ``w``'s ``[rows, cols]`` view, ``rows`` being the
            product of all dimensions but the last.
        dtype: the result's dtype; the product is computed in float32 and rounded once.
        block: the block size ``(b0, b1)`` of a grid: element ``[i, j]`` uses
            ``s[i // b0, j // b1]`` (blocks at the ragged edges are partial). A per-channel
            ``[rows, 1]`` scale is the block ``(1, cols)``. A 3-D or deeper ``w`` with a grid is
            a stack of matrices, each tiled on its own (the grid holds one per matrix).

    Returns:
        A new tensor of ``w.shape`` and ``dtype``.
    """
    wf = w.to(torch.float32)
    sf = s.to(torch.float32)
    if w.numel() == 0:  # an empty weight has an empty grid, which no broadcast below accepts
        return wf.to(dtype)
    if block is not None and sf.numel() > 1 and w.dim() >= 3:
        # a stack of matrices, each tiled on its own
        mats = wf.reshape(-1, *w.shape[-2:])
        grids = sf.reshape(mats.shape[0], -1, sf.shape[-1])
        stacked = torch.stack([reference(m, g, torch.float32, block) for m, g in zip(mats, grids)])
        return stacked.reshape(w.shape).to(dtype)
    if block is not None and sf.numel() > 1:
        rows = math.prod(w.shape[:-1]) if w.dim() > 1 else 1
        cols = w.shape[-1]
        sf = sf.reshape(-(-rows // block[0]), -1)
        sf = sf.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
        return (wf.reshape(rows, cols) * sf).reshape(w.shape).to(dtype)
    if sf.numel() == 1:
        sf = sf.reshape(())
    return (wf * sf).to(dtype)


def quantize_per_tensor(
    w: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lazyfp8.quantize(w, PerTensor(), fp8_dtype)``: codes of ``w.shape`` and a 0-d float32
    scale ``amax(|w|) / fp8_max``, exactly what :func:`write_checkpoint` stores for a
    per-tensor weight (so ``reference(*quantize_per_tensor(w), dtype)`` is what loading it gives)."""
    return _quantize(w, PerTensor(), fp8_dtype)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _selector(quantize: Selector) -> Callable[[str], bool]:
    if callable(quantize):
        return quantize
    patterns = [re.compile(p) for p in ([quantize] if isinstance(quantize, str) else quantize)]
    return lambda key: any(p.search(key) for p in patterns)


def _default_selector(key: str, value: torch.Tensor) -> bool:
    """``lazyfp8.save``'s default for a state dict: 2-D ``*weight`` tensors, minus
    ``DEFAULT_EXCLUDE`` (the output head and embeddings)."""
    excluded = any(re.search(p, key) for p in DEFAULT_EXCLUDE)
    return not excluded and key.endswith("weight") and value.dim() == 2


def write_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    scheme: Granularity | str | None = "per-tensor",
    block_size: tuple[int, int] | None = None,
    quantize: Selector | None = None,
    key_mapping: KeyMappingSpec = None,
    format: str = "fp8",
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    ue8m0: bool = False,
    activation_scales: bool = False,
    max_shard_size: int | str = "5GB",
    config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> SaveResult:
    """Write ``state_dict`` to directory ``path`` as an FP8 safetensors checkpoint, with
    :func:`lazyfp8.save`.

    The arguments ``scheme``, ``block_size``, ``key_mapping``, ``format``, ``fp8_dtype``,
    ``ue8m0``, ``max_shard_size`` and ``overwrite`` are :func:`lazyfp8.save`'s. What this adds:

    Args:
        state_dict: runtime key -> tensor. Floating tensors not quantized are written as they
            are (convert them first for another dtype).
        scheme: ``"per-tensor"`` (a 0-d float32 ``_scale_inv``), ``"per-channel"``, ``"block"``
            (with ``block_size``), ``"mx"``, a granularity object, or ``None``: quantize nothing,
            write every tensor as given (already-quantized codes and scales included).
        quantize: exactly which runtime keys to store as FP8: a predicate, a regex or regexes
            (searched). Unlike ``lazyfp8.save``, nothing is excluded from it: ``lm_head`` and
            embeddings are quantized when it picks them. Default: ``lazyfp8.save``'s (2-D
            ``*weight`` tensors but the output head and embeddings). Tensors that are not
            floating or already 8-bit are never quantized.
        key_mapping: the disk -> runtime mapping a view of the result would use (for example
            ``"mistral3"``): keys are written under its inverse, so
            ``LazyFP8View(path, key_mapping=key_mapping)`` has ``state_dict``'s keys.
        activation_scales: add a float32 ``<module>.activation_scale`` of 1.0 beside every
            quantized weight, as Mistral-3's releases store (static activation scheme). A loader
            must key them away with the weight's scale.
        max_shard_size: the largest shard, as ``"5GB"`` or bytes: a small value writes several
            shards and a ``model.safetensors.index.json``.
        config: written as ``config.json``. A ``quantization_config`` in it is written as given
            (a test may need fields save does not write, such as ``activation_scheme: static``);
            without one, ``lazyfp8.save`` adds the one that describes what it wrote.

    Returns:
        ``lazyfp8.save``'s :class:`~lazyfp8.SaveResult`: the files, the quantized runtime keys,
        ``key_map`` (runtime -> on-disk key).

    Raises:
        ValueError, FileExistsError, lazyfp8.writer.SaveError: as ``lazyfp8.save``.
    """
    chosen = None if quantize is None else _selector(quantize)
    tensors = dict(state_dict)
    if scheme is None:
        selected: list[str] = []
    else:
        selected = [
            k
            for k, v in tensors.items()
            if v.dtype.is_floating_point and v.dtype.itemsize > 1 and (chosen(k) if chosen else _default_selector(k, v))
        ]
    if activation_scales:
        for key in selected:
            tensors[key.rpartition(".")[0] + ".activation_scale"] = torch.tensor(1.0)
    verbatim = config is not None and "quantization_config" in config
    qset = set(selected)
    result = save(
        tensors,
        path,
        scheme=scheme,
        block_size=block_size,
        fp8_dtype=fp8_dtype,
        format=format,
        key_mapping=key_mapping,
        quantize=qset.__contains__,
        exclude=(),
        ue8m0=ue8m0,
        max_shard_size=max_shard_size,
        config=None if verbatim or config is None else dict(config),
        overwrite=overwrite,
    )
    if verbatim:
        with open(os.path.join(result.path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    return result


# --------------------------------------------------------------------------------------------
# The reference load
# --------------------------------------------------------------------------------------------
def _files(path: str | os.PathLike[str]) -> list[str]:
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no *.safetensors file")
    return files


def _config_block(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``quantization_config.weight_block_size`` of the ``config.json`` beside the files."""
    path = os.fspath(path)
    config = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    if not os.path.exists(config):
        return None
    with open(config) as f:
        block = (json.load(f).get("quantization_config") or {}).get("weight_block_size")
    return None if block is None else (int(block[0]), int(block[1]))


def _multipliers(scale: torch.Tensor) -> torch.Tensor:
    """A stored scale as float32 multipliers: ue8m0 bytes ``b`` mean ``2 ** (b - 127)``."""
    if scale.dtype in _EXPONENT_SCALES:
        return torch.exp2(scale.view(torch.uint8).to(torch.float32) - 127.0)
    return scale.to(torch.float32)


def reference_state_dict(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.bfloat16,
    block_size: tuple[int, int] | None = None,
    key_mapping: KeyMappingSpec = None,
) -> dict[str, torch.Tensor]:
    """What every correct loader must produce from the checkpoint at ``path``, computed without
    lazyfp8's reader: every ``*.safetensors`` file read whole with ``safetensors.torch.load_file``,
    every FP8 tensor dequantized with :func:`reference`.

    An FP8 tensor ``K``'s scale is ``K + "_scale_inv"`` (HF fp8, DeepSeek, Mistral) or
    ``K + "_scale"`` (``<module>.weight_scale``: compressed-tensors, ModelOpt); ue8m0 exponent
    bytes (``uint8`` or ``float8_e8m0fnu``) mean ``2 ** (b - 127)``. The scales, and the static
    activation and KV-cache scales of FP8 modules (``activation_scale``, ``input_scale``,
    ``k_scale``...), are not in the result, as they are not in a :class:`lazyfp8.LazyFP8View`.

    Args:
        path: a checkpoint directory or one ``.safetensors`` file.
        dtype: the dtype of the dequantized tensors; every other tensor keeps its stored dtype.
        block_size: the block size of grid scales. Default: ``config.json``'s
            ``quantization_config.weight_block_size``; an ``[rows, 1]`` scale without either is
            per-channel.
        key_mapping: disk -> runtime renaming of the result's keys (a preset such as
            ``"mistral3"``, a dict of regexes, a :class:`lazyfp8.KeyMapping`).

    Returns:
        runtime key -> tensor, in file and key order.

    Raises:
        ValueError: an FP8 tensor without exactly one scale, or a grid scale whose block size
            neither ``block_size`` nor ``config.json`` gives.
    """
    from safetensors.torch import load_file

    disk: dict[str, torch.Tensor] = {}
    for file in _files(path):
        disk.update(load_file(file))
    block = tuple(block_size) if block_size is not None else _config_block(path)
    fp8 = [k for k, t in disk.items() if t.dtype in _FP8]
    modules = {k.rpartition(".")[0] for k in fp8}
    hidden: set[str] = set()
    values: dict[str, torch.Tensor] = {}
    for key in fp8:
        found = [c for c in (key + "_scale_inv", key + "_scale") if c in disk]
        if len(found) != 1:
            raise ValueError(
                f"{path}: the FP8 tensor {key!r} has {'no scale' if not found else 'two scales'} "
                f"({key + '_scale_inv'!r} or {key + '_scale'!r}); a loader cannot dequantize it"
            )
        w, s = disk[key], _multipliers(disk[found[0]])
        hidden.add(found[0])
        grid = block
        if s.numel() > 1 and grid is None:
            rows = math.prod(w.shape[:-1]) if w.dim() > 1 else 1
            if tuple(s.shape) != (rows, 1):
                raise ValueError(
                    f"{path}: the scale of {key!r} is a {list(s.shape)} grid for a {list(w.shape)} weight; "
                    "pass block_size=... (the checkpoint's config.json gives no weight_block_size)"
                )
            grid = (1, w.shape[-1])  # per-channel
        values[key] = reference(w, s, dtype, grid if s.numel() > 1 else None)
    for key in disk:
        module, _, leaf = key.rpartition(".")
        static = leaf in _STATIC_SCALES and module in modules
        kv = leaf in _KV_SCALES and (module in modules or any(m.rpartition(".")[0] == module for m in modules))
        if static or kv:
            hidden.add(key)
    runtime_to_disk = KeyMapping.from_spec(key_mapping).build([k for k in disk if k not in hidden])
    return {runtime: values.get(k, disk[k]) for runtime, k in runtime_to_disk.items()}


# --------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.dtype.itemsize])


def _compare(actual: Any, expected: Any, what: str) -> str | None:
    actual, expected = (v.materialize() if hasattr(v, "materialize") else v for v in (actual, expected))
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        return f"{what}: expected two tensors, got {type(actual).__name__} and {type(expected).__name__}"
    if actual.dtype != expected.dtype:
        return f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if actual.shape != expected.shape:
        return f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    a, e = _bits(actual), _bits(expected)
    differ = a != e
    if not bool(differ.any()):
        return None
    first = tuple(int(i) for i in differ.nonzero()[0])
    n = int(differ.sum())
    width = 2 * actual.dtype.itemsize
    mask = (1 << (8 * actual.dtype.itemsize)) - 1
    return (
        f"{what}: {n} of {actual.numel()} elements differ; first at index {first}: "
        f"{actual[first].item()!r} (0x{int(a[first]) & mask:0{width}x}) != "
        f"{expected[first].item()!r} (0x{int(e[first]) & mask:0{width}x})"
    )


def assert_bitwise_equal(
    actual: torch.Tensor | Mapping[str, torch.Tensor],
    expected: torch.Tensor | Mapping[str, torch.Tensor],
) -> None:
    """Assert that two tensors, or two state dicts, are equal bit for bit: same keys, and for each
    the same dtype, shape and raw bytes (so ``-0.0 != 0.0`` and NaNs are equal exactly when their
    payloads are). Values are read once each (a lazy value is materialized).

    Raises:
        AssertionError: naming the missing and extra keys, or the first differing key with its
            dtypes, shapes, or the count of differing elements and the first one's index, value
            and bits.
    """
    if isinstance(actual, torch.Tensor) or isinstance(expected, torch.Tensor):
        problem = _compare(actual, expected, "tensor")  # type: ignore[arg-type]
        if problem:
            raise AssertionError(problem)
        return
    missing = [k for k in expected if k not in actual]
    extra = [k for k in actual if k not in expected]
    if missing or extra:
        raise AssertionError(f"keys differ: missing {sorted(missing)}, unexpected {sorted(extra)}")
    for key in expected:
        problem = _compare(actual[key], expected[key], repr(key))
        if problem:
            raise AssertionError(problem)
