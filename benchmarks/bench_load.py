"""Load benchmark: time and peak memory of loading an FP8 Mistral3 checkpoint into a bf16 model.

Generates (or reuses, with ``--workdir``) a deterministic ``Mistral3ForConditionalGeneration``
checkpoint in the FP8 "dawn-ridge" layout plus an equivalent plain bf16 one, then runs each case
in a fresh interpreter:

- ``lazyfp8``: real (zeroed) bf16 model, ``model.load_state_dict(LazyFP8View(...), strict=True)``;
- ``lazyfp8-meta``: model under ``lazyfp8.init_empty_weights()``, ``lazyfp8.load_into(model, view)``;
- ``naive``: ``safetensors.torch.load_file`` of every shard, ``(w.float() * s).to(bf16)``, rename,
  ``load_state_dict``;
- ``transformers``: ``Mistral3ForConditionalGeneration.from_pretrained(fp8_dir, dtype=bf16)``
  (dequantizes on a machine without a GPU);
- ``bf16-safetensors``: the bf16 checkpoint via ``load_file`` + ``load_state_dict`` (the floor).

Usage::

    python benchmarks/bench_load.py --quick          # tiny model, seconds; what CI runs
    python benchmarks/bench_load.py                  # full: ~1.16 GB of bf16 parameters
    python benchmarks/bench_load.py --workdir /tmp/lazyfp8-bench   # keep and reuse checkpoints

Exits non-zero if a lazyfp8 case fails or any case that loaded differs from the reference bits.
See benchmarks/README.md for what each column means.
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
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

HERE = os.path.dirname(os.path.abspath(__file__))
BOUND_SLACK = 64 * common.MiB  # the bound: largest on-disk tensor + 64 MiB
LAZY_CASES = ("lazyfp8", "lazyfp8-meta")


# --------------------------------------------------------------------------------------------
# Cases (run in the child process)
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    """What a case gets: checkpoint paths, the model config, a stopwatch and a place for notes."""

    fp8_dir: str
    bf16_dir: str
    config: dict[str, Any]
    watch: common.Stopwatch = dataclasses.field(default_factory=common.Stopwatch)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)


def case_lazyfp8(ctx: Context) -> Any:
    """Plain ``load_state_dict`` with the lazy view: values read themselves inside ``copy_``."""
    import lazyfp8

    with ctx.watch.lap("build"):
        model = common.build_model(ctx.config, params="zeros")
    with ctx.watch.lap("load"), lazyfp8.LazyFP8View(ctx.fp8_dir, key_mapping="mistral3") as view:
        ctx.notes["load_state_dict"] = str(model.load_state_dict(view, strict=True))
    return model


def case_lazyfp8_meta(ctx: Context) -> Any:
    """Parameters on meta, allocated one at a time by ``load_into`` as each is read."""
    import lazyfp8

    with ctx.watch.lap("build"):
        model = common.build_model(ctx.config, params="meta")
    with ctx.watch.lap("load"), lazyfp8.LazyFP8View(ctx.fp8_dir, key_mapping="mistral3") as view:
        lazyfp8.load_into(model, view, strict=True)
    return model


def case_naive(ctx: Context) -> Any:
    """What a script without lazyfp8 does: the whole checkpoint, then a dequantized copy of it."""
    import torch
    from safetensors.torch import load_file

    with ctx.watch.lap("build"):
        model = common.build_model(ctx.config, params="zeros")
    with ctx.watch.lap("load"):
        disk: dict[str, torch.Tensor] = {}
        for file in common.safetensors_files(ctx.fp8_dir):
            disk.update(load_file(file))
        state = {}
        for key, t in disk.items():
            if key.endswith(("_scale_inv", ".activation_scale")):
                continue  # quantization parameters, not model weights
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                t = (t.float() * disk[key + "_scale_inv"].float()).to(torch.bfloat16)
            state[common.disk_to_runtime(key)] = t
        del disk
        model.load_state_dict(state, strict=True)
        del state
    return model


def _import_transformers_fp8() -> None:
    """Import what ``from_pretrained`` of an FP8 checkpoint imports lazily (the quantizer,
    accelerate), before the baseline, so the case's memory is the load's and not the imports'."""
    import transformers.integrations.finegrained_fp8
    import transformers.quantizers.quantizer_finegrained_fp8  # noqa: F401

    try:
        import accelerate  # noqa: F401
    except ImportError:
        pass  # from_pretrained will say so; the case records it


def case_transformers(ctx: Context) -> Any:
    """transformers' own loader (renaming rules, FP8 dequantized on load when there is no GPU)."""
    import torch
    from transformers import Mistral3ForConditionalGeneration

    with ctx.watch.lap("load"):
        model, info = Mistral3ForConditionalGeneration.from_pretrained(
            ctx.fp8_dir, dtype=torch.bfloat16, output_loading_info=True
        )
    ctx.watch.laps["build"] = 0.0  # from_pretrained builds the model itself, inside "load"
    ctx.notes["loading_info"] = {k: sorted(map(str, v)) for k, v in info.items() if v}
    # Dequantized on load, transformers drops the quantizer and the config's quantization_config
    # and keeps plain nn.Linear; left quantized (a GPU), q_proj would be an FP8Linear.
    ctx.notes["quantization_config_kept"] = "quantization_config" in model.config.to_dict()
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    ctx.notes["q_proj"] = f"{type(q_proj).__name__} {q_proj.weight.dtype}"
    return model


def case_bf16(ctx: Context) -> Any:
    """The same model from a plain bf16 checkpoint: the floor any FP8 loader is compared to."""
    from safetensors.torch import load_file

    with ctx.watch.lap("build"):
        model = common.build_model(ctx.config, params="zeros")
    with ctx.watch.lap("load"):
        state = {}
        for file in common.safetensors_files(ctx.bf16_dir):
            state.update(load_file(file))
        model.load_state_dict(state, strict=True)
        del state
    return model


CASES: dict[str, Callable[[Context], Any]] = {
    "lazyfp8": case_lazyfp8,
    "lazyfp8-meta": case_lazyfp8_meta,
    "naive": case_naive,
    "transformers": case_transformers,
    "bf16-safetensors": case_bf16,
}
#: Per-case imports done before the baseline (beyond the common ones in :func:`child_main`).
PREPARE: dict[str, Callable[[], None]] = {"transformers": _import_transformers_fp8}
#: Which checkpoint each case reads, for the page-cache warm-up.
READS = {"bf16-safetensors": "bf16"}


def child_main(args: argparse.Namespace) -> int:
    """Run one case and write its measurements to ``args.result``."""
    # The same imports in every case, before the baseline: they are not part of any load.
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration  # noqa: F401

    import lazyfp8  # noqa: F401

    with open(os.path.join(args.bf16_dir, "config.json")) as f:
        ctx = Context(args.fp8_dir, args.bf16_dir, json.load(f))
    PREPARE.get(args.case, lambda: None)()
    result: dict[str, Any] = {"case": args.case}
    probe = common.MemoryProbe()
    try:
        model = CASES[args.case](ctx)
    except Exception as e:  # noqa: BLE001 - recorded, not raised: "why it could not load" is a result too
        result.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6))
        result.update(probe.report(), notes=ctx.notes)
        common.write_result(args.result, result)
        return 0
    probe.stop()  # before hashing, which must not count
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
# Parent: generate, run every case, report
# --------------------------------------------------------------------------------------------
COLUMNS = [
    ("case", "case"),
    ("load_s", "load s"),
    ("load_cpu_s", "load CPU s"),
    ("total_s", "build+load s"),
    ("vs_transformers", "× transformers"),
    ("vs_bf16", "× bf16"),
    ("baseline_mib", "baseline RSS MiB"),
    ("vmhwm_mib", "VmHWM MiB"),
    ("peak_above_params_mib", "peak above params MiB"),
    ("rss_anon_mib", "RssAnon end MiB"),
    ("rss_file_mib", "RssFile end MiB"),
    ("within_bound", "≤ bound"),
    ("bit_exact", "bit-exact"),
]


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs of a case: the best (smallest) times, since on a shared
    2-core machine every disturbance only adds time, and the worst (largest) memory peak.
    The individual runs are kept under ``"runs"``."""
    ok = [r for r in runs if "error" not in r]
    row = dict(ok[0] if ok else runs[-1])
    row["runs"] = runs
    row["errors"] = [r["error"] for r in runs if "error" in r]
    if not ok:
        return row
    for key in ("build_s", "load_s", "load_cpu_s"):
        row[key] = min(r[key] for r in ok)
    row["total_s"] = min(r["build_s"] + r["load_s"] for r in ok)
    peak = max(ok, key=lambda r: r["vmhwm"] - r["baseline_rss"])
    for key in ("baseline_rss", "vmhwm", "vmrss_end", "rss_anon_end", "rss_file_end"):
        row[key] = peak[key]
    row["digests"] = sorted({r["digest"] for r in ok})
    # Another process's CPU time above 10% of a run's wall time: that run's timing is suspect.
    row["disturbed_runs"] = sum(r["others_cpu_s"] > 0.1 * r["process_s"] for r in ok)
    return row


def derive(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
    """Add the reported columns: peak above params, the bound check, bit-exactness, ratios."""
    bound = manifest["largest_fp8_tensor"]["bytes"] + BOUND_SLACK
    by_case = {r["case"]: r for r in rows}
    for r in rows:
        if "load_s" not in r:
            r["bit_exact"] = "error"
            continue
        peak = r["vmhwm"] - r["baseline_rss"] - r["model_bytes"]
        r["peak_above_params"] = peak
        r["peak_above_params_mib"] = common.mib(peak)
        r["baseline_mib"] = common.mib(r["baseline_rss"])
        r["vmhwm_mib"] = common.mib(r["vmhwm"])
        r["rss_anon_mib"] = common.mib(r["rss_anon_end"])
        r["rss_file_mib"] = common.mib(r["rss_file_end"])
        r["within_bound"] = "yes" if peak <= bound else "no"
        r["bit_exact"] = "yes" if r["digests"] == [manifest["digest"]] else "NO"
        for ref, col in (("transformers", "vs_transformers"), ("bf16-safetensors", "vs_bf16")):
            other = by_case.get(ref)
            if other is not None and other.get("total_s"):
                r[col] = r["total_s"] / other["total_s"]


def report(
    rows: list[dict[str, Any]], manifest: dict[str, Any], mode: str, repeat: int, note: str | None = None
) -> str:
    """The markdown report: facts about the checkpoint, the table, and notes on failures."""
    largest = manifest["largest_fp8_tensor"]
    bound = largest["bytes"] + BOUND_SLACK
    lines = [
        f"## Load benchmark ({mode})",
        "",
        *([f"- note: {note}"] if note else []),
        (
            f"- model: Mistral3ForConditionalGeneration, {manifest['params'] / 1e6:.1f}M parameters, "
            f"{common.mib(manifest['model_bytes']):.1f} MiB of parameters+buffers in bf16"
        ),
        (
            f"- FP8 checkpoint: {common.mib(manifest['fp8_disk_bytes']):.1f} MiB in {manifest['spec']['shards']} shards, "
            f"{manifest['fp8_tensors']} FP8 tensors; bf16 checkpoint: {common.mib(manifest['bf16_disk_bytes']):.1f} MiB"
        ),
        (
            f"- largest on-disk tensor: {largest['key']} ({largest['dtype']}), {common.mib(largest['bytes']):.1f} MiB; "
            f"bound = largest + 64 MiB = {common.mib(bound):.1f} MiB"
        ),
        "- page cache: warm (every file of the checkpoint a case reads was read once just before it)",
        f"- each case in a fresh process; {repeat} run(s) per case: best time, largest peak",
        "",
        common.markdown_table(rows, COLUMNS),
    ]
    busy = [f"{r['case']} ({r['disturbed_runs']}/{len(r['runs'])})" for r in rows if r.get("disturbed_runs")]
    if busy:
        lines.append(
            "\nOther processes used CPU for over 10% of the wall time of some runs of "
            f"{', '.join(busy)}: those timings are disturbed (others_cpu_s in the JSON); "
            "the best-of-N time is reported, but rerun on a quiet machine to trust it."
        )
    for name in LAZY_CASES:
        r = next((r for r in rows if r["case"] == name), None)
        if r is not None and "peak_above_params" in r:
            verdict = "holds" if r["peak_above_params"] <= bound else "DOES NOT hold"
            lines.append(
                f"\n{name}: peak above params {common.mib(r['peak_above_params']):.1f} MiB vs bound "
                f"{common.mib(bound):.1f} MiB: the bound {verdict}."
            )
    for r in rows:
        if r.get("errors"):
            lines.append(
                f"\n{r['case']} failed in {len(r['errors'])}/{len(r['runs'])} run(s): {short(r['errors'][0])}"
            )
    return "\n".join(lines)


def run_all(args: argparse.Namespace, ck: common.Checkpoints) -> list[dict[str, Any]]:
    """Run every selected case ``--repeat`` times, interleaved, each in a fresh process."""
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.cases}
    dirs = {"fp8": ck.fp8_dir, "bf16": ck.bf16_dir}
    child_args = ["--fp8-dir", ck.fp8_dir, "--bf16-dir", ck.bf16_dir]
    for i in range(args.repeat):
        for case in args.cases:
            common.warm_page_cache(common.checkpoint_files(dirs[READS.get(case, "fp8")]))
            r = common.run_case(os.path.abspath(__file__), case, child_args, timeout=args.timeout)
            status = (
                short(r["error"])
                if "error" in r
                else f"load {r['load_s']:.2f} s (others' CPU {r['others_cpu_s']:.1f} s)"
            )
            print(f"  run {i + 1}/{args.repeat} {case}: {status}", flush=True)
            runs[case].append(r)
    return [aggregate(runs[c]) for c in args.cases]


def short(error: str, limit: int = 400) -> str:
    """An error's first ``limit`` characters on one line (torch repeats one message per key; the
    JSON keeps the whole text)."""
    one = " ".join(error.split())
    return one if len(one) <= limit else f"{one[:limit]}... ({len(one)} chars; full text in the JSON)"


def failures(rows: list[dict[str, Any]]) -> list[str]:
    """What makes the run fail: a lazyfp8 case that did not load, or any load with wrong bits."""
    out = []
    for r in rows:
        if r["case"] in LAZY_CASES and (r.get("errors") or "error" in r):
            out.append(f"{r['case']} failed to load")
        if r.get("bit_exact") == "NO":
            out.append(f"{r['case']} loaded different bits than the reference")
    return out


def parent_main(args: argparse.Namespace) -> int:
    mode = "quick" if args.quick else "full"
    spec = common.SPECS[mode]
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    env = common.environment()  # before the runs: the lazyfp8 revision they measure
    workdir = args.workdir or tempfile.mkdtemp(prefix=f"lazyfp8-bench-{mode}-")
    try:
        ck = common.ensure_checkpoints(workdir, spec)
        rows = run_all(args, ck)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    derive(rows, ck.manifest)
    text = report(rows, ck.manifest, mode, args.repeat, args.note)
    print(text)
    out = args.out or os.path.join(HERE, "results", f"load_{mode}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            {
                "mode": mode,
                "note": args.note,
                "page_cache": "warm",
                "repeat": args.repeat,
                "bound_bytes": ck.manifest["largest_fp8_tensor"]["bytes"] + BOUND_SLACK,
                "environment": env,
                "checkpoint": {k: v for k, v in ck.manifest.items()},
                "fp8_quantization_config": common.FP8_QUANTIZATION_CONFIG,
                "rows": rows,
                "table": text,
            },
            f,
            indent=2,
            default=str,
        )
    print(f"\nsaved {out}")
    bad = failures(rows)
    for b in bad:
        print(f"FAIL: {b}", file=sys.stderr)
    return 1 if bad else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny model (a few MB); for CI")
    size.add_argument("--full", action="store_true", help="~1.16 GB of bf16 parameters (the default)")
    p.add_argument("--workdir", help="keep checkpoints here and reuse them (default: a temp dir, removed)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="cases to run")
    p.add_argument("--repeat", type=int, help="runs per case (default: 1 quick, 3 full)")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per case run")
    p.add_argument("--out", help="JSON result path (default: benchmarks/results/load_<mode>.json)")
    p.add_argument("--note", help="a line printed above the table and stored in the JSON (what was measured)")
    # Internal: one case in this (fresh) process.
    p.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--fp8-dir", help=argparse.SUPPRESS)
    p.add_argument("--bf16-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return child_main(args) if args.case else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
