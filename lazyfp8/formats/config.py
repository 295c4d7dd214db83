"""Turn ``config.json``'s ``quantization_config`` into a :class:`~lazyfp8.formats.schemes.Scheme`.

Any JSON may sit in a config: every field is type-checked before use, and whatever does not fit
is an :class:`~lazyfp8.errors.UnsupportedSchemeError` naming the file and the key.
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedSchemeError
from .schemes import MX_BLOCK, Granularity, PerBlock, PerChannel, PerTensor, Scheme

__all__ = ["scheme_from_config", "SUPPORTED_METHODS"]

SUPPORTED_METHODS = ("fp8", "compressed-tensors", "fbgemm_fp8", "modelopt", "mxfp4", "mxfp8")


# A block beyond int64 cannot be handed to torch; no tensor dimension is that large anyway.
_MAX_BLOCK = 2**62


#: ModelOpt's FP8 ``quant_algo`` values and the weight scale each writes (``<module>.weight_scale``):
#: one float32 value; one per output row, ``[N]``; a ``[N/128, K/128]`` block grid (weight only).
_MODELOPT_FP8: dict[str, Granularity] = {
    "FP8": PerTensor(),
    "FP8_PER_CHANNEL_PER_TOKEN": PerChannel(),
    "FP8_PB_WO": PerBlock((128, 128)),
}


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 < x <= _MAX_BLOCK


def _block(value: Any, what: str, path: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_positive_int(x) for x in value):
        raise UnsupportedSchemeError(
            f"{path}: {what} must be two positive integers, found {value!r}", file=path, key=what
        )
    return int(value[0]), int(value[1])


def _bad(path: str, what: str, value: Any, expected: str) -> UnsupportedSchemeError:
    return UnsupportedSchemeError(
        f"{path}: {what} must be {expected}, found {type(value).__name__} {value!r:.80}", file=path, key=what
    )


#: compressed-tensors ``format`` values whose tensors lazyfp8 reads (dense: no quantized tensors).
_CT_FORMATS = frozenset({
    "float-quantized", "naive-quantized", "int-quantized", "pack-quantized",
    "nvfp4-pack-quantized", "mxfp4-pack-quantized", "dense",
})


def _ct_format(value: Any, where: str, path: str) -> None:
    if value is not None and value not in _CT_FORMATS:
        raise UnsupportedSchemeError(
            f"{path}: compressed-tensors {where} is {value!r:.80}; lazyfp8 reads {', '.join(sorted(_CT_FORMATS))}",
            file=path,
            key=where,
        )


def _ct_granularity(weights: dict[str, Any], name: str, where: str, path: str) -> Granularity:
    strategy = weights.get("strategy")
    if strategy == "tensor":
        return PerTensor()
    if strategy == "channel":
        return PerChannel()
    if strategy == "block":
        return PerBlock(_block(weights.get("block_structure"), f"group {name!r} block_structure", path))
    if strategy in ("group", "tensor_group"):
        size = weights.get("group_size")
        if not _positive_int(size):
            raise _bad(path, f"{where}.weights.group_size", size, "a positive integer")
        return PerBlock((1, size))
    raise UnsupportedSchemeError(
        f"{path}: compressed-tensors group {name!r} has weight strategy {strategy!r:.80}; "
        "lazyfp8 reads tensor, channel, block, group and tensor_group",
        file=path,
    )


def _compressed_tensors(qc: dict[str, Any], path: str) -> Scheme:
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise UnsupportedSchemeError(
            f"{path}: compressed-tensors config has no config_groups", file=path, key="quantization_config.config_groups"
        )
    # "mixed-precision": each group names its own format, checked below.
    if qc.get("format") != "mixed-precision":
        _ct_format(qc.get("format"), "quantization_config.format", path)
    found: list[Granularity] = []
    int_bits: int | None = None
    for name, group in groups.items():
        where = f"quantization_config.config_groups.{name}"
        if not isinstance(group, dict):
            raise _bad(path, where, group, "an object")
        _ct_format(group.get("format"), f"{where}.format", path)
        weights = group.get("weights")
        if weights is None:  # a group that quantizes only activations
            continue
        if not isinstance(weights, dict):
            raise _bad(path, f"{where}.weights", weights, "an object or null")
        kind, bits = weights.get("type"), weights.get("num_bits")
        if (kind, bits) not in (("float", 8), ("float", 4), ("int", 4), ("int", 8)):
            raise UnsupportedSchemeError(
                f"{path}: compressed-tensors group {name!r} quantizes weights to {bits!r:.20}-bit {kind!r:.20}; "
                "lazyfp8 reads 8- and 4-bit float and int weights",
                file=path,
                key=f"{where}.weights",
            )
        if kind == "int":
            if int_bits is not None and int_bits != bits:
                raise UnsupportedSchemeError(
                    f"{path}: compressed-tensors groups quantize int weights to both {int_bits} and {bits} bits; "
                    "int32-packed tensors do not say which they hold",
                    file=path,
                    key=f"{where}.weights.num_bits",
                )
            int_bits = bits
        found.append(_ct_granularity(weights, name, where, path))
    if not found:
        raise UnsupportedSchemeError(
            f"{path}: no compressed-tensors group quantizes weights", file=path, key="quantization_config.config_groups"
        )
    return Scheme("compressed-tensors", tuple(dict.fromkeys(found)), ("_scale",), int_bits=int_bits)


def _modelopt_algo(algo: Any, group_size: Any, path: str, where: str) -> Granularity:
    if algo == "NVFP4":
        size = 16 if group_size is None else group_size
        if not _positive_int(size):
            raise _bad(path, f"{where}.group_size", group_size, "a positive integer")
        return PerBlock((1, size))
    granularity = _MODELOPT_FP8.get(algo) if isinstance(algo, str) else None
    if granularity is None:
        raise UnsupportedSchemeError(
            f"{path}: modelopt quant_algo {algo!r:.80} is not one lazyfp8 reads "
            f"({', '.join((*_MODELOPT_FP8, 'NVFP4', 'MIXED_PRECISION'))})",
            file=path,
            key=where,
        )
    return granularity


def _modelopt(qc: dict[str, Any], path: str) -> Scheme:
    # modelopt writes quant_algo at the top, or (hf_quant_config.json style) under "quantization".
    nested = qc.get("quantization")
    if nested is not None and not isinstance(nested, dict):
        raise _bad(path, "quantization_config.quantization", nested, "an object")
    fields = {**(nested or {}), **{k: v for k, v in qc.items() if k != "quantization"}}
    algo = fields.get("quant_algo")
    if algo != "MIXED_PRECISION":
        return Scheme("modelopt", (_modelopt_algo(algo, fields.get("group_size"), path, "quant_algo"),), ("_scale",))
    layers = fields.get("quantized_layers")
    if not isinstance(layers, dict) or not layers:
        raise _bad(path, "quantized_layers", layers, "an object naming each quantized layer")
    found = []
    for name, layer in layers.items():
        where = f"quantized_layers.{name:.80}"
        if not isinstance(layer, dict):
            raise _bad(path, where, layer, "an object")
        found.append(_modelopt_algo(layer.get("quant_algo"), layer.get("group_size"), path, f"{where}.quant_algo"))
    return Scheme("modelopt", tuple(dict.fromkeys(found)), ("_scale",))


def scheme_from_config(config: dict[str, Any] | None, path: str) -> Scheme | None:
    """The scheme ``config.json`` at ``path`` declares, or ``None`` if it declares none.

    Raises:
        UnsupportedSchemeError: a ``quant_method`` that is not a scheme read here, or a
            malformed quantization_config.
    """
    if config is None:
        return None
    if not isinstance(config, dict):
        raise _bad(path, "config.json", config, "a JSON object")
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise _bad(path, "quantization_config", qc, "an object")
    method = qc.get("quant_method")
    if method == "fp8":
        block = qc.get("weight_block_size")
        if block is None:
            return Scheme("fp8", (PerTensor(),), ("_scale_inv",))
        return Scheme("fp8", (PerBlock(_block(block, "quantization_config.weight_block_size", path)),), ("_scale_inv",))
    if method == "compressed-tensors":
        return _compressed_tensors(qc, path)
    if method == "fbgemm_fp8":
        return Scheme("fbgemm_fp8", (PerChannel(),), ("_scale",))
    if method == "modelopt":
        return _modelopt(qc, path)
    if method in ("mxfp4", "mxfp8"):
        return Scheme(method, (PerBlock(MX_BLOCK),), ("_scale_inv", "_scale"))
    raise UnsupportedSchemeError(
        f"{path}: quantization_config.quant_method is {method!r:.80}; lazyfp8 reads "
        f"{', '.join(SUPPORTED_METHODS)} (pass scheme= to override)",
        file=path,
        key="quantization_config.quant_method",
    )

