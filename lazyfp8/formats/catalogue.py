"""The catalogue: one picture of a checkpoint that every reader shares.

From the located files (``_checkpoint``) it settles how FP8 weights are scaled (the scheme: an
explicit argument, else ``config.json``'s ``quantization_config``, else ``auto``), which scale
belongs to which weight (``_pairing``), and which on-disk keys are tensors a user sees. The view,
``inspect_checkpoint`` and everything built on them (the writer's view sources, the DCP reader)
see a checkpoint through this one function, so they cannot disagree about it. No tensor data is
read.
"""

from __future__ import annotations

import dataclasses
import os

from ..errors import CheckpointError
from ..storage.checkpoint import CONFIG_NAME, QUANT_CONFIG_NAME, Checkpoint
from ..storage.header import TensorEntry
from .config import scheme_from_config
from .pairing import Pairing, pair_scales
from .schemes import Granularity, PerBlock, PerChannel, PerTensor, Scheme, auto_scheme, make_scheme

__all__ = ["Catalogue", "build_catalogue", "resolve_scheme"]


@dataclasses.dataclass(frozen=True)
class Catalogue:
    """What a checkpoint holds, as every reader sees it.

    Attributes:
        checkpoint: the located files and their headers.
        scheme: how FP8 weights are scaled.
        pairing: each quantized weight's scale, the quantization parameters, orphan scales.
        exposed: the keys that are tensors of the model (scales, and unless asked for,
            quantization parameters, hidden), in checkpoint order: on-disk names, except that a
            packed weight is exposed under the name it stands for (``weight_packed`` ->
            ``weight``, ``gate_up_proj_blocks`` -> ``gate_up_proj``).
    """

    checkpoint: Checkpoint
    scheme: Scheme
    pairing: Pairing
    exposed: list[str]

    def stored(self, key: str) -> tuple[str, TensorEntry]:
        """The file and header entry of exposed key ``key`` (for a packed weight: its codes)."""
        return self.checkpoint.tensors[self.pairing.stored.get(key, key)]


def _declared(ckpt: Checkpoint) -> tuple[dict | None, str]:
    """The config that declares the quantization, and its path: ``config.json``, or ModelOpt's
    ``hf_quant_config.json`` when ``config.json`` has no ``quantization_config``."""
    if ckpt.quant_config is not None and not (ckpt.config or {}).get("quantization_config"):
        qc = {"quant_method": "modelopt", **ckpt.quant_config}
        return {**(ckpt.config or {}), "quantization_config": qc}, os.path.join(ckpt.root, QUANT_CONFIG_NAME)
    return ckpt.config, os.path.join(ckpt.root, CONFIG_NAME)


def resolve_scheme(
    scheme: Scheme | Granularity | str | None,
    block_size: tuple[int, int] | None,
    config: dict | None,
    config_path: str,
) -> Scheme:
    """An explicit ``scheme=`` wins; else the config's quantization_config; else ``auto``.
    ``block_size=`` replaces the block of every block granularity.

    Raises:
        UnsupportedSchemeError: a quantization_config that is not an FP8 scheme read here.
        ValueError: an unknown ``scheme`` name.
    """
    explicit = make_scheme(scheme, block_size)
    if explicit is not None:
        return explicit
    declared = scheme_from_config(config, config_path)
    if declared is None:
        return auto_scheme(block_size)
    # What a config declares decides between shapes that fit several granularities; a scale whose
    # shape only one granularity explains (one value, one per row) is that one whatever it says.
    declared = dataclasses.replace(declared, fallback=(PerTensor(), PerChannel()))
    if block_size is None:
        return declared
    gs = tuple(g for g in declared.granularities if g.weight_block_size is None)
    return dataclasses.replace(declared, granularities=gs + (PerBlock(tuple(block_size)),))


def build_catalogue(
    ckpt: Checkpoint,
    *,
    scheme: Scheme | Granularity | str | None = None,
    block_size: tuple[int, int] | None = None,
    include_quant_params: bool = False,
    problems: list[CheckpointError] | None = None,
) -> Catalogue:
    """The catalogue of ``ckpt``.

    With ``problems`` given (``inspect``), errors are appended there instead of raised: a scheme
    that cannot be resolved falls back to ``auto`` and is reported, and each weight whose scale
    cannot be paired is left unpaired and reported.
    """
    try:
        sch = resolve_scheme(scheme, block_size, *_declared(ckpt))
    except (CheckpointError, ValueError) as e:
        if problems is None:
            raise
        problems.append(e)  # type: ignore[arg-type]
        sch = auto_scheme(block_size)
    pairing = pair_scales(ckpt.tensors, sch, problems)
    hidden = pairing.consumed | (set() if include_quant_params else pairing.quant_params)
    renamed = {disk: key for key, disk in pairing.stored.items()}
    exposed = [renamed.get(k, k) for k in ckpt.tensors if k not in hidden]
    return Catalogue(checkpoint=ckpt, scheme=sch, pairing=pairing, exposed=exposed)
