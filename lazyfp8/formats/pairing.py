"""Pair each quantized tensor with its scale (and zero point, and global scale), and find the
quantization parameters that are not weights.

Header facts only: names, dtypes and shapes say which stored form a tensor is in (``FORMS``), the
config (through the scheme) decides only what the header cannot (an int32 word holding eight
4-bit or four 8-bit codes; a block size a scale shape fits with several). Used by the view
(which raises on the first problem) and by ``inspect`` (which collects every problem).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from ..errors import CheckpointError, MissingScaleError, UnsupportedDtypeError, raise_or_collect
from ..storage.dtypes import SCALE_CODES
from ..storage.header import TensorEntry
from .codecs import E2M1, INT4, INT8, INT8_OFFSET, Codec, fp8_codec
from .schemes import MX_BLOCK, Granularity, PerBlock, Scheme

__all__ = ["Pairing", "Quantized", "pair_scales", "QUANT_SIBLINGS", "FORMS"]

# output_scale: compressed-tensors' static KV-cache scale, on k_proj / v_proj beside the weight;
# input_global_scale: its NVFP4 activation scale; qscale_act: Mistral's native activation scale.
_LINEAR_SIBLINGS = frozenset(
    {"activation_scale", "input_scale", "input_scale_ub", "output_scale", "input_global_scale", "qscale_act"}
)
_KV_SIBLINGS = frozenset({"k_scale", "v_scale"})
#: Quantization parameters that are not weights (static activation and KV-cache scales), hidden
#: from a view's keys when they belong to a module with a quantized weight (or its attention parent).
QUANT_SIBLINGS = _LINEAR_SIBLINGS | _KV_SIBLINGS

#: NVFP4's group: 16 consecutive elements of a row share one e4m3 scale.
NV_BLOCK = (1, 16)


@dataclasses.dataclass(frozen=True)
class Quantized:
    """One quantized weight: where its scale is and what its stored codes mean.

    Element ``[i, j]`` of the weight's ``[rows, cols]`` view is, evaluated in float32 and rounded
    once to the output dtype::

        v = codec value of code[i, j]  (- zero_point[g] when there is one)
        v * s[g]                       no global scale
        v * (s[g] * global)            ModelOpt NVFP4 (``weight_scale_2`` multiplies)
        v * (s[g] / global)            compressed-tensors NVFP4 (``weight_global_scale`` divides)

    where ``g`` is the block of ``granularity`` that holds ``[i, j]``.

    Attributes:
        file, entry: the scale's file and header entry.
        granularity: how the scale covers the weight.
        codec: what a stored code means and how many a byte holds.
        shape: the weight's shape (its codes unpacked).
        form: the stored form's name (``FORMS``).
        global_scale: a second, one-value scale (file, entry), or ``None``.
        divide: the global scale divides the group scale (else multiplies it).
        zero_point: the zero point (file, entry) of an asymmetric int weight, or ``None``.
        transposed: the weight is exposed with its last two dims swapped (``shape`` is as
            stored): gpt-oss's MXFP4 experts, stored ``[E, out, in]`` and held by transformers'
            ``GptOssExperts`` as ``[E, in, out]``.
    """

    file: str
    entry: TensorEntry
    granularity: Granularity
    codec: Codec
    shape: tuple[int, ...]
    form: str
    global_scale: tuple[str, TensorEntry] | None = None
    divide: bool = False
    zero_point: tuple[str, TensorEntry] | None = None
    transposed: bool = False
    declared_shape: tuple[str, TensorEntry] | None = None


@dataclasses.dataclass(frozen=True)
class Pairing:
    """Attributes:
    scales: weight key -> how it is quantized. The key is the name the weight is exposed under:
        its on-disk name, or for a packed form that renames (``weight_packed`` -> ``weight``,
        ``gate_up_proj_blocks`` -> ``gate_up_proj``) the name it stands for.
    stored: exposed key -> on-disk key, for the keys a packed form renames.
    consumed: on-disk keys that are parts of a quantized weight (scales, zero points, global
        scales, ``weight_shape``): never exposed.
    quant_params: static activation / KV-cache scale keys of quantized modules.
    orphans: keys named like scales (``*_scale_inv``, ``*.weight_scale``) that no weight uses.
    """

    scales: dict[str, Quantized]
    stored: dict[str, str]
    consumed: set[str]
    quant_params: set[str]
    orphans: list[str]

    @property
    def scale_keys(self) -> set[str]:
        return {q.entry.name for q in self.scales.values()}


@dataclasses.dataclass(frozen=True)
class _Claim:
    key: str  # the exposed name
    quantized: Quantized
    consumed: tuple[str, ...]


class _Problem(Exception):
    """A tensor that is this form but cannot be read (carries the error to raise or collect)."""

    def __init__(self, error: CheckpointError):
        self.error = error


_Tensors = Mapping[str, tuple[str, TensorEntry]]


def _module(key: str) -> str:
    return key.rpartition(".")[0]


def _check_scale_dtype(tensors: _Tensors, scale_key: str, key: str, codes: frozenset[str] = SCALE_CODES) -> None:
    scale_file, scale_entry = tensors[scale_key]
    if scale_entry.dtype.code not in codes:
        raise _Problem(UnsupportedDtypeError(
            f"{os.path.basename(scale_file)}: scale {scale_key!r} of the quantized tensor {key!r} has dtype "
            f"{scale_entry.dtype.code}; scales must be {', '.join(sorted(codes))}",
            file=scale_file,
            key=scale_key,
        ))


def _missing(file: str, key: str, what: str, candidates: list[str], scheme: Scheme) -> _Problem:
    return _Problem(MissingScaleError(
        f"{os.path.basename(file)} holds the {what} tensor {key!r} but the checkpoint has no "
        f"scale for it ({' or '.join(map(repr, candidates))}, scheme {scheme.name!r}); its raw "
        "bytes are not weights. Check that every shard is present and that the "
        "checkpoint's quantization_config matches it",
        file=file,
        key=key,
    ))


def _granularity(
    scheme: Scheme, shape: tuple[int, ...], tensors: _Tensors, scale_key: str, key: str, file: str
) -> Granularity:
    _, scale_entry = tensors[scale_key]
    try:
        return scheme.granularity(
            shape, scale_entry.shape, scale_entry.dtype.code, weight_key=key, scale_key=scale_key, file=file
        )
    except CheckpointError as e:
        raise _Problem(e) from None


def _packed_shape(entry: TensorEntry, codec: Codec, key: str, file: str) -> tuple[int, ...]:
    """The shape of the codes a packed tensor holds: its last dim's bytes unpacked."""
    if len(entry.shape) < 2 or entry.shape[-1] == 0:
        raise _Problem(CheckpointError(
            f"{os.path.basename(file)}: the packed {codec.name} tensor {key!r} has shape {list(entry.shape)}; "
            "a packed weight has two or more dims and a non-empty last one",
            file=file,
            key=key,
        ))
    return (*entry.shape[:-1], codec.logical_cols(entry.shape[-1] * entry.dtype.itemsize))


class Form:
    """One way producers store a quantized weight. ``claim`` says whether ``key`` is a weight
    stored this way and, if so, what it is; raising ``_Problem`` for one it recognises but cannot
    read."""

    name: str = ""

    def claim(self, key: str, tensors: _Tensors, scheme: Scheme) -> _Claim | None:
        raise NotImplementedError


class _FP8(Form):
    """An FP8 tensor and a scale sibling: ``weight_scale_inv`` (HF fp8, DeepSeek-V3), ``weight_scale``
    (compressed-tensors, ModelOpt, fbgemm), ``<module>.scale`` (DeepSeek-V4), ``<module>.qscale_weight``
    (Mistral's native format)."""

    name = "fp8"

    def claim(self, key: str, tensors: _Tensors, scheme: Scheme) -> _Claim | None:
        file, entry = tensors[key]
        if not entry.dtype.fp8_weight:
            return None
        candidates = scheme.scale_keys(key)
        found = [c for c in candidates if c in tensors]
        if not found:
            raise _missing(file, key, f"FP8 ({entry.dtype.code})", candidates, scheme)
        if len(found) > 1:
            raise _Problem(CheckpointError(
                f"{os.path.basename(file)}: the FP8 tensor {key!r} has two scales, {found[0]!r} and {found[1]!r}; "
                "the checkpoint is ambiguous (pass scheme= to choose)",
                file=file,
                key=key,
            ))
        _check_scale_dtype(tensors, found[0], key)
        g = _granularity(scheme, entry.shape, tensors, found[0], key, file)
        scale_file, scale_entry = tensors[found[0]]
        q = Quantized(scale_file, scale_entry, g, fp8_codec(entry.dtype.torch), entry.shape, self.name)
        return _Claim(key, q, (found[0],))


class _MXBlocks(Form):
    """gpt-oss MXFP4: ``<name>_blocks`` U8 ``[..., C/32, 16]`` (32 e2m1 codes a block) and
    ``<name>_scales`` U8 ``[..., C/32]`` ue8m0; the weight is ``<name>`` ``[..., C]``, stacked
    experts ``[E, R, C]`` exposed as ``[E, C, R]``."""

    name = "mxfp4"

    def claim(self, key: str, tensors: _Tensors, scheme: Scheme) -> _Claim | None:
        if not key.endswith("_blocks"):
            return None
        base = key.removesuffix("_blocks")
        scale_key = base + "_scales"
        file, entry = tensors[key]
        if scale_key not in tensors or entry.dtype.code != "U8":
            return None
        if len(entry.shape) < 3 or entry.shape[-1] != 16:
            raise _Problem(CheckpointError(
                f"{os.path.basename(file)}: MXFP4 blocks {key!r} have shape {list(entry.shape)}; expected "
                "[..., blocks, 16] (32 FP4 codes in 16 bytes per block)",
                file=file,
                key=key,
            ))
        _check_scale_dtype(tensors, scale_key, key, frozenset({"U8", "F8_E8M0"}))
        shape = (*entry.shape[:-2], entry.shape[-2] * 32)
        mx = Scheme("mxfp4", (PerBlock(MX_BLOCK),))
        g = _granularity(mx, shape, tensors, scale_key, key, file)
        scale_file, scale_entry = tensors[scale_key]
        # Stacked experts come out as transformers' GptOssExperts holds them (its own MXFP4
        # dequantization transposes them the same way).
        q = Quantized(scale_file, scale_entry, g, E2M1, shape, self.name, transposed=len(shape) >= 3)
        return _Claim(base, q, (scale_key,))


class _PackedU8FP4(Form):
    """Packed e2m1 in U8 (or I8) ``[out, in/2]`` beside an e4m3 or ue8m0 scale:

    - ModelOpt NVFP4: ``weight`` + ``weight_scale`` e4m3 ``[out, in/16]`` + ``weight_scale_2``
      (multiplies);
    - compressed-tensors NVFP4: ``weight_packed`` + ``weight_scale`` + ``weight_global_scale``
      (divides), exposed as ``weight``;
    - compressed-tensors MXFP4 and DeepSeek-V4 experts: ``weight_packed`` / I8 ``weight`` with a
      ue8m0 ``weight_scale`` / ``<module>.scale`` ``[out, in/32]``.
    """

    name = "fp4"

    def claim(self, key: str, tensors: _Tensors, scheme: Scheme) -> _Claim | None:
        file, entry = tensors[key]
        if entry.dtype.code not in ("U8", "I8"):
            return None
        module, _, leaf = key.rpartition(".")
        prefix = module + "." if module else ""
        if leaf == "weight_packed":
            exposed = prefix + "weight"
            if entry.dtype.code != "U8":
                return None  # int codes packed in bytes: not FP4
        elif leaf == "weight":
            exposed = key
        else:
            return None
        scale_key = next((k for k in (prefix + "weight_scale", prefix + "scale") if k in tensors), None)
        if scale_key is None:
            if leaf == "weight_packed" and prefix + "weight_global_scale" in tensors:
                raise _missing(file, key, "packed FP4", [prefix + "weight_scale"], scheme)
            return None
        scale_code = tensors[scale_key][1].dtype.code
        if scale_code == "F8_E4M3":
            block, second_key, divide = NV_BLOCK, None, False
            for k, div in ((prefix + "weight_scale_2", False), (prefix + "weight_global_scale", True)):
                if k in tensors:
                    second_key, divide = k, div
            if second_key is None and leaf == "weight":
                return None  # an e4m3 scale on a byte tensor with no global scale: not NVFP4
            form = "nvfp4" + ("-ct" if divide else "")
        elif scale_code in ("U8", "F8_E8M0") and (leaf == "weight_packed" or scale_key.endswith(".scale") or entry.dtype.code == "I8"):
            block, second_key, divide, form = MX_BLOCK, None, False, "mxfp4"
        else:
            return None
        shape = _packed_shape(entry, E2M1, key, file)
        fixed = Scheme(form, (PerBlock(block),))
        g = _granularity(fixed, shape, tensors, scale_key, key, file)
        consumed: tuple[str, ...] = (scale_key,)
        second = None
        if second_key is not None:
            second_file, second_entry = tensors[second_key]
            _check_one_value(second_file, second_entry, key)
            second, consumed = (second_file, second_entry), consumed + (second_key,)
        scale_file, scale_entry = tensors[scale_key]
        q = Quantized(scale_file, scale_entry, g, E2M1, shape, form, global_scale=second, divide=divide)
        return _Claim(exposed, q, consumed)


def _check_one_value(file: str, entry: TensorEntry, key: str) -> None:
    if entry.numel != 1 or entry.dtype.code not in SCALE_CODES or entry.dtype.code in ("U8", "F8_E8M0"):
        raise _Problem(CheckpointError(
            f"{os.path.basename(file)}: global scale {entry.name!r} of {key!r} is {entry.dtype.code} "
            f"{list(entry.shape)}; expected one float value",
            file=file,
            key=entry.name,
        ))


class _PackedInt(Form):
    """compressed-tensors int ``pack-quantized``: ``weight_packed`` I32 ``[out, in * bits / 32]``
    (codes offset to unsigned, little-endian in each word), ``weight_scale`` per group, channel or
    tensor, ``weight_shape``, and for an asymmetric scheme ``weight_zero_point`` (I32, packed the
    same way along the output rows). How many bits a code has is the config's ``num_bits`` (the
    header cannot tell 8 nibbles from 4 bytes). The shape is the header's, every word's codes
    unpacked; ``weight_shape`` is checked against it when the weight is read."""

    name = "int-packed"

    def claim(self, key: str, tensors: _Tensors, scheme: Scheme) -> _Claim | None:
        if not key.endswith(".weight_packed") and key != "weight_packed":
            return None
        file, entry = tensors[key]
        if entry.dtype.code != "I32":
            return None
        prefix = key.removesuffix("weight_packed")
        bits = scheme.int_bits
        if bits not in (4, 8):
            raise _Problem(UnsupportedDtypeError(
                f"{os.path.basename(file)}: {key!r} is int32-packed but the config declares no 4- or 8-bit int "
                f"weights (quantization_config.config_groups.*.weights.num_bits, found {bits!r}); pass the "
                "checkpoint's config.json beside its shards",
                file=file,
                key=key,
            ))
        zp_key = prefix + "weight_zero_point"
        zero_point = tensors.get(zp_key)
        codec = INT4 if bits == 4 else INT8_OFFSET
        shape = _packed_shape(entry, codec, key, file)
        scale_key = prefix + "weight_scale"
        if scale_key not in tensors:
            raise _missing(file, key, f"int{bits}-packed", [scale_key], scheme)
        _check_scale_dtype(tensors, scale_key, key)
        g = _granularity(scheme, shape, tensors, scale_key, key, file)
        shape_key = prefix + "weight_shape"
        consumed = tuple(k for k in (scale_key, zp_key, shape_key) if k in tensors)
        scale_file, scale_entry = tensors[scale_key]
        q = Quantized(
            scale_file, scale_entry, g, codec, shape, self.name,
            zero_point=zero_point, declared_shape=tensors.get(shape_key),
        )
        return _Claim(prefix + "weight", q, consumed)


class _Int8(Form):
    """An I8 ``weight`` beside a ``weight_scale`` (compressed-tensors ``naive-quantized`` /
    ``int-quantized``): one code a byte, with an optional ``weight_zero_point``."""

    name = "int8"

    def claim(self, key: str, tensors: _Tensors, scheme: Scheme) -> _Claim | None:
        file, entry = tensors[key]
        if entry.dtype.code != "I8" or not (key.endswith(".weight") or key == "weight"):
            return None
        prefix = key.removesuffix("weight")
        scale_key = prefix + "weight_scale"
        if scale_key not in tensors:
            return None
        _check_scale_dtype(tensors, scale_key, key)
        g = _granularity(scheme, entry.shape, tensors, scale_key, key, file)
        zp_key = prefix + "weight_zero_point"
        zero_point = tensors.get(zp_key)
        scale_file, scale_entry = tensors[scale_key]
        q = Quantized(scale_file, scale_entry, g, INT8, entry.shape, self.name, zero_point=zero_point)
        return _Claim(key, q, tuple(k for k in (scale_key, zp_key) if k in tensors))


class _Unread(Form):
    """Packed weights lazyfp8 does not read, refused naming what was found rather than shown as
    the integer tensors they are stored as: GPTQ / AWQ (``qweight`` beside ``scales`` and
    ``qzeros``) and bitsandbytes 4-bit (``weight.quant_state.bitsandbytes__nf4`` / ``__fp4``)."""

    name = "unread"

    def claim(self, key: str, tensors: _Tensors, scheme: Scheme) -> _Claim | None:
        module, _, leaf = key.rpartition(".")
        prefix = module + "." if module else ""
        what = None
        if leaf == "qweight" and (prefix + "scales" in tensors or prefix + "qzeros" in tensors):
            what = "GPTQ/AWQ-packed (qweight, qzeros, scales)"
        elif leaf in ("quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4") or key.endswith(
            (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
        ):
            what = "bitsandbytes 4-bit"
        if what is None:
            return None
        file = tensors[key][0]
        raise _Problem(UnsupportedDtypeError(
            f"{os.path.basename(file)}: {key!r} is a {what} weight, a format lazyfp8 does not read "
            "(it reads FP8, MXFP4, NVFP4 and compressed-tensors int weights)",
            file=file,
            key=key,
        ))


#: The stored forms, each offered every tensor no earlier form claimed or took as a part.
FORMS: tuple[Form, ...] = (_Unread(), _MXBlocks(), _PackedInt(), _PackedU8FP4(), _Int8(), _FP8())


def pair_scales(
    tensors: _Tensors,
    scheme: Scheme,
    problems: list[CheckpointError] | None = None,
) -> Pairing:
    """Pair every quantized tensor of ``tensors`` (on-disk key -> (file, entry)) with its scale.

    Raises (or, with ``problems`` given, appends and skips the weight):
        MissingScaleError, CheckpointError (two scales, a bad packed shape), UnsupportedDtypeError
        (scale dtype, int32 codes with no declared width), ScaleShapeError (scale shape).
    """
    scales: dict[str, Quantized] = {}
    stored: dict[str, str] = {}
    consumed: set[str] = set()
    settled: set[str] = set()  # keys claimed, or refused with a problem
    # Form by form, so that what one form takes as a part (NVFP4's e4m3 scale) is never claimed
    # by a later one (as an FP8 weight).
    for form in FORMS:
        for key in tensors:
            if key in settled or key in consumed:
                continue
            try:
                claim = form.claim(key, tensors, scheme)
            except _Problem as p:
                raise_or_collect(problems, p.error)
                settled.add(key)
                continue
            if claim is None:
                continue
            settled.add(key)
            if claim.key != key:
                if claim.key in tensors or claim.key in stored:
                    file = tensors[key][0]
                    raise_or_collect(problems, CheckpointError(
                        f"{os.path.basename(file)}: {key!r} stands for {claim.key!r}, which the checkpoint "
                        "also holds; the checkpoint is ambiguous",
                        file=file,
                        key=key,
                    ))
                    continue
                stored[claim.key] = key
            scales[claim.key] = claim.quantized
            consumed.update(claim.consumed)
    order = {k: i for i, k in enumerate(tensors)}
    scales = dict(sorted(scales.items(), key=lambda kv: order[stored.get(kv[0], kv[0])]))
    # A linear's static input scale sits beside its weight (``q_proj.input_scale``); a KV-cache
    # scale sits on the attention module, the parent (``self_attn.k_scale``).
    modules = {_module(k) for k in scales}
    parents = {_module(m) for m in modules} | modules
    quant_params = set()
    for key in tensors:
        module, _, leaf = key.rpartition(".")
        if (leaf in _LINEAR_SIBLINGS and module in modules) or (leaf in _KV_SIBLINGS and module in parents):
            quant_params.add(key)
    orphans = [
        k for k in tensors
        if k not in consumed and (k.endswith("_scale_inv") or k.endswith(".weight_scale")) and not tensors[k][1].dtype.fp8_weight
    ]
    return Pairing(scales=scales, stored=stored, consumed=consumed, quant_params=quant_params, orphans=orphans)
