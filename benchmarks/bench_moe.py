"""MoE benchmark: a DeepSeek-V3-shaped FP8 checkpoint in its per-expert on-disk layout, loaded into
transformers 5's fused-expert ``DeepseekV3ForCausalLM`` three ways, side by side.

Generates (or reuses, with ``--workdir``) a seeded ``DeepseekV3ForCausalLM`` (MLA attention, the
first layer dense, routed + shared experts) saved by ``lazyfp8.save(state_dict, scheme=
PerBlock((128, 128)), key_mapping=[Fuse(...), ...])``: every expert its own tensor on disk
(``mlp.experts.{e}.{gate,up,down}_proj.weight`` float8_e4m3fn + a float32 128x128
``weight_scale_inv`` grid), as DeepSeek ships it; ``kv_a_proj_with_mqa`` has a ragged last row of
blocks, as DeepSeek-V3's [576, 7168] does. Then runs each case in a fresh interpreter with the
checkpoint in the page cache:

- ``lazyfp8``: a bf16 model with real (zeroed) parameters,
  ``model.load_state_dict(LazyFP8View(dir, key_mapping="transformers"), strict=True)``: each fused
  ``mlp.experts.gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I] filled expert by expert;
- ``lazyfp8-meta``: the model under ``lazyfp8.init_empty_weights()``,
  ``lazyfp8.load_into(model, dir, key_mapping="transformers")``;
- ``transformers``: ``AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)``
  (without a GPU its FP8 quantizer dequantizes on load, then its conversion fuses the experts).

Usage::

    python benchmarks/bench_moe.py --quick       # ~2M parameters; what CI runs
    python benchmarks/bench_moe.py               # full: ~610M parameters, 1.16 GiB of bf16
    python benchmarks/bench_moe.py --workdir /tmp/lazyfp8-moe    # keep and reuse the checkpoint

Every case's loaded state is hashed key by key and compared with the reference (the files read
with ``load_file``, dequantized with the formula, experts stacked and concatenated as transformers
fuses them). Exits 1 if a lazyfp8 case fails or differs from the reference in any bit, or if
transformers' result differs from lazyfp8's anywhere but the ragged rows it scales wrongly.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import checkpoints, child, cli, measure, models, processes, reporting

LAZY_CASES = ("lazyfp8", "lazyfp8-meta")
#: The issue's time target: a lazyfp8 load takes at most this fraction of transformers' time.
TIME_TARGET = 0.25

#: transformers 5's fused experts, on-disk per-expert parts -> runtime parameter. The same facts
#: transformers' own conversion mapping for ``deepseek_v3`` holds (``MergeModulelist(dim=0)`` +
#: ``Concatenate(dim=1)``); written here in lazyfp8's language so :func:`lazyfp8.save` writes the
#: per-expert layout. The cases read it back with ``key_mapping="transformers"``, i.e. through
#: transformers' mapping, not this one.
FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<which>gate_up_proj|down_proj)$")
#: The Linear weights DeepSeek-V3 ships as FP8 (attention, dense MLP, routed and shared experts),
#: matched on the per-expert names :func:`lazyfp8.save` quantizes; the router
#: (``mlp.gate.weight``), norms, embeddings and ``lm_head`` are not.
DEEPSEEK_FP8 = r"^model\.layers\.\d+\..*_proj(_with_mqa)?\.weight$"
#: The declared block size; transformers infers its own from the grid (``rows // grid_rows``).
BLOCK = models.BLOCK


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MoESpec:
    """Sizes of a ``DeepseekV3ForCausalLM``. ``kv_lora_rank + rope_dim`` is
    ``kv_a_proj_with_mqa``'s row count: not a multiple of 128 (ragged), but a multiple of its grid's
    row count, so transformers infers a wrong block height instead of refusing to load."""

    vocab: int
    hidden: int
    intermediate: int  # the dense first layer's MLP
    moe_intermediate: int  # one expert's
    layers: int
    dense_layers: int
    experts: int
    shared_experts: int
    experts_per_token: int
    groups: int
    topk_groups: int
    heads: int
    q_lora_rank: int
    kv_lora_rank: int
    rope_dim: int
    nope_dim: int
    v_dim: int
    max_shard_size: str
    seed: int = 0

    def config_dict(self) -> dict[str, Any]:
        """A ``config.json`` for transformers' ``DeepseekV3Config`` (no quantization)."""
        from transformers import DeepseekV3Config

        config = DeepseekV3Config(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            moe_intermediate_size=self.moe_intermediate,
            num_hidden_layers=self.layers,
            first_k_dense_replace=self.dense_layers,
            n_routed_experts=self.experts,
            n_shared_experts=self.shared_experts,
            num_experts_per_tok=self.experts_per_token,
            n_group=self.groups,
            topk_group=self.topk_groups,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank,
            qk_rope_head_dim=self.rope_dim,
            qk_nope_head_dim=self.nope_dim,
            v_head_dim=self.v_dim,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
        d = config.to_dict()
        d["architectures"] = ["DeepseekV3ForCausalLM"]
        d["dtype"] = "bfloat16"
        return d


#: ``--quick``: ~2M parameters, seconds per case; kv_a_proj_with_mqa is [192, 256] (a [2, 2] grid:
#: transformers uses 96-row blocks, rows 96-127 take the wrong scale).
MOE_QUICK = MoESpec(
    vocab=1024, hidden=256, intermediate=512, moe_intermediate=128, layers=2, dense_layers=1,
    experts=8, shared_experts=1, experts_per_token=2, groups=2, topk_groups=1, heads=2,
    q_lora_rank=128, kv_lora_rank=128, rope_dim=64, nope_dim=64, v_dim=64, max_shard_size="1MB",
)  # fmt: skip

#: Full: ~610M parameters, 1.16 GiB of bf16: hidden 2048, 4 layers (1 dense, 3 MoE of 48 routed
#: experts of 512 + 1 shared), vocab 16384. The largest fused parameter (gate_up_proj, [48, 1024,
#: 2048], 192 MiB) is larger than the memory bound (the 64 MiB bf16 embedding + 64 MiB), as in
#: DeepSeek-V3 (14 GiB of gate_up_proj a layer against a 1.75 GiB embedding), so a loader that
#: builds a fused temporary cannot pass. kv_a_proj_with_mqa is [448, 2048] (a [4, 16] grid:
#: transformers uses 112-row blocks, so rows 112-127, 224-255 and 336-383 take a wrong scale).
MOE_FULL = MoESpec(
    vocab=16384, hidden=2048, intermediate=6144, moe_intermediate=512, layers=4, dense_layers=1,
    experts=48, shared_experts=1, experts_per_token=6, groups=8, topk_groups=4, heads=16,
    q_lora_rank=768, kv_lora_rank=384, rope_dim=64, nope_dim=128, v_dim=128, max_shard_size="300MB",
)  # fmt: skip

MOE_SPECS = {"quick": MOE_QUICK, "full": MOE_FULL}


def fused_mapping() -> list[Any]:
    """transformers 5's DeepSeek-V3 experts in lazyfp8's key-mapping language (for writing)."""
    import lazyfp8

    return [
        lazyfp8.Fuse(
            ["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
            "mlp.experts.gate_up_proj",
            stack_dim=0,
            cat_dim=1,
        ),
        lazyfp8.Fuse(["mlp.experts.*.down_proj.weight"], "mlp.experts.down_proj", stack_dim=0),
    ]


def fused_parts(key: str, shape: tuple[int, ...]) -> list[str] | None:
    """The on-disk tensors of a fused runtime key, in the fused tensor's memory order (expert 0's
    gate, its up, expert 1's gate...: stacking on dim 0 then concatenating on dim 1 lays each
    expert's parts out one after the other), or ``None`` for a key stored as itself."""
    m = FUSED.match(key)
    if m is None:
        return None
    prefix, which = m.group("prefix"), m.group("which")
    names = ("gate_proj", "up_proj") if which == "gate_up_proj" else ("down_proj",)
    return [f"{prefix}.{e}.{n}.weight" for e in range(shape[0]) for n in names]


# --------------------------------------------------------------------------------------------
# Digests and the region transformers scales wrongly
# --------------------------------------------------------------------------------------------
def _bytes_of(t: Any) -> memoryview:
    import torch

    t = t.detach().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_digest(dtype: Any, shape: Iterable[int], parts: Iterable[Any]) -> str:
    """SHA-256 over ``dtype|shape`` and the raw bytes of ``parts`` in order (one tensor, or the
    parts a fused tensor is laid out from): equal exactly when the bits are."""
    h = hashlib.sha256(f"{dtype}|{tuple(shape)}\n".encode())
    for p in parts:
        if p.numel():
            h.update(_bytes_of(p))
    return h.hexdigest()


def key_digests(state: Mapping[str, Any]) -> dict[str, str]:
    """:func:`tensor_digest` of every tensor of a state dict."""
    return {k: tensor_digest(t.dtype, t.shape, [t]) for k, t in state.items()}


def wrong_region(shape: tuple[int, int], grid: tuple[int, int]) -> dict[str, Any]:
    """Where transformers' CPU dequantizer scales a ragged ``shape`` weight with a ``grid`` of
    128x128 blocks wrongly: it takes the block as ``(rows // grid_rows, cols // grid_cols)``, so a
    row ``r`` with ``r // 128 != r // block_rows`` (and likewise a column) uses a neighbouring
    block's scale. ``raises``: the grid does not divide the shape, and transformers refuses."""
    rows, cols = shape
    if rows % grid[0] or cols % grid[1]:
        return {"raises": True, "rows": [], "cols": []}
    br, bc = rows // grid[0], cols // grid[1]
    return {
        "raises": False,
        "block": [br, bc],
        "rows": [r for r in range(rows) if r // BLOCK[0] != r // br],
        "cols": [c for c in range(cols) if c // BLOCK[1] != c // bc],
    }


def _ranges(xs: list[int]) -> str:
    """``[112, ..., 127, 224, ...]`` -> ``"112-127, 224-255"``."""
    out: list[str] = []
    for x in xs:
        if out and int(out[-1].split("-")[-1]) == x - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{x}"
        else:
            out.append(str(x))
    return ", ".join(out)


# --------------------------------------------------------------------------------------------
# The checkpoint (written once per spec, reused through the manifest)
# --------------------------------------------------------------------------------------------
#: Bump when :func:`ensure_moe_checkpoint`'s output changes.
MOE_CHECKPOINT_FORMAT_VERSION = 1
RAGGED_REFERENCE = "moe-ragged-reference.safetensors"


def ensure_moe_checkpoint(
    workdir: str, spec: MoESpec, log: Callable[[str], Any] = print
) -> checkpoints.Checkpoints:
    """Write (or reuse) ``fp8-moe/`` and ``manifest-moe.json`` in ``workdir``.

    The seeded model (parameters N(0, 0.02), ``e_score_correction_bias`` too) is saved with
    ``lazyfp8.save(sd, scheme=PerBlock((128, 128)), quantize=DEEPSEEK_FP8,
    key_mapping=fused_mapping())``: per-expert on-disk names, FP8 e4m3 with float32
    ``weight_scale_inv`` grids, the router weight stored BF16 and its correction bias F32 (as
    DeepSeek-V3 ships them; the model keeps both in float32), embeddings, norms and ``lm_head``
    BF16. The manifest holds the reference state's digests (each runtime key's, and the whole
    state's as ``models.state_digest`` computes it), computed from ``lazyfp8.testing.
    reference_state_dict`` (``load_file`` + the formula) with the experts laid out as
    transformers fuses them; the reference values of the ragged weights go to
    ``moe-ragged-reference.safetensors`` for the cases to compare element by element."""
    import torch
    from safetensors.torch import save_file

    import lazyfp8
    from lazyfp8.testing import reference_state_dict

    fp8_dir = os.path.join(workdir, "fp8-moe")
    manifest_path = os.path.join(workdir, "manifest-moe.json")
    wanted = {"format": MOE_CHECKPOINT_FORMAT_VERSION, "spec": dataclasses.asdict(spec)}
    manifest = checkpoints.reusable_manifest(manifest_path, wanted)
    if manifest is not None and os.path.isdir(fp8_dir):
        log(f"reusing the MoE checkpoint in {workdir}")
        return checkpoints.Checkpoints(workdir, fp8_dir, "", manifest)
    t0 = time.perf_counter()
    config = spec.config_dict()
    model = models.random_causal_lm(config, spec.seed)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.02, generator=gen)
    sd = model.state_dict()
    runtime = {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}
    fused = {k: runtime[k][1] for k in sd if FUSED.match(k)}
    fused_bytes = {k: sd[k].numel() * sd[k].element_size() for k in fused}
    largest_fused = max(fused_bytes, key=fused_bytes.__getitem__)
    facts = {
        "params": sum(p.numel() for p in model.parameters()),
        "model_bytes": models.model_bytes(model),
        "largest_fused_param": {
            "key": largest_fused,
            "shape": list(fused[largest_fused]),
            "bytes": fused_bytes[largest_fused],
        },
    }
    # DeepSeek-V3 stores the router weight in BF16 (transformers keeps it in float32).
    disk_sd = {k: (v.to(torch.bfloat16) if k.endswith("mlp.gate.weight") else v) for k, v in sd.items()}
    res = lazyfp8.save(
        disk_sd,
        fp8_dir,
        scheme=lazyfp8.PerBlock(BLOCK),
        quantize=DEEPSEEK_FP8,
        key_mapping=fused_mapping(),
        max_shard_size=spec.max_shard_size,
        config=config,
        overwrite=True,
    )
    del model, sd, disk_sd
    gen_s = time.perf_counter() - t0

    ref = reference_state_dict(fp8_dir, dtype=torch.bfloat16)
    digests: dict[str, str] = {}
    whole = hashlib.sha256()  # models.state_digest's format, part by part
    for key in sorted(runtime):
        dtype, shape = runtime[key]
        parts = [ref[p].to(dtype) for p in fused_parts(key, shape) or [key]]
        if sum(p.numel() for p in parts) != torch.Size(shape).numel():
            raise AssertionError(f"the reference parts of {key} do not fill {list(shape)}")
        digests[key] = tensor_digest(dtype, shape, parts)
        whole.update(f"{key}|{dtype}|{shape}\n".encode())
        for p in parts:
            if p.numel():
                whole.update(_bytes_of(p))
    ragged = {}
    for file in checkpoints.safetensors_files(fp8_dir):
        header = checkpoints.safetensors_header(file)
        for key, e in header.items():
            if not key.endswith("_scale_inv"):
                continue
            weight = key[: -len("_scale_inv")]
            shape = tuple(runtime[weight][1]) if weight in runtime else None
            if shape is None:  # an expert's part: the comparison with transformers assumes none is ragged
                if any(n % b for n, b in zip(ref[weight].shape, BLOCK)):
                    raise AssertionError(f"{weight} is ragged; choose expert sizes that are multiples of 128")
            elif shape[0] % BLOCK[0] or shape[1] % BLOCK[1]:
                grid = tuple(e["shape"])
                ragged[weight] = dict(wrong_region(shape, grid), shape=list(shape), grid=list(grid))
    ragged = dict(sorted(ragged.items()))
    save_file(
        {k: ref[k].to(runtime[k][0]).contiguous() for k in ragged}, os.path.join(workdir, RAGGED_REFERENCE)
    )
    manifest = dict(
        wanted,
        **facts,
        digest=whole.hexdigest(),
        key_digests=digests,
        ragged=ragged,
        fp8_tensors=len(res.quantized),
        fused_params={k: list(v) for k, v in fused.items()},
        shards=len(res.files),
        fp8_disk_bytes=checkpoints.dir_bytes(fp8_dir),
        largest_fp8_tensor=checkpoints.largest_tensor(fp8_dir),
        quantization_config=json.load(open(os.path.join(fp8_dir, "config.json"))).get("quantization_config"),
        write_s=round(gen_s, 2),
    )
    del ref
    manifest["generate_s"] = round(time.perf_counter() - t0, 2)
    checkpoints.write_manifest(manifest_path, manifest)
    log(f"wrote the MoE checkpoint to {fp8_dir} in {manifest['generate_s']} s")
    return checkpoints.Checkpoints(workdir, fp8_dir, "", manifest)


# --------------------------------------------------------------------------------------------
# Cases (child process)
# --------------------------------------------------------------------------------------------
Context = child.CaseContext


def case_lazyfp8(ctx: Context) -> Any:
    """A model with real parameters; the view's fused values read expert by expert in ``copy_``."""
    import lazyfp8

    with ctx.watch.lap("build"):
        model = models.build_causal_lm(ctx.config, params="zeros")
    with ctx.watch.lap("load"), lazyfp8.LazyFP8View(ctx.fp8_dir, key_mapping="transformers") as view:
        ctx.notes["load_state_dict"] = str(model.load_state_dict(view, strict=True))
        ctx.notes["materialized"] = list(getattr(view, "materialized", []))
    return model


def case_lazyfp8_meta(ctx: Context) -> Any:
    """Parameters on meta, each allocated once by ``load_into`` and filled from the files."""
    import lazyfp8

    with ctx.watch.lap("build"):
        model = models.build_causal_lm(ctx.config, params="meta")
    with ctx.watch.lap("load"):
        lazyfp8.load_into(model, ctx.fp8_dir, key_mapping="transformers")
    return model


def case_transformers(ctx: Context) -> Any:
    """transformers' own loader: FP8 dequantized on load (no GPU), experts fused by its converters."""
    import torch
    from transformers import AutoModelForCausalLM

    with ctx.watch.lap("load"):
        model, info = AutoModelForCausalLM.from_pretrained(
            ctx.fp8_dir, dtype=torch.bfloat16, output_loading_info=True
        )
    ctx.watch.laps["build"] = 0.0  # from_pretrained builds the model itself, inside "load"
    ctx.notes["loading_info"] = {k: sorted(map(str, v)) for k, v in info.items() if v}
    ctx.notes["quantization_config_kept"] = "quantization_config" in model.config.to_dict()
    proj = model.model.layers[0].self_attn.kv_a_proj_with_mqa
    ctx.notes["kv_a_proj_with_mqa"] = f"{type(proj).__name__} {proj.weight.dtype}"
    return model


CASES: dict[str, Callable[[Context], Any]] = {
    "lazyfp8": case_lazyfp8,
    "lazyfp8-meta": case_lazyfp8_meta,
    "transformers": case_transformers,
}


def _prepare_lazyfp8() -> dict[str, Any]:
    """The compiled kernels, and transformers' conversion mapping (which ``key_mapping=
    "transformers"`` imports): library code, loaded before the baseline as the transformers case
    imports its quantizer."""
    import transformers.conversion_mapping  # noqa: F401

    return child.prepare_lazyfp8()


PREPARE: dict[str, Callable[[], Any]] = {
    "transformers": child.import_transformers_fp8,
    "lazyfp8": _prepare_lazyfp8,
    "lazyfp8-meta": _prepare_lazyfp8,
}


def ragged_comparison(state: Mapping[str, Any], workdir: str, ragged: Mapping[str, Any]) -> dict[str, Any]:
    """Each ragged weight of ``state`` against the reference: how many elements differ, and how
    many of those lie outside the rows and columns transformers scales wrongly."""
    import torch
    from safetensors.torch import load_file

    ref = load_file(os.path.join(workdir, RAGGED_REFERENCE))
    out = {}
    for key, region in ragged.items():
        got, want = state[key], ref[key]
        if got.dtype != want.dtype or got.shape != want.shape:
            out[key] = {"error": f"{got.dtype} {list(got.shape)}, reference {want.dtype} {list(want.shape)}"}
            continue
        differ = got.view(torch.int16) != want.view(torch.int16) if got.element_size() == 2 else got != want
        inside = torch.zeros_like(differ)
        inside[region["rows"], :] = True
        inside[:, region["cols"]] = True
        rows = differ.any(dim=1).nonzero().flatten().tolist()
        out[key] = {
            "differing": int(differ.sum()),
            "outside_wrong_region": int((differ & ~inside).sum()),
            "differing_rows": _ranges(rows),
        }
    return out


def child_main(args: argparse.Namespace) -> int:
    # The same imports in every case, before the baseline: they are not part of any load.
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: F401

    import lazyfp8  # noqa: F401

    with open(os.path.join(args.fp8_dir, "config.json")) as f:
        ctx = Context(args.fp8_dir, json.load(f))
    prepared = PREPARE.get(args.case, lambda: None)()
    if prepared:
        ctx.notes["kernels"] = prepared
    kept: dict[str, Any] = {}

    def run(c: Context) -> Any:
        kept["model"] = CASES[args.case](c)
        return kept["model"]

    status = child.run_load_case(args.result, args.case, run, ctx)
    if "model" in kept:  # after the measured run and its result: hash each key, check ragged rows
        workdir = os.path.dirname(os.path.abspath(args.fp8_dir))
        with open(os.path.join(workdir, "manifest-moe.json")) as f:
            ragged = json.load(f)["ragged"]
        state = kept.pop("model").state_dict()
        with open(args.result) as f:
            result = json.load(f)
        result["key_digests"] = key_digests(state)
        result["dtypes"] = {k: str(t.dtype) for k, t in state.items()}
        result["ragged"] = ragged_comparison(state, workdir, ragged)
        processes.write_result(args.result, result)
    return status


# --------------------------------------------------------------------------------------------
# Parent: generate, run, compare, report
# --------------------------------------------------------------------------------------------
COLUMNS = [
    ("case", "case"),
    ("load_s", "load s"),
    ("load_cpu_s", "load CPU s"),
    ("total_s", "build+load s"),
    ("vs_transformers", "× transformers"),
    ("load_vs_transformers", "load × transformers"),
    ("baseline_mib", "baseline RSS MiB"),
    ("vmhwm_mib", "VmHWM MiB"),
    ("peak_above_params_mib", "peak above params MiB"),
    ("rss_file_mib", "RssFile end MiB"),
    ("within_bound", "≤ bound"),
    ("below_fused", "< fused param"),
    ("bit_exact_text", "bit-exact"),
    ("differing_keys", "keys ≠ reference"),
]


def derive(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
    """Add the reported columns: times and ratios, peak above params against the bound and the
    largest fused parameter, and the bit checks (against the reference, key by key)."""
    bound = reporting.load_bound(manifest)
    fused_bytes = manifest["largest_fused_param"]["bytes"]
    by_case = {r["case"]: r for r in rows}
    for r in rows:
        if r.get("load_s") is not None:
            r["total_s"] = min(x["build_s"] + x["load_s"] for x in r["runs"] if "error" not in x)
    for r in rows:
        r["largest_disk_tensor_bytes"] = manifest["largest_fp8_tensor"]["bytes"]
        r["largest_fused_param_bytes"] = fused_bytes
        if r.get("load_s") is None or "vmhwm" not in r:
            r["bit_exact"], r["bit_exact_text"] = None, "error"
            continue
        peak = reporting.peak_above_params(r)
        r["baseline_mib"] = measure.mib(r["baseline_rss"])
        r["vmhwm_mib"] = measure.mib(r["vmhwm"])
        r["rss_file_mib"] = measure.mib(r.get("rss_file_end"))
        r["within_bound"] = "yes" if peak <= bound else "no"
        r["below_fused"] = "yes" if peak < fused_bytes else "no"
        reporting.add_ratios(r, by_case, (("transformers", "vs_transformers"),))
        reporting.add_ratios(r, by_case, (("transformers", "load_vs_transformers"),), key="load_s")
        digests = r.get("key_digests") or {}
        differ = sorted(k for k, d in manifest["key_digests"].items() if digests.get(k) != d)
        r["differing_keys"] = len(differ) if digests else None
        r["differing_key_names"] = differ
        if r["case"] == "transformers":
            # transformers scales the ragged rows wrongly: its row is judged outside them (below).
            r["bit_exact"] = None
            outside = [k for k in differ if k not in manifest["ragged"]]
            ragged_ok = all(v.get("outside_wrong_region") == 0 for v in (r.get("ragged") or {}).values())
            r["bit_exact_outside_ragged"] = bool(digests) and not outside and ragged_ok
            r["bit_exact_text"] = (
                "except ragged rows"
                if r["bit_exact_outside_ragged"] and differ
                else ("yes" if r["bit_exact_outside_ragged"] else "NO")
            )
        else:
            r["bit_exact"] = bool(digests) and not differ and r.get("digests") == [manifest["digest"]]
            r["bit_exact_text"] = "yes" if r["bit_exact"] else "NO"


def verdicts(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets and the bit checks, each ``{"pass": bool | None, ...}`` (``None``: it
    could not be checked, a case failed)."""
    bound = reporting.load_bound(manifest)
    fused_bytes = manifest["largest_fused_param"]["bytes"]
    by_case = {r["case"]: r for r in rows}
    out: dict[str, Any] = {"memory": {}, "never_fused": {}, "time": {}, "load_time": {}, "bits": {}}
    for case in LAZY_CASES:
        r = by_case.get(case, {})
        peak = r.get("peak_above_params")
        out["memory"][case] = {
            "pass": None if peak is None else peak <= bound,
            "peak_above_params": peak,
            "bound": bound,
        }
        # Meaningful only where a fused parameter is larger than the bound (the full size, as in
        # DeepSeek-V3); below it (--quick) a fused temporary would pass the bound unnoticed.
        out["never_fused"][case] = {
            "pass": None if peak is None or fused_bytes <= bound else peak < fused_bytes,
            "peak_above_params": peak,
            "largest_fused_param": fused_bytes,
            "discriminating": fused_bytes > bound,
        }
        for name, ratio in (("time", "vs_transformers"), ("load_time", "load_vs_transformers")):
            x = r.get(ratio)
            out[name][case] = {
                "pass": None if x is None else x <= TIME_TARGET,
                "ratio": x,
                "target": TIME_TARGET,
            }
        out["bits"][f"{case} = reference"] = {"pass": r.get("bit_exact") if "bit_exact" in r else None}
    a, b, t = (by_case.get(c, {}).get("key_digests") for c in ("lazyfp8", "lazyfp8-meta", "transformers"))
    out["bits"]["lazyfp8 = lazyfp8-meta"] = {"pass": None if not (a and b) else a == b}
    if b and t:
        # Case 2 against case 3 directly, key by key; a ragged key through the element-wise
        # comparison of each with the reference (lazyfp8-meta's equals it bit for bit above).
        differ = sorted(k for k in b if b[k] != t.get(k))
        outside = [k for k in differ if k not in manifest["ragged"]]
        ragged = by_case["transformers"].get("ragged") or {}
        meta_ragged = by_case["lazyfp8-meta"].get("ragged") or {}
        ok = not outside and all(v.get("outside_wrong_region") == 0 for v in ragged.values())
        ok = ok and all(v.get("differing") == 0 for v in meta_ragged.values())
        out["bits"]["lazyfp8-meta = transformers outside the ragged rows"] = {
            "pass": ok,
            "keys_compared": len(b),
            "keys_differing": differ,
            "keys_differing_outside_ragged": outside,
            "ragged": ragged,
        }
    else:
        out["bits"]["lazyfp8-meta = transformers outside the ragged rows"] = {"pass": None}
    return out


def _verdict(v: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "not checked"}[v]


def verdict_lines(v: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    mib = measure.mib
    lines = ["", "Targets (issue 13) and bit checks:", ""]
    for case, x in v["memory"].items():
        peak = "?" if x["peak_above_params"] is None else f"{mib(x['peak_above_params']):.1f}"
        lines.append(
            f"- {_verdict(x['pass'])} memory, {case}: peak above params {peak} MiB ≤ largest on-disk "
            f"tensor + 64 MiB = {mib(x['bound']):.1f} MiB"
        )
    for case, x in v["never_fused"].items():
        peak = "?" if x["peak_above_params"] is None else f"{mib(x['peak_above_params']):.1f}"
        why = (
            ""
            if x["discriminating"]
            else " (not checked: the fused parameter is within the bound at this size)"
        )
        lines.append(
            f"- {_verdict(x['pass'])} never a fused temporary, {case}: peak above params {peak} MiB < "
            f"the largest fused parameter, {mib(x['largest_fused_param']):.1f} MiB{why}"
        )
    for name, what in (("time", "build+load"), ("load_time", "load alone")):
        for case, x in v[name].items():
            ratio = "?" if x["ratio"] is None else f"{x['ratio']:.3f}"
            lines.append(
                f"- {_verdict(x['pass'])} time ({what}), {case}: {ratio} × transformers ≤ {x['target']}"
            )
    for name, x in v["bits"].items():
        extra = ""
        if "keys_compared" in x:
            rag = "; ".join(
                f"{k.split('.self_attn.')[0]}: {d.get('differing')} elements differ (rows {d.get('differing_rows') or 'none'}), "
                f"{d.get('outside_wrong_region')} outside transformers' wrong rows"
                for k, d in x["ragged"].items()
            )
            extra = (
                f" ({x['keys_compared']} keys compared; {len(x['keys_differing'])} differ, "
                f"{len(x['keys_differing_outside_ragged'])} of them outside the ragged kv_a_proj_with_mqa; {rag})"
            )
        lines.append(f"- {_verdict(x['pass'])} bits: {name}{extra}")
    return lines


def report(
    rows: list[dict[str, Any]],
    manifest: dict[str, Any],
    v: dict[str, Any],
    mode: str,
    repeat: int,
    note: str | None,
) -> str:
    spec, mib = manifest["spec"], measure.mib
    fused = manifest["largest_fused_param"]
    ragged = "; ".join(
        f"{k} {r['shape']} with a {r['grid']} grid: transformers "
        + (
            "refuses it"
            if r["raises"]
            else f"uses {r['block'][0]}x{r['block'][1]} blocks, rows {_ranges(r['rows'])} wrong"
        )
        for k, r in list(manifest["ragged"].items())[:1]
    )
    lines = [
        f"## MoE load benchmark ({mode})",
        "",
        *([f"- note: {note}"] if note else []),
        (
            f"- model: DeepseekV3ForCausalLM (hidden {spec['hidden']}, {spec['layers']} layers of which "
            f"{spec['dense_layers']} dense (MLP {spec['intermediate']}), {spec['experts']} routed experts of "
            f"{spec['moe_intermediate']} + {spec['shared_experts']} shared, MLA q_lora {spec['q_lora_rank']} "
            f"kv_lora {spec['kv_lora_rank']}, vocab {spec['vocab']}), {manifest['params'] / 1e6:.1f}M parameters, "
            f"{mib(manifest['model_bytes']):.1f} MiB of parameters+buffers (bf16; router in float32)"
        ),
        (
            f"- checkpoint: DeepSeek's per-expert layout, written by lazyfp8.save(..., scheme=PerBlock((128, 128)), "
            f"key_mapping=[Fuse(...)]): {mib(manifest['fp8_disk_bytes']):.1f} MiB in {manifest['shards']} shards "
            f"(max_shard_size {spec['max_shard_size']}), {manifest['fp8_tensors']} FP8 e4m3 weights with float32 "
            f"128x128 weight_scale_inv grids; quantization_config {json.dumps(manifest['quantization_config'])}"
        ),
        f"- ragged: {ragged} (and the same in every layer)",
        reporting.largest_tensor_line(manifest),
        (
            f"- largest fused parameter: {fused['key']} {fused['shape']}, {mib(fused['bytes']):.1f} MiB "
            f"({fused['bytes']} bytes); largest on-disk tensor {manifest['largest_fp8_tensor']['bytes']} bytes"
        ),
        "- page cache: warm (every file of the checkpoint read just before each run)",
        f"- each case in a fresh process; {repeat} run(s) per case: best time, largest peak",
        "",
        *reporting.kernels_line(rows),
        reporting.markdown_table(rows, COLUMNS),
    ]
    lines += reporting.disturbance_lines(rows, rerun=True)
    lines += verdict_lines(v, manifest)
    lines += reporting.error_lines(rows)
    return "\n".join(lines)


def failures(rows: list[dict[str, Any]], v: dict[str, Any]) -> list[str]:
    """A lazyfp8 case that did not load or gave other bits than the reference; the two lazyfp8
    cases disagreeing; transformers' result differing from lazyfp8's outside the ragged rows."""
    out = [f for f in reporting.load_failures(rows, LAZY_CASES) if "different bits" not in f]
    for name, x in v["bits"].items():
        if x["pass"] is False:
            out.append(f"bits: {name}")
    return out


def run_all(args: argparse.Namespace, ck: checkpoints.Checkpoints) -> list[dict[str, Any]]:
    files = checkpoints.checkpoint_files(ck.fp8_dir)
    runs = processes.run_repeated(
        os.path.abspath(__file__),
        args.cases,
        args.repeat,
        ["--fp8-dir", ck.fp8_dir],
        warm=lambda case: files,
        timeout=args.timeout,
        status=lambda r: reporting.status_line(r, 400),
    )
    rows = []
    for c in args.cases:
        row = reporting.aggregate_runs(
            runs[c], ("build_s", "load_s", "load_cpu_s"), ("vmrss_end", "rss_anon_end", "rss_file_end")
        )
        ok = [r for r in runs[c] if "error" not in r]
        # every run's per-key digests must agree; the row keeps the first run's (the JSON, all)
        if ok and any(r.get("key_digests") != ok[0].get("key_digests") for r in ok):
            row["key_digests"] = {}
            row["errors"].append("runs of this case loaded different bits")
        elif ok:
            row["key_digests"], row["ragged"] = ok[0].get("key_digests"), ok[0].get("ragged")
        rows.append(row)
    return rows


def parent_main(args: argparse.Namespace) -> int:
    mode = cli.size_mode(args)
    spec = MOE_SPECS[mode]
    env = reporting.environment()
    print(f"load average before: {measure.load_average()}", flush=True)
    with cli.work_directory(args.workdir, f"lazyfp8-moe-{mode}-") as workdir:
        ck = ensure_moe_checkpoint(workdir, spec)
        rows = run_all(args, ck)
    derive(rows, ck.manifest)
    v = verdicts(rows, ck.manifest)
    text = report(rows, ck.manifest, v, mode, args.repeat, args.note)
    print(text)
    for r in rows:  # the per-key digests stay in each run; the row keeps which keys differed
        r.pop("key_digests", None)
        for run in r.get("runs", []):
            run.pop("key_digests", None)
    checkpoint = {k: x for k, x in ck.manifest.items() if k != "key_digests"}
    return cli.finish(
        cli.result_path(args.out, "moe", mode),
        {
            "mode": mode,
            "note": args.note,
            "page_cache": "warm",
            "repeat": args.repeat,
            "bound_bytes": reporting.load_bound(ck.manifest),
            "largest_disk_tensor_bytes": ck.manifest["largest_fp8_tensor"]["bytes"],
            "largest_fused_param_bytes": ck.manifest["largest_fused_param"]["bytes"],
            "time_target": TIME_TARGET,
            "verdicts": v,
            "load_average_after": measure.load_average(),
            "environment": env,
            "checkpoint": checkpoint,
            "rows": rows,
            "table": text,
        },
        failures(rows, v),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.benchmark_parser(
        __doc__, "tiny model (~2M parameters); for CI", "~1.16 GiB of bf16 parameters (the default)"
    )
    cli.add_options(
        p, "workdir", "cases", "repeat", "timeout", "out", "note", cases=list(CASES), results="moe"
    )
    cli.add_options(p, "case", "result", "fp8-dir", cases=list(CASES))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return cli.main(parse_args, child_main, parent_main, argv)


if __name__ == "__main__":
    sys.exit(main())
