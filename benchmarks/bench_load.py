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
import json
import os
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import checkpoints, child, cli, measure, models, processes, reporting

LAZY_CASES = ("lazyfp8", "lazyfp8-meta")


# --------------------------------------------------------------------------------------------
# Cases (run in the child process)
# --------------------------------------------------------------------------------------------
#: What a case gets: both checkpoints' paths, the model config, a stopwatch and a place for notes.
Context = child.CaseContext


def case_lazyfp8(ctx: Context) -> Any:
    """Plain ``load_state_dict`` with the lazy view: values read themselves inside ``copy_``."""
    import lazyfp8

    with ctx.watch.lap("build"):
        model = models.build_model(ctx.config, params="zeros")
    with ctx.watch.lap("load"), lazyfp8.LazyFP8View(ctx.fp8_dir, key_mapping="mistral3") as view:
        ctx.notes["load_state_dict"] = str(model.load_state_dict(view, strict=True))
    return model


def case_lazyfp8_meta(ctx: Context) -> Any:
    """Parameters on meta, allocated one at a time by ``load_into`` as each is read."""
    import lazyfp8

    with ctx.watch.lap("build"):
        model = models.build_model(ctx.config, params="meta")
    with ctx.watch.lap("load"), lazyfp8.LazyFP8View(ctx.fp8_dir, key_mapping="mistral3") as view:
        lazyfp8.load_into(model, view, strict=True)
    return model


def case_naive(ctx: Context) -> Any:
    """What a script without lazyfp8 does: the whole checkpoint, then a dequantized copy of it."""
    import torch
    from safetensors.torch import load_file

    with ctx.watch.lap("build"):
        model = models.build_model(ctx.config, params="zeros")
    with ctx.watch.lap("load"):
        disk: dict[str, torch.Tensor] = {}
        for file in checkpoints.safetensors_files(ctx.fp8_dir):
            disk.update(load_file(file))
        state = {}
        for key, t in disk.items():
            if key.endswith(("_scale_inv", ".activation_scale")):
                continue  # quantization parameters, not model weights
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                t = (t.float() * disk[key + "_scale_inv"].float()).to(torch.bfloat16)
            state[models.disk_to_runtime(key)] = t
        del disk
        model.load_state_dict(state, strict=True)
        del state
    return model


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
        model = models.build_model(ctx.config, params="zeros")
    with ctx.watch.lap("load"):
        state = {}
        for file in checkpoints.safetensors_files(ctx.bf16_dir):
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
PREPARE: dict[str, Callable[[], Any]] = {
    "transformers": child.import_transformers_fp8,
    "lazyfp8": child.prepare_lazyfp8,
    "lazyfp8-meta": child.prepare_lazyfp8,
}
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
        ctx = Context(args.fp8_dir, json.load(f), args.bf16_dir)
    prepared = PREPARE.get(args.case, lambda: None)()
    if prepared:
        ctx.notes["kernels"] = prepared
    return child.run_load_case(args.result, args.case, CASES[args.case], ctx)


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
    """One row from repeated runs of a case (:func:`reporting.aggregate_runs`): the best (smallest)
    times, since on a shared 2-core machine every disturbance only adds time, and the worst
    (largest) memory peak. The individual runs are kept under ``"runs"``."""
    row = reporting.aggregate_runs(
        runs, ("build_s", "load_s", "load_cpu_s"), ("vmrss_end", "rss_anon_end", "rss_file_end")
    )
    ok = [r for r in runs if "error" not in r]
    if ok:
        row["total_s"] = min(r["build_s"] + r["load_s"] for r in ok)
        # This benchmark reports the first good run's others_cpu_s (aggregate_runs: the largest).
        row["others_cpu_s"] = ok[0]["others_cpu_s"]
    return row


def derive(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
    """Add the reported columns: peak above params, the bound check, bit-exactness, ratios."""
    bound = reporting.load_bound(manifest)
    by_case = {r["case"]: r for r in rows}
    for r in rows:
        if "load_s" not in r:
            r["bit_exact"] = "error"
            continue
        peak = reporting.peak_above_params(r)
        r["baseline_mib"] = measure.mib(r["baseline_rss"])
        r["vmhwm_mib"] = measure.mib(r["vmhwm"])
        r["rss_anon_mib"] = measure.mib(r["rss_anon_end"])
        r["rss_file_mib"] = measure.mib(r["rss_file_end"])
        r["within_bound"] = "yes" if peak <= bound else "no"
        r["bit_exact"] = "yes" if r["digests"] == [manifest["digest"]] else "NO"
        reporting.add_ratios(r, by_case, (("transformers", "vs_transformers"), ("bf16-safetensors", "vs_bf16")))


def report(
    rows: list[dict[str, Any]], manifest: dict[str, Any], mode: str, repeat: int, note: str | None = None
) -> str:
    """The markdown report: facts about the checkpoint, the table, and notes on failures."""
    bound = reporting.load_bound(manifest)
    lines = [
        f"## Load benchmark ({mode})",
        "",
        *([f"- note: {note}"] if note else []),
        (
            f"- model: Mistral3ForConditionalGeneration, {manifest['params'] / 1e6:.1f}M parameters, "
            f"{measure.mib(manifest['model_bytes']):.1f} MiB of parameters+buffers in bf16"
        ),
        (
            f"- FP8 checkpoint: {measure.mib(manifest['fp8_disk_bytes']):.1f} MiB in {manifest['fp8_shards']} shards, "
            f"{manifest['fp8_tensors']} FP8 tensors; bf16 checkpoint: {measure.mib(manifest['bf16_disk_bytes']):.1f} MiB "
            f"in {manifest['bf16_shards']} shards (max_shard_size {manifest['spec']['max_shard_size']})"
        ),
        reporting.largest_tensor_line(manifest),
        "- page cache: warm (every file of the checkpoint a case reads was read once just before it)",
        f"- each case in a fresh process; {repeat} run(s) per case: best time, largest peak",
        "",
        *reporting.kernels_line(rows),
        reporting.markdown_table(rows, COLUMNS),
    ]
    lines += reporting.disturbance_lines(rows, rerun=True)
    lines += reporting.bound_verdicts(rows, bound, LAZY_CASES, fails="DOES NOT hold")
    lines += reporting.error_lines(rows)
    return "\n".join(lines)


def run_all(args: argparse.Namespace, ck: checkpoints.Checkpoints) -> list[dict[str, Any]]:
    """Run every selected case ``--repeat`` times, interleaved, each in a fresh process."""
    dirs = {"fp8": ck.fp8_dir, "bf16": ck.bf16_dir}
    runs = processes.run_repeated(
        os.path.abspath(__file__),
        args.cases,
        args.repeat,
        ["--fp8-dir", ck.fp8_dir, "--bf16-dir", ck.bf16_dir],
        warm=lambda case: checkpoints.checkpoint_files(dirs[READS.get(case, "fp8")]),
        timeout=args.timeout,
        # torch repeats one message per key: 400 characters of it (the JSON keeps the whole text)
        status=lambda r: reporting.status_line(r, 400),
    )
    return [aggregate(runs[c]) for c in args.cases]


def parent_main(args: argparse.Namespace) -> int:
    mode = cli.size_mode(args)
    spec = models.SPECS[mode]
    env = reporting.environment()  # before the runs: the lazyfp8 revision they measure
    with cli.work_directory(args.workdir, f"lazyfp8-bench-{mode}-") as workdir:
        ck = checkpoints.ensure_checkpoints(workdir, spec)
        rows = run_all(args, ck)
    derive(rows, ck.manifest)
    text = report(rows, ck.manifest, mode, args.repeat, args.note)
    print(text)
    return cli.finish(
        cli.result_path(args.out, "load", mode),
        {
            "mode": mode,
            "note": args.note,
            "page_cache": "warm",
            "repeat": args.repeat,
            "bound_bytes": reporting.load_bound(ck.manifest),
            "environment": env,
            "checkpoint": dict(ck.manifest),
            "fp8_quantization_config": models.FP8_QUANTIZATION_CONFIG,
            "rows": rows,
            "table": text,
        },
        reporting.load_failures(rows, LAZY_CASES),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.benchmark_parser(
        __doc__, "tiny model (a few MB); for CI", "~1.16 GB of bf16 parameters (the default)"
    )
    cli.add_options(
        p, "workdir", "cases", "repeat", "timeout", "out", "note",
        cases=list(CASES),
        results="load",
        helps={
            "workdir": "keep checkpoints here and reuse them (default: a temp dir, removed)",
            "cases": "cases to run",
            "note": "a line printed above the table and stored in the JSON (what was measured)",
        },
    )  # fmt: skip
    # Internal: one case in this (fresh) process.
    cli.add_options(p, "case", "result", "fp8-dir", "bf16-dir", cases=list(CASES))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return cli.main(parse_args, child_main, parent_main, argv)


if __name__ == "__main__":
    sys.exit(main())
