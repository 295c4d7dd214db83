"""Tiny quantized checkpoints written by the producers' own code, with the producers' own
dequantization as the oracle.

Every writer here builds a tree of ``torch.nn.Linear`` modules named by the caller (keys such
as ``"model.layers.0.mlp.down_proj"``), quantizes it the way llm-compressor does it with
compressed-tensors' own functions, and saves it the way llm-compressor's
``save_pretrained`` wrapper does:

1. ``apply_quantization_config(model, QuantizationConfig)`` registers ``weight_scale``,
   ``weight_zero_point``, ``weight_global_scale`` on each targeted module (dtypes and shapes
   decided by compressed-tensors: scales in the weight's dtype, global scale float32 ``[1]``).
2. The qparams are computed with compressed-tensors' own ``generate_gparam`` (NVFP4's global
   scale, ``448 * 6 / amax``) and ``calculate_qparams`` (min-max over each group / row /
   tensor, which is llm-compressor's memoryless min-max observer) and copied into those
   parameters (so they are rounded to the parameter dtype exactly as llm-compressor's
   ``update_offload_parameter`` does).
3. ``ModelCompressor.from_pretrained_model(model)`` infers each group's format,
   ``compress_model`` packs the weights, the module state dict is written with
   ``safetensors.torch.save_file`` (metadata ``{"format": "pt"}`` like ``save_pretrained``)
   and ``update_config`` writes ``quantization_config`` into ``config.json``.

The oracle is computed from the files on disk, model-free, exactly as
``compressed_tensors.entrypoints.convert.converters.CompressedTensorsDequantizer.process`` does
(match each config group's targets/ignore against the tensor names, call the group's
compressor ``decompress`` on the module's tensors), except that the result is *not* cast:
each weight keeps the dtype the compressor returns (noted per writer). Unquantized tensors
are returned as stored.

llm-compressor itself is not needed (and not installed): the only thing it would add is the
observer, whose min-max arithmetic is ``calculate_qparams`` called here directly.

gpt-oss MXFP4 (``*_blocks``/``*_scales``) cannot be *written* by transformers on CPU (its
``Mxfp4Quantize`` needs the ``kernels`` hub's triton kernels); ``write_gptoss_mxfp4`` writes
random codes and exponents in the released layout and uses transformers' own
``convert_moe_packed_tensors`` as the oracle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import pytest
import torch

Shapes = Mapping[str, tuple[int, int]]


def _ct():
    """compressed_tensors, or skip the calling test."""
    return pytest.importorskip("compressed_tensors")


# --------------------------------------------------------------------------------------------
# model tree and quantization


def _tiny_model(shapes: Shapes, seed: int, dtype: torch.dtype, std: float = 0.02) -> torch.nn.Module:
    """A module tree with one bias-free ``nn.Linear(in, out)`` at each dotted name of ``shapes``
    (``{name: (out, in)}``), weights drawn from N(0, std) with ``seed`` (in float32, then cast)."""
    root = torch.nn.Module()
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(shapes):
        out_f, in_f = shapes[name]
        *parents, leaf = name.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        linear = torch.nn.Linear(in_f, out_f, bias=False)
        w = torch.randn(out_f, in_f, generator=gen, dtype=torch.float32) * std
        # a few outliers so group maxima differ visibly (and the global scale is not trivial)
        flat = w.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 97),), generator=gen)
        flat[idx] *= 8.0
        linear.weight = torch.nn.Parameter(w.to(dtype), requires_grad=False)
        node.add_module(leaf, linear)
    return root


def _calibrate(model: torch.nn.Module) -> None:
    """Fill the qparams ``apply_quantization_config`` registered, as llm-compressor's
    memoryless min-max weight observer does, with compressed-tensors' own functions."""
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    for _, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        args = scheme.weights
        w = module.weight.data
        strategy = QuantizationStrategy(args.strategy)
        global_scale = None
        if strategy == QuantizationStrategy.TENSOR_GROUP:
            # llm-compressor: global scale from the whole tensor's min/max, float32 [1]
            global_scale = generate_gparam(w.amin(), w.amax())
            module.weight_global_scale.data.copy_(global_scale)
            global_scale = module.weight_global_scale.data
        if strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
            pad = -w.shape[-1] % args.group_size  # a ragged last group: let compressed-tensors decide
            grouped = torch.nn.functional.pad(w, (0, pad)).unflatten(-1, (-1, args.group_size))
            lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
        elif strategy == QuantizationStrategy.CHANNEL:
            lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        elif strategy == QuantizationStrategy.TENSOR:
            lo, hi = w.amin(), w.amax()
        else:
            raise NotImplementedError(f"strategy {strategy} not calibrated here")
        scale, zero_point = calculate_qparams(lo, hi, args, global_scale=global_scale)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
        inputs = scheme.input_activations
        if inputs is not None and hasattr(module, "input_scale"):
            # static activation scale: there are no activations here, so use the min-max
            # scale of a fixed range [-4, 4] (4 / 448 for FP8)
            four = torch.tensor(4.0)
            in_scale, _ = calculate_qparams(-four, four, inputs)
            module.input_scale.data.copy_(in_scale.reshape(module.input_scale.shape))


def _write(dirpath: str, model: torch.nn.Module, qconfig, config: Mapping | None) -> None:
    """Compress ``model`` after applying ``qconfig`` and write model.safetensors + config.json."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from safetensors.torch import save_file

    apply_quantization_config(model, qconfig, show_progress=False)
    _calibrate(model)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    os.makedirs(dirpath, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(dirpath, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dirpath, "config.json"), "w") as f:
        json.dump(dict(config or {}), f)
    compressor.update_config(dirpath)


def ct_oracle(dirpath: str) -> dict[str, torch.Tensor]:
    """compressed-tensors' model-free decompression of the checkpoint in ``dirpath``
    (``CompressedTensorsDequantizer.process`` without its final ``.to(dtype)``)."""
    _ct()
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_quantizable_tensors
    from safetensors.torch import load_file

    with open(os.path.join(dirpath, "config.json")) as f:
        qconfig = QuantizationConfig.model_validate(json.load(f)["quantization_config"])
    tensors = load_file(os.path.join(dirpath, "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for scheme in qconfig.config_groups.values():
        fmt = scheme.format or infer_module_format(torch.nn.Linear, scheme)
        compressor = BaseCompressor.get_value_from_registry(CompressionFormat(fmt).value)
        names = compressor.compression_param_names(scheme)
        for module, _ in list(
            match_quantizable_tensors(tensors, qconfig.ignore or [], scheme.targets, [names[0]])
        ):
            sd = {n: tensors.pop(f"{module}.{n}") for n in names}
            out[f"{module}.weight"] = compressor.decompress(sd, scheme)["weight"]
    out.update(tensors)
    return out


def _qconfig(groups: Mapping[str, object], ignore: Iterable[str]):
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig(config_groups=dict(groups), ignore=list(ignore))


# --------------------------------------------------------------------------------------------
# writers


def write_ct_nvfp4(
    dirpath: str,
    shapes: Shapes,
    seed: int = 0,
    *,
    ignore: Iterable[str] = (),
    dtype: torch.dtype = torch.bfloat16,
    config: Mapping | None = None,
) -> dict[str, torch.Tensor]:
    """compressed-tensors ``nvfp4-pack-quantized`` (preset ``NVFP4A16``: weights FP4 E2M1,
    ``tensor_group`` strategy, group 16, FP8 E4M3 group scales, float32 global scale).

    Every ``in`` must be a multiple of 16 (compressed-tensors raises otherwise). Modules named
    in ``ignore`` (exact names or ``re:`` patterns) stay dense in ``dtype``.

    On disk per module: ``weight_packed`` U8 [out, in/2] (element 2j in the low nibble of byte
    j, element 2j+1 in the high nibble; nibble = sign<<3 | index into 0,.5,1,1.5,2,3,4,6),
    ``weight_scale`` F8_E4M3 [out, in/16], ``weight_global_scale`` F32 [1] (= 448*6/amax).

    Oracle (``NVFP4PackedCompressor.decompress``): BF16, whatever ``dtype`` is:
    ``bf16(f32(e2m1) * (f32(bf16(scale_fp8)) / global_scale_f32))`` -- the codes are looked
    up in float32 and cast to bf16 (exact), the fp8 scale cast to bf16 (exact); ``scale /
    global_scale`` is computed in float32 (bf16 [out, g, 1] / f32 [1] promotes), the product
    in float32, then rounded once to bf16.
    """
    _ct()
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import NVFP4A16

    model = _tiny_model(shapes, seed, dtype)
    scheme = QuantizationScheme(targets=["Linear"], **NVFP4A16)
    _write(dirpath, model, _qconfig({"group_0": scheme}, ignore), config)
    return ct_oracle(dirpath)


def write_ct_mxfp4(
    dirpath: str,
    shapes: Shapes,
    seed: int = 0,
    *,
    ignore: Iterable[str] = (),
    dtype: torch.dtype = torch.bfloat16,
    config: Mapping | None = None,
) -> dict[str, torch.Tensor]:
    """compressed-tensors ``mxfp4-pack-quantized`` (preset ``MXFP4A16``: FP4 E2M1 weights,
    ``group`` strategy, group 32, E8M0 exponent scales). Every ``in`` a multiple of 32.

    On disk per module: ``weight_packed`` U8 [out, in/2] (nibbles as NVFP4), ``weight_scale``
    U8 [out, in/32] (biased exponent, scale = 2**(byte - 127)); no global scale.

    Oracle (``MXFP4PackedCompressor.decompress``): BF16: ``bf16(e2m1) * (2.0 **
    (byte - 127).to(bf16))``, the product in bf16 (exact unless it underflows bf16).
    """
    _ct()
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import MXFP4A16

    model = _tiny_model(shapes, seed, dtype)
    scheme = QuantizationScheme(targets=["Linear"], **MXFP4A16)
    _write(dirpath, model, _qconfig({"group_0": scheme}, ignore), config)
    return ct_oracle(dirpath)


def write_ct_int(
    dirpath: str,
    shapes: Shapes,
    seed: int = 0,
    num_bits: int = 4,
    strategy: str = "group",
    group_size: int | None = 128,
    symmetric: bool = True,
    *,
    ignore: Iterable[str] = (),
    dtype: torch.dtype = torch.bfloat16,
    config: Mapping | None = None,
) -> dict[str, torch.Tensor]:
    """compressed-tensors ``pack-quantized`` integer weights (W{num_bits}A16): ``strategy``
    ``"group"`` (``group_size`` must divide every ``in``) or ``"channel"``; ``symmetric=False``
    adds a packed zero point.

    On disk per module: ``weight_packed`` I32 [out, ceil(in*num_bits/32)] -- dense little-endian
    bit stream per row, element i at bit i*num_bits (4-bit: element 2j in the low nibble of
    byte j of the little-endian words), each stored as ``q + 2**(num_bits-1)`` (unsigned);
    ``weight_shape`` I64 [2] = (out, in); ``weight_scale`` in the weight dtype, [out, in/g]
    (group) or [out, 1] (channel); asymmetric: ``weight_zero_point`` I32
    [ceil(out*num_bits/32), in/g or 1] packed the same way along dim 0 (the output rows).

    Oracle (``PackedQuantizationCompressor.decompress`` -> ``dequantize``): dtype of the scale
    (= ``dtype``): ``(q.to(scale.dtype) - zp.to(scale.dtype)) * scale`` -- every op in the
    scale dtype (bf16 by default; the subtraction is exact for small ints, the product rounds
    once).
    """
    _ct()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if strategy == "channel":
        group_size = None
    weights = QuantizationArgs(
        num_bits=num_bits,
        type="int",
        strategy=strategy,
        group_size=group_size,
        symmetric=symmetric,
        dynamic=False,
    )
    model = _tiny_model(shapes, seed, dtype)
    # pack-quantized is also what compressed-tensors infers for integer weight-only schemes
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, format="pack-quantized")
    _write(dirpath, model, _qconfig({"group_0": scheme}, ignore), config)
    return ct_oracle(dirpath)


MIXED_SHAPES: dict[str, tuple[int, int]] = {
    "model.layers.0.self_attn.q_proj": (64, 64),
    "model.layers.0.self_attn.k_proj": (32, 64),
    "model.layers.0.self_attn.v_proj": (32, 64),
    "model.layers.0.self_attn.o_proj": (64, 64),
    "model.layers.0.mlp.gate_proj": (96, 64),
    "model.layers.0.mlp.up_proj": (96, 64),
    "model.layers.0.mlp.down_proj": (64, 96),
    "lm_head": (128, 64),
}


def write_ct_mixed(
    dirpath: str,
    seed: int = 0,
    shapes: Shapes | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    config: Mapping | None = None,
) -> dict[str, torch.Tensor]:
    """compressed-tensors ``mixed-precision``: one config group = preset ``FP8`` (per-tensor
    FP8 E4M3 weights, static per-tensor FP8 input scale) targeting ``re:.*self_attn\\..*``,
    another = preset ``NVFP4A16`` targeting ``re:.*mlp\\..*``; ``lm_head`` ignored (dense
    ``dtype``). Default shapes: ``MIXED_SHAPES``.

    The top-level ``format`` is ``"mixed-precision"`` and each group carries its own
    ``format`` (``"float-quantized"``, ``"nvfp4-pack-quantized"``). The group *names* are
    re-assigned by compressed-tensors (``QuantizationConfig.from_pretrained`` numbers the
    schemes in module order: with ``MIXED_SHAPES`` ``group_0`` is the NVFP4 MLP group and
    ``group_1`` the FP8 attention group); which module belongs to which group is decided
    only by ``targets`` (``re:`` = ``re.match`` on the module name, else exact name or a
    class name in the module's MRO) minus ``ignore``.

    FP8 modules on disk: ``weight`` F8_E4M3 [out, in], ``weight_scale`` (weight dtype) [1],
    ``input_scale`` (weight dtype) [1] (never calibrated here: it holds whatever the
    initialised parameter had -- only its presence/shape/dtype are meaningful).
    NVFP4 modules: as ``write_ct_nvfp4``.

    Oracle: FP8 ``(w.to(scale.dtype) * scale)`` in the scale dtype (bf16 by default); NVFP4 as
    ``write_ct_nvfp4`` (bf16).
    """
    _ct()
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import FP8, NVFP4A16

    shapes = MIXED_SHAPES if shapes is None else shapes
    model = _tiny_model(shapes, seed, dtype)
    groups = {
        "group_0": QuantizationScheme(targets=[r"re:.*self_attn\..*"], **FP8),
        "group_1": QuantizationScheme(targets=[r"re:.*mlp\..*"], **NVFP4A16),
    }
    _write(dirpath, model, _qconfig(groups, ["lm_head"]), config)
    return ct_oracle(dirpath)


GPTOSS_MODULES_TO_NOT_CONVERT = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]


def write_gptoss_mxfp4(
    dirpath: str,
    seed: int = 0,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 96,
    num_experts: int = 4,
    num_layers: int = 1,
    exponent_range: tuple[int, int] = (118, 130),
    load_check: bool = False,
) -> dict[str, torch.Tensor]:
    """A tiny gpt-oss checkpoint in the released MXFP4 layout (openai/gpt-oss-*), and
    transformers' own dequantization of it as the oracle.

    transformers cannot *write* MXFP4 on CPU (``Mxfp4Quantize`` needs the ``kernels`` hub's
    triton kernels), so the experts' codes are random bytes (all 16 nibbles, incl. 8 = -0.0)
    and the scales random E8M0 exponents in ``exponent_range``; everything else is a
    ``GptOssForCausalLM`` initialised with ``seed`` in bf16.

    On disk per layer (E experts, H hidden, I intermediate):
    ``mlp.experts.gate_up_proj_blocks`` U8 [E, 2I, H/32, 16], ``..._scales`` U8 [E, 2I, H/32],
    ``mlp.experts.down_proj_blocks`` U8 [E, H, I/32, 16], ``..._scales`` U8 [E, H, I/32],
    biases ``gate_up_proj_bias`` BF16 [E, 2I], ``down_proj_bias`` BF16 [E, H]; config.json
    ``quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [...]}``.

    Oracle (``transformers.integrations.mxfp4.convert_moe_packed_tensors``, bf16): runtime names
    ``mlp.experts.gate_up_proj`` [E, H, 2I] and ``mlp.experts.down_proj`` [E, I, H]
    (the [E, out, in] dequantized weight transposed), plus every other tensor as stored.
    ``load_check=True`` also loads the directory with ``from_pretrained`` (CPU forces
    ``Mxfp4Config(dequantize=True)``) and asserts it equals the oracle.
    """
    import transformers
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    cfg = transformers.GptOssConfig(
        num_hidden_layers=num_layers,
        num_local_experts=num_experts,
        num_experts_per_tok=2,
        vocab_size=128,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(cfg).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    lo, hi = exponent_range
    disk: dict[str, torch.Tensor] = {}
    oracle: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.endswith("mlp.experts.gate_up_proj") or key.endswith("mlp.experts.down_proj"):
            e, in_f, out_f = value.shape  # runtime layout [E, in, out]
            blocks = torch.randint(0, 256, (e, out_f, in_f // 32, 16), generator=gen, dtype=torch.uint8)
            scales = torch.randint(lo, hi + 1, (e, out_f, in_f // 32), generator=gen, dtype=torch.uint8)
            disk[key + "_blocks"] = blocks
            disk[key + "_scales"] = scales
            oracle[key] = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
        else:
            disk[key] = value.detach().contiguous()
            oracle[key] = disk[key]
    os.makedirs(dirpath, exist_ok=True)
    save_file(disk, os.path.join(dirpath, "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_dict()
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": list(GPTOSS_MODULES_TO_NOT_CONVERT),
    }
    with open(os.path.join(dirpath, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if load_check:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            dirpath, dtype=torch.bfloat16, quantization_config=transformers.Mxfp4Config(dequantize=True)
        ).state_dict()
        assert set(loaded) == set(oracle), sorted(set(loaded) ^ set(oracle))
        for key, value in oracle.items():
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    return oracle
