"""The deterministic models the benchmarks load: a scaled-down Mistral-3 (``ModelSpec``,
``QUICK``, ``FULL``: Mistral text model + Pixtral vision tower, the layout of the released
Mistral-3.x FP8 checkpoints) and a Qwen3 causal LM whose Linear shapes are multiples of 128
(``CausalLMSpec``, ``QWEN3_QUICK``, ``QWEN3_FULL``: the layout of block-FP8 releases); building them
with parameters on meta, zeroed or empty, filling them from one seeded generator, their byte size
and the digest of a state dict (bit-exactness checks)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

#: On-disk (dawn-ridge) -> runtime renaming, written out here rather than taken from lazyfp8 so
#: that the baselines do not depend on the library under test. ``lm_head`` first: its on-disk
#: name also starts with ``language_model.``.
DISK_TO_RUNTIME: tuple[tuple[str, str], ...] = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


@dataclasses.dataclass(frozen=True)
class TextSizes:
    """The sizes of a transformer text model, the leading fields of :class:`ModelSpec` and
    :class:`CausalLMSpec` (in this order: their manifests record ``dataclasses.asdict(spec)``,
    and a reused ``--workdir`` is matched against it)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class ModelSpec(TextSizes):
    """Sizes of a ``Mistral3ForConditionalGeneration``: a Mistral text model with a small Pixtral
    vision tower, the shape of the released Mistral-3.x FP8 checkpoints scaled down."""

    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int = 224
    patch_size: int = 14
    max_shard_size: str = "8MB"
    seed: int = 0

    def config_dict(self) -> dict[str, Any]:
        """A ``config.json`` for transformers' ``Mistral3Config`` (no quantization)."""
        from transformers import Mistral3Config

        text = {
            "model_type": "mistral",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
        }
        vision = {
            "model_type": "pixtral",
            "hidden_size": self.vision_hidden,
            "intermediate_size": self.vision_intermediate,
            "num_hidden_layers": self.vision_layers,
            "num_attention_heads": self.vision_heads,
            "head_dim": self.vision_hidden // self.vision_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
        }
        # Both tie flags off: released Mistral-3 checkpoints store lm_head, and the top-level
        # Mistral3Config defaults to tying.
        config = Mistral3Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
        d = config.to_dict()
        d["architectures"] = ["Mistral3ForConditionalGeneration"]
        d["dtype"] = "bfloat16"
        return d


#: The released Mistral-3.x FP8 checkpoints' ``quantization_config``: per-tensor scales
#: (``weight_block_size: null``), static activation scales, and only the text layers' Linears
#: quantized. transformers' FineGrainedFP8 quantizer reads this; without a GPU it dequantizes.
FP8_QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "fp8",
    "activation_scheme": "static",
    "weight_block_size": None,
    "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
}

#: The runtime keys those checkpoints store as FP8: the text layers' attention and MLP Linears.
MISTRAL3_FP8 = r"^model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$"


#: ``--quick``: ~17 MB, seconds per case; for CI, so the benchmark code never rots. The MLP
#: weights (8256 x 256 = 2,113,536 elements) are just over lazyfp8's default chunk of 2**21
#: elements, so even the quick run reads FP8 tensors in several chunks (and threads).
QUICK = ModelSpec(
    vocab=4096,
    hidden=256,
    intermediate=8256,
    layers=1,
    heads=4,
    kv_heads=2,
    head_dim=64,
    vision_hidden=64,
    vision_intermediate=128,
    vision_layers=1,
    vision_heads=2,
    image_size=56,
    max_shard_size="8MB",  # FP8: 2 shards, bf16: 3
)


#: Full: ~580M parameters, ~1.16 GB of bf16 (text hidden 2048, 7 layers, vocab 32768).
FULL = ModelSpec(
    vocab=32768,
    hidden=2048,
    intermediate=8192,
    layers=7,
    heads=16,
    kv_heads=8,
    head_dim=128,
    vision_hidden=256,
    vision_intermediate=1024,
    vision_layers=2,
    vision_heads=4,
    image_size=224,
    max_shard_size="300MB",
)


SPECS = {"quick": QUICK, "full": FULL}


@contextlib.contextmanager
def default_dtype(dtype: Any) -> Iterator[None]:
    """Construct modules in ``dtype`` (as ``from_pretrained(dtype=...)`` does), then restore."""
    import torch

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def build_model(config: Mapping[str, Any] | Any, params: str = "zeros") -> Any:
    """A bf16 ``Mistral3ForConditionalGeneration`` whose parameters are ``"meta"`` (no storage),
    ``"zeros"`` (allocated and touched, as a model about to be loaded with ``load_state_dict``),
    or ``"empty"`` (allocated, untouched; the caller fills them).

    The module tree is always built with parameters on meta (``lazyfp8.init_empty_weights``
    keeps buffers such as rotary ``inv_freq`` real); building 500M parameters with transformers'
    default initializers takes minutes on 2 cores and is not what any case measures.
    """
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    import lazyfp8

    if isinstance(config, Mapping):
        config = Mistral3Config(**{k: v for k, v in config.items() if k != "quantization_config"})
    with lazyfp8.init_empty_weights(), default_dtype(torch.bfloat16):
        model = Mistral3ForConditionalGeneration(config)
    if params != "meta":
        materialize_(model, zero=(params == "zeros"))
    return model.eval()


def materialize_(model: Any, *, zero: bool) -> None:
    """Give every meta parameter CPU storage (shared once per tied group), zeroed if ``zero``."""
    import torch

    done: dict[int, Any] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            new = done.get(id(p))
            if new is None:
                data = torch.zeros(p.shape, dtype=p.dtype) if zero else torch.empty(p.shape, dtype=p.dtype)
                new = done[id(p)] = type(p)(data, requires_grad=p.requires_grad)
            module._parameters[name] = new


def fill_random_(model: Any, seed: int) -> None:
    """Fill every parameter with N(0, 0.02) from one seeded generator, in ``named_parameters``
    order: the same spec always gives the same bits, in seconds rather than the minutes of
    transformers' initializers."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(0.0, 0.02, generator=gen)


def model_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_meta:
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 over ``(name, dtype, shape, bytes)`` of every tensor in name order: two loads are
    bit-identical exactly when their digests are equal."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def disk_to_runtime(key: str) -> str:
    """The runtime name of an on-disk dawn-ridge key (see :data:`DISK_TO_RUNTIME`)."""
    for disk, runtime in DISK_TO_RUNTIME:
        if key.startswith(disk):
            return runtime + key[len(disk) :]
    return key


#: The block size of DeepSeek-V3/R1 and Qwen3-FP8 releases.
BLOCK = (128, 128)


@dataclasses.dataclass(frozen=True)
class CausalLMSpec(TextSizes):
    """Sizes of a ``Qwen3ForCausalLM`` whose Linear shapes are all multiples of 128, so a
    128x128 block grid covers every weight exactly (as in the released Qwen3-FP8 checkpoints)."""

    max_shard_size: str
    seed: int = 0

    def config_dict(self) -> dict[str, Any]:
        """A ``config.json`` for transformers' ``Qwen3Config`` (no quantization)."""
        from transformers import Qwen3Config

        config = Qwen3Config(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
        d = config.to_dict()
        d["architectures"] = ["Qwen3ForCausalLM"]
        d["dtype"] = "bfloat16"
        return d


#: ``--quick``: ~2.4M parameters (4.8 MB of bf16), written in 3 shards (torch's quantized DCP
#: reader needs an index, which only a sharded checkpoint has).
QWEN3_QUICK = CausalLMSpec(
    vocab=4096, hidden=256, intermediate=768, layers=2, heads=4, kv_heads=2, head_dim=64, max_shard_size="2MB"
)


#: Full: ~587M parameters = 1.17 GB of bf16 (9 layers of hidden 2048, MLP 6144, vocab 32768,
#: untied lm_head); the block-FP8 checkpoint is ~720 MB in 3 shards of at most 300 MB.
QWEN3_FULL = CausalLMSpec(
    vocab=32768, hidden=2048, intermediate=6144, layers=9, heads=16, kv_heads=8, head_dim=128, max_shard_size="300MB"
)


QWEN3_SPECS = {"quick": QWEN3_QUICK, "full": QWEN3_FULL}


def build_causal_lm(config: Mapping[str, Any] | Any, params: str = "zeros") -> Any:
    """A bf16 model of ``config["architectures"][0]`` (any transformers class), parameters
    ``"meta"``, ``"zeros"`` or ``"empty"`` as in :func:`build_model`."""
    import torch
    import transformers

    import lazyfp8

    if isinstance(config, Mapping):
        d = {k: v for k, v in config.items() if k != "quantization_config"}
        arch = d["architectures"][0]
        config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    else:
        arch = config.architectures[0]
    with lazyfp8.init_empty_weights(), default_dtype(torch.bfloat16):
        model = getattr(transformers, arch)(config)
    if params != "meta":
        materialize_(model, zero=(params == "zeros"))
    return model.eval()


def random_causal_lm(config: Mapping[str, Any], seed: int) -> Any:
    """The spec's model with N(0, 0.02) parameters from one seeded generator (deterministic)."""
    model = build_causal_lm(config, params="empty")
    fill_random_(model, seed)
    return model
