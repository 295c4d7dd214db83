"""Save benchmark: write throughput and peak memory of ``lazyfp8.save`` for a >= 1 GB bf16 model,
from memory and streaming from an FP8 checkpoint, next to ``safetensors.torch.save_file``.

Sources (each case in a fresh interpreter):

- ``mem:*``: the seeded ``Qwen3ForCausalLM`` of bench_schemes.py (1.17 GB of bf16 parameters in
  full mode), built in the process before the measured region; its ``state_dict()`` is saved.
- ``view:*``: a ``LazyFP8View`` of that model's block-FP8 checkpoint (warm page cache): nothing
  of the source is in memory, every tensor is read and dequantized when its shard is built.

Outputs: ``block`` = ``scheme=PerBlock((128, 128))``, ``per-tensor`` = ``scheme="per-tensor"``,
``bf16`` = ``scheme=None`` (rename/re-shard only; from a view: a streaming FP8 -> bf16
dequantizer), all with ``max_shard_size`` (default ``"500MB"``); and ``mem:save_file`` =
``safetensors.torch.save_file(state_dict, one_file)``.

    python benchmarks/bench_save.py --quick      # tiny model; what CI runs
    python benchmarks/bench_save.py              # full
    python benchmarks/bench_save.py --workdir /tmp/lazyfp8-work   # reuse bench_schemes' checkpoint

Throughput is bytes of the source's bf16 tensors / seconds of the save call (it returns with the
data in the page cache); ``sync s`` is an ``os.sync()`` right after, to show what writing back to
the disk adds. Peak memory is ``VmHWM - baseline RSS - bytes of the source held in memory``.
Outputs are checked against references where one exists (see the ``check`` column).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import checkpoints, child, cli, measure, models, processes, reporting

CASES = ("mem:block", "mem:per-tensor", "mem:bf16", "mem:save_file", "view:block", "view:per-tensor", "view:bf16")


# --------------------------------------------------------------------------------------------
# Child
# --------------------------------------------------------------------------------------------
def _state_digest_of_dir(path: str) -> str:
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for f in checkpoints.safetensors_files(path):
        state.update(load_file(f))
    return models.state_digest(state)


def child_main(args: argparse.Namespace) -> int:
    # lazyfp8.save plans shards with huggingface_hub and safetensors' writer imports numpy:
    # imported before the baseline, like everything that is not the measured work.
    import huggingface_hub  # noqa: F401
    import numpy  # noqa: F401
    import safetensors.torch
    import torch
    from transformers import Qwen3ForCausalLM  # noqa: F401

    import lazyfp8

    source_kind, output = args.case.split(":")
    with open(args.manifest) as f:
        manifest = json.load(f)
    with open(os.path.join(args.fp8_dir, "config.json")) as f:
        config = {k: v for k, v in json.load(f).items() if k != "quantization_config"}
    out_dir = args.out_dir
    result: dict[str, Any] = {"case": args.case}
    watch = measure.Stopwatch()
    # The source exists before the baseline (building it has transients of its own: torch's
    # bf16 normal_ goes through a float32 buffer), so VmHWM - baseline is what saving needed
    # above the source's own bytes.
    if source_kind == "mem":
        with watch.lap("source"):
            model = models.random_causal_lm(config, manifest["spec"]["seed"])
            source: Any = model.state_dict()
        source_bytes = models.model_bytes(model)
    else:
        source = lazyfp8.LazyFP8View(args.fp8_dir)
        source_bytes = 0
    child.prepare_lazyfp8()  # library code, before the baseline
    probe = measure.MemoryProbe()
    try:
        input_bytes = sum(int(torch.Size(v.shape).numel()) * 2 for v in source.values())  # as bf16
        scheme = {"block": lazyfp8.PerBlock(models.BLOCK), "per-tensor": "per-tensor", "bf16": None}.get(output)
        with watch.lap("save"):
            if output == "save_file":
                os.makedirs(out_dir)
                safetensors.torch.save_file(source, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
            else:
                res = lazyfp8.save(
                    source, out_dir, scheme=scheme, max_shard_size=args.max_shard_size, config=config
                )
                result["files"] = len(res.files)
        probe.stop()
        with watch.lap("sync"):
            os.sync()
    except Exception as e:  # noqa: BLE001 - recorded in the result, not raised
        result.update(child.error_fields(e))
        result.update(probe.report())
        processes.write_result(args.result, result)
        return 0
    shard_sizes = [os.path.getsize(f) for f in checkpoints.safetensors_files(out_dir)]
    result.update(probe.report())
    result.update(
        source_bytes=source_bytes,
        input_bytes=input_bytes,
        save_s=watch.laps["save"],
        save_cpu_s=watch.cpu["save"],
        sync_s=watch.laps["sync"],
        output_bytes=checkpoints.dir_bytes(out_dir),
        largest_shard=max(shard_sizes),
        shards=len(shard_sizes),
    )
    if source_kind == "view":
        source.close()
    del source
    if args.check:  # after the measurements: what the output holds, against a reference
        if args.case == "mem:block":
            result["check"] = "stored tensors = bench_schemes' checkpoint (same save from the same model)"
            result["bit_exact"] = checkpoints.checkpoint_digest(out_dir) == manifest["disk_digest"]
        elif output in ("bf16", "save_file"):
            want = manifest["source_digest"] if source_kind == "mem" else manifest["digest"]
            result["check"] = (
                "read back = the source model" if source_kind == "mem" else "read back = reference dequantization"
            )
            result["bit_exact"] = _state_digest_of_dir(out_dir) == want
        else:
            with lazyfp8.LazyFP8View(out_dir) as view:  # at least: it reads back, every key
                ok = set(view) == set(manifest["keys"])
            result["check"] = "reads back with LazyFP8View, same keys (values: no reference)"
            result["reads_back"] = ok
            if not ok:
                result["bit_exact"] = False
    processes.write_result(args.result, result)
    return 0


# --------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------
COLUMNS = [
    ("case", "case"),
    ("save_s", "save s"),
    ("save_cpu_s", "save CPU s"),
    ("gbps", "GB/s (bf16 in)"),
    ("sync_s", "sync s"),
    ("gbps_sync", "GB/s incl. sync"),
    ("output_mib", "output MiB"),
    ("shards", "files"),
    ("source_mib", "source in RAM MiB"),
    ("peak_mib", "peak above source MiB"),
    ("peak_range", "runs' range MiB"),
    ("expect_mib", "shard + tensor MiB"),
    ("bit_exact_text", "check"),
]


def derive(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
    largest_bf16 = manifest["largest_source_tensor_bytes"]
    for r in rows:
        if r.get("save_s") is None or "vmhwm" not in r:
            r["bit_exact_text"] = "error"
            continue
        first = next(x for x in r["runs"] if "error" not in x)
        for k in ("check", "bit_exact", "reads_back", "output_bytes", "largest_shard", "shards", "source_bytes", "input_bytes"):
            if k in first:
                r[k] = first[k]
        r["total_s"] = min(x["save_s"] + x["sync_s"] for x in r["runs"] if "error" not in x)
        r["gbps"] = r["input_bytes"] / r["save_s"] / 1e9
        r["gbps_sync"] = r["input_bytes"] / r["total_s"] / 1e9
        r["output_mib"] = measure.mib(r["output_bytes"])
        r["source_mib"] = measure.mib(r["source_bytes"])
        peak = r["vmhwm"] - r["baseline_rss"]  # the source is in the baseline (see child_main)
        r["peak_above_source"] = peak
        r["peak_mib"] = measure.mib(peak)
        peaks = [x["vmhwm"] - x["baseline_rss"] for x in r["runs"] if "error" not in x]
        r["peak_range"] = f"{measure.mib(min(peaks)):.0f}–{measure.mib(max(peaks)):.0f}"
        if r["case"] != "mem:save_file":
            # one output shard, plus one source tensor in bf16 (materialized from the view)
            r["expect_bytes"] = r["largest_shard"] + largest_bf16
            r["expect_mib"] = measure.mib(r["expect_bytes"])
        r["bit_exact_text"] = {True: "exact", False: "WRONG"}.get(r.get("bit_exact"), "reads back" if r.get("reads_back") else None)


def report(rows: list[dict[str, Any]], manifest: dict[str, Any], mode: str, repeat: int, max_shard: str, note: str | None) -> str:
    spec = manifest["spec"]
    lines = [
        f"## Save benchmark ({mode})",
        "",
        *([f"- note: {note}"] if note else []),
        (
            f"- source: Qwen3ForCausalLM (hidden {spec['hidden']}, {spec['layers']} layers), {manifest['params'] / 1e6:.1f}M "
            f"parameters = {measure.mib(manifest['model_bytes']):.1f} MiB of bf16; `mem:` its state_dict in memory, "
            f"`view:` a LazyFP8View of its block-FP8 checkpoint ({measure.mib(manifest['fp8_disk_bytes']):.1f} MiB, "
            "page cache warm)"
        ),
        f"- lazyfp8.save(..., max_shard_size={max_shard!r}); `mem:save_file` = safetensors.torch.save_file, one file",
        (
            "- GB/s = bytes of the source's tensors in bf16 / save s (returns with the data in the page cache); "
            "sync s = os.sync() right after"
        ),
        (
            "- peak above source = VmHWM − RSS at the baseline, taken with the source already in memory "
            "(`mem:`: the model; `view:`: the view, headers only) and VmHWM reset there; "
            f"shard + tensor = largest output file + largest source tensor in bf16 ({measure.mib(manifest['largest_source_tensor_bytes']):.0f} MiB)"
        ),
        f"- each case in a fresh process; {repeat} run(s) per case: best time, largest peak; outputs checked on the first run",
        "",
        reporting.markdown_table(rows, COLUMNS),
    ]
    lines += reporting.disturbance_lines(rows)
    for r in rows:
        if r.get("check"):
            lines.append(f"\n- {r['case']}: {r['check']}: {r['bit_exact_text']}")
    lines += reporting.error_lines(rows)
    return "\n".join(lines)


def parent_main(args: argparse.Namespace) -> int:
    import torch

    import lazyfp8

    mode = "quick" if args.quick else "full"
    spec = models.QWEN3_SPECS[mode]
    repeat = args.repeat or (1 if args.quick else 3)
    max_shard = args.max_shard_size or ("1MB" if args.quick else "500MB")
    env = reporting.environment()
    print(f"load average before: {measure.load_average()}", flush=True)
    with cli.work_directory(args.workdir, f"lazyfp8-save-{mode}-") as workdir:
        ck = checkpoints.ensure_block_checkpoint(workdir, spec)
        manifest = dict(ck.manifest)
        with lazyfp8.LazyFP8View(ck.fp8_dir) as view:
            manifest["keys"] = sorted(view)
            manifest["largest_source_tensor_bytes"] = max(
                int(torch.Size(view[k].shape).numel()) * 2 for k in view
            )
        manifest_path = os.path.join(workdir, "manifest-save.json")
        with open(manifest_path, "w") as f:
            json.dump(manifest, f)
        files = checkpoints.checkpoint_files(ck.fp8_dir)

        def out_dir(case: str) -> str:
            return os.path.join(workdir, "out-" + case.replace(":", "-"))

        def before(case: str) -> None:
            shutil.rmtree(out_dir(case), ignore_errors=True)
            os.sync()  # no earlier run's dirty pages written back inside this one

        runs = processes.run_repeated(
            os.path.abspath(__file__),
            args.cases,
            repeat,
            lambda i, case: ["--fp8-dir", ck.fp8_dir, "--manifest", manifest_path, "--out-dir", out_dir(case),
                             "--max-shard-size", max_shard, *(["--check"] if i == 0 else [])],
            warm=lambda case: files,
            timeout=args.timeout,
            status=lambda r: (
                reporting.short_error(r["error"], 300)
                if "error" in r
                else f"save {r['save_s']:.2f} s, sync {r['sync_s']:.2f} s (others' CPU {r['others_cpu_s']:.1f} s)"
            ),
            before=before,
            after=lambda case: shutil.rmtree(out_dir(case), ignore_errors=True),
        )  # fmt: skip
        rows = [
            reporting.aggregate_runs(runs[c], ("save_s", "save_cpu_s", "sync_s"), ("vmrss_end", "rss_anon_end"))
            for c in args.cases
        ]
    derive(rows, manifest)
    text = report(rows, manifest, mode, repeat, max_shard, args.note)
    print(text)
    manifest.pop("keys", None)
    return cli.finish(
        cli.result_path(args.out, "save", mode),
        {
            "mode": mode,
            "note": args.note,
            "page_cache": "warm (source checkpoint read before each run); outputs written to the page cache, sync timed apart",
            "repeat": repeat,
            "max_shard_size": max_shard,
            "load_average_after": measure.load_average(),
            "environment": env,
            "checkpoint": manifest,
            "rows": rows,
            "table": text,
        },
        [r["case"] for r in rows if r.get("errors") or r.get("bit_exact") is False],
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.benchmark_parser(__doc__, "tiny model; for CI", "~1.17 GB of bf16 parameters (the default)")
    workdir_help = "keep the source checkpoint here and reuse it (shared with bench_schemes.py)"
    cli.add_options(p, "workdir", "cases", "repeat", cases=CASES, helps={"workdir": workdir_help})
    p.add_argument("--max-shard-size", help='lazyfp8.save max_shard_size (default: "500MB"; quick "1MB")')
    cli.add_options(p, "timeout", "out", "note", results="save", helps={"timeout": None, "note": None})
    cli.add_options(p, "case", "result", "fp8-dir", cases=CASES)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return cli.main(parse_args, child_main, parent_main, argv)


if __name__ == "__main__":
    sys.exit(main())
