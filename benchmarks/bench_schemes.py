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
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

HERE = os.path.dirname(os.path.abspath(__file__))
BOUND_SLACK = 64 * common.MiB
LAZY_CASES = ("lazyfp8", "lazyfp8-meta", "dcp-lazyfp8")


# --------------------------------------------------------------------------------------------
# Cases (child process)
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    fp8_dir: str
    config: dict[str, Any]
    watch: common.Stopwatch = dataclasses.field(default_factory=common.Stopwatch)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)


def case_lazyfp8(ctx: Context) -> Any:
    import lazyfp8

    with ctx.watch.lap("build"):
        model = common.build_causal_lm(ctx.config, params="zeros")
    with ctx.watch.lap("load"), lazyfp8.LazyFP8View(ctx.fp8_dir) as view:
        ctx.notes["scheme"] = repr(view.scheme)
        model.load_state_dict(view, strict=True)
    return model


def case_lazyfp8_meta(ctx: Context) -> Any:
    import lazyfp8

    with ctx.watch.lap("build"):
        model = common.build_causal_lm(ctx.config, params="meta")
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
        model = common.build_causal_lm(ctx.config, params="zeros")
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
    import torch
    from safetensors.torch import load_file

    b0, b1 = common.BLOCK
    with ctx.watch.lap("build"):
        model = common.build_causal_lm(ctx.config, params="zeros")
    with ctx.watch.lap("load"):
        disk: dict[str, torch.Tensor] = {}
        for file in common.safetensors_files(ctx.fp8_dir):
            disk.update(load_file(file))
        state = {}
        for key, t in disk.items():
            if key.endswith("_scale_inv"):
                continue
            if t.dtype == torch.float8_e4m3fn:
                s = disk[key + "_scale_inv"].float()
                s = s.repeat_interleave(b0, 0)[: t.shape[0]].repeat_interleave(b1, 1)[:, : t.shape[1]]
                t = (t.float() * s).to(torch.bfloat16)
            state[key] = t
        del disk
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


def _import_transformers_fp8() -> None:
    import transformers.integrations.finegrained_fp8
    import transformers.quantizers.quantizer_finegrained_fp8  # noqa: F401

    try:
        import accelerate  # noqa: F401
    except ImportError:
        pass


PREPARE: dict[str, Callable[[], None]] = {
    "transformers": _import_transformers_fp8,
    "dcp-torch": _import_dcp,
    "dcp-lazyfp8": _import_dcp,
}


def child_main(args: argparse.Namespace) -> int:
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: F401

    import lazyfp8  # noqa: F401

    with open(os.path.join(args.fp8_dir, "config.json")) as f:
        ctx = Context(args.fp8_dir, json.load(f))
    PREPARE.get(args.case, lambda: None)()
    result: dict[str, Any] = {"case": args.case}
    probe = common.MemoryProbe()
    try:
        model = CASES[args.case](ctx)
    except BaseException as e:  # dcp.load raises CheckpointException, a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        result.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6))
        result.update(probe.report(), notes=ctx.notes)
        common.write_result(args.result, result)
        return 0
    probe.stop()
    result.update(probe.report())
    result.update(
        build_s=ctx.watch.laps.get("build", 0.0),
        load_s=ctx.watch.laps["load"],
        load_cpu_s=ctx.watch.cpu["load"],
        model_bytes=common.model_bytes(model),
        digest=common.state_digest(model.state_dict()),
        notes=ctx.notes,
    )
    common.write_result(args.result, result)
    return 0


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
    bound = manifest["largest_fp8_tensor"]["bytes"] + BOUND_SLACK
    by_case = {r["case"]: r for r in rows}
    lazy = by_case.get("lazyfp8", {}).get("digests")
    for r in rows:  # first: every row's total, which the ratios below compare
        if r.get("load_s") is not None:
            r["total_s"] = min(x["build_s"] + x["load_s"] for x in r["runs"] if "error" not in x)
    for r in rows:
        if r.get("load_s") is None or "vmhwm" not in r:
            r["bit_exact"] = "error"
            continue
        peak = r["vmhwm"] - r["baseline_rss"] - r["model_bytes"]
        r["peak_above_params"] = peak
        r["peak_above_params_mib"] = common.mib(peak)
        r["rss_file_mib"] = common.mib(r.get("rss_file_end"))
        r["within_bound"] = "yes" if peak <= bound else "no"
        r["gbps"] = manifest["model_bytes"] / r["load_s"] / 1e9
        r["bit_exact"] = "yes" if r["digests"] == [manifest["digest"]] else "NO"
        r["same_as_lazyfp8"] = "yes" if lazy and r["digests"] == lazy else ("NO" if lazy else None)
        for ref, col in (("transformers", "vs_transformers"), ("dcp-torch", "vs_dcp")):
            other = by_case.get(ref, {})
            if other.get("total_s"):
                r[col] = r["total_s"] / other["total_s"]


def report(rows: list[dict[str, Any]], manifest: dict[str, Any], mode: str, repeat: int, note: str | None) -> str:
    largest = manifest["largest_fp8_tensor"]
    bound = largest["bytes"] + BOUND_SLACK
    spec = manifest["spec"]
    lines = [
        f"## Block-scaled FP8 load benchmark ({mode})",
        "",
        *([f"- note: {note}"] if note else []),
        (
            f"- model: Qwen3ForCausalLM (hidden {spec['hidden']}, MLP {spec['intermediate']}, {spec['layers']} layers, "
            f"vocab {spec['vocab']}, untied lm_head), {manifest['params'] / 1e6:.1f}M parameters, "
            f"{common.mib(manifest['model_bytes']):.1f} MiB of bf16"
        ),
        (
            f"- checkpoint: lazyfp8.save(..., scheme=PerBlock((128, 128))): {common.mib(manifest['fp8_disk_bytes']):.1f} MiB "
            f"in {manifest['shards']} shards (max_shard_size {spec['max_shard_size']}), {manifest['fp8_tensors']} FP8 "
            f"e4m3 weights with float32 128x128 weight_scale_inv grids; quantization_config "
            f"{json.dumps(manifest['quantization_config'])}"
        ),
        (
            f"- largest on-disk tensor: {largest['key']} ({largest['dtype']}), {common.mib(largest['bytes']):.1f} MiB; "
            f"bound = largest + 64 MiB = {common.mib(bound):.1f} MiB"
        ),
        "- page cache: warm (every file of the checkpoint read just before each run)",
        f"- each case in a fresh process; {repeat} run(s) per case: best time, largest peak",
        "- GB/s = bytes of bf16 parameters produced / load s",
        "",
        common.markdown_table(rows, COLUMNS),
    ]
    note_busy = common.disturbance_note(rows)
    if note_busy:
        lines.append("\n" + note_busy)
    for r in rows:
        if "peak_above_params" in r:
            verdict = "holds" if r["peak_above_params"] <= bound else "does not hold"
            lines.append(
                f"\n{r['case']}: peak above params {common.mib(r['peak_above_params']):.1f} MiB vs bound "
                f"{common.mib(bound):.1f} MiB: the bound {verdict}."
            )
    for r in rows:
        if r.get("errors"):
            lines.append(
                f"\n{r['case']} failed in {len(r['errors'])}/{len(r['runs'])} run(s): {common.short_error(r['errors'][0])}"
            )
    return "\n".join(lines)


def run_all(args: argparse.Namespace, ck: common.Checkpoints) -> list[dict[str, Any]]:
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.cases}
    files = common.checkpoint_files(ck.fp8_dir)
    for i in range(args.repeat):
        for case in args.cases:
            common.warm_page_cache(files)
            r = common.run_case(os.path.abspath(__file__), case, ["--fp8-dir", ck.fp8_dir], timeout=args.timeout)
            status = (
                common.short_error(r["error"], 300)
                if "error" in r
                else f"load {r['load_s']:.2f} s (others' CPU {r['others_cpu_s']:.1f} s)"
            )
            print(f"  run {i + 1}/{args.repeat} {case}: {status}", flush=True)
            runs[case].append(r)
    return [
        common.aggregate_runs(runs[c], ("build_s", "load_s", "load_cpu_s"), ("vmrss_end", "rss_anon_end", "rss_file_end"))
        for c in args.cases
    ]


def failures(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if r["case"] in LAZY_CASES and r.get("errors"):
            out.append(f"{r['case']} failed to load")
        if r.get("bit_exact") == "NO":
            out.append(f"{r['case']} loaded different bits than the reference")
    return out


def parent_main(args: argparse.Namespace) -> int:
    mode = "quick" if args.quick else "full"
    spec = common.QWEN3_SPECS[mode]
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    env = common.environment()
    print(f"load average before: {common.load_average()}", flush=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix=f"lazyfp8-schemes-{mode}-")
    try:
        ck = common.ensure_block_checkpoint(workdir, spec)
        rows = run_all(args, ck)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    derive(rows, ck.manifest)
    text = report(rows, ck.manifest, mode, args.repeat, args.note)
    print(text)
    for r in rows:  # JSON rows: bit_exact as a boolean where it was checked
        r["bit_exact_text"] = r.get("bit_exact")
        r["bit_exact"] = {"yes": True, "NO": False}.get(r.get("bit_exact"))
    out = args.out or os.path.join(HERE, "results", f"schemes_{mode}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    common.write_result(
        out,
        {
            "mode": mode,
            "note": args.note,
            "page_cache": "warm",
            "repeat": args.repeat,
            "bound_bytes": ck.manifest["largest_fp8_tensor"]["bytes"] + BOUND_SLACK,
            "load_average_after": common.load_average(),
            "environment": env,
            "checkpoint": ck.manifest,
            "rows": rows,
            "table": text,
        },
    )
    print(f"\nsaved {out}")
    bad = failures(rows)
    for b in bad:
        print(f"FAIL: {b}", file=sys.stderr)
    return 1 if bad else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny model; for CI")
    size.add_argument("--full", action="store_true", help="~1.17 GB of bf16 parameters (the default)")
    p.add_argument("--workdir", help="keep the checkpoint here and reuse it (default: a temp dir, removed)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--repeat", type=int, help="runs per case (default: 1 quick, 3 full)")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per case run")
    p.add_argument("--out", help="JSON result path (default: benchmarks/results/schemes_<mode>.json)")
    p.add_argument("--note", help="a line printed above the table and stored in the JSON")
    p.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--fp8-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return child_main(args) if args.case else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
