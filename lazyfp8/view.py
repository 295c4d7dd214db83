"""``LazyFP8View``: a read-only Mapping over a checkpoint, keyed by runtime names."""

from __future__ import annotations

import bisect
import copy
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence

import torch

from .composite import CompositeSource
from .conversion import mapping_of
from .errors import KeyMappingError, ShardChangedError, TensorNotFoundError
from .formats.catalogue import build_catalogue
from .formats.codecs import fp8_codec
from .formats.pairing import QUANT_SIBLINGS, Quantized
from .formats.schemes import Granularity, Scheme
from .kernels.parallel import default_threads
from .kernels.source import DEFAULT_CHUNK_ELEMENTS, ScaleRef, TensorSource, TransposedSource, read_scale
from .keymap import KeyMappingSpec
from .lazy import LazyTensor
from .storage.checkpoint import open_checkpoint
from .storage.dtypes import TARGETS
from .storage.header import TensorEntry
from .storage.reader import ShardFile

__all__ = ["LazyFP8View", "TensorInfo", "QUANT_SIBLINGS"]



@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What the view knows about one key, from headers alone.

    Attributes:
        key: the runtime name.
        disk_key: the on-disk name.
        file: the shard holding it.
        disk_dtype: the stored dtype.
        shape: the shape.
        dtype: the dtype ``get_tensor`` returns.
        scale_key: the on-disk name of the scale, for an FP8 tensor, else ``None``.
        scale_file: the shard holding the scale, else ``None``.
        granularity: how the scale covers the weight, else ``None``.
        parts: for a composite value (fused experts), one line per on-disk tensor: which one,
            which box of it, and where it lands; else empty.
        materialized: a composite whose conversion is not a layout: read whole, then converted.
        codec: what a quantized tensor's stored codes are (``e4m3fn``, ``e2m1``, ``int4``...),
            else ``None``.
        quant_keys: the on-disk keys read with a quantized tensor besides its codes (scale,
            global scale, zero point, ``weight_shape``), else empty.
    """

    key: str
    disk_key: str
    file: str
    disk_dtype: torch.dtype
    shape: tuple[int, ...]
    dtype: torch.dtype
    scale_key: str | None = None
    scale_file: str | None = None
    granularity: Granularity | None = None
    parts: tuple[str, ...] = ()
    materialized: bool = False
    codec: str | None = None
    quant_keys: tuple[str, ...] = ()


class _Hints:
    """What a "did you mean" needs, built once per view on its first miss. difflib over every key
    cost 2.5 s per miss on a 47k-key checkpoint; a near miss differs from its key in one place,
    so its key is a neighbour in the sorted keys (a changed suffix) or in the sorted reversed
    keys (a changed prefix). Those few neighbours are ranked by how much of each end they share."""

    NEIGHBOURS = 4  # on each side, in each order
    CUTOFF = 0.6  # shared ends over the longer length, as difflib's default cutoff

    def __init__(self, to_disk: dict[str, str], parts: dict[str, str] | None = None):
        self.runtime_of = {d: r for r, d in to_disk.items() if d != r}
        self.part_of = parts or {}
        keys = [*to_disk, *dict.fromkeys(self.part_of.values())]
        self.keys = sorted(keys)
        self.reversed = sorted(k[::-1] for k in keys)

    def near(self, key: str) -> list[str]:
        """Up to three keys sharing most of their beginning and end with ``key``, closest first."""
        n = self.NEIGHBOURS
        i = bisect.bisect_left(self.keys, key)
        j = bisect.bisect_left(self.reversed, key[::-1])
        candidates = set(self.keys[max(i - n, 0) : i + n]) | {k[::-1] for k in self.reversed[max(j - n, 0) : j + n]}
        scored = sorted((-_shared_ends(key, c), c) for c in candidates)
        return [c for score, c in scored[:3] if -score >= self.CUTOFF]


def _shared_ends(a: str, b: str) -> float:
    """The characters ``a`` and ``b`` share at their start and, after that, at their end, over
    the longer length."""
    m = min(len(a), len(b))
    p = 0
    while p < m and a[p] == b[p]:
        p += 1
    s = 0
    while s < m - p and a[-1 - s] == b[-1 - s]:
        s += 1
    return (p + s) / max(len(a), len(b), 1)


def _reopen(path: str, kwargs: dict, pinned: dict) -> "LazyFP8View":
    """Unpickle a view: open it again, and refuse shards that are no longer the files it read."""
    view = LazyFP8View(path, **kwargs)
    files = {os.path.abspath(p): f for p, f in view._files.items()}
    for p in sorted(pinned.keys() | files.keys()):
        now = files.get(p)
        if p not in pinned:
            how = "is a new shard in the index"
        elif now is None:
            how = "is no longer in the index"
        elif (now.identity.size, now.identity.mtime_ns) != (pinned[p].size, pinned[p].mtime_ns):
            # Size and mtime only: device and inode numbers differ when the same shared file
            # system is seen from another machine (a worker elsewhere unpickling the view).
            how = "was replaced or rewritten"
        else:
            continue
        raise ShardChangedError(
            f"{p}: {how}: the checkpoint changed since the view was pickled; "
            "pickle a view opened on the current files",
            file=p,
        )
    return view


class LazyFP8View(Mapping[str, LazyTensor]):
    """A read-only ``Mapping`` from runtime names to lazily read, dequantized tensors.

    Constructing it reads the index and every shard header, nothing else. ``view[key]`` returns a
    :class:`~lazyfp8.LazyTensor` that reads (and for FP8 tensors dequantizes) only when torch uses
    it, so ``model.load_state_dict(view)`` streams one tensor at a time with no second copy.

    FP8 tensors (``F8_E4M3``, ``F8_E5M2``... in the header) are paired with their scale sibling
    and come out as ``dtype``: element-wise ``(w.to(float32) * scale.to(float32)).to(dtype)``
    (bit-exact). Packed FP4 and int weights (gpt-oss MXFP4 ``*_blocks``, ModelOpt and
    compressed-tensors NVFP4, int4/int8 ``pack-quantized``, DeepSeek-V4 FP4 experts) are
    recognised from their tensors' names, dtypes and shapes, exposed under their runtime name and
    unpacked shape, and dequantized by their format's formula (docs/formats.md). Other tensors
    come out bit-exact in their stored dtype. Scale tensors, zero points, global scales and static
    activation/KV scales of quantized modules are not keys.

    A Hugging Face Hub repo id works wherever a path does: ``LazyFP8View("org/name")`` reads the
    snapshot in huggingface_hub's cache, downloading (when allowed) only the index, config and
    shards it reads (docs/integrations.md, "Hugging Face Hub").

    Args:
        path (`str` or `os.PathLike`): a directory holding ``model.safetensors.index.json`` and
            its shards, a directory holding one ``*.safetensors`` file, or one file; or a Hub
            repo id ``"org/name"``, when no local file or directory has that name (a local path
            always wins).
        key_mapping (`str`, `dict`, `list` or `KeyMapping`, *optional*): ``None`` keeps on-disk
            names; ``"transformers"`` applies the installed transformers' conversion mapping for
            ``config.json``'s ``model_type`` (renames, and fused experts as composite values); a
            preset name (``"mistral3"``); ``{checkpoint_regex: runtime_replacement}`` as in
            transformers' ``from_pretrained(key_mapping=...)``, first matching rule wins; or a
            list of rules, :class:`~lazyfp8.Fuse` and :class:`~lazyfp8.Split`. A composite value
            (several stored tensors as one) reads each part straight into its place.
        dtype (`torch.dtype`, defaults to `torch.bfloat16`): what quantized tensors dequantize to.
        device (`str` or `torch.device`, defaults to ``"cpu"``): where tensors are produced.
        scheme (`Scheme`, granularity or `str`, *optional*): how FP8 weights are scaled. Default:
            what ``config.json``'s ``quantization_config`` declares (``quant_method`` ``fp8``,
            ``compressed-tensors``, ``fbgemm_fp8``, ``modelopt``), else ``"auto"``: each scale's
            granularity from its shape (per-tensor, per-channel, blocks of ``block_size``; ue8m0
            exponent scales: MX 1x32 blocks). Also ``"per-tensor"``, ``"per-channel"``,
            ``"block"``, ``"mx"``, or ``PerTensor()``, ``PerChannel()``, ``PerBlock((r, c))``.
        block_size (`tuple[int, int]`, *optional*): block size of block scales; defaults to
            ``quantization_config.weight_block_size`` (or the compressed-tensors
            ``block_structure``) of ``config.json`` beside the shards.
        include_quant_params (`bool`, defaults to `False`): also expose static activation and
            KV-cache scales (``input_scale``, ``activation_scale``, ``k_scale``...) as keys.
        chunk_elements (`int`, *optional*): elements dequantized per step; bounds the working
            memory (about 11 bytes per element and thread for block scales).
        threads (`int`, *optional*): threads that read and dequantize the chunks of one tensor
            (default: the usable CPUs, at most 4).
        revision (`str`, *optional*): for a repo id, the branch, tag or commit hash to read
            (default: the main branch).
        cache_dir (`str` or `os.PathLike`, *optional*): for a repo id, the Hub cache (default:
            huggingface_hub's, ``HF_HUB_CACHE``).
        local_files_only (`bool`, defaults to `False`): for a repo id, never download: read only
            what the cache holds (as ``HF_HUB_OFFLINE=1`` does).
        token (`str` or `bool`, *optional*): for a repo id, the Hub token for a private or gated
            repo, as huggingface_hub takes it. Never pickled.

    A view pickles as what opened it; one opened by repo id pickles as that repo id at the commit
    it read, in the same cache, with ``local_files_only=True`` (the receiving process reads those
    files, or refuses: a download there would be other files) and without the token.

    Raises:
        RepoNotCachedError: a repo id that is not cached where nothing may be downloaded; the
            message gives the ``hf download`` command that fetches it.
        MissingShardError, UnsafePathError, CorruptCheckpointError: a bad path, index or header.
        UnsupportedSchemeError: a quantization_config that is not a scheme read here.
        MissingScaleError: an FP8 tensor without a scale sibling.
        ScaleShapeError: a scale whose shape fits no granularity for its weight.
        KeyMappingError: an unknown preset, or two on-disk keys mapping to one runtime name.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        key_mapping: KeyMappingSpec = None,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        scheme: Scheme | Granularity | str | None = None,
        block_size: tuple[int, int] | None = None,
        include_quant_params: bool = False,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        threads: int | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ):
        if dtype not in TARGETS:
            raise ValueError(f"dtype must be one of {', '.join(map(str, TARGETS))}; got {dtype}")
        self.path = os.fspath(path)
        # What a pickle carries to reopen this view elsewhere (the key mapping is added then, as
        # remap() may have changed it).
        self._reopen_args = dict(
            dtype=dtype,
            device=device,
            scheme=scheme,
            block_size=block_size,
            include_quant_params=include_quant_params,
            chunk_elements=chunk_elements,
            threads=threads,
        )
        self.dtype = dtype
        self.device = torch.device(device)
        self.key_mapping = mapping_of(key_mapping)
        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        ckpt = open_checkpoint(self.path, **{k: v for k, v in hub.items() if v is not None and v is not False})
        if ckpt.hub is not None:
            # Reopened elsewhere: the same commit in the same cache, never a download (new files
            # would fail the identity check) and never the token (pickles travel).
            self._reopen_args.update(revision=ckpt.hub.commit, cache_dir=ckpt.hub.cache_dir, local_files_only=True)
        self._checkpoint = ckpt
        catalogue = build_catalogue(ckpt, scheme=scheme, block_size=block_size, include_quant_params=include_quant_params)
        self.scheme = catalogue.scheme
        self._files = {p: ShardFile(p, h.identity) for p, h in ckpt.shards.items()}
        self._chunk = chunk_elements
        self._threads = default_threads() if threads is None else max(int(threads), 1)
        self._catalogue = catalogue
        self._scales = {k: self._scale_ref(q) for k, q in catalogue.pairing.scales.items()}
        self._exposed = catalogue.exposed
        self._apply_mapping()

    def _apply_mapping(self) -> None:
        self._hints: _Hints | None = None  # built on the first miss
        self._sources: dict[str, TensorSource | CompositeSource] = {}
        # The values made of several stored tensors, also in _sources: what is one-to-one and
        # what is not is known from where a key is, not from its value's type.
        self._composites: dict[str, CompositeSource] = {}
        self.materialized: list[str] = []  #: keys whose conversion is not a layout (read whole)
        conversion = self.key_mapping.convert(
            self._exposed, lambda disk: self._tensor_source(disk, disk), self.path, config=self._checkpoint.config
        )
        self._to_disk = conversion.renamed
        for runtime, disk in conversion.renamed.items():
            self._sources[runtime] = self._tensor_source(runtime, disk)
        self._composites = dict(conversion.composites)
        self._sources.update(self._composites)
        self.materialized = conversion.materialized

    def _scale_ref(self, q: Quantized) -> ScaleRef:
        def opened(part: tuple[str, TensorEntry] | None) -> tuple[ShardFile, TensorEntry] | None:
            return None if part is None else (self._files[part[0]], part[1])

        return ScaleRef(
            self._files[q.file], q.entry, q.granularity,
            codec=q.codec, shape=q.shape, global_scale=opened(q.global_scale), divide=q.divide,
            zero_point=opened(q.zero_point), declared_shape=opened(q.declared_shape),
        )

    def _tensor_source(self, runtime: str, disk: str) -> TensorSource:
        file, entry = self._catalogue.stored(disk)
        q = self._catalogue.pairing.scales.get(disk)
        cls = TransposedSource if q is not None and q.transposed else TensorSource
        return cls(
            runtime,
            self._files[file],
            entry,
            scale=self._scales.get(disk),
            dtype=self.dtype,
            device=self.device,
            chunk=self._chunk,
            threads=self._threads,
        )

    def remap(self, key_mapping: KeyMappingSpec) -> "LazyFP8View":
        """The same checkpoint under another key mapping, without reading headers again."""
        other = copy.copy(self)
        other.key_mapping = mapping_of(key_mapping)
        other._apply_mapping()
        return other

    def __copy__(self) -> "LazyFP8View":
        # Shares the headers and files (what remap() builds on); __reduce__ below would reopen.
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        return other

    def __reduce__(self) -> tuple:
        # A view pickles as what opened it, so a spawned worker (multiprocessing, a DataLoader)
        # opens the checkpoint again and re-reads every header; open descriptors and locks do not
        # cross processes. The files' identities travel too: a checkpoint rewritten in between is
        # refused, as a read through this view would be. copy.deepcopy goes this way as well.
        # Absolute paths: a worker may run in another directory (a repo id stays one).
        pinned = {os.path.abspath(p): f.identity for p, f in self._files.items()}
        args = {**self._reopen_args, "key_mapping": self.key_mapping}
        path = self.path if self._checkpoint.hub is not None else os.path.abspath(self.path)
        return (_reopen, (path, args, pinned))

    def disk_keys(self) -> list[str]:
        """The on-disk names of the keys, in checkpoint order (scales excluded)."""
        return list(self._exposed)

    # --- Mapping ---------------------------------------------------------------------------
    def __getitem__(self, key: str) -> LazyTensor:
        source = self._sources.get(key)
        if source is None:
            raise self._missing(key)
        return LazyTensor(source, self)

    def get(self, key: str, default: object = None) -> LazyTensor | object:  # type: ignore[override]
        # Mapping.get would go through __getitem__ and build a "did you mean" hint only to
        # catch the KeyError and throw it away.
        source = self._sources.get(key)
        return default if source is None else LazyTensor(source, self)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def __contains__(self, key: object) -> bool:
        return key in self._sources

    def _missing(self, key: object) -> TensorNotFoundError:
        msg = f"{self.path} has no tensor {key!r}"
        if isinstance(key, str):
            if self._hints is None:
                self._hints = _Hints(self._to_disk, self._composite_parts())
            runtime = self._hints.runtime_of.get(key)
            if runtime is not None:
                msg += f"; that is the on-disk name of {runtime!r} under the key mapping"
            elif key in self._hints.part_of:
                msg += f"; that on-disk tensor is a part of {self._hints.part_of[key]!r} under the key mapping"
            else:
                close = self._hints.near(key)
                if close:
                    msg += f"; did you mean {', '.join(map(repr, close))}?"
        return TensorNotFoundError(msg)

    def _composite_parts(self) -> dict[str, str]:
        """On-disk key -> the composite runtime key it is a part of."""
        return {stored.entry.name: key for key, source in self._composites.items() for stored in source.stored()}

    # --- beyond Mapping --------------------------------------------------------------------
    def get_tensor(self, key: str) -> torch.Tensor:
        """A real tensor: FP8 tensors dequantized to ``dtype``, others in their stored dtype,
        on ``device``. Reads the file each call."""
        return self[key].materialize()

    def get_slice(self, key: str) -> LazyTensor:
        """``key``'s value for partial reads, as safetensors' ``safe_open(...).get_slice(key)``:
        ``get_shape()``, ``get_dtype()`` and ``[index]``, where basic indexing (ints, slices of
        step 1, ``...``) reads and dequantizes only the box it selects."""
        return self[key]

    def read_box(self, key: str, dst: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
        """Read the box ``[offsets, offsets + lengths)`` of ``key`` into ``dst`` (shape
        ``lengths``, any dtype or device), reading only that box's bytes. Returns ``dst``."""
        source = self._sources.get(key)
        if source is None:
            raise self._missing(key)
        with torch.no_grad():
            source.read_box_into(dst, offsets, lengths)
        return dst

    def scale(self, key: str) -> torch.Tensor | None:
        """The stored scale of FP8 key ``key`` as float32 multipliers (its stored shape), or
        ``None`` for a tensor that is not FP8. Reads only the scale.

        Raises:
            KeyMappingError: ``key`` is a composite of several stored tensors (each has its own).
        """
        source = self._one_to_one(key)
        return None if source.scale is None else read_scale(source.scale, key)

    def disk_key(self, key: str) -> str:
        """The on-disk name of runtime key ``key``.

        Raises:
            KeyMappingError: ``key`` is a composite of several stored tensors (see :meth:`info`).
        """
        return self._one_to_one(key).entry.name

    def _one_to_one(self, key: str) -> TensorSource:
        source = self._sources.get(key)
        if source is None:
            raise self._missing(key)
        if key in self._composites:
            raise KeyMappingError(
                f"{self.path}: {key!r} is made of several on-disk tensors ({len(source.describe())} parts); "
                "view.info(key).parts lists them"
            )
        return source

    def info(self, key: str) -> TensorInfo:
        """What the headers say about ``key``; reads no data."""
        source = self._sources.get(key)
        if source is None:
            raise self._missing(key)
        if key in self._composites:
            first = source.stored()[0]
            return TensorInfo(
                key=key,
                disk_key=first.entry.name,
                file=first.shard.path,
                disk_dtype=first.entry.dtype.torch,
                shape=tuple(source.shape),
                dtype=source.dtype,
                parts=tuple(source.describe()),
                materialized=getattr(source, "materialized", False),
            )
        scale = source.scale
        return TensorInfo(
            key=key,
            disk_key=source.entry.name,
            file=source.shard.path,
            disk_dtype=source.entry.dtype.torch,
            shape=tuple(source.shape),
            dtype=source.dtype,
            scale_key=None if scale is None else scale.entry.name,
            scale_file=None if scale is None else scale.shard.path,
            granularity=None if scale is None else scale.granularity,
            codec=None if scale is None else (scale.codec or fp8_codec(source.entry.dtype.torch)).name,
            quant_keys=() if scale is None else scale.keys(),
        )

    @property
    def bytes_read(self) -> int:
        """Bytes of tensor data and scales read from the files by this view so far."""
        return sum(f.bytes_read for f in self._files.values())

    @property
    def files(self) -> list[str]:
        """The shard files, in index order."""
        return list(self._files)

    @property
    def config(self) -> dict | None:
        """The parsed ``config.json`` beside the checkpoint, or ``None``."""
        return self._checkpoint.config

    def close(self) -> None:
        """Close the shard files. Reading again reopens them."""
        for f in self._files.values():
            f.close()

    def __enter__(self) -> "LazyFP8View":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        fp8 = sum(getattr(s, "scale", None) is not None for s in self._sources.values())
        return (
            f"LazyFP8View({self.path!r}, {len(self)} tensors ({fp8} FP8), {len(self._files)} file(s), "
            f"dtype={self.dtype}, device={self.device})"
        )

