"""Pair each FP8 tensor with its scale, and find the quantization parameters that are not weights.

Header facts only. Used by the view (which raises on the first problem) and by ``inspect`` (which
collects every problem).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from ..errors import CheckpointError, MissingScaleError, UnsupportedDtypeError, raise_or_collect
from ..storage.dtypes import SCALE_CODES
from ..storage.header import TensorEntry
from .schemes import Granularity, Scheme

__all__ = ["Pairing", "pair_scales", "QUANT_SIBLINGS"]

# output_scale: compressed-tensors' static KV-cache scale, on k_proj / v_proj beside the weight.
_LINEAR_SIBLINGS = frozenset({"activation_scale", "input_scale", "input_scale_ub", "output_scale"})
_KV_SIBLINGS = frozenset({"k_scale", "v_scale"})
#: Quantization parameters that are not weights (static activation and KV-cache scales), hidden
#: from a view's keys when they belong to a module with an FP8 weight (or its attention parent).
QUANT_SIBLINGS = _LINEAR_SIBLINGS | _KV_SIBLINGS


@dataclasses.dataclass(frozen=True)
class Pairing:
    """Attributes:
    scales: FP8 key -> (scale file, scale entry, granularity).
    quant_params: static activation / KV-cache scale keys of FP8 modules.
    orphans: keys named like scales (``*_scale_inv``, ``*.weight_scale``) that no FP8 tensor uses.
    """

    scales: dict[str, tuple[str, TensorEntry, Granularity]]
    quant_params: set[str]
    orphans: list[str]

    @property
    def scale_keys(self) -> set[str]:
        return {e.name for _, e, _ in self.scales.values()}


def pair_scales(
    tensors: Mapping[str, tuple[str, TensorEntry]],
    scheme: Scheme,
    problems: list[CheckpointError] | None = None,
) -> Pairing:
    """Pair every FP8 tensor of ``tensors`` (on-disk key -> (file, entry)) with its scale.

    Raises (or, with ``problems`` given, appends and skips the weight):
        MissingScaleError, CheckpointError (two scales), UnsupportedDtypeError (scale dtype),
        ScaleShapeError (scale shape).
    """
    scales: dict[str, tuple[str, TensorEntry, Granularity]] = {}
    fp8_modules: set[str] = set()
    for key, (file, entry) in tensors.items():
        if not entry.dtype.fp8_weight:
            continue
        fp8_modules.add(key.rpartition(".")[0])
        candidates = scheme.scale_keys(key)
        found = [c for c in candidates if c in tensors]
        name = os.path.basename(file)
        if not found:
            raise_or_collect(problems, MissingScaleError(
                f"{name} holds the FP8 ({entry.dtype.code}) tensor {key!r} but the checkpoint has no "
                f"scale for it ({' or '.join(map(repr, candidates))}, scheme {scheme.name!r}); its raw "
                "bytes are not weights. Check that every shard is present and that the "
                "checkpoint's quantization_config matches it",
                file=file,
                key=key,
            ))
            continue
        if len(found) > 1:
            raise_or_collect(problems, CheckpointError(
                f"{name}: the FP8 tensor {key!r} has two scales, {found[0]!r} and {found[1]!r}; "
                "the checkpoint is ambiguous (pass scheme= to choose)",
                file=file,
                key=key,
            ))
            continue
        scale_file, scale_entry = tensors[found[0]]
        if scale_entry.dtype.code not in SCALE_CODES:
            raise_or_collect(problems, UnsupportedDtypeError(
                f"{os.path.basename(scale_file)}: scale {found[0]!r} of the FP8 tensor {key!r} has dtype "
                f"{scale_entry.dtype.code}; scales must be F32, BF16, F16, F64, U8 (ue8m0) or F8_E8M0",
                file=scale_file,
                key=found[0],
            ))
            continue
        try:
            granularity = scheme.granularity(
                entry.shape, scale_entry.shape, scale_entry.dtype.code,
                weight_key=key, scale_key=found[0], file=file,
            )
        except CheckpointError as e:
            raise_or_collect(problems, e)
            continue
        scales[key] = (scale_file, scale_entry, granularity)
    # A linear's static input scale sits beside its weight (``q_proj.input_scale``); a KV-cache
    # scale sits on the attention module, the parent (``self_attn.k_scale``).
    parents = {m.rpartition(".")[0] for m in fp8_modules} | fp8_modules
    quant_params = set()
    for key in tensors:
        module, _, leaf = key.rpartition(".")
        if (leaf in _LINEAR_SIBLINGS and module in fp8_modules) or (leaf in _KV_SIBLINGS and module in parents):
            quant_params.add(key)
    used = {e.name for _, e, _ in scales.values()}
    orphans = [
        k for k in tensors
        if k not in used and (k.endswith("_scale_inv") or k.endswith(".weight_scale")) and not tensors[k][1].dtype.fp8_weight
    ]
    return Pairing(scales=scales, quant_params=quant_params, orphans=orphans)
