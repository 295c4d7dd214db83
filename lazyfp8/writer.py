"""``save``: quantize, rename and shard a state dict into an on-disk quantized layout (FP8, NVFP4,
MXFP4, int4, each named as its producers name it).

The inverse of :class:`~lazyfp8.LazyFP8View`: what ``save`` writes, a view reads back. Tensors are
produced one at a time from the source (a model, a state dict or a lazy view); at most one shard's
worth of output plus one source tensor is held.

What a user may rely on (see ``docs/writing.md`` for how it is tested):

* Everything that can be refused (arguments, keys, values, the destination) is refused before the
  destination is touched.
* Every file is written under a temporary name in the destination and put in place by
  :func:`~lazyfp8.storage.destination.commit`, so that at every instant the destination loads as the old checkpoint, as the
  new one, or not at all, whichever file a reader looks at first.
* The only files ever removed or replaced are the ones ``save`` itself writes
  (``model.safetensors``, ``model-XXXXX-of-YYYYY.safetensors``, the index, ``config.json``, the
  ``extra_files`` names and their ``.<name>.tmp-<pid>`` temporaries), directly inside the
  destination; a link among them is removed, never followed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any, Union

import torch
from torch import nn

from ._progress import ProgressSpec, make_progress
from .errors import SaveError
from .formats.quantize import MXFP4, NVFP4, Int4, PackedScheme, fp8_max, pack_nibbles
from .formats.quantize import quantize as _quantize
from .formats.schemes import Granularity, make_scheme
from .keymap import KeyMapping, KeyMappingSpec
from .lazy import LazyTensor
from .storage.checkpoint import CONFIG_NAME, INDEX_NAME
from .storage.destination import (
    Staging,
    commit,
    locked,
    make_directory,
    ours,
    remove_dead_temporaries,
    survey,
    umask,
)
from .storage.dtypes import by_torch
from .storage.files import check_name, open_regular
from .view import LazyFP8View

__all__ = ["save", "SaveResult", "SaveError", "DEFAULT_EXCLUDE"]

#: Weights left unquantized unless ``exclude`` says otherwise: the output head and embeddings.
DEFAULT_EXCLUDE: tuple[str, ...] = (r"(^|\.)lm_head\.", r"(^|\.)embed")

Selector = Union[Callable[[str], bool], Iterable[str], None]


@dataclasses.dataclass(frozen=True)
class SaveResult:
    """What :func:`save` wrote.

    Attributes:
        path: the checkpoint directory.
        files: the shard file names, in order.
        index: the index file name, or ``None`` for a single-file checkpoint.
        total_size: bytes of tensor data written.
        quantized: runtime keys stored quantized.
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
    if isinstance(spec, str):
        spec = [spec]  # one regex, not its characters
    try:
        patterns = [re.compile(p) for p in spec]
    except (re.error, TypeError) as e:
        raise ValueError(f"not a regular expression: {e}") from None
    return lambda key: any(p.search(key) for p in patterns)


def _items(source: nn.Module | Mapping[str, Any], path: str) -> tuple[dict[str, Any], list[str], set[str]]:
    """(runtime key -> value, tied keys dropped, keys of Linear weights) without reading data;
    every key a string and every value a tensor with data (else a SaveError)."""
    if isinstance(source, nn.Module):
        linear = {f"{n}.weight" if n else "weight" for n, m in source.named_modules() if isinstance(m, nn.Linear)}
        values = source.state_dict(keep_vars=True)
    elif isinstance(source, Mapping):
        linear = set()
        values = source
    else:
        raise TypeError(f"save() writes an nn.Module, a state dict or a LazyFP8View, not {type(source).__name__}")
    out: dict[str, Any] = {}
    tied: list[str] = []
    seen: dict[tuple, str] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            _check_key(key, path)
        _check_value(key, value, path)
        if isinstance(value, torch.Tensor) and value.numel():
            ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()), value.dtype)
            if ident in seen:
                tied.append(key)
                continue
            seen[ident] = key
        out[key] = value
    return out, tied, linear


def _check_key(disk: Any, path: str, runtime: Any = None) -> None:
    """Refuse a name safetensors cannot store, or stores so that no reader gets it back."""
    shown = repr(disk) if runtime is None or runtime == disk else f"{runtime!r} (written as {disk!r})"
    if not isinstance(disk, str):
        problem = f"is a {type(disk).__name__}; safetensors names tensors with strings"
    elif not disk:
        problem = "is empty"
    elif "\x00" in disk:
        problem = "holds a NUL character"
    elif disk == "__metadata__":
        problem = "is the name safetensors reserves for its metadata"
    else:
        try:
            disk.encode("utf-8")
            return
        except UnicodeEncodeError as e:
            problem = f"holds {disk[e.start]!r}, which UTF-8 cannot encode (a lone surrogate)"
    raise SaveError(
        f"{path}: cannot write the tensor {shown}: its name {problem}; rename it (key_mapping=...) or leave it out",
        path=path,
        key=disk if isinstance(disk, str) else repr(disk),
    )


def _check_value(key: str, value: Any, path: str) -> None:
    """Refuse, before anything is written, a value that cannot be read and stored as it is."""
    if isinstance(value, LazyTensor):
        return  # a view's tensor: its dtype and shape come from a header that was checked
    if not isinstance(value, torch.Tensor):
        problem = f"is a {type(value).__name__}, not a tensor"
    elif value.device.type == "meta":
        problem = "is on the meta device and has no data; load the weights first"
    elif value.layout != torch.strided:
        problem = f"has layout {value.layout}; convert it with .to_dense()"
    elif by_torch(value.dtype) is None:
        problem = f"has dtype {value.dtype}, which safetensors cannot store"
    else:
        return
    raise SaveError(f"{path}: cannot write {key!r}: it {problem}", path=path, key=key)


def _check_disk_names(disk_of: dict[str, str], written: dict[str, list[tuple[str, str]]], path: str) -> None:
    """Every on-disk name storable, and no two tensors written under one name (a scale or a
    packed part taking the name of another tensor, or of another weight's part).

    ``written``: for each quantized runtime key, the ``(name, what)`` of every tensor written for it.
    """
    for runtime, disk in disk_of.items():
        _check_key(disk, path, runtime)
    holder = {disk: (runtime, "tensor") for runtime, disk in disk_of.items() if runtime not in written}
    for runtime, parts in written.items():
        for name, what in parts:
            if name in holder and holder[name][0] != runtime:
                other, other_what = holder[name]
                whose = f"the tensor {other!r}" if other_what == "tensor" else f"the {other_what} of {other!r}"
                raise SaveError(
                    f"{path}: the {what} of {runtime!r} would be written as {name!r}, the name of {whose}; "
                    f"rename one of them or leave {runtime!r} unquantized",
                    path=path,
                    key=name,
                )
            _check_key(name, path, runtime)
            holder[name] = (runtime, what)


def _materialize(value: Any) -> torch.Tensor:
    if isinstance(value, LazyTensor):
        t = value.materialize()
    elif isinstance(value, torch.Tensor):
        t = value.detach()
    else:
        raise TypeError(f"expected a tensor, got {type(value).__name__}")
    return t.to("cpu").contiguous()


# ---------------------------------------------------------------------------------------------
# What one quantized weight becomes on disk, per scheme and format

#: Every ``format=``; the key of its ``quantization_config`` listing the Linear modules left
#: unquantized.
_UNCONVERTED = {
    "fp8": "modules_to_not_convert",
    "compressed-tensors": "ignore",
    "modelopt": "exclude_modules",
    "mxfp4": "modules_to_not_convert",
}
_FORMATS = tuple(_UNCONVERTED)

#: The 4-bit schemes by name: the formats that store each (the first is the default) and the
#: scheme object a format asks for.
_PACKED: dict[str, tuple[str, ...]] = {
    "nvfp4": ("compressed-tensors", "modelopt"),
    "mxfp4": ("mxfp4", "compressed-tensors"),
    "int4": ("compressed-tensors",),
    "int4-asym": ("compressed-tensors",),
}


def _module_prefix(disk: str) -> str | None:
    """``"a.b."`` for ``"a.b.weight"``, ``""`` for ``"weight"``, ``None`` for any other name."""
    if disk == "weight":
        return ""
    if disk.endswith(".weight"):
        return disk.removesuffix("weight")
    return None


class _Target:
    """How one scheme in one format stores a quantized weight: its on-disk names, its size, its
    tensors, and the ``quantization_config`` that tells readers so. One subclass per layout."""

    format: str = ""

    def check(self, key: str, disk: str, shape: tuple[int, ...]) -> None:
        """Refuse (ValueError, naming ``key``) a weight this layout cannot store."""

    def names(self, disk: str) -> list[tuple[str, str]]:
        """``(on-disk name, what it is)`` of every tensor written for the weight stored as ``disk``."""
        raise NotImplementedError

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes written for a weight of ``shape`` (codes and scales)."""
        raise NotImplementedError

    def tensors(self, key: str, disk: str, t: torch.Tensor, given: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The tensors to write for weight ``t`` (``given``: its scale, reused)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The ``quantization_config`` describing the weights, without the unquantized modules."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _FP8(_Target):
    """FP8 codes under the weight's name, the scale beside it: ``<name>_scale_inv`` (HF ``fp8``) or
    ``<module>.weight_scale`` (compressed-tensors)."""

    granularity: Granularity
    fp8_dtype: torch.dtype
    ue8m0: bool
    format: str

    @property
    def suffix(self) -> str:
        return "_scale_inv" if self.format == "fp8" else "_scale"

    def check(self, key: str, disk: str, shape: tuple[int, ...]) -> None:
        if self.format == "compressed-tensors" and not disk.endswith("weight"):
            raise ValueError(f"format='compressed-tensors' names scales '<module>.weight_scale'; {key!r} is not a weight")
        if self.granularity.needs_rows and len(shape) < 2:
            raise ValueError(f"per-channel scales need a 2-D weight; {key!r} has shape {list(shape)}")

    def names(self, disk: str) -> list[tuple[str, str]]:
        return [(disk, "codes"), (disk + self.suffix, "scale")]

    def nbytes(self, shape: tuple[int, ...]) -> int:
        n = int(torch.Size(shape).numel())
        return n + 4 * int(torch.Size(self.granularity.scale_shape(shape)).numel())

    def tensors(self, key: str, disk: str, t: torch.Tensor, given: torch.Tensor | None) -> dict[str, torch.Tensor]:
        codes, s = _quantize(t, self.granularity, self.fp8_dtype, ue8m0=self.ue8m0, scale=given, name=key)
        return {disk: codes, disk + self.suffix: s.contiguous()}

    def config(self) -> dict[str, Any]:
        if self.ue8m0:
            raise ValueError("no standard quantization_config describes ue8m0 scales; pass config=None")
        if self.fp8_dtype != torch.float8_e4m3fn and self.format == "fp8":
            raise ValueError("the HF 'fp8' quantization_config describes float8_e4m3fn only; pass config=None")
        if self.format == "fp8":
            return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": self.granularity.weight_block_size}
        weights: dict[str, Any] = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
        weights.update(self.granularity.compressed_tensors_strategy())
        return {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        }


@dataclasses.dataclass(frozen=True)
class _Packed(_Target):
    """A 4-bit scheme's codes (two a byte) and scales, named as one producer names them."""

    scheme: PackedScheme

    def check(self, key: str, disk: str, shape: tuple[int, ...]) -> None:
        self.scheme.check_shape(shape, key)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        groups = int(torch.Size(self.scheme.granularity.scale_shape(shape)).numel())
        extra = {"weight_global_scale": 4, "weight_scale_2": 4, "weight_shape": 16}
        return (
            int(torch.Size(shape).numel()) // 2
            + groups * self.scheme.scale_dtype.itemsize
            + sum(extra.get(name.rpartition(".")[2], 0) for name, _ in self.names("weight"))
        )

    def _module(self, key: str, disk: str, what: str) -> str:
        prefix = _module_prefix(disk)
        if prefix is None:
            raise ValueError(
                f"format={self.format!r} names a packed weight's parts '<module>.{what}'; {key!r} is stored as "
                f"{disk!r}, not '<module>.weight': leave it unquantized or rename it (key_mapping=...)"
            )
        return prefix


@dataclasses.dataclass(frozen=True)
class _CompressedTensorsPacked(_Packed):
    """compressed-tensors ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` (``weight_packed`` U8
    ``[out, in/2]``, ``weight_scale``, NVFP4's ``weight_global_scale`` F32 ``[1]``) and int4
    ``pack-quantized`` (``weight_packed`` I32 ``[out, in/8]``, eight codes ``q + 8`` a word, low
    nibble first; ``weight_scale``; ``weight_shape`` I64 ``[2]``; asymmetric, ``weight_zero_point``
    I32 ``[ceil(out/8), in/g]``, packed the same way along the output rows)."""

    format: str = "compressed-tensors"

    def check(self, key: str, disk: str, shape: tuple[int, ...]) -> None:
        self._module(key, disk, "weight_packed")
        super().check(key, disk, shape)

    @property
    def _asymmetric(self) -> bool:
        return not getattr(self.scheme, "symmetric", True)

    def names(self, disk: str) -> list[tuple[str, str]]:
        m = _module_prefix(disk) or ""
        second = {"nvfp4": [(m + "weight_global_scale", "global scale")], "int4": [(m + "weight_shape", "shape")]}
        zero = [(m + "weight_zero_point", "zero point")] if self._asymmetric else []
        return [(m + "weight_packed", "codes"), (m + "weight_scale", "scale"), *second.get(self.scheme.name, []), *zero]

    def nbytes(self, shape: tuple[int, ...]) -> int:
        n = super().nbytes(shape)
        if self._asymmetric:
            n += -(-shape[0] // 8) * (shape[-1] // self.scheme.group) * 4
        return n

    def tensors(self, key: str, disk: str, t: torch.Tensor, given: torch.Tensor | None) -> dict[str, torch.Tensor]:
        p = self.scheme.quantize(t, name=key)
        m = self._module(key, disk, "weight_packed")
        out = {m + "weight_packed": p.codes, m + "weight_scale": p.scale}
        if self.scheme.name == "int4":
            out[m + "weight_packed"] = p.codes.view(torch.int32)  # little-endian words: nibble 0 lowest
            out[m + "weight_shape"] = torch.tensor(t.shape, dtype=torch.int64)
        if p.zero_point is not None:
            # Packed like the codes (q + 8, eight a word, lowest nibble first) but along the
            # output rows, a column of words per group: compressed-tensors' pack_to_int32(dim=0).
            zp = (p.zero_point.to(torch.int32) + 8).to(torch.uint8).t()
            zp = pack_nibbles(torch.nn.functional.pad(zp, (0, -zp.shape[1] % 8)))
            words = torch.empty(zp.shape, dtype=torch.uint8).copy_(zp)  # plain strides, size-1 dims too
            out[m + "weight_zero_point"] = words.view(torch.int32).t().contiguous()
        if p.global_scale is not None:
            out[m + "weight_global_scale"] = p.global_scale.reshape(1)
        return out

    def config(self) -> dict[str, Any]:
        weights: dict[str, Any] = {
            "num_bits": 4,
            "type": "int" if self.scheme.name == "int4" else "float",
            "strategy": {"nvfp4": "tensor_group"}.get(self.scheme.name, "group"),
            "group_size": self.scheme.group,
            "symmetric": not self._asymmetric,
            "dynamic": False,
        }
        if self.scheme.name != "int4":
            weights["scale_dtype"] = str(self.scheme.scale_dtype)
        fmt = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized", "int4": "pack-quantized"}[self.scheme.name]
        return {
            "quant_method": "compressed-tensors",
            "format": fmt,
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": fmt}},
        }


@dataclasses.dataclass(frozen=True)
class _ModelOptNVFP4(_Packed):
    """ModelOpt NVFP4: ``weight`` U8 ``[out, in/2]``, ``weight_scale`` F8_E4M3 ``[out, in/16]``,
    ``weight_scale_2`` F32 0-d (multiplies)."""

    format: str = "modelopt"

    def check(self, key: str, disk: str, shape: tuple[int, ...]) -> None:
        self._module(key, disk, "weight_scale")
        super().check(key, disk, shape)

    def names(self, disk: str) -> list[tuple[str, str]]:
        m = _module_prefix(disk) or ""
        return [(disk, "codes"), (m + "weight_scale", "scale"), (m + "weight_scale_2", "global scale")]

    def tensors(self, key: str, disk: str, t: torch.Tensor, given: torch.Tensor | None) -> dict[str, torch.Tensor]:
        p = self.scheme.quantize(t, name=key)
        m = self._module(key, disk, "weight_scale")
        assert p.global_scale is not None
        return {disk: p.codes, m + "weight_scale": p.scale, m + "weight_scale_2": p.global_scale}

    def config(self) -> dict[str, Any]:
        return {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": self.scheme.group}


@dataclasses.dataclass(frozen=True)
class _GptOssMXFP4(_Packed):
    """gpt-oss MXFP4 (``quant_method: mxfp4``): ``<name>_blocks`` U8 ``[..., R, C/32, 16]`` (32 codes
    in 16 bytes a block) and ``<name>_scales`` U8 ``[..., R, C/32]`` biased exponents. Stacked
    experts are held as transformers' ``GptOssExperts`` holds them, ``[E, in, out]``, and stored
    ``[E, out, in]`` (blocks along ``in``): the inverse of what the view exposes."""

    format: str = "mxfp4"

    @staticmethod
    def _stored_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-2], shape[-1], shape[-2]) if len(shape) >= 3 else shape

    def check(self, key: str, disk: str, shape: tuple[int, ...]) -> None:
        self.scheme.check_shape(self._stored_shape(shape), key)

    def names(self, disk: str) -> list[tuple[str, str]]:
        return [(disk + "_blocks", "codes"), (disk + "_scales", "scale")]

    def tensors(self, key: str, disk: str, t: torch.Tensor, given: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if t.dim() >= 3:
            # Expert by expert, each a transposed view: bands are copied, never a whole expert.
            mats = t.reshape(-1, *t.shape[-2:])
            parts = [self.scheme.quantize(m.transpose(0, 1), name=key) for m in mats]
            stored = self._stored_shape(tuple(t.shape))
            codes = torch.stack([p.codes for p in parts]).reshape(*stored[:-1], -1)
            scale = torch.stack([p.scale for p in parts]).reshape(*stored[:-1], -1)
        else:
            p = self.scheme.quantize(t, name=key)
            stored, codes, scale = tuple(t.shape), p.codes, p.scale
        return {disk + "_blocks": codes.reshape(*stored[:-1], stored[-1] // 32, 16), disk + "_scales": scale}

    def config(self) -> dict[str, Any]:
        return {"quant_method": "mxfp4"}


def _target(
    scheme: Granularity | PackedScheme | str | None,
    block_size: tuple[int, int] | None,
    group_size: int | None,
    fp8_dtype: torch.dtype,
    fmt: str | None,
    ue8m0: bool,
) -> tuple[_Target | None, str]:
    """The layout ``save``'s arguments ask for, and the format (``format=None``: the scheme's
    usual one). Raises ValueError for a combination no producer writes."""
    if fmt is not None and fmt not in _FORMATS:
        raise ValueError(f"format must be one of {sorted(_FORMATS)}, got {fmt!r}")
    packed: PackedScheme | None = None
    if isinstance(scheme, PackedScheme):
        packed = scheme
    elif isinstance(scheme, str) and scheme in _PACKED:
        if block_size is not None:
            raise ValueError(f"scheme={scheme!r} takes group_size=, not block_size=")
        if scheme in ("int4", "int4-asym"):
            packed = Int4(128 if group_size is None else group_size, symmetric=scheme == "int4")
        else:
            fixed = {"nvfp4": NVFP4, "mxfp4": MXFP4}[scheme]
            packed = fixed() if group_size is None else fixed(group=group_size)
    if packed is None:
        if group_size is not None:
            raise ValueError(f"group_size= is for the 4-bit schemes ({', '.join(_PACKED)}); FP8 schemes take block_size=")
        fmt = fmt or "fp8"
        if fmt not in ("fp8", "compressed-tensors"):
            raise ValueError(
                f"format={fmt!r} stores 4-bit weights ({', '.join(k for k, v in _PACKED.items() if fmt in v)}); "
                "FP8 weights are written with format='fp8' or 'compressed-tensors'"
            )
        if scheme is None:
            return None, fmt
        gran = make_scheme(scheme, block_size).granularities[0]  # type: ignore[union-attr]
        if fmt == "fp8" and gran.grid and gran.weight_block_size is None:
            raise ValueError("the HF 'fp8' format has no per-channel scales; use format='compressed-tensors'")
        fp8_max(fp8_dtype)  # an FP8 dtype, or a ValueError naming the allowed ones
        return _FP8(gran, fp8_dtype, ue8m0, fmt), fmt
    formats = _PACKED[packed.name]
    fmt = fmt or formats[0]
    if fmt not in formats:
        raise ValueError(
            f"{packed.name} is written with format={' or '.join(map(repr, formats))}, not {fmt!r}"
        )
    if ue8m0 or fp8_dtype != torch.float8_e4m3fn:
        raise ValueError(f"ue8m0= and fp8_dtype= are for FP8 schemes; {packed.name} fixes its own code and scale types")
    if isinstance(packed, NVFP4):
        divide = fmt == "compressed-tensors"  # ModelOpt's weight_scale_2 multiplies
        if isinstance(scheme, str):
            packed = NVFP4(divide=divide)
        elif packed.divide != divide:
            raise ValueError(
                f"format={fmt!r} stores NVFP4 with a global scale that {'divides' if divide else 'multiplies'}: "
                f"pass NVFP4(divide={divide}) or scheme='nvfp4'"
            )
    layout = {"compressed-tensors": _CompressedTensorsPacked, "modelopt": _ModelOptNVFP4, "mxfp4": _GptOssMXFP4}[fmt]
    return layout(packed), fmt


def parse_shard_size(value: int | str) -> int:
    """``max_shard_size`` in bytes: a positive int, or a size huggingface_hub parses (``"5GB"``,
    ``"500MB"``); plain digits are bytes.

    Raises:
        ValueError: zero, negative, or not a size.
    """
    try:
        from huggingface_hub.serialization._base import parse_size_to_int
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError("lazyfp8.save plans shards with huggingface_hub: pip install 'lazyfp8[save]'") from None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        try:
            n = parse_size_to_int(value)
        except (ValueError, OverflowError) as e:
            raise ValueError(f"max_shard_size {value!r} is not a size: {e}") from None
    else:
        raise ValueError(f"max_shard_size must be bytes (an int) or a size like '5GB', not {value!r}")
    if n <= 0:
        raise ValueError(f"max_shard_size must be a positive size, got {value!r}")
    return n


def _plan(sizes: dict[str, int], max_shard_size: int) -> tuple[dict[str, list[str]], dict[str, Any]]:
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(
        sizes,
        get_storage_size=lambda n: n,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    return split.filename_to_tensors, split.metadata


def _json_text(obj: Any, what: str, path: str) -> str:
    try:
        return json.dumps(obj, indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise SaveError(f"{path}: {what} cannot be written as JSON: {e}", path=path) from None


def _extra_names(extra_files: Mapping[str, Any] | None, path: str) -> dict[str, Any]:
    """``extra_files`` checked to hold plain names that no reader takes for checkpoint files."""
    out = dict(extra_files or {})
    for name in out:
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or os.sep in name or "\x00" in name:
            raise SaveError(f"{path}: extra file name {name!r} is not a plain file name", path=path)
        if name.startswith(".") or name.endswith(".safetensors") or ours(name) or name.endswith(".index.json"):
            raise SaveError(
                f"{path}: extra file name {name!r} is reserved: hidden names are save's temporaries, and "
                "*.safetensors, *.index.json and config.json are the checkpoint's own files",
                path=path,
            )
        if not hasattr(out[name], "read"):  # a path: a regular file now, or refused before writing
            os.close(open_regular(os.fspath(out[name]), f"extra file {name!r}")[0])
    return out


# ---------------------------------------------------------------------------------------------
# The destination


def _files_of(view: LazyFP8View) -> list[str]:
    """Every file a view reads: shards, index and config.json."""
    ckpt = view._checkpoint
    files = list(view.files)
    if ckpt.index_path is not None:
        files.append(ckpt.index_path)
    config = os.path.join(ckpt.root, CONFIG_NAME)
    if os.path.exists(config):
        files.append(config)
    return files


def _check_not_source(path: str, sources: Iterable[Any]) -> None:
    """Refuse a destination that is, or holds a file of, a view being read.

    The directory itself (the same real path, or the same (st_dev, st_ino) through a bind mount
    or a link), a file of the view directly inside it, or a file in it that is one of the view's
    under another name (a hard link or a symlink) all count: overwriting would destroy the source.
    """
    real = os.path.realpath(path)
    try:
        dst = os.stat(path)
    except OSError:
        return  # nothing there yet: nothing of the source either
    inside_dst: dict[tuple[int, int], str] = {}
    if stat.S_ISDIR(dst.st_mode):
        for name in os.listdir(path):
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(path, name))
                inside_dst[(st.st_dev, st.st_ino)] = name
    for view in sources:
        if not isinstance(view, LazyFP8View):
            continue
        root = view._checkpoint.root
        with contextlib.suppress(OSError):
            if os.path.samefile(root, path):
                raise SaveError(f"{path} is the directory of the checkpoint being read ({root}); "
                                "write to another directory", path=path)
        for f in _files_of(view):
            clash = os.path.dirname(os.path.realpath(f)) == real
            with contextlib.suppress(OSError):
                st = os.stat(f)
                clash = clash or (st.st_dev, st.st_ino) in inside_dst
            if clash:
                raise SaveError(
                    f"{path} holds {f}, a file of the checkpoint being read ({root}); writing there "
                    "would destroy the source: write to another directory",
                    path=path,
                )


def save(
    source: nn.Module | Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    scheme: Granularity | PackedScheme | str | None = "per-tensor",
    block_size: tuple[int, int] | None = None,
    group_size: int | None = None,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    format: str | None = None,
    key_mapping: KeyMappingSpec = None,
    quantize: Selector = None,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    ue8m0: bool = False,
    scales: Mapping[str, torch.Tensor] | Any = None,
    max_shard_size: int | str = "5GB",
    config: dict[str, Any] | None = None,
    extra_files: Mapping[str, str | os.PathLike[str] | IO[bytes]] | None = None,
    overwrite: bool = False,
    progress: ProgressSpec = None,
) -> SaveResult:
    """Write ``source`` to directory ``path`` as a (sharded) quantized safetensors checkpoint.

    Args:
        source: an ``nn.Module``, a state dict, or a :class:`LazyFP8View` (tensors are read one
            at a time). Tensors shared under several names (tied weights) are written once.
        scheme: FP8 with a granularity: ``PerTensor()``, ``PerChannel()``, ``PerBlock((r, c))``,
            ``"per-tensor"``, ``"per-channel"``, ``"block"`` (with ``block_size``), ``"mx"``; or a
            4-bit scheme: ``"nvfp4"`` (e2m1, e4m3 scale per 16, global scale), ``"mxfp4"`` (e2m1,
            power-of-two scale per 32), ``"int4"`` / ``"int4-asym"`` (symmetric / with a zero point,
            float32 scale per ``group_size``, default 128), or a
            :class:`~lazyfp8.formats.quantize.PackedScheme`; ``None``
            quantizes nothing (rename and shard only).
        group_size: the int4 group (a positive even number dividing each weight's columns).
        fp8_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2`` (FP8 schemes).
        format: how the quantized weights are named and described, as one producer does it:
            ``"fp8"`` (FP8; scales ``<name>_scale_inv``, HF/DeepSeek/Mistral),
            ``"compressed-tensors"`` (FP8 ``<module>.weight_scale``; NVFP4, MXFP4 and int4
            ``weight_packed``), ``"modelopt"`` (NVFP4: ``weight``, ``weight_scale``,
            ``weight_scale_2``), ``"mxfp4"`` (gpt-oss: ``<name>_blocks``, ``<name>_scales``).
            ``None`` (default): ``"fp8"`` for FP8, ``"compressed-tensors"`` for NVFP4 and int4,
            ``"mxfp4"`` for MXFP4. See ``docs/writing.md`` for the names and error bounds.
        key_mapping: the same disk -> runtime mapping a view of the result would use (a preset,
            a dict, a :class:`KeyMapping`); keys are written under its inverse, checked to
            round-trip on every key.
        quantize: which runtime keys to quantize: a predicate or regexes. Default: the weights of
            ``nn.Linear`` modules for a model, 2-D floating ``*.weight`` tensors for a mapping;
            always minus ``exclude``.
        exclude: regexes of runtime keys never quantized (default: ``lm_head`` and embeddings,
            plus what a preset ``key_mapping``'s family keeps unquantized: ``"mistral3"``'s
            vision tower and projector). The Linear modules left unquantized are listed in the
            written ``quantization_config`` (``modules_to_not_convert``; compressed-tensors
            ``ignore``), so transformers keeps them plain.
        ue8m0: store power-of-two scales as exponent bytes (MX).
        scales: runtime key -> scale to reuse instead of ``amax / fp8_max``, or a
            :class:`LazyFP8View` whose stored scales to reuse: re-saving a view's tensors with its
            own scales reproduces its FP8 bytes exactly. FP8 schemes only.
        max_shard_size: as in ``huggingface_hub`` (``"5GB"``, or bytes); must be positive.
        config: written as ``config.json`` with ``quantization_config`` describing the result.
        extra_files: file name -> path or binary file object, copied byte for byte beside the
            checkpoint (a tokenizer...) in the same atomic replacement: they are in place before
            the checkpoint becomes loadable. Names must be plain, not hidden, and not checkpoint
            files (``*.safetensors``, ``*.index.json``, ``config.json``).
        overwrite: replace the checkpoint in ``path``: its index, ``model*.safetensors`` shards
            and ``config.json`` (removed when ``config`` is ``None``). At every instant ``path``
            loads as the old checkpoint, the new one, or not at all; no other file is touched.
        progress: ``True`` for a bar on stderr (tqdm), or ``callback(done_bytes, total_bytes, key)``.

    Returns:
        A :class:`SaveResult`.

    Raises:
        FileExistsError: ``path`` holds a checkpoint and ``overwrite`` is false.
        SaveError: ``path`` is (or holds a file of) a view being read, is not a directory, holds
            a ``*.safetensors`` file save did not write, or another save is writing there; a key
            safetensors cannot store (not a string, empty, NUL, a lone surrogate, a scale name
            taken by another tensor); a value that is not a tensor with data.
        ValueError: a bad argument (``max_shard_size``, ``format``, ``scheme``...), a combination no
            producer writes, or a weight the scheme cannot store (naming it).
        NonFiniteError: a tensor to quantize holds NaN or an infinity (naming it).
        KeyMappingError: the key mapping does not round-trip on the keys.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"path must be a directory path, got {path!r}")
    path = os.fspath(path)
    check_name(path, "destination")
    # -- Everything that can be refused is refused here, before the destination is touched. --
    target, format = _target(scheme, block_size, group_size, fp8_dtype, format, ue8m0)
    if scales is not None and target is not None and not isinstance(target, _FP8):
        raise ValueError("scales= reuses FP8 scales; the 4-bit schemes compute their own (pass scales=None)")
    shard_bytes = parse_shard_size(max_shard_size)
    if config is not None:
        cfg = dict(config)
        if target is not None:
            cfg["quantization_config"] = target.config()
        _json_text(cfg, "config", path)  # refused now if it cannot be written; written below
    extras = _extra_names(extra_files, path)
    chosen = _selector(quantize)
    items, tied, linear = _items(source, path)
    mapping = KeyMapping.from_spec(key_mapping)
    if exclude is DEFAULT_EXCLUDE:  # the default follows the checkpoint family's convention too
        exclude = DEFAULT_EXCLUDE + mapping.unquantized
    excluded = _selector(exclude if isinstance(exclude, str) else list(exclude)) or (lambda key: False)
    if mapping.composites:
        # Fused values are written as their on-disk parts (views, not copies, where a part is a
        # slice); a part that is a 2-D weight is one Linear's weight on disk, quantized as such.
        expanded = mapping.write_names(items)
        if linear:
            linear = set(linear) | {k for k in expanded if k not in items and k.endswith("weight") and len(expanded[k].shape) == 2}
        items = expanded
    disk_of = {runtime: disk for disk, runtime in mapping.build_inverse(items).items()}

    def should_quantize(key: str, value: Any) -> bool:
        if target is None or excluded(key) or not value.dtype.is_floating_point or value.dtype.itemsize == 1:
            return False
        if chosen is not None:
            return chosen(key)
        if linear:
            return key in linear
        return key.endswith("weight") and len(value.shape) == 2

    quantized = [k for k, v in items.items() if should_quantize(k, v)]
    qset = set(quantized)
    for k in quantized:
        target.check(k, disk_of[k], tuple(items[k].shape))  # type: ignore[union-attr]
    written = {k: target.names(disk_of[k]) for k in quantized}  # type: ignore[union-attr]
    _check_disk_names(disk_of, written, path)
    cfg_text = None
    if config is not None:
        if target is not None:
            # The Linear weights left unquantized, by module: what a loader must not replace with
            # a quantized layer (transformers' modules_to_not_convert, compressed-tensors' ignore).
            weights = linear or {k for k, v in items.items() if k.endswith("weight") and len(v.shape) == 2}
            kept = sorted({k.removesuffix(".weight") for k in weights if k not in qset and k in items})
            if kept:
                cfg["quantization_config"][_UNCONVERTED[format]] = kept
        cfg_text = _json_text(cfg, "config", path)

    sizes = {}
    for k, v in items.items():
        if k in qset:
            sizes[k] = target.nbytes(tuple(v.shape))  # type: ignore[union-attr]
        else:
            sizes[k] = int(torch.Size(v.shape).numel()) * v.dtype.itemsize
    files, metadata = _plan(sizes, shard_bytes)
    index_text = None
    if len(files) > 1:
        weight_map = {}
        for fname, keys in files.items():
            for k in keys:
                for name, _ in written.get(k, [(disk_of[k], "tensor")]):
                    weight_map[name] = fname
        index_text = _json_text({"metadata": metadata, "weight_map": weight_map}, "the index", path)
    _check_not_source(path, [source, scales])
    survey(path, overwrite)

    # -- Write every file into the staging directory, then move them in (see _destination.commit). --
    make_directory(path)
    scale_source = _scale_lookup(scales)
    with locked(path):
        remove_dead_temporaries(path)
        old, old_config = survey(path, overwrite)  # again: the directory may have changed
        staging = Staging(path)
        bar = make_progress(progress, sum(sizes.values()), "writing")
        try:
            for fname, keys in files.items():
                shard: dict[str, torch.Tensor] = {}
                for k in keys:
                    t = _materialize(items[k])
                    disk = disk_of[k]
                    if k in qset:
                        shard.update(target.tensors(k, disk, t, scale_source(k)))  # type: ignore[union-attr]
                    else:
                        shard[disk] = t
                    del t
                    bar.update(sizes[k], k)
                _save_file(shard, staging.file(fname))
                del shard
            if cfg_text is not None:
                staging.write(CONFIG_NAME, cfg_text)
            for name, value in extras.items():
                _copy_extra(staging, name, value)
            if index_text is not None:
                staging.write(INDEX_NAME, index_text)
            # The file that makes the destination loadable goes last: the index, or the single shard.
            new = ([CONFIG_NAME] if cfg_text is not None else []) + list(extras) + list(files)
            if index_text is not None:
                new.append(INDEX_NAME)
            commit(path, staging, new, old, drop_config=old_config and cfg_text is None and bool(old))
        finally:
            bar.close()
            staging.discard()
    return SaveResult(
        path=path,
        files=list(files),
        index=INDEX_NAME if len(files) > 1 else None,
        total_size=int(metadata.get("total_size", sum(sizes.values()))),
        quantized=quantized,
        tied=tied,
        key_map=disk_of,
    )


def _copy_extra(staging: Staging, name: str, value: Any) -> None:
    if hasattr(value, "read"):
        staging.write(name, value)
        return
    fd, _ = open_regular(os.fspath(value), f"extra file {name!r}")
    with os.fdopen(fd, "rb") as f:
        staging.write(name, f)


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
    os.chmod(path, 0o666 & ~umask())
