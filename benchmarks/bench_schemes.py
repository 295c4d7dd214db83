"""Block-scaled FP8 benchmark: a DeepSeek/Qwen3-style checkpoint (float8_e4m3fn weights with
128x128 ``weight_scale_inv`` grids, ``quant_method: fp8, weight_block_size: [128, 128]``) of a real
transformers architecture (``Qwen3ForCausalLM``), loaded every way there is, side by side.

Generates (or reuses, with ``--workdir``) the checkpoint with
``lazyfp8.save(state_dict, dir, scheme=PerBlock((128, 128)), config=...)`` (on-disk names = the
runtime names, so torch's DCP readers can match them), then runs each case in a fresh
interpreter with the checkpoint in the page cache:

- ``lazyfp8``: real (zeroed) bf16 model, ``model.load_state_dict(LazyFP8View(dir), strict=True)``;
- ``lazyfp8-meta``: model under ``lazyfp8.init_empty_weights()``, ``lazyfp8.load_into(model, view)``;
- ``transformers``: ``Qwen3ForCausalLM.from_pretrained(dir, dtype=bf16)`` (FP8 quantizer; on a
  machine without a GPU it dequantizes on load);
- ``dcp-torch``: zeroed model, ``dcp.load(model.state_dict(), storage_reader=
  QuantizedHuggingFaceStorageReader(dir, target_dtype=bf16, block_size=128), no_dist=True)``;
- ``dcp-lazyfp8``: zeroed model, ``dcp.load(model.state_dict(), storage_reader=
  lazyfp8.LazyFP8StorageReader(dir), no_dist=True)``;
- ``naive``: ``safetensors.torch.load_file`` of every shard, each weight dequantized with its
  block grid expanded (``repeat_interleave``), ``load_state_dict``.

Usage::

    python benchmarks/bench_schemes.py --quick      # ~3.7M parameters; what CI runs
    python benchmarks/bench_schemes.py              # full: ~587M parameters, 1.17 GB of bf16
    python benchmarks/bench_schemes.py --workdir /tmp/lazyfp8-schemes   # keep and reuse the checkpoint

Every case's loaded state is hashed and compared with the reference (the checkpoint read with
``load_file`` and dequantized with ``(w.float() * s_expanded).to(bf16)``) and with lazyfp8's.
Exits 1 if a lazyfp8 case fails or a case that loaded gives different bits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import checkpoints, child, cli, measure, models, processes, reporting

LAZY_CASES = ("lazyfp8", "lazyfp8-meta", "dcp-lazyfp8")


# --------------------------------------------------------------------------------------------
# Cases (child process)
# --------------------------------------------------------------------------------------------
Context = child.CaseContext


def case_lazyfp8(ctx: Context) -> Any:
    import lazyfp8

    with ctx.watch.lap("build"):
        model = models.build_causal_lm(ctx.config, params="zeros")
    with ctx.watch.lap("load"), lazyfp8.LazyFP8View(ctx.fp8_dir) as view:
        ctx.notes["scheme"] = repr(view.scheme)
        model.load_state_dict(view, strict=True)
    return model


def case_lazyfp8_meta(ctx: Context) -> Any:
    import lazyfp8

    with ctx.watch.lap("build"):
        model = models.build_causal_lm(ctx.config, params="meta")
    with ctx.watch.lap("load"), lazyfp8.LazyFP8View(ctx.fp8_dir) as view:
        lazyfp8.load_into(model, view, strict=True)
    return model


def case_transformers(ctx: Context) -> Any:
    import torch
    from transformers import Qwen3ForCausalLM

    with ctx.watch.lap("load"):
        model, info = Qwen3ForCausalLM.from_pretrained(ctx.fp8_dir, dtype=torch.bfloat16, output_loading_info=True)
    ctx.watch.laps["build"] = 0.0  # built inside from_pretrained
    ctx.notes["loading_info"] = {k: sorted(map(str, v)) for k, v in info.items() if v}
    ctx.notes["quantization_config_kept"] = "quantization_config" in model.config.to_dict()
    proj = model.model.layers[0].mlp.gate_proj
    ctx.notes["gate_proj"] = f"{type(proj).__name__} {proj.weight.dtype}"
    return model


def _dcp_load(ctx: Context, make_reader: Callable[[], Any]) -> Any:
    import torch.distributed.checkpoint as dcp

    with ctx.watch.lap("build"):
        model = models.build_causal_lm(ctx.config, params="zeros")
    with ctx.watch.lap("load"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        sd = model.state_dict()
        dcp.load(sd, storage_reader=make_reader(), no_dist=True)
        del sd
    return model


def case_dcp_torch(ctx: Context) -> Any:
    import torch
    from torch.distributed.checkpoint.quantized_hf_storage import QuantizedHuggingFaceStorageReader

    return _dcp_load(
        ctx, lambda: QuantizedHuggingFaceStorageReader(ctx.fp8_dir, target_dtype=torch.bfloat16, block_size=128)
    )


def case_dcp_lazyfp8(ctx: Context) -> Any:
    import lazyfp8

    return _dcp_load(ctx, lambda: lazyfp8.LazyFP8StorageReader(ctx.fp8_dir))


def case_naive(ctx: Context) -> Any:
    """Without any library: the whole checkpoint, then a dequantized copy (block grid expanded)."""
    with ctx.watch.lap("build"):
        model = models.build_causal_lm(ctx.config, params="zeros")
    with ctx.watch.lap("load"):
        state = checkpoints.naive_block_dequantized(ctx.fp8_dir)
        model.load_state_dict(state, strict=True)
        del state
    return model


CASES: dict[str, Callable[[Context], Any]] = {
    "lazyfp8": case_lazyfp8,
    "lazyfp8-meta": case_lazyfp8_meta,
    "transformers": case_transformers,
    "dcp-torch": case_dcp_torch,
    "dcp-lazyfp8": case_dcp_lazyfp8,
    "naive": case_naive,
}


def _import_dcp() -> None:
    import torch.distributed.checkpoint
    import torch.distributed.checkpoint.quantized_hf_storage  # noqa: F401

    import lazyfp8.distributed

    lazyfp8.distributed._register()


def _import_dcp_lazyfp8() -> dict[str, Any]:
    _import_dcp()
    return child.prepare_lazyfp8()


PREPARE: dict[str, Callable[[], Any]] = {
    "transformers": child.import_transformers_fp8,
    "dcp-torch": _import_dcp,
    "dcp-lazyfp8": _import_dcp_lazyfp8,
    "lazyfp8": child.prepare_lazyfp8,
    "lazyfp8-meta": child.prepare_lazyfp8,
}


def child_main(args: argparse.Namespace) -> int:
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: F401

    import lazyfp8  # noqa: F401

    with open(os.path.join(args.fp8_dir, "config.json")) as f:
        ctx = Context(args.fp8_dir, json.load(f))
    prepared = PREPARE.get(args.case, lambda: None)()
    if prepared:
        ctx.notes["kernels"] = prepared
    # dcp.load raises CheckpointException, a BaseException
    return child.run_load_case(args.result, args.case, CASES[args.case], ctx, catch=BaseException)


# --------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------
COLUMNS = [
    ("case", "case"),
    ("load_s", "load s"),
    ("load_cpu_s", "load CPU s"),
    ("total_s", "build+load s"),
    ("vs_transformers", "× transformers"),
    ("vs_dcp", "× dcp-torch"),
    ("gbps", "GB/s of bf16 out"),
    ("peak_above_params_mib", "peak above params MiB"),
    ("rss_file_mib", "RssFile end MiB"),
    ("within_bound", "≤ bound"),
    ("bit_exact", "bit-exact"),
    ("same_as_lazyfp8", "= lazyfp8"),
]


def derive(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
    bound = reporting.load_bound(manifest)
    by_case = {r["case"]: r for r in rows}
    lazy = by_case.get("lazyfp8", {}).get("digests")
    for r in rows:  # first: every row's total, which the ratios below compare
        if r.get("load_s") is not None:
            r["total_s"] = min(x["build_s"] + x["load_s"] for x in r["runs"] if "error" not in x)
    for r in rows:
        if r.get("load_s") is None or "vmhwm" not in r:
            r["bit_exact"] = "error"
            continue
        peak = reporting.peak_above_params(r)
        r["rss_file_mib"] = measure.mib(r.get("rss_file_end"))
        r["within_bound"] = "yes" if peak <= bound else "no"
        r["gbps"] = manifest["model_bytes"] / r["load_s"] / 1e9
        r["bit_exact"] = "yes" if r["digests"] == [manifest["digest"]] else "NO"
        r["same_as_lazyfp8"] = "yes" if lazy and r["digests"] == lazy else ("NO" if lazy else None)
        reporting.add_ratios(r, by_case, (("transformers", "vs_transformers"), ("dcp-torch", "vs_dcp")))


def report(rows: list[dict[str, Any]], manifest: dict[str, Any], mode: str, repeat: int, note: str | None) -> str:
    bound = reporting.load_bound(manifest)
    spec = manifest["spec"]
    lines = [
        f"## Block-scaled FP8 load benchmark ({mode})",
        "",
        *([f"- note: {note}"] if note else []),
        (
            f"- model: Qwen3ForCausalLM (hidden {spec['hidden']}, MLP {spec['intermediate']}, {spec['layers']} layers, "
            f"vocab {spec['vocab']}, untied lm_head), {manifest['params'] / 1e6:.1f}M parameters, "
            f"{measure.mib(manifest['model_bytes']):.1f} MiB of bf16"
        ),
        (
            f"- checkpoint: lazyfp8.save(..., scheme=PerBlock((128, 128))): {measure.mib(manifest['fp8_disk_bytes']):.1f} MiB "
            f"in {manifest['shards']} shards (max_shard_size {spec['max_shard_size']}), {manifest['fp8_tensors']} FP8 "
            f"e4m3 weights with float32 128x128 weight_scale_inv grids; quantization_config "
            f"{json.dumps(manifest['quantization_config'])}"
        ),
        reporting.largest_tensor_line(manifest),
        "- page cache: warm (every file of the checkpoint read just before each run)",
        f"- each case in a fresh process; {repeat} run(s) per case: best time, largest peak",
        "- GB/s = bytes of bf16 parameters produced / load s",
        "",
        *reporting.kernels_line(rows),
        reporting.markdown_table(rows, COLUMNS),
    ]
    lines += reporting.disturbance_lines(rows)
    lines += reporting.bound_verdicts(rows, bound)
    lines += reporting.error_lines(rows)
    return "\n".join(lines)


def run_all(args: argparse.Namespace, ck: checkpoints.Checkpoints) -> list[dict[str, Any]]:
    files = checkpoints.checkpoint_files(ck.fp8_dir)
    runs = processes.run_repeated(
        os.path.abspath(__file__),
        args.cases,
        args.repeat,
        ["--fp8-dir", ck.fp8_dir],
        warm=lambda case: files,
        timeout=args.timeout,
    )
    return [
        reporting.aggregate_runs(runs[c], ("build_s", "load_s", "load_cpu_s"), ("vmrss_end", "rss_anon_end", "rss_file_end"))
        for c in args.cases
    ]


def parent_main(args: argparse.Namespace) -> int:
    mode = cli.size_mode(args)
    spec = models.QWEN3_SPECS[mode]
    env = reporting.environment()
    print(f"load average before: {measure.load_average()}", flush=True)
    with cli.work_directory(args.workdir, f"lazyfp8-schemes-{mode}-") as workdir:
        ck = checkpoints.ensure_block_checkpoint(workdir, spec)
        rows = run_all(args, ck)
    derive(rows, ck.manifest)
    text = report(rows, ck.manifest, mode, args.repeat, args.note)
    print(text)
    for r in rows:  # JSON rows: bit_exact as a boolean where it was checked
        r["bit_exact_text"] = r.get("bit_exact")
        r["bit_exact"] = {"yes": True, "NO": False}.get(r.get("bit_exact"))
    return cli.finish(
        cli.result_path(args.out, "schemes", mode),
        {
            "mode": mode,
            "note": args.note,
            "page_cache": "warm",
            "repeat": args.repeat,
            "bound_bytes": reporting.load_bound(ck.manifest),
            "load_average_after": measure.load_average(),
            "environment": env,
            "checkpoint": ck.manifest,
            "rows": rows,
            "table": text,
        },
        reporting.load_failures(rows, LAZY_CASES),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.benchmark_parser(__doc__, "tiny model; for CI", "~1.17 GB of bf16 parameters (the default)")
    cli.add_options(
        p, "workdir", "cases", "repeat", "timeout", "out", "note", cases=list(CASES), results="schemes"
    )
    cli.add_options(p, "case", "result", "fp8-dir", cases=list(CASES))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return cli.main(parse_args, child_main, parent_main, argv)


if __name__ == "__main__":
    sys.exit(main())
