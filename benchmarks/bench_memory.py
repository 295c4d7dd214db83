"""Memory benchmark: the working-memory bound whatever the tensor sizes, cold-cache load speed
against the disk, and RSS over time during a load.

Three parts (``--parts a b c``, default all), every case in a fresh interpreter:

- **a, huge tensor**: a checkpoint holding one 262144 x 4096 bf16 embedding (2 GiB; quick:
  32768 x 1024, 64 MiB) and four FP8 4096 x 4096 weights with 128x128 block scales, loaded into
  a model with real parameters (``load_state_dict(LazyFP8View)``) and into a meta model
  (``load_into``), next to ``load_file`` + dequantize. lazyfp8's peak above params must stay
  <= 64 MiB: a pass-through tensor is read straight into its parameter, never staged.
- **b, cold cache**: bench_load's Mistral3 checkpoints (FP8 and bf16). Before every run the
  parent calls ``os.sync()`` and ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file of the
  checkpoint the case reads, and checks with ``mincore`` how much is still cached. Then: raw
  sequential reads of the files (a Python ``readinto`` loop, ``cat files > /dev/null``, and the
  loop after ``POSIX_FADV_WILLNEED`` on every file), lazyfp8 loads of the FP8 checkpoint, and
  ``load_file`` + ``load_state_dict`` of the bf16 one. Each child times its cold pass, then the
  same work again (warm): if both times match, the eviction did not happen.
- **c, RSS over time**: bench_load's five cases on its full checkpoint, ``VmRSS`` of the child
  sampled every 5 ms by the parent from ``/proc/<pid>/status``, drawn on one chart
  (``docs/rss_over_time.png`` in full mode; needs matplotlib, skipped with a message without it).

    python benchmarks/bench_memory.py --quick        # small sizes; what CI runs
    python benchmarks/bench_memory.py                # full (~4 min; 2.3 GB + 1.9 GB of checkpoints)
    python benchmarks/bench_memory.py --parts b --workdir /tmp/lazyfp8-work
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import checkpoints, child, cli, measure, models, pagecache, processes, reporting

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SLACK = 64 * measure.MiB

#: (vocab, hidden) of part a's embedding, and how many FP8 hidden x hidden weights.
HUGE = {"quick": (32768, 1024, 4), "full": (262144, 4096, 4)}
HUGE_FORMAT_VERSION = 1
CASES_A = ("huge:lazyfp8", "huge:lazyfp8-meta", "huge:naive")
CASES_B = ("raw:fp8", "raw:bf16", "cat:fp8", "willneed:fp8", "cold:lazyfp8", "cold:lazyfp8-meta", "cold:bf16-safetensors")
CASES_C = ("lazyfp8", "lazyfp8-meta", "naive", "transformers", "bf16-safetensors")  # bench_load's
ALL_CASES = (*CASES_A, *CASES_B, *(f"rss:{c}" for c in CASES_C))
#: ``--quick`` runs a subset (each case is a fresh interpreter, ~4 s of imports): under a minute.
QUICK_CASES = ("huge:lazyfp8", "huge:lazyfp8-meta", "raw:fp8", "cold:lazyfp8", "cold:bf16-safetensors",
               "rss:lazyfp8", "rss:naive")


# --------------------------------------------------------------------------------------------
# Part a: the model and its checkpoint
# --------------------------------------------------------------------------------------------
def huge_model(vocab: int, hidden: int, layers: int, params: str) -> Any:
    """``embed`` (vocab x hidden) and ``layers.i`` (hidden x hidden Linears), bf16; parameters
    ``"meta"``, ``"zeros"`` or ``"empty"``."""
    import torch
    from torch import nn

    import lazyfp8

    class Huge(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, hidden)
            self.layers = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(layers))

    with lazyfp8.init_empty_weights(), models.default_dtype(torch.bfloat16):
        model = Huge()
    if params != "meta":
        models.materialize_(model, zero=(params == "zeros"))
    return model


def ensure_huge(workdir: str, mode: str) -> dict[str, Any]:
    """Write (or reuse) ``huge/``: the embedding stored as bf16 in its own shard, the Linears as
    block-FP8. Returns the manifest (reference digest, sizes)."""
    import torch

    import lazyfp8
    from lazyfp8.testing import reference_state_dict

    vocab, hidden, layers = HUGE[mode]
    path = os.path.join(workdir, "huge")
    manifest_path = os.path.join(workdir, "manifest-huge.json")
    wanted = {"format": HUGE_FORMAT_VERSION, "vocab": vocab, "hidden": hidden, "layers": layers}
    manifest = checkpoints.reusable_manifest(manifest_path, wanted)
    if manifest is not None:
        print(f"reusing {path}")
        return manifest
    t0 = time.perf_counter()
    model = huge_model(vocab, hidden, layers, "empty")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(0.0, 0.02, generator=gen)
    pbytes = models.model_bytes(model)
    lazyfp8.save(
        model.state_dict(), path, scheme=lazyfp8.PerBlock(models.BLOCK), max_shard_size="1GB", overwrite=True,
        config={"note": "bench_memory part a"},
    )
    del model
    ref = reference_state_dict(path, block_size=models.BLOCK)
    manifest = dict(
        wanted,
        digest=models.state_digest(ref),
        model_bytes=pbytes,
        disk_bytes=checkpoints.dir_bytes(path),
        largest=checkpoints.largest_tensor(path),
    )
    del ref
    manifest["generate_s"] = round(time.perf_counter() - t0, 1)
    checkpoints.write_manifest(manifest_path, manifest)
    print(f"wrote {path} in {manifest['generate_s']} s")
    return manifest


# --------------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------------
def _mistral_config(bf16_dir: str) -> dict[str, Any]:
    with open(os.path.join(bf16_dir, "config.json")) as f:
        return json.load(f)


def child_a(args: argparse.Namespace, result: dict[str, Any]) -> None:
    import lazyfp8

    vocab, hidden, layers = HUGE[args.mode]
    if args.case.split(":")[1] != "naive":
        result["kernels"] = child.prepare_lazyfp8()  # library code, before the baseline
    watch = measure.Stopwatch()
    probe = measure.MemoryProbe()
    kind = args.case.split(":")[1]
    with watch.lap("build"):
        model = huge_model(vocab, hidden, layers, "meta" if kind == "lazyfp8-meta" else "zeros")
    with watch.lap("load"):
        if kind == "lazyfp8":
            with lazyfp8.LazyFP8View(args.dir) as view:
                model.load_state_dict(view, strict=True)
        elif kind == "lazyfp8-meta":
            with lazyfp8.LazyFP8View(args.dir) as view:
                lazyfp8.load_into(model, view, strict=True)
        else:
            state = checkpoints.naive_block_dequantized(args.dir)
            model.load_state_dict(state, strict=True)
            del state
    probe.stop()
    result.update(probe.report())
    result.update(child.load_fields(watch, model))


def _bench_load_case(name: str, fp8_dir: str, bf16_dir: str) -> tuple[Any, Any]:
    """bench_load's case ``name`` (its own functions: one definition of each loader) and its
    context, with bench_load's imports done."""
    import bench_load

    ctx = bench_load.Context(fp8_dir, _mistral_config(bf16_dir), bf16_dir)
    bench_load.PREPARE.get(name, lambda: None)()
    return bench_load.CASES[name], ctx


def _cat(files: list[str]) -> None:
    import subprocess

    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)


def _willneed_then_read(files: list[str]) -> None:
    """Ask for every file at once (``POSIX_FADV_WILLNEED`` over the whole file), then read them
    in order: the device gets the whole request up front, as lazyfp8's per-tensor advice does."""
    pagecache.fadvise(files, os.POSIX_FADV_WILLNEED)
    pagecache.read_files(files)


#: Raw reads of the checkpoint files, no parsing: a Python loop of 16 MiB ``readinto`` calls,
#: ``cat files > /dev/null``, and WILLNEED advice on every file followed by the same loop.
RAW_READS = {"raw": pagecache.read_files, "cat": _cat, "willneed": _willneed_then_read}


def child_b(args: argparse.Namespace, result: dict[str, Any]) -> None:
    kind, what = args.case.split(":")
    if kind in RAW_READS:
        files = checkpoints.checkpoint_files(args.fp8_dir if what == "fp8" else args.bf16_dir)
        probe = measure.MemoryProbe()
        t0 = time.perf_counter()
        RAW_READS[kind](files)
        cold = time.perf_counter() - t0
        probe.stop()
        t0 = time.perf_counter()
        RAW_READS[kind](files)
        warm = time.perf_counter() - t0
        n = sum(os.path.getsize(f) for f in files)
        result.update(probe.report(), load_s=cold, warm_s=warm, bytes=n, model_bytes=0)
        return
    fn, ctx = _bench_load_case(what, args.fp8_dir, args.bf16_dir)
    files = checkpoints.checkpoint_files(args.bf16_dir if what == "bf16-safetensors" else args.fp8_dir)
    result["resident_at_start"] = pagecache.resident_bytes(files)
    probe = measure.MemoryProbe()
    model = fn(ctx)
    probe.stop()
    result.update(probe.report())
    result.update(child.load_fields(ctx.watch, model), bytes=sum(os.path.getsize(f) for f in files))
    result["resident_after"] = pagecache.resident_bytes(files)
    # The same load again, now from a warm cache: the second timing that tells whether the first
    # one really read the disk.
    del model
    fn2, ctx2 = _bench_load_case(what, args.fp8_dir, args.bf16_dir)
    fn2(ctx2)
    result["warm_s"] = ctx2.watch.laps["load"]


def child_c(args: argparse.Namespace, result: dict[str, Any]) -> None:
    fn, ctx = _bench_load_case(args.case.split(":", 1)[1], args.fp8_dir, args.bf16_dir)
    probe = measure.MemoryProbe()
    result["t_start"] = time.monotonic()
    model = fn(ctx)
    result["t_end"] = time.monotonic()
    probe.stop()
    result.update(probe.report())
    result.update(child.load_fields(ctx.watch, model, cpu=False))
    time.sleep(0.05)  # a few samples of the end state


def child_main(args: argparse.Namespace) -> int:
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration  # noqa: F401

    import lazyfp8  # noqa: F401

    result: dict[str, Any] = {"case": args.case}
    try:
        part = {"huge": child_a, "raw": child_b, "cat": child_b, "willneed": child_b, "cold": child_b, "rss": child_c}[
            args.case.split(":")[0]
        ]
        part(args, result)
    except Exception as e:  # noqa: BLE001 - recorded in the result, not raised
        result.update(child.error_fields(e, limit=8))
    processes.write_result(args.result, result)
    return 0


# --------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------
COLUMNS_A = [
    ("case", "case"),
    ("load_s", "load s"),
    ("total_s", "build+load s"),
    ("params_mib", "params MiB"),
    ("vmhwm_mib", "VmHWM MiB"),
    ("peak_mib", "peak above params MiB"),
    ("within", "≤ 64 MiB"),
    ("bit_exact_text", "bit-exact"),
]


def part_a(args: argparse.Namespace, workdir: str, mode: str) -> dict[str, Any]:
    manifest = ensure_huge(workdir, mode)
    path = os.path.join(workdir, "huge")
    files = checkpoints.checkpoint_files(path)
    cases = [c for c in args.cases if c in CASES_A]
    runs = processes.run_repeated(
        os.path.abspath(__file__),
        cases,
        args.repeat,
        ["--dir", path, "--mode", mode],
        warm=lambda case: files,
        timeout=args.timeout,
        label="a: ",
    )
    rows = [reporting.aggregate_runs(runs[c], ("build_s", "load_s", "load_cpu_s")) for c in cases]
    for r in rows:
        if r.get("load_s") is None or "vmhwm" not in r:
            r["bit_exact_text"] = "error"
            continue
        r["total_s"] = min(x["build_s"] + x["load_s"] for x in r["runs"] if "error" not in x)
        r["params_mib"] = measure.mib(r["model_bytes"])
        r["vmhwm_mib"] = measure.mib(r["vmhwm"])
        peak = reporting.peak_above_params(r, mib_key="peak_mib")
        r["within"] = "yes" if peak <= SLACK else "no"
        r["bit_exact"] = r["digests"] == [manifest["digest"]]
        r["bit_exact_text"] = "yes" if r["bit_exact"] else "NO"
    vocab, hidden, layers = HUGE[mode]
    largest = manifest["largest"]
    lines = [
        f"### a. One huge tensor ({mode})",
        "",
        (
            f"- checkpoint: embed.weight {vocab} x {hidden} bf16 ({measure.mib(largest['bytes']):.0f} MiB, its own shard) "
            f"+ {layers} FP8 {hidden} x {hidden} weights with 128x128 block scales; "
            f"{measure.mib(manifest['disk_bytes']):.0f} MiB on disk, params {measure.mib(manifest['model_bytes']):.0f} MiB in bf16"
        ),
        (
            "- page cache warm; each case in a fresh process; "
            f"{args.repeat} run(s): best time, largest peak; bound: peak above params ≤ 64 MiB"
        ),
        "",
        reporting.markdown_table(rows, COLUMNS_A),
    ]
    lines += reporting.disturbance_lines(rows)
    return {"manifest": manifest, "rows": rows, "table": "\n".join(lines)}


COLUMNS_B = [
    ("case", "case"),
    ("gib", "GiB read"),
    ("evicted", "cached before MiB"),
    ("load_s", "cold s"),
    ("mbps", "cold MB/s"),
    ("warm_s", "warm s"),
    ("x_raw", "× raw read"),
    ("x_cat", "× cat"),
    ("x_willneed", "× willneed"),
    ("x_warm", "cold / warm"),
    ("peak_mib", "peak above params MiB"),
    ("bit_exact_text", "bit-exact"),
]


def part_b(args: argparse.Namespace, workdir: str, mode: str) -> dict[str, Any]:
    ck = checkpoints.ensure_checkpoints(workdir, models.SPECS[mode])
    cases = [c for c in args.cases if c in CASES_B]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    child_args = ["--fp8-dir", ck.fp8_dir, "--bf16-dir", ck.bf16_dir]
    evictions = []
    for i in range(args.repeat):
        for case in cases:
            files = checkpoints.checkpoint_files(ck.bf16_dir if "bf16" in case else ck.fp8_dir)
            before = (pagecache.resident_bytes(files), measure.meminfo()["Cached"])
            pagecache.drop_page_cache(files)
            after = (pagecache.resident_bytes(files), measure.meminfo()["Cached"])
            ev = {
                "case": case, "run": i, "file_bytes": sum(os.path.getsize(f) for f in files),
                "resident_before": before[0], "resident_after": after[0],
                "meminfo_cached_before": before[1], "meminfo_cached_after": after[1],
            }
            evictions.append(ev)
            r = processes.run_case(os.path.abspath(__file__), case, child_args, timeout=args.timeout)
            r["eviction"] = ev
            print(
                f"  b: run {i + 1}/{args.repeat} {case}: cached {measure.mib(before[0] or 0):.0f} -> "
                f"{measure.mib(after[0] or 0):.0f} MiB; {reporting.status_line(r)}",
                flush=True,
            )
            runs[case].append(r)
    rows = [reporting.aggregate_runs(runs[c], ("load_s", "warm_s", "load_cpu_s")) for c in cases]
    by = {r["case"]: r for r in rows}
    for r in rows:
        if r.get("load_s") is None:
            r["bit_exact_text"] = "error"
            continue
        r["gib"] = r["bytes"] / (1 << 30)
        r["mbps"] = r["bytes"] / r["load_s"] / 1e6
        r["evicted"] = measure.mib(max(x["eviction"]["resident_after"] or 0 for x in r["runs"]))
        reporting.add_ratios(r, by, [("raw:bf16" if "bf16" in r["case"] else "raw:fp8", "x_raw")], key="load_s")
        if "bf16" not in r["case"]:
            reporting.add_ratios(r, by, (("cat:fp8", "x_cat"), ("willneed:fp8", "x_willneed")), key="load_s")
        if r.get("warm_s"):
            r["x_warm"] = r["load_s"] / r["warm_s"]
        if r["case"].startswith("cold:"):
            peak = r["vmhwm"] - r["baseline_rss"] - r["model_bytes"]
            r["peak_mib"] = measure.mib(peak)
            r["bit_exact"] = r["digests"] == [ck.manifest["digest"]]
            r["bit_exact_text"] = "yes" if r["bit_exact"] else "NO"
    spec_note = (
        f"{ck.manifest['params'] / 1e6:.0f}M-parameter Mistral3 of bench_load ({mode}): FP8 "
        f"{measure.mib(ck.manifest['fp8_disk_bytes']):.0f} MiB, bf16 {measure.mib(ck.manifest['bf16_disk_bytes']):.0f} MiB"
    )
    lines = [
        f"### b. Cold page cache ({mode})",
        "",
        f"- checkpoints: {spec_note}",
        (
            "- before every run: os.sync(), posix_fadvise(DONTNEED) on every file the case reads; "
            "'cached before' = bytes of those files still in the page cache then (mincore), largest over the runs"
        ),
        (
            "- cold s: the first pass in the child (raw: a Python loop reading every file in order into one 16 MiB "
            "buffer; cat: `cat files > /dev/null`; willneed: POSIX_FADV_WILLNEED on every whole file, then the raw "
            "loop; loads: bench_load's case, load call only); warm s: the same again in the same process"
        ),
        f"- {args.repeat} run(s) per case, each in a fresh process: best time",
        "- × raw read = cold s / cold s of raw:<same checkpoint>; × cat, × willneed: / cold s of cat:fp8, willneed:fp8",
        "",
        reporting.markdown_table(rows, COLUMNS_B),
    ]
    lines += reporting.disturbance_lines(rows)
    cached = [e["meminfo_cached_before"] - e["meminfo_cached_after"] for e in evictions]
    lines += [
        "",
        (
            f"/proc/meminfo Cached fell by {measure.mib(min(cached)):.0f} to {measure.mib(max(cached)):.0f} MiB at "
            f"each eviction (files of {measure.mib(min(e['file_bytes'] for e in evictions)):.0f} to "
            f"{measure.mib(max(e['file_bytes'] for e in evictions)):.0f} MiB)."
        ),
    ]
    return {"manifest": ck.manifest, "rows": rows, "evictions": evictions, "table": "\n".join(lines)}


COLORS = {
    "lazyfp8": "#1b9e77",
    "lazyfp8-meta": "#66a61e",
    "naive": "#d95f02",
    "transformers": "#7570b3",
    "bf16-safetensors": "#888888",
}
LABELS = {
    "lazyfp8": "lazyfp8 load_state_dict(LazyFP8View)",
    "lazyfp8-meta": "lazyfp8 load_into (meta model)",
    "naive": "naive: load_file + dequantize",
    "transformers": "transformers from_pretrained",
    "bf16-safetensors": "bf16 checkpoint: load_file + load_state_dict",
}


def part_c(args: argparse.Namespace, workdir: str, mode: str, plot_path: str) -> dict[str, Any]:
    ck = checkpoints.ensure_checkpoints(workdir, models.SPECS[mode])
    cases = [c for c in args.cases if c.startswith("rss:")]
    child_args = ["--fp8-dir", ck.fp8_dir, "--bf16-dir", ck.bf16_dir]
    rows = []
    for case in cases:
        name = case.split(":", 1)[1]
        pagecache.warm_page_cache(checkpoints.checkpoint_files(ck.bf16_dir if name == "bf16-safetensors" else ck.fp8_dir))
        r = processes.run_case_sampled(os.path.abspath(__file__), case, child_args, interval=0.005, timeout=args.timeout)
        print(
            f"  c: {case}: {reporting.status_line(r) if 'error' in r else 'load {:.2f} s, {} samples'.format(r['load_s'], len(r['samples']))}"
            f" (others' CPU incl. the sampler {r['others_cpu_s']:.1f} s)",
            flush=True,
        )
        if "error" not in r:
            t0, base = r["t_start"], r["baseline_rss"]
            r["curve"] = [
                [round(t - t0, 4), round((rss - base) / measure.MiB, 1)]
                for t, rss in r.pop("samples")
                if t0 - 0.1 <= t <= r["t_end"] + 0.03
            ]
            r["peak_curve_mib"] = max(v for _, v in r["curve"]) if r["curve"] else None
            r["peak_mib"] = measure.mib(r["vmhwm"] - r["baseline_rss"] - r["model_bytes"])
            r["total_s"] = r["t_end"] - r["t_start"]
            r["bit_exact"] = r["digest"] == ck.manifest["digest"]
            r["bit_exact_text"] = "yes" if r["bit_exact"] else "NO"
        else:
            r.pop("samples", None)
        r["case"] = name
        rows.append(r)
    plotted = plot(rows, ck.manifest, mode, plot_path)
    table = reporting.markdown_table(
        rows,
        [("case", "case"), ("total_s", "build+load s"), ("peak_curve_mib", "max sampled RSS above baseline MiB"),
         ("peak_mib", "peak above params MiB (VmHWM)"), ("others_cpu_s", "others' CPU s (incl. sampler)"),
         ("bit_exact_text", "bit-exact")],
    )
    lines = [
        f"### c. RSS over time ({mode})",
        "",
        (
            f"- bench_load's cases on its {mode} checkpoint (params {measure.mib(ck.manifest['model_bytes']):.0f} "
            "MiB), warm page cache, one run each; VmRSS of the child read by the parent from /proc/<pid>/status "
            "every 5 ms; t = 0 at the child's baseline, just before the model is built"
        ),
        f"- plot: {plotted}",
        "",
        table,
    ]
    return {"manifest": ck.manifest, "rows": rows, "plot": plotted, "table": "\n".join(lines)}


def plot(rows: list[dict[str, Any]], manifest: dict[str, Any], mode: str, path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        msg = "skipped: matplotlib is not installed (pip install matplotlib)"
        print(f"  c: plot {msg}")
        return msg
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 5), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    params = measure.mib(manifest["model_bytes"])
    ends = [r["total_s"] for r in rows if "curve" in r and r["case"].startswith("lazyfp8")]
    zoom_to = max(ends) * 1.25 if ends else 1.0
    for panel in (ax, zoom):
        for r in rows:
            if "curve" not in r:
                continue
            t = [p[0] for p in r["curve"]]
            v = [p[1] for p in r["curve"]]
            label = f"{LABELS.get(r['case'], r['case'])} ({r['total_s']:.2f} s)"
            panel.plot(t, v, label=label, color=COLORS.get(r["case"]), lw=1.6)
        panel.axhline(params, ls="--", color="black", lw=0.8)
        panel.set_ylim(bottom=0)
        panel.grid(alpha=0.3)
        panel.set_xlabel("seconds since the baseline (model construction + load)")
    ax.text(0.0, params, f" model parameters ({params:.0f} MiB)", va="bottom", fontsize=8)
    ax.set_ylabel("RSS above baseline (MiB)")
    ax.set_xlim(left=-0.05)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("whole loads", fontsize=10)
    zoom.set_xlim(-0.02, zoom_to)
    zoom.set_title(f"first {zoom_to:.2f} s: lazyfp8 stays at the parameters' line", fontsize=10)
    fig.suptitle(f"RSS while loading the {manifest['params'] / 1e6:.0f}M-parameter FP8 Mistral3 checkpoint of bench_load ({mode})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"  c: plot saved to {path}")
    return os.path.relpath(path, ROOT) if os.path.abspath(path).startswith(ROOT) else path


def parent_main(args: argparse.Namespace) -> int:
    mode = cli.size_mode(args)
    if args.cases is None:
        args.cases = list(QUICK_CASES if args.quick else ALL_CASES)
    out = cli.result_path(args.out, "memory", mode)
    plot_path = args.plot or (
        os.path.join(ROOT, "docs", "rss_over_time.png") if mode == "full" else os.path.splitext(out)[0] + "_rss.png"
    )
    env = reporting.environment()
    load0 = measure.load_average()
    print(f"load average before: {load0}", flush=True)
    parts: dict[str, Any] = {}
    with cli.work_directory(args.workdir, f"lazyfp8-memory-{mode}-") as workdir:
        if "a" in args.parts:
            parts["a"] = part_a(args, workdir, mode)
        if "b" in args.parts:
            parts["b"] = part_b(args, workdir, mode)
        if "c" in args.parts:
            parts["c"] = part_c(args, workdir, mode, plot_path)
    rows = [dict(r, part=k) for k, p in parts.items() for r in p["rows"]]
    kept = []
    if set(args.parts) != {"a", "b", "c"} and os.path.exists(out):
        # Refreshing some parts: keep the others from the previous run of the same mode.
        with open(out) as f:
            previous = json.load(f)
        if previous.get("mode") == mode:
            for k in sorted(set(previous.get("tables", {})) - set(parts)):
                parts[k] = dict(previous["parts"][k], table=previous["tables"][k], from_previous_run=True)
                rows += [r for r in previous["rows"] if r.get("part") == k]
                kept.append(k)
    parts = dict(sorted(parts.items()))
    rows.sort(key=lambda r: r["part"])
    text = "\n\n".join([f"## Memory benchmark ({mode})", *(p["table"] for p in parts.values())])
    if kept:
        shown = os.path.relpath(out, ROOT) if os.path.abspath(out).startswith(ROOT + os.sep) else out
        text += f"\n\n(part(s) {', '.join(kept)}: from the previous run in {shown})"
    print(text)
    return cli.finish(
        out,
        {
            "mode": mode,
            "note": args.note,
            "repeat": args.repeat,
            "load_average_before": load0,
            "load_average_after": measure.load_average(),
            "environment": env,
            "parts": {k: {kk: vv for kk, vv in p.items() if kk not in ("rows", "table")} for k, p in parts.items()},
            "tables": {k: p["table"] for k, p in parts.items()},
            "rows": rows,
            "table": text,
        },
        [r["case"] for r in rows if r.get("errors") or "error" in r or r.get("bit_exact") is False],
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.benchmark_parser(__doc__, "small sizes; for CI", "full sizes (the default)")
    p.add_argument("--parts", nargs="+", choices=("a", "b", "c"), default=["a", "b", "c"])
    p.add_argument("--cases", nargs="+", choices=ALL_CASES, help="default: all (--quick: a subset)")
    cli.add_options(
        p, "workdir", "repeat", "timeout", "out",
        results="memory",
        helps={
            "workdir": "keep checkpoints here and reuse them (bench_load's workdir layout for b and c)",
            "repeat": "runs per case in parts a and b (default: 1 quick, 3 full)",
            "timeout": None,
        },
    )  # fmt: skip
    p.add_argument("--plot", help="PNG path (default: docs/rss_over_time.png full, beside --out quick)")
    cli.add_options(p, "note", "case", "result", cases=ALL_CASES, helps={"note": None})
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    cli.add_options(p, "fp8-dir", "bf16-dir")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return cli.main(parse_args, child_main, parent_main, argv)


if __name__ == "__main__":
    sys.exit(main())
