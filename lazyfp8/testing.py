"""Small, deterministic FP8 checkpoints for tests, benchmarks and the demo.

Nothing here is on the load path. ``write_checkpoint`` lays a state dict out the way released FP8
checkpoints are: chosen 2-D weights quantized per tensor to ``float8_e4m3fn`` with a 0-d float32
``weight_scale_inv`` and an unused ``activation_scale``, everything else as given, optionally
renamed to on-disk names and split into shards with a ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping

import torch
from safetensors.torch import save_file

from .formats.quantize import quantize
from .formats.schemes import PerTensor

__all__ = ["reference", "quantize_per_tensor", "write_checkpoint", "DAWN_RIDGE_TO_DISK", "dawn_ridge_fp8"]

def reference(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, block: tuple[int, int] | None = None) -> torch.Tensor:
    """The reference dequantization ``(w.to(float32) * s.to(float32)).to(dtype)``, block scales
    (``block`` over the ``[rows, cols]`` view, or per matrix of a 3-D+ stack) expanded first.
    Straightforward and memory-hungry (a float32 copy of ``w``): for checking, not loading."""
    wf = w.to(torch.float32)
    sf = s.to(torch.float32)
    if w.numel() == 0:  # an empty weight has an empty grid, which no broadcast below accepts
        return wf.to(dtype)
    if block is not None and sf.numel() > 1 and w.dim() >= 3:
        # a stack of matrices, each tiled on its own
        mats = wf.reshape(-1, *w.shape[-2:])
        grids = sf.reshape(mats.shape[0], -1, sf.shape[-1])
        return torch.stack([reference(m, g, torch.float32, block) for m, g in zip(mats, grids)]).reshape(w.shape).to(dtype)
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
    """``quantize(w, PerTensor(), fp8_dtype)``: codes and a 0-d float32 scale."""
    return quantize(w, PerTensor(), fp8_dtype)


#: Runtime (transformers Mistral3) -> on-disk names of the dawn-ridge / legacy LLaVA layout.
DAWN_RIDGE_TO_DISK: tuple[tuple[str, str], ...] = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
)

_DAWN_RIDGE_FP8 = re.compile(r"^model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


def dawn_ridge_fp8(key: str) -> bool:
    """Whether the dawn-ridge layout stores runtime key ``key`` as FP8 (the text layers' Linears)."""
    return _DAWN_RIDGE_FP8.match(key) is not None


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key, count=1)
        if n:
            return new
    return key


def write_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    quantize: Callable[[str], bool] = lambda key: False,
    to_disk: tuple[tuple[str, str], ...] = (),
    dtype: torch.dtype | None = torch.bfloat16,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    shards: int = 1,
    activation_scale: bool = True,
    config: dict | None = None,
) -> dict[str, str]:
    """Write ``state_dict`` to directory ``path`` and return ``{runtime_key: disk_key}``.

    Args:
        quantize: which runtime keys to store as FP8 (per-tensor scale).
        to_disk: ``(regex, replacement)`` rules renaming runtime keys to on-disk keys.
        dtype: the dtype of every tensor not quantized (``None`` keeps each as given).
        shards: number of files; with more than one, an index is written.
        config: written as ``config.json`` when given.
    """
    os.makedirs(path, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for key, t in state_dict.items():
        disk = _rename(key, to_disk)
        names[key] = disk
        if quantize(key):
            codes, scale = quantize_per_tensor(t, fp8_dtype)
            tensors[disk] = codes
            tensors[disk + "_scale_inv"] = scale
            if activation_scale:
                tensors[disk.rpartition(".")[0] + ".activation_scale"] = torch.tensor(1.0)
        else:
            t = t.detach()
            tensors[disk] = (t if dtype is None or not t.is_floating_point() else t.to(dtype)).contiguous()
    keys = list(tensors)
    per = -(-len(keys) // max(shards, 1))
    groups = [keys[i : i + per] for i in range(0, len(keys), per)] or [[]]
    if len(groups) == 1:
        save_file({k: tensors[k] for k in groups[0]}, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        total = 0
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({k: tensors[k] for k in group}, os.path.join(path, fname), metadata={"format": "pt"})
            for k in group:
                weight_map[k] = fname
                total += tensors[k].numel() * tensors[k].element_size()
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if config is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return names
