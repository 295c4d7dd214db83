"""Offload benchmark: peak memory and forward time of a model run by ``lazyfp8.offload`` (its
quantized weights held as the checkpoint's bytes, each dequantized around its module's forward)
next to the same model fully loaded in bf16 by ``lazyfp8.load_into``, from the same checkpoint.

Generates (or reuses, with ``--workdir``) a deterministic ``LlamaForCausalLM`` checkpoint per
format, every ``*_proj`` weight stored as seeded random codes (writing codes directly takes
seconds; quantizing a 1 GB model takes minutes here, and the codes' values do not change what is
measured):

- ``nvfp4``: compressed-tensors ``nvfp4-pack-quantized`` (``weight_packed`` + e4m3 group scales
  of 16 + a global scale);
- ``fp8-block``: HF ``fp8`` e4m3 with float32 128x128 block scales (DeepSeek-V3, Qwen3-FP8).

Cases, each in a fresh interpreter, the model built on meta before the baseline:

- ``full:<format>``: ``lazyfp8.load_into(model, dir)``, the whole model in bf16;
- ``offload:<format>``: ``lazyfp8.offload(model, dir)``: every ``nn.Linear`` stored quantized held.

Each case times the load, a prefill forward of ``--tokens`` tokens (best of 3) and a greedy
``generate`` of ``--new-tokens`` tokens (per token), all under ``torch.inference_mode()``, and
reports ``VmHWM`` above the baseline. The offload row's logits and tokens must equal the full
row's bit for bit.

    python benchmarks/bench_offload.py --quick      # tiny model; what CI runs
    python benchmarks/bench_offload.py              # full: 1.0 GiB of bf16 parameters
    python benchmarks/bench_offload.py --workdir /tmp/lazyfp8-work --formats nvfp4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import checkpoints, child, cli, measure, models, processes, reporting

FORMATS = ("nvfp4", "fp8-block")
CASES = tuple(f"{how}:{fmt}" for fmt in FORMATS for how in ("full", "offload"))

#: Bump when the generated checkpoints change.
OFFLOAD_CHECKPOINT_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class OffloadSpec(models.TextSizes):
    """Sizes of the ``LlamaForCausalLM`` (untied ``lm_head``) the checkpoints hold."""

    max_shard_size: str
    seed: int = 0

    def config_dict(self) -> dict[str, Any]:
        """A ``config.json`` for transformers' ``LlamaConfig`` (no quantization)."""
        from transformers import LlamaConfig

        config = LlamaConfig(
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
        d["architectures"] = ["LlamaForCausalLM"]
        d["dtype"] = "bfloat16"
        return d


#: ``--quick``: 2.6M parameters, two shards.
QUICK = OffloadSpec(vocab=1024, hidden=256, intermediate=768, layers=2, heads=4, kv_heads=2, head_dim=64, max_shard_size="2MB")

#: Full: 531M parameters, 1013 MiB of bf16: 464M in the Linear layers (8 layers of hidden 2048,
#: MLP 8192), 64 MiB each for the embedding and the untied lm_head (vocab 16384), which
#: producers leave in bf16.
FULL = OffloadSpec(
    vocab=16384, hidden=2048, intermediate=8192, layers=8, heads=16, kv_heads=4, head_dim=128, max_shard_size="300MB"
)

SPECS = {"quick": QUICK, "full": FULL}


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def _quantization_config(fmt: str) -> dict[str, Any]:
    if fmt == "nvfp4":
        group = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}}
        return {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {"group_0": group}, "ignore": ["lm_head"]}
    return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": list(models.BLOCK)}


def ensure_checkpoint(workdir: str, fmt: str, spec: OffloadSpec, log: Any = print) -> checkpoints.Checkpoints:
    """Write (or reuse) ``offload-<fmt>/`` in ``workdir``: the spec's Llama, every ``*_proj``
    weight as seeded random codes (NVFP4: random packed bytes, e4m3 group scales of codes
    0x30-0x37 (0.5-0.9) and a global scale of 2000; FP8: e4m3 codes 0x00-0x7e, block scales in
    [1e-5, 1.1e-4)), every other tensor N(0, 0.02) in bf16, written by
    ``lazyfp8.testing.write_checkpoint(..., scheme=None)`` (as given, sharded)."""
    import time

    import torch

    from lazyfp8.testing import write_checkpoint

    path = os.path.join(workdir, f"offload-{fmt}")
    manifest_path = os.path.join(workdir, f"manifest-offload-{fmt}.json")
    wanted = {"format": OFFLOAD_CHECKPOINT_FORMAT_VERSION, "packing": fmt, "spec": dataclasses.asdict(spec)}
    manifest = checkpoints.reusable_manifest(manifest_path, wanted)
    if manifest is not None and os.path.isdir(path):
        log(f"reusing the {fmt} checkpoint in {path}")
        return checkpoints.Checkpoints(workdir, path, "", manifest)
    t0 = time.perf_counter()
    config = spec.config_dict()
    model = models.build_causal_lm(config, params="meta")
    gen = torch.Generator().manual_seed(spec.seed)

    def randint(lo: int, hi: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int32).to(torch.uint8)

    disk: dict[str, torch.Tensor] = {}
    linear = 0
    for key, p in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if not (module.endswith("_proj") and leaf == "weight"):
            disk[key] = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(torch.bfloat16)
            continue
        out_f, in_f = p.shape
        linear += out_f * in_f
        if fmt == "nvfp4":
            disk[f"{module}.weight_packed"] = randint(0, 256, (out_f, in_f // 2))
            disk[f"{module}.weight_scale"] = randint(0x30, 0x38, (out_f, in_f // 16)).view(torch.float8_e4m3fn)
            disk[f"{module}.weight_global_scale"] = torch.tensor([2000.0])
        else:
            disk[key] = randint(0, 0x7F, (out_f, in_f)).view(torch.float8_e4m3fn)  # 0x7f is NaN
            grid = (-(-out_f // models.BLOCK[0]), -(-in_f // models.BLOCK[1]))
            disk[f"{key}_scale_inv"] = torch.rand(grid, generator=gen) * 1e-4 + 1e-5
    params = sum(p.numel() for p in model.parameters())
    write_checkpoint(
        disk, path, scheme=None, max_shard_size=spec.max_shard_size, overwrite=True,
        config=dict(config, quantization_config=_quantization_config(fmt)),
    )  # fmt: skip
    del disk
    manifest = dict(
        wanted,
        params=params,
        model_bytes=params * 2,
        linear_params=linear,
        fp8_disk_bytes=checkpoints.dir_bytes(path),
        largest_fp8_tensor=checkpoints.largest_tensor(path),
        quantization_config=_quantization_config(fmt),
        generate_s=round(time.perf_counter() - t0, 2),
    )
    checkpoints.write_manifest(manifest_path, manifest)
    log(f"wrote the {fmt} checkpoint to {path} in {manifest['generate_s']} s")
    return checkpoints.Checkpoints(workdir, path, "", manifest)


# --------------------------------------------------------------------------------------------
# Child
# --------------------------------------------------------------------------------------------
def child_main(args: argparse.Namespace) -> int:
    import time

    import torch
    import transformers  # noqa: F401

    import lazyfp8

    how, fmt = args.case.split(":")
    with open(os.path.join(args.fp8_dir, "config.json")) as f:
        config = json.load(f)
    result: dict[str, Any] = {"case": args.case, "format": fmt}
    notes = {"kernels": child.prepare_lazyfp8()}  # library code, before the baseline
    model = models.build_causal_lm(config, params="meta")
    ids = torch.arange(args.tokens).remainder(config["vocab_size"]).view(1, -1)
    watch = measure.Stopwatch()
    probe = measure.MemoryProbe()
    try:
        with watch.lap("load"):
            if how == "offload":
                handle = lazyfp8.offload(model, args.fp8_dir)
            else:
                lazyfp8.load_into(model, args.fp8_dir)
        after_load = measure.proc_status()["VmRSS"]
        prefill = []
        with torch.inference_mode():
            for _ in range(3):
                t0 = time.perf_counter()
                logits = model(ids).logits
                prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
            generate_s = time.perf_counter() - t0
        probe.stop()
    except Exception as e:  # noqa: BLE001 - recorded in the result, not raised
        result.update(child.error_fields(e))
        result.update(probe.report(), notes=notes)
        processes.write_result(args.result, result)
        return 0
    result.update(probe.report())
    resident = sum(p.nbytes for p in model.parameters() if not p.is_meta)
    result.update(
        load_s=watch.laps["load"],
        load_cpu_s=watch.cpu["load"],
        rss_after_load=after_load,
        prefill_s=min(prefill),
        prefill_runs_s=prefill,
        generate_s=generate_s,
        decode_s_per_token=generate_s / args.new_tokens,
        resident_param_bytes=resident,
        digest=models.state_digest({"logits": logits, "tokens": out}),
        notes=notes,
    )
    if how == "offload":
        result.update(
            held_bytes=handle.held_bytes,
            dense_bytes=handle.dense_bytes,
            buffer_bytes=handle.buffer_bytes,
            held_weights=len(handle.keys),
            fresh_buffers=handle.fresh_buffers,
        )
    processes.write_result(args.result, result)
    return 0


# --------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------
COLUMNS = [
    ("case", "case"),
    ("load_s", "load s"),
    ("prefill_s", "prefill s"),
    ("decode_s_per_token", "decode s/token"),
    ("held_mib", "held MiB"),
    ("buffer_mib", "buffers MiB"),
    ("resident_mib", "resident params MiB"),
    ("peak_mib", "peak above baseline MiB"),
    ("expected_mib", "held + buffers + resident MiB"),
    ("peak_x_full", "peak × full"),
    ("prefill_x_full", "prefill × full"),
    ("decode_x_full", "decode × full"),
    ("bit_exact_text", "= full (logits, tokens)"),
]


def derive(rows: list[dict[str, Any]]) -> None:
    by_case = {r["case"]: r for r in rows}
    for r in rows:
        if r.get("load_s") is None or "vmhwm" not in r:
            r["bit_exact_text"] = "error"
            continue
        first = next(x for x in r["runs"] if "error" not in x)
        r["peak"] = r["vmhwm"] - r["baseline_rss"]
        r["peak_mib"] = measure.mib(r["peak"])
        r["resident_mib"] = measure.mib(first["resident_param_bytes"])
        r["decode_s_per_token"] = min(x["decode_s_per_token"] for x in r["runs"] if "error" not in x)
        if r["case"].startswith("offload:"):
            r["held_mib"] = measure.mib(first["held_bytes"])
            r["buffer_mib"] = measure.mib(first["buffer_bytes"])
            r["expected_mib"] = measure.mib(first["held_bytes"] + first["buffer_bytes"] + first["resident_param_bytes"])
            full = by_case.get("full:" + r["format"])
            if full and full.get("digests") and r.get("digests"):
                r["bit_exact"] = r["digests"] == full["digests"]
                r["bit_exact_text"] = "exact" if r["bit_exact"] else "WRONG"
            if full and "vmhwm" in full:
                r["peak_x_full"] = r["peak"] / (full["vmhwm"] - full["baseline_rss"])
                reporting.add_ratios(r, by_case, [("full:" + r["format"], "prefill_x_full")], key="prefill_s")
                r["decode_x_full"] = r["decode_s_per_token"] / full["decode_s_per_token"]


def report(rows: list[dict[str, Any]], manifests: dict[str, Any], mode: str, repeat: int, args: argparse.Namespace) -> str:
    spec = next(iter(manifests.values()))["spec"]
    m0 = next(iter(manifests.values()))
    lines = [
        f"## Offload benchmark ({mode})",
        "",
        *([f"- note: {args.note}"] if args.note else []),
        (
            f"- model: LlamaForCausalLM (hidden {spec['hidden']}, MLP {spec['intermediate']}, {spec['layers']} layers, "
            f"vocab {spec['vocab']}), {m0['params'] / 1e6:.0f}M parameters = {measure.mib(m0['model_bytes']):.0f} MiB of bf16, "
            f"{m0['linear_params'] / 1e6:.0f}M of them in the quantized Linear weights"
        ),
        *(
            f"- `{fmt}` checkpoint: {measure.mib(m['fp8_disk_bytes']):.0f} MiB on disk"
            for fmt, m in manifests.items()
        ),
        (
            f"- each case: model built on meta before the baseline; `full`: `load_into` (bf16); `offload`: `offload`; "
            f"then under inference_mode a prefill of {args.tokens} tokens (best of 3) and greedy `generate` of "
            f"{args.new_tokens} tokens (decode s/token = its time / {args.new_tokens})"
        ),
        "- peak above baseline = VmHWM − RSS at the baseline (VmHWM reset there), over load, prefills and generate",
        f"- each case in a fresh process, page cache warm; {repeat} run(s) per case: best time, largest peak",
        "",
        *reporting.kernels_line(rows),
        reporting.markdown_table(rows, COLUMNS),
    ]
    lines += reporting.disturbance_lines(rows)
    lines += reporting.error_lines(rows)
    return "\n".join(lines)


def parent_main(args: argparse.Namespace) -> int:
    mode = cli.size_mode(args)
    spec = SPECS[mode]
    env = reporting.environment()
    cases = [c for c in args.cases if c.split(":")[1] in args.formats]
    print(f"load average before: {measure.load_average()}", flush=True)
    with cli.work_directory(args.workdir, f"lazyfp8-offload-{mode}-") as workdir:
        cks = {fmt: ensure_checkpoint(workdir, fmt, spec) for fmt in args.formats}
        runs = processes.run_repeated(
            os.path.abspath(__file__),
            cases,
            args.repeat,
            lambda i, case: ["--fp8-dir", cks[case.split(":")[1]].fp8_dir, "--tokens", str(args.tokens),
                             "--new-tokens", str(args.new_tokens)],
            warm=lambda case: checkpoints.checkpoint_files(cks[case.split(":")[1]].fp8_dir),
            timeout=args.timeout,
            status=lambda r: (
                reporting.short_error(r["error"], 300)
                if "error" in r
                else f"load {r['load_s']:.2f} s, prefill {r['prefill_s']:.2f} s, decode {r['decode_s_per_token']:.2f} s/token, "
                f"peak {measure.mib(r['vmhwm'] - r['baseline_rss']):.0f} MiB (others' CPU {r['others_cpu_s']:.1f} s)"
            ),
        )  # fmt: skip
        rows = [
            reporting.aggregate_runs(runs[c], ("load_s", "load_cpu_s", "prefill_s", "generate_s"), ("vmrss_end",))
            for c in cases
        ]
        manifests = {fmt: ck.manifest for fmt, ck in cks.items()}
    derive(rows)
    text = report(rows, manifests, mode, args.repeat, args)
    print(text)
    failures = [r["case"] for r in rows if r.get("errors") or r.get("bit_exact") is False]
    return cli.finish(
        cli.result_path(args.out, "offload", mode),
        {
            "mode": mode,
            "note": args.note,
            "page_cache": "warm (checkpoint read before each run)",
            "repeat": args.repeat,
            "tokens": args.tokens,
            "new_tokens": args.new_tokens,
            "load_average_after": measure.load_average(),
            "environment": env,
            "checkpoints": manifests,
            "rows": rows,
            "table": text,
        },
        failures,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.benchmark_parser(__doc__, "tiny model; for CI", "1.0 GiB of bf16 parameters (the default)")
    cli.add_options(p, "workdir", "cases", "repeat", cases=CASES)
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--tokens", type=int, default=32, help="prompt length of the prefill (default 32)")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generate adds (default 8)")
    cli.add_options(p, "timeout", "out", "note", results="offload", helps={"timeout": None, "note": None})
    cli.add_options(p, "case", "result", "fp8-dir", cases=CASES)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return cli.main(parse_args, child_main, parent_main, argv)


if __name__ == "__main__":
    sys.exit(main())
