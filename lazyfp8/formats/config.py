"""Turn ``config.json``'s ``quantization_config`` into a :class:`~lazyfp8.formats.schemes.Scheme`.

Any JSON may sit in a config: every field is type-checked before use, and whatever does not fit
is an :class:`~lazyfp8.errors.UnsupportedSchemeError` naming the file and the key.
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedSchemeError
from .schemes import Granularity, PerBlock, PerChannel, PerTensor, Scheme

__all__ = ["scheme_from_config", "SUPPORTED_METHODS"]

SUPPORTED_METHODS = ("fp8", "compressed-tensors", "fbgemm_fp8", "modelopt")


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


def _compressed_tensors(qc: dict[str, Any], path: str) -> Scheme:
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise UnsupportedSchemeError(
            f"{path}: compressed-tensors config has no config_groups", file=path, key="quantization_config.config_groups"
        )
    found: list[Granularity] = []
    for name, group in groups.items():
        where = f"quantization_config.config_groups.{name}"
        if not isinstance(group, dict):
            raise _bad(path, where, group, "an object")
        weights = group.get("weights")
        if weights is None:  # a group that quantizes only activations
            continue
        if not isinstance(weights, dict):
            raise _bad(path, f"{where}.weights", weights, "an object or null")
        kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
        if kind != "float" or bits != 8:
            raise UnsupportedSchemeError(
                f"{path}: compressed-tensors group {name!r} quantizes weights to {bits}-bit {kind}; "
                "lazyfp8 reads 8-bit float weights only",
                file=path,
            )
        if strategy == "tensor":
            found.append(PerTensor())
        elif strategy == "channel":
            found.append(PerChannel())
        elif strategy == "block":
            found.append(PerBlock(_block(weights.get("block_structure"), f"group {name!r} block_structure", path)))
        elif strategy == "group":
            size = weights.get("group_size")
            if not _positive_int(size):
                raise _bad(path, f"{where}.weights.group_size", size, "a positive integer")
            found.append(PerBlock((1, size)))
        else:
            raise UnsupportedSchemeError(
                f"{path}: compressed-tensors group {name!r} has weight strategy {strategy!r}; "
                "lazyfp8 reads tensor, channel, block and group",
                file=path,
            )
    if not found:
        raise UnsupportedSchemeError(
            f"{path}: no compressed-tensors group quantizes weights", file=path, key="quantization_config.config_groups"
        )
    return Scheme("compressed-tensors", tuple(dict.fromkeys(found)), ("_scale",))


def scheme_from_config(config: dict[str, Any] | None, path: str) -> Scheme | None:
    """The scheme ``config.json`` at ``path`` declares, or ``None`` if it declares none.

    Raises:
        UnsupportedSchemeError: a ``quant_method`` that is not an FP8 scheme read here, or a
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
        # modelopt writes quant_algo at the top, or (hf_quant_config.json style) under "quantization".
        nested = qc.get("quantization")
        if nested is not None and not isinstance(nested, dict):
            raise _bad(path, "quantization_config.quantization", nested, "an object")
        algo = qc.get("quant_algo") or (nested or {}).get("quant_algo")
        granularity = _MODELOPT_FP8.get(algo) if isinstance(algo, str) else None
        if granularity is None:
            raise UnsupportedSchemeError(
                f"{path}: modelopt quant_algo {algo!r:.80} is not one lazyfp8 reads "
                f"({', '.join(_MODELOPT_FP8)})",
                file=path,
                key="quant_algo",
            )
        return Scheme("modelopt", (granularity,), ("_scale",))
    raise UnsupportedSchemeError(
        f"{path}: quantization_config.quant_method is {method!r:.80}; lazyfp8 reads "
        f"{', '.join(SUPPORTED_METHODS)} (pass scheme= to override)",
        file=path,
        key="quantization_config.quant_method",
    )

