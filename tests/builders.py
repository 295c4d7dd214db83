"""Build FP8 checkpoints the way released ones are laid out, for the parity and model tests.

Quantization is ``lazyfp8.quantize``, with the stored scale dtypes real exporters use that
``lazyfp8.save`` does not write (BF16 scales, ue8m0 bytes under U8 or F8_E8M0, ``_scale`` or
``_scale_inv`` names); the quantized tensors are then written as given by
``lazyfp8.testing.write_checkpoint(..., scheme=None)``. Nothing here reads a checkpoint back.
Every builder returns what a test needs to compute the expected values independently of the
reader under test: for each FP8 weight its codes and the scale exactly as written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import torch

from lazyfp8 import testing
from lazyfp8.formats.quantize import quantize
from lazyfp8.formats.schemes import Granularity

#: ``{weight key: (codes, scale as written)}`` for every FP8 weight of a built checkpoint.
Quantized = dict[str, tuple[torch.Tensor, torch.Tensor]]

EXPONENT_SCALE_DTYPES = (torch.uint8, torch.float8_e8m0fnu)


def quantize_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    select: Callable[[str], bool],
    granularity: Granularity,
    *,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    suffix: str = "_scale_inv",
    scale_dtype: torch.dtype | Callable[[str], torch.dtype] = torch.float32,
    plain_dtype: torch.dtype | None = torch.bfloat16,
) -> tuple[dict[str, torch.Tensor], Quantized]:
    """The on-disk tensors of ``state_dict`` with the keys ``select`` picks quantized.

    Args:
        select: which keys to store as FP8 (``fp8_dtype`` codes, scale at ``key + suffix``).
        granularity: passed to ``quantize``.
        suffix: ``"_scale_inv"`` (HF fp8 / DeepSeek) or ``"_scale"`` (compressed-tensors).
        scale_dtype: the stored scale dtype (or a function of the key): ``torch.float32``,
            ``torch.bfloat16`` (the float32 scale rounded, as some exporters store it),
            ``torch.uint8`` (ue8m0 exponent bytes) or ``torch.float8_e8m0fnu`` (the same bytes
            under the F8_E8M0 header code).
        plain_dtype: dtype of every floating tensor not quantized (``None`` keeps it).
    """
    disk: dict[str, torch.Tensor] = {}
    quantized: Quantized = {}
    for key, value in state_dict.items():
        value = value.detach()
        if not select(key):
            keep = plain_dtype is None or not value.is_floating_point()
            disk[key] = (value if keep else value.to(plain_dtype)).contiguous()
            continue
        sdt = scale_dtype(key) if callable(scale_dtype) else scale_dtype
        exponent = sdt in EXPONENT_SCALE_DTYPES
        codes, scale = quantize(value, granularity, fp8_dtype, ue8m0=exponent, name=key)
        if sdt == torch.float8_e8m0fnu:
            scale = scale.view(torch.float8_e8m0fnu)
        elif not exponent:
            scale = scale.to(sdt)
        disk[key] = codes
        disk[key + suffix] = scale
        quantized[key] = (codes, scale)
    return disk, quantized


def scale_multipliers(scale: torch.Tensor) -> torch.Tensor:
    """A stored scale as float32 multipliers: ue8m0 bytes ``b`` mean ``2 ** (b - 127)``
    (computed with ``exp2``, not through torch's e8m0 dtype, so it checks the reader's decoding)."""
    if scale.dtype in EXPONENT_SCALE_DTYPES:
        return torch.exp2(scale.view(torch.uint8).to(torch.float32) - 127.0)
    return scale.to(torch.float32)


def expected(
    codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, block: tuple[int, int] | None
) -> torch.Tensor:
    """The reference dequantization (``lazyfp8.testing.reference``) of one built FP8 weight;
    ``block`` is the block size, or ``None`` for per-tensor and per-channel ``[N, 1]`` scales."""
    s = scale_multipliers(scale)
    if block is None and s.numel() > 1:  # per-channel: one row of the grid per output row
        block = (1, codes.shape[-1])
    return testing.reference(codes, s, dtype, block)


def shard_size(tensors: Mapping[str, torch.Tensor], shards: int) -> int:
    """A ``max_shard_size`` (bytes) that splits ``tensors`` into about ``shards`` files (more
    where a tensor is larger than the share: huggingface_hub's planner gives it its own)."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    return max(1, math.ceil(total / shards))


def write_checkpoint(
    directory: str, tensors: Mapping[str, torch.Tensor], config: dict | None = None, *, shards: int = 1
) -> str:
    """Write already-quantized on-disk ``tensors`` (from :func:`quantize_state_dict`) as they
    are, in about ``shards`` files, and ``config`` verbatim: ``lazyfp8.testing.write_checkpoint``
    with ``scheme=None``, which quantizes nothing. Not a writer of its own; a layout ``save``
    would not produce (scales in their own shard, an index over one file) is
    ``tests.helpers.write_layout``."""
    testing.write_checkpoint(tensors, directory, scheme=None, max_shard_size=shard_size(tensors, shards), config=config)
    return directory


def fp8_block_config(model_config: dict, block: tuple[int, int] = (128, 128)) -> dict:
    """``config.json`` of an HF "fp8" block-scaled checkpoint (DeepSeek-V3, Qwen3-FP8)."""
    return {
        **model_config,
        "quantization_config": {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "weight_block_size": list(block),
        },
    }


def mx_config(model_config: dict) -> dict:
    """``config.json`` of an HF "fp8" checkpoint with ue8m0 scales over 1x32 blocks (MXFP8)."""
    return {
        **model_config,
        "quantization_config": {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "scale_fmt": "ue8m0",
            "weight_block_size": [1, 32],
        },
    }


def compressed_tensors_channel_config(model_config: dict, ignore: list[str]) -> dict:
    """``config.json`` of an llm-compressor FP8 checkpoint: per-channel weight scales, static
    per-tensor input scales (the "FP8" preset)."""
    return {
        **model_config,
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "ignore": list(ignore),
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 8,
                        "type": "float",
                        "strategy": "channel",
                        "symmetric": True,
                        "dynamic": False,
                    },
                    "input_activations": {
                        "num_bits": 8,
                        "type": "float",
                        "strategy": "tensor",
                        "symmetric": True,
                        "dynamic": False,
                    },
                }
            },
        },
    }


def add_input_scales(tensors: dict[str, torch.Tensor], quantized: Quantized, seed: int = 0) -> list[str]:
    """Add a static ``input_scale`` (F32, shape ``[1]``) beside every FP8 weight, as
    compressed-tensors does; returns the keys added."""
    g = torch.Generator().manual_seed(seed)
    added = []
    for key in quantized:
        name = key.rpartition(".")[0] + ".input_scale"
        tensors[name] = torch.rand(1, generator=g) + 0.01
        added.append(name)
    return added


_FUSED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def unfuse_experts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's runtime MoE layout -> the per-expert layout DeepSeek-V3 ships.

    ``<p>.mlp.experts.gate_up_proj`` ``[E, 2I, H]`` becomes ``<p>.mlp.experts.{e}.gate_proj.weight``
    (rows ``:I``) and ``.up_proj.weight`` (rows ``I:``), the inverse of transformers'
    ``MergeModulelist(dim=0)`` + ``Concatenate(dim=1)``; ``down_proj`` ``[E, H, I]`` becomes
    ``<p>.mlp.experts.{e}.down_proj.weight``. Other keys are kept in order.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _FUSED_EXPERTS.match(key)
        if m is None:
            out[key] = value
            continue
        prefix, which = m.groups()
        for e in range(value.shape[0]):
            if which == "gate_up_proj":
                gate, up = value[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate.clone()
                out[f"{prefix}.{e}.up_proj.weight"] = up.clone()
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = value[e].clone()
    return out


#: The Linear weights DeepSeek-V3 ships as FP8: attention (``q_a_proj``, ``q_b_proj``,
#: ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``), dense MLPs, routed and shared experts.
#: The router (``mlp.gate.weight``), norms, embeddings and ``lm_head`` stay BF16.
DEEPSEEK_FP8 = re.compile(r"^model\.layers\.\d+\..*_proj(_with_mqa)?\.weight$")


def deepseek_v3_checkpoint(
    directory: str,
    runtime_state_dict: Mapping[str, torch.Tensor],
    model_config: dict,
    *,
    shards: int = 3,
) -> tuple[dict[str, torch.Tensor], Quantized]:
    """Write the on-disk layout DeepSeek-V3 ships from a transformers 5 ``DeepseekV3ForCausalLM``
    state dict: per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight``, every ``DEEPSEEK_FP8``
    weight as ``float8_e4m3fn`` with a float32 ``weight_scale_inv`` over 128x128 blocks (partial
    at ragged edges), ``e_score_correction_bias`` in F32, everything else in BF16, and a
    ``config.json`` declaring ``quant_method: fp8`` with ``weight_block_size: [128, 128]``.

    Returns the on-disk tensors and the FP8 weights' codes and scales.
    """
    from lazyfp8.formats.schemes import PerBlock

    per_expert = unfuse_experts(runtime_state_dict)
    disk, quantized = quantize_state_dict(
        per_expert, lambda k: DEEPSEEK_FP8.match(k) is not None, PerBlock((128, 128))
    )
    for key in disk:
        if key.endswith(".e_score_correction_bias"):
            disk[key] = per_expert[key].to(torch.float32)
    write_checkpoint(directory, disk, fp8_block_config(model_config), shards=shards)
    return disk, quantized


def deepseek_config():
    """A tiny DeepSeek-V3: MLA attention whose kv_a_proj_with_mqa is [kv_lora_rank + rope_dim,
    hidden] = [192, 256], ragged (a [2, 2] grid of 128x128 blocks, the last row of blocks 64 rows
    high) like DeepSeek-V3's [576, 7168]; layer 0 dense (first_k_dense_replace=1), layer 1 MoE with
    4 routed experts + 1 shared. Every other Linear is a multiple of 128."""
    import transformers

    return transformers.DeepseekV3Config(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=384,
        moe_intermediate_size=128,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=128,
        kv_lora_rank=128,
        qk_rope_head_dim=64,
        qk_nope_head_dim=64,
        v_head_dim=64,
        num_mtp_layers=0,
    )
