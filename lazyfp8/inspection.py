"""``inspect_checkpoint``: everything the headers say about a checkpoint, and every problem."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from typing import Any

import torch

from .conversion import mapping_of
from .errors import CheckpointError, LazyFP8Error
from .formats.catalogue import build_catalogue
from .keymap import KeyMapping, KeyMappingSpec
from .storage.checkpoint import CONFIG_NAME, open_checkpoint

__all__ = ["Report", "inspect_checkpoint"]


@dataclasses.dataclass
class Report:
    """What :func:`inspect_checkpoint` found. ``problems`` empty means the headers are sound.

    Attributes:
        path: the checkpoint.
        files: per shard: name, bytes, tensor count.
        tensors: number of tensors in the index (or file).
        bytes_by_dtype: bytes of tensor data by stored dtype.
        scheme: the scheme name in force (explicit, from config.json, or ``auto``).
        fp8: per FP8 tensor: key, dtype, shape, scale key, granularity.
        fp8_summary: counts by (format, dtype, granularity, scale suffix).
        quant_params: static activation / KV-cache scales (not weights).
        orphan_scales: scale-named tensors no FP8 tensor uses.
        config: what config.json says (model type, architectures, quantization_config).
        key_mapping: the rules used, and ``runtime_names`` (disk -> runtime) under them.
        composites: runtime key -> one line per part (which on-disk tensor, which box of it,
            where it lands) for the values made of several on-disk tensors (fused experts).
        materialized: composite keys whose conversion is not a layout (read whole).
        problems: one line per problem, naming file and key.
    """

    path: str
    files: list[dict[str, Any]]
    tensors: int
    bytes_by_dtype: dict[str, int]
    scheme: str
    fp8: list[dict[str, Any]]
    fp8_summary: list[dict[str, Any]]
    quant_params: list[str]
    orphan_scales: list[str]
    config: dict[str, Any] | None
    key_mapping: list[str]
    runtime_names: dict[str, str]
    problems: list[str]
    composites: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    materialized: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _model_keys(root: str) -> list[str]:
    """State-dict keys of the model ``config.json`` describes, built on the meta device."""
    try:
        import torch
        import transformers
    except ImportError:
        raise LazyFP8Error("key_mapping='auto' needs the model's keys: install transformers") from None
    try:
        config = transformers.AutoConfig.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a config transformers cannot use
        raise LazyFP8Error(f"{os.path.join(root, CONFIG_NAME)}: transformers cannot read it ({e})") from None
    archs = getattr(config, "architectures", None) or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise LazyFP8Error(f"{os.path.join(root, CONFIG_NAME)}: architectures must be a list of class names, found {archs!r}")
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise LazyFP8Error(f"{root}/config.json names no transformers architecture ({archs!r})")
    with torch.device("meta"):
        model = cls(config)
    return list(model.state_dict().keys())


def inspect_checkpoint(
    path: str | os.PathLike[str],
    *,
    key_mapping: KeyMappingSpec = None,
    scheme: Any = None,
    block_size: tuple[int, int] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: Any = None,
) -> Report:
    """Read every header of ``path`` and report what it holds and what is wrong with it.

    Never raises for a damaged shard, tensor, scale, index or ``config.json``: each becomes a
    line in ``problems``, and the rest is still read. A directory holding both
    ``model.safetensors`` and an index (read as transformers reads it: the single file) and an
    empty index beside shards are problems too. Raises only when ``path`` holds no checkpoint
    at all.

    ``key_mapping="auto"`` builds the model ``config.json`` names on the meta device (needs
    transformers) and infers the rules onto its keys.

    ``path`` may be a Hugging Face Hub repo id: ``revision``, ``cache_dir``, ``local_files_only``
    and ``token`` are as for :class:`~lazyfp8.LazyFP8View`.
    """
    problems: list[CheckpointError] = []
    ckpt = open_checkpoint(
        path, problems, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
    )
    lines: list[str] = []
    catalogue = build_catalogue(ckpt, scheme=scheme, block_size=block_size, problems=problems)
    sch, pairing, exposed = catalogue.scheme, catalogue.pairing, catalogue.exposed

    files = []
    for shard, header in ckpt.shards.items():
        files.append({"name": os.path.basename(shard), "bytes": header.size, "tensors": len(header.tensors)})
    by_dtype: Counter[str] = Counter()
    for _, entry in ckpt.tensors.values():
        by_dtype[entry.dtype.code] += entry.nbytes
    fp8, summary = [], Counter()
    for key, q in pairing.scales.items():
        w = catalogue.stored(key)[1]
        entry, g = q.entry, q.granularity
        # A module-level scale (``<module>.scale``) is named after the module, not the weight.
        suffix = entry.name[len(key):] if entry.name.startswith(key) else "." + entry.name.rpartition(".")[2]
        fp8.append({"key": key, "dtype": w.dtype.code, "shape": list(q.shape), "scale_key": entry.name,
                    "scale_dtype": entry.dtype.code, "granularity": g.name, "format": q.form, "codec": q.codec.name})
        summary[(q.form, w.dtype.code, g.name, suffix, entry.dtype.code)] += 1
    rules: list[str] = []
    runtime: dict[str, str] = {}
    composites: dict[str, list[str]] = {}
    materialized: list[str] = []
    if key_mapping is not None:
        try:
            km = KeyMapping.infer(exposed, _model_keys(ckpt.root)) if key_mapping == "auto" else mapping_of(key_mapping)
            rules = km.describe()
            # Shapes and dtypes from the headers are all a layout needs: nothing is read.
            paired = set(pairing.scales)
            conversion = km.convert(
                exposed,
                lambda d: _HeaderTensor(
                    d,
                    pairing.scales[d].shape if d in paired else catalogue.stored(d)[1].shape,
                    torch.bfloat16 if d in paired else catalogue.stored(d)[1].dtype.torch,
                ),
                os.fspath(path),
                config=ckpt.config,
            )
            runtime = {d: r for r, d in conversion.renamed.items()}
            composites = {k: source.describe() for k, source in conversion.composites.items()}
            materialized = list(conversion.materialized)
        except LazyFP8Error as e:
            lines.append(str(e))
    for orphan in pairing.orphans:
        lines.append(f"{os.path.basename(ckpt.tensors[orphan][0])}: scale {orphan!r} belongs to no FP8 tensor")
    lines = [str(p) for p in problems] + lines
    cfg = None
    if ckpt.config is not None:
        cfg = {k: ckpt.config.get(k) for k in ("model_type", "architectures", "torch_dtype", "dtype", "quantization_config") if k in ckpt.config}
    return Report(
        path=os.fspath(path),
        files=files,
        tensors=len(ckpt.tensors),
        bytes_by_dtype=dict(by_dtype),
        scheme=sch.name,
        fp8=fp8,
        fp8_summary=[{"format": f, "dtype": d, "granularity": g, "scale_suffix": s, "scale_dtype": sd, "count": n}
                     for (f, d, g, s, sd), n in summary.most_common()],
        quant_params=sorted(pairing.quant_params),
        orphan_scales=list(pairing.orphans),
        config=cfg,
        key_mapping=rules,
        runtime_names=runtime,
        problems=lines,
        composites=composites,
        materialized=materialized,
    )


class _HeaderTensor:
    """A stored tensor as far as its header tells: what a layout checks, nothing to read."""

    def __init__(self, key: str, shape: tuple[int, ...], dtype: Any):
        self.key, self.shape, self.dtype, self.device = key, torch.Size(shape), dtype, torch.device("meta")

    def read_box_into(self, dst: Any, offsets: Any, lengths: Any) -> None:  # pragma: no cover - never called
        raise RuntimeError("inspect reads no data")
