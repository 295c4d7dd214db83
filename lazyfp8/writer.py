"""``save``: quantize, rename and shard a state dict into the on-disk FP8 layout.

The inverse of :class:`~lazyfp8.LazyFP8View`: what ``save`` writes, a view reads back. Tensors are
produced one at a time from the source (a model, a state dict or a lazy view); at most one shard's
worth of output plus one source tensor is held. Every file is written under a temporary name in
the destination directory and renamed only when all are complete, the index last; on failure the
temporary files are removed and nothing that looks like a checkpoint is left.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import torch
from torch import nn

from ._checkpoint import CONFIG_NAME, INDEX_NAME
from ._progress import ProgressSpec, make_progress
from .keymap import KeyMapping, KeyMappingSpec
from .lazy import LazyTensor
from .quantize import quantize as _quantize
from .schemes import Granularity, PerBlock, PerChannel, PerTensor, make_scheme

__all__ = ["save", "SaveResult", "DEFAULT_EXCLUDE"]

#: Weights left unquantized unless ``exclude`` says otherwise: the output head and embeddings.
DEFAULT_EXCLUDE: tuple[str, ...] = (r"(^|\.)lm_head\.", r"(^|\.)embed")

_FORMATS = {"fp8": "_scale_inv", "compressed-tensors": "_scale"}

Selector = Union[Callable[[str], bool], Iterable[str], None]


@dataclasses.dataclass(frozen=True)
class SaveResult:
    """What :func:`save` wrote.

    Attributes:
        path: the checkpoint directory.
        files: the shard file names, in order.
        index: the index file name, or ``None`` for a single-file checkpoint.
        total_size: bytes of tensor data written.
        quantized: runtime keys stored as FP8.
        tied: runtime keys not written because they share their tensor with a key that was.
        key_map: runtime key -> on-disk key.
    """

    path: str
    files: list[str]
    index: str | None
    total_size: int
    quantized: list[str]
    tied: list[str]
    key_map: dict[str, str]


def _selector(spec: Selector) -> Callable[[str], bool] | None:
    if spec is None or callable(spec):
        return spec  # type: ignore[return-value]
    patterns = [re.compile(p) for p in spec]
    return lambda key: any(p.search(key) for p in patterns)


def _items(source: nn.Module | Mapping[str, Any]) -> tuple[dict[str, Any], list[str], set[str]]:
    """(runtime key -> value, tied keys dropped, keys of Linear weights) without reading data."""
    if isinstance(source, nn.Module):
        linear = {f"{n}.weight" if n else "weight" for n, m in source.named_modules() if isinstance(m, nn.Linear)}
        values = source.state_dict(keep_vars=True)
    else:
        linear = set()
        values = source
    out: dict[str, Any] = {}
    tied: list[str] = []
    seen: dict[tuple, str] = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel():
            ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()), value.dtype)
            if ident in seen:
                tied.append(key)
                continue
            seen[ident] = key
        out[key] = value
    return out, tied, linear


def _materialize(value: Any) -> torch.Tensor:
    if isinstance(value, LazyTensor):
        t = value.materialize()
    elif isinstance(value, torch.Tensor):
        t = value.detach()
    else:
        raise TypeError(f"expected a tensor, got {type(value).__name__}")
    return t.to("cpu").contiguous()


def _quantization_config(g: Granularity, fmt: str, fp8_dtype: torch.dtype, ue8m0: bool) -> dict[str, Any]:
    if ue8m0:
        raise ValueError("no standard quantization_config describes ue8m0 scales; pass config=None")
    if fp8_dtype != torch.float8_e4m3fn and fmt == "fp8":
        raise ValueError("the HF 'fp8' quantization_config describes float8_e4m3fn only; pass config=None")
    if fmt == "fp8":
        block = list(g.block) if isinstance(g, PerBlock) else None
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": block}
    weights: dict[str, Any] = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
    if isinstance(g, PerTensor):
        weights["strategy"] = "tensor"
    elif isinstance(g, PerChannel):
        weights["strategy"] = "channel"
    elif g.block[0] == 1:
        weights.update(strategy="group", group_size=g.block[1])
    else:
        weights.update(strategy="block", block_structure=list(g.block))
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
    }


def _plan(sizes: dict[str, int], max_shard_size: int | str) -> tuple[dict[str, list[str]], dict[str, Any]]:
    try:
        from huggingface_hub import split_state_dict_into_shards_factory
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError("lazyfp8.save plans shards with huggingface_hub: pip install 'lazyfp8[save]'") from None
    split = split_state_dict_into_shards_factory(
        sizes,
        get_storage_size=lambda n: n,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    return split.filename_to_tensors, split.metadata


def _write_json(obj: Any, path: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def save(
    source: nn.Module | Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    scheme: Granularity | str | None = "per-tensor",
    block_size: tuple[int, int] | None = None,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    format: str = "fp8",
    key_mapping: KeyMappingSpec = None,
    quantize: Selector = None,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    ue8m0: bool = False,
    scales: Mapping[str, torch.Tensor] | Any = None,
    max_shard_size: int | str = "5GB",
    config: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: ProgressSpec = None,
) -> SaveResult:
    """Write ``source`` to directory ``path`` as a (sharded) FP8 safetensors checkpoint.

    Args:
        source: an ``nn.Module``, a state dict, or a :class:`LazyFP8View` (tensors are read one
            at a time). Tensors shared under several names (tied weights) are written once.
        scheme: granularity of the quantized weights: ``PerTensor()``, ``PerChannel()``,
            ``PerBlock((r, c))``, ``"per-tensor"``, ``"per-channel"``, ``"block"`` (with
            ``block_size``), ``"mx"``; ``None`` quantizes nothing (rename and shard only).
        fp8_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        format: ``"fp8"`` (scales as ``<name>_scale_inv``, HF/DeepSeek/Mistral) or
            ``"compressed-tensors"`` (``<module>.weight_scale``).
        key_mapping: the same disk -> runtime mapping a view of the result would use (a preset,
            a dict, a :class:`KeyMapping`); keys are written under its inverse, checked to
            round-trip on every key.
        quantize: which runtime keys to quantize: a predicate or regexes. Default: the weights of
            ``nn.Linear`` modules for a model, 2-D floating ``*.weight`` tensors for a mapping;
            always minus ``exclude``.
        exclude: regexes of runtime keys never quantized (default: ``lm_head`` and embeddings).
        ue8m0: store power-of-two scales as exponent bytes (MX).
        scales: runtime key -> scale to reuse instead of ``amax / fp8_max``, or a
            :class:`LazyFP8View` whose stored scales to reuse: re-saving a view's tensors with its
            own scales reproduces its FP8 bytes exactly.
        max_shard_size: as in ``huggingface_hub`` (``"5GB"``, or bytes).
        config: written as ``config.json`` with ``quantization_config`` describing the result.
        overwrite: replace an existing checkpoint in ``path`` (its stale shards are removed).
        progress: ``True`` for a bar on stderr (tqdm), or ``callback(done_bytes, total_bytes, key)``.

    Returns:
        A :class:`SaveResult`.

    Raises:
        FileExistsError: ``path`` holds a checkpoint and ``overwrite`` is false.
        NonFiniteError: a tensor to quantize holds NaN or an infinity (naming it).
        KeyMappingError: the key mapping does not round-trip on the keys.
    """
    path = os.fspath(path)
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {sorted(_FORMATS)}, got {format!r}")
    gran = None if scheme is None else make_scheme(scheme, block_size).granularities[0]  # type: ignore[union-attr]
    if format == "fp8" and isinstance(gran, PerChannel):
        raise ValueError("the HF 'fp8' format has no per-channel scales; use format='compressed-tensors'")
    # Settled before any tensor is read: a config that cannot be written must not cost a save.
    cfg = None if config is None else dict(config)
    if cfg is not None and gran is not None:
        cfg["quantization_config"] = _quantization_config(gran, format, fp8_dtype, ue8m0)
    suffix = _FORMATS[format]
    chosen = _selector(quantize)
    excluded = _selector(list(exclude)) or (lambda key: False)
    items, tied, linear = _items(source)
    mapping = KeyMapping.from_spec(key_mapping)
    disk_of = {runtime: disk for disk, runtime in mapping.build_inverse(items).items()}

    def should_quantize(key: str, value: Any) -> bool:
        if gran is None or excluded(key) or not value.dtype.is_floating_point or value.dtype.itemsize == 1:
            return False
        if chosen is not None:
            return chosen(key)
        if linear:
            return key in linear
        return key.endswith("weight") and len(value.shape) == 2

    quantized = [k for k, v in items.items() if should_quantize(k, v)]
    qset = set(quantized)
    for k in quantized:
        if suffix == "_scale" and not disk_of[k].endswith("weight"):
            raise ValueError(f"format='compressed-tensors' names scales '<module>.weight_scale'; {k!r} is not a weight")
        if isinstance(gran, PerChannel) and len(items[k].shape) < 2:
            raise ValueError(f"per-channel scales need a 2-D weight; {k!r} has shape {list(items[k].shape)}")

    sizes = {}
    for k, v in items.items():
        n = int(torch.Size(v.shape).numel())
        if k in qset:
            sizes[k] = n + 4 * int(torch.Size(gran.scale_shape(tuple(v.shape))).numel())  # type: ignore[union-attr]
        else:
            sizes[k] = n * v.dtype.itemsize
    files, metadata = _plan(sizes, max_shard_size)

    os.makedirs(path, exist_ok=True)
    _remove_dead_temporaries(path)
    index_path = os.path.join(path, INDEX_NAME)
    old_files = _existing(path, index_path)
    if old_files and not overwrite:
        raise FileExistsError(f"{path} already holds a checkpoint ({', '.join(sorted(old_files)[:3])}); pass overwrite=True")

    scale_source = _scale_lookup(scales)
    written: list[str] = []
    bar = make_progress(progress, sum(sizes.values()), "writing")
    try:
        for fname, keys in files.items():
            shard: dict[str, torch.Tensor] = {}
            for k in keys:
                t = _materialize(items[k])
                disk = disk_of[k]
                if k in qset:
                    given = scale_source(k)
                    codes, s = _quantize(t, gran, fp8_dtype, ue8m0=ue8m0, scale=given, name=k)  # type: ignore[arg-type]
                    shard[disk] = codes
                    shard[disk + suffix] = s.contiguous()
                else:
                    shard[disk] = t
                del t
                bar.update(sizes[k], k)
            tmp = os.path.join(path, f".{fname}.tmp-{os.getpid()}")
            written.append(tmp)
            _save_file(shard, tmp)
            del shard
        if cfg is not None:
            _write_json(cfg, os.path.join(path, CONFIG_NAME))
        for tmp, fname in zip(written, files):
            os.replace(tmp, os.path.join(path, fname))
        written = []
        if len(files) > 1:
            weight_map = {}
            for fname, keys in files.items():
                for k in keys:
                    weight_map[disk_of[k]] = fname
                    if k in qset:
                        weight_map[disk_of[k] + suffix] = fname
            _write_json({"metadata": metadata, "weight_map": weight_map}, index_path)
        elif os.path.exists(index_path):
            os.remove(index_path)
    finally:
        bar.close()
        for tmp in written:
            if os.path.exists(tmp):
                os.remove(tmp)
    for stale in old_files - set(files):
        p = os.path.join(path, stale)
        if os.path.exists(p):
            os.remove(p)
    return SaveResult(
        path=path,
        files=list(files),
        index=INDEX_NAME if len(files) > 1 else None,
        total_size=int(metadata.get("total_size", sum(sizes.values()))),
        quantized=quantized,
        tied=tied,
        key_map=disk_of,
    )


_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


def _remove_dead_temporaries(path: str) -> None:
    """Remove temporary files left by writers that were killed (their process is gone)."""
    for name in os.listdir(path):
        m = _TEMPORARY.match(name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _alive(pid):
            continue  # another writer is at work here
        try:
            os.remove(os.path.join(path, name))
        except FileNotFoundError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _existing(path: str, index_path: str) -> set[str]:
    """Checkpoint files already in ``path``: the index's shards and any ``*.safetensors``."""
    names = {f for f in os.listdir(path) if f.endswith(".safetensors")}
    if os.path.isfile(index_path):
        names.add(INDEX_NAME)
        try:
            with open(index_path) as f:
                names |= set(json.load(f).get("weight_map", {}).values())
        except (ValueError, AttributeError, OSError):
            pass
    return names


def _scale_lookup(scales: Any) -> Callable[[str], torch.Tensor | None]:
    if scales is None:
        return lambda key: None
    if hasattr(scales, "scale") and callable(scales.scale):  # a LazyFP8View
        return lambda key: scales.scale(key) if key in scales else None
    return lambda key: scales.get(key)


def _save_file(tensors: dict[str, torch.Tensor], path: str) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:  # pragma: no cover
        raise ImportError("lazyfp8.save needs safetensors") from None
    save_file(tensors, path, metadata={"format": "pt"})
    # safetensors creates its files 0600; a checkpoint in a shared directory must be readable
    # like any other file the user creates.
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    # /proc tells without changing it; os.umask() can only be read by setting it, which would
    # race with other threads creating files.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
