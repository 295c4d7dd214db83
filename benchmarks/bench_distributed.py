"""Sharded loads on torch.distributed: what each of N ranks reads, holds and spends.

A block-scaled FP8 checkpoint (128x128 blocks: ``layers`` Linear weights of ``hidden x hidden``,
a bf16 embedding and norm) is generated once; then, for N = 1, 2 and 4 ranks (gloo, CPU), N fresh
processes each build the model on the meta device, shard it, and load their shards from the
checkpoint. Each rank measures the bytes it read (``bytes_read``) against the exact count its
shard boxes imply, how many reads it issued, the wall and CPU time of the load, and its memory
(``VmHWM`` minus the RSS just before the load minus the bytes of its local parameters); then it
checks its shards against the single-process view, bit for bit.

Methods:

- ``single``: no torch.distributed at all, ``lazyfp8.load_into`` of the meta model (N = 1 only):
  the reference point.
- ``fsdp2``: FSDP2 recipe: meta model, ``fully_shard`` per layer and at the root,
  ``to_empty(device="cpu")``, ``model.load_state_dict(LazyFP8View(path), strict=True)``. Every
  parameter is ``Shard(0)``: each rank reads a band of whole rows of every tensor.
- ``dcp``: the same model loaded with
  ``dcp.load(model.state_dict(), storage_reader=LazyFP8StorageReader(path))``.
- ``tp-columns``: every Linear ``RowwiseParallel`` (weights ``Shard(1)``), the embedding
  vocab-parallel (``Shard(0)``): column shards, read one row segment at a time.

Usage::

    python benchmarks/bench_distributed.py --quick   # seconds of loading, < 60 s in all; for CI
    python benchmarks/bench_distributed.py           # ~340 MB checkpoint (the default, --full)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import checkpoints, child, cli, measure, pagecache, processes, reporting

MiB = measure.MiB


@dataclasses.dataclass(frozen=True)
class Spec:
    """The benchmark model: an embedding, ``layers`` square Linears (FP8), a norm."""

    vocab: int
    hidden: int
    layers: int
    block: tuple[int, int] = (128, 128)
    max_shard_size: int = 100 * 1000 * 1000
    seed: int = 0

    @property
    def fp8_params(self) -> int:
        return self.layers * self.hidden * self.hidden

    @property
    def bf16_params(self) -> int:
        return self.vocab * self.hidden + self.hidden


#: ``--quick``: 4 layers of 512 (1 MB of FP8) and a 2 MB embedding.
QUICK = Spec(vocab=2048, hidden=512, layers=4, max_shard_size=1_000_000)
#: Full: 12 layers of 4096 x 4096 (201 MB of FP8) and a 16384 x 4096 bf16 embedding (134 MB).
FULL = Spec(vocab=16384, hidden=4096, layers=12)
SPECS = {"quick": QUICK, "full": FULL}

RANKS = (1, 2, 4)
METHODS = ("single", "fsdp2", "dcp", "tp-columns")
#: ``--quick`` runs every method but fewer launches (each costs seconds of imports per rank).
QUICK_RANKS = {"single": (1,), "fsdp2": (1, 2, 4), "dcp": (2,), "tp-columns": (2,)}
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# The model and its checkpoint
# --------------------------------------------------------------------------------------------
def build_meta_model(spec: Spec) -> Any:
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(spec.vocab, spec.hidden)
            self.layers = nn.ModuleList(nn.Linear(spec.hidden, spec.hidden, bias=False) for _ in range(spec.layers))
            self.norm = nn.RMSNorm(spec.hidden)

    with torch.device("meta"):
        return Net().to(torch.bfloat16)


def ensure_checkpoint(workdir: str, spec: Spec) -> dict[str, Any]:
    """Write (or reuse, if ``workdir`` holds one for ``spec``) the FP8 checkpoint; return its
    manifest."""
    import torch

    import lazyfp8

    path = os.path.join(workdir, "fp8")
    manifest_path = os.path.join(workdir, "manifest.json")
    wanted = {"format": FORMAT_VERSION, "spec": dataclasses.asdict(spec)}
    manifest = checkpoints.reusable_manifest(manifest_path, wanted)
    if manifest is not None:
        print(f"reusing the checkpoint in {workdir}")
        return manifest
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(spec.seed)
    sd: dict[str, torch.Tensor] = {"embed.weight": (torch.randn(spec.vocab, spec.hidden, generator=g) * 0.02).to(torch.bfloat16)}
    for i in range(spec.layers):
        # rows of different magnitudes, so that every block has its own scale
        rows = torch.logspace(-1, 1, spec.hidden).roll(i * 97)[:, None]
        sd[f"layers.{i}.weight"] = torch.randn(spec.hidden, spec.hidden, generator=g) * 0.02 * rows
    sd["norm.weight"] = (1 + torch.randn(spec.hidden, generator=g) * 0.1).to(torch.bfloat16)
    res = lazyfp8.save(
        sd,
        path,
        scheme=lazyfp8.PerBlock(spec.block),
        config={"architectures": ["BenchNet"]},
        max_shard_size=spec.max_shard_size,
        overwrite=True,
    )
    del sd
    manifest = dict(
        wanted,
        path=path,
        files=res.files,
        disk_bytes=checkpoints.dir_bytes(path),
        data_bytes=res.total_size,
        fp8_keys=len(res.quantized),
        generate_s=round(time.perf_counter() - t0, 2),
    )
    checkpoints.write_manifest(manifest_path, manifest)
    print(f"wrote {measure.mib(manifest['disk_bytes']):.1f} MiB to {path} in {manifest['generate_s']} s")
    return manifest


# --------------------------------------------------------------------------------------------
# One rank (a fresh process)
# --------------------------------------------------------------------------------------------
def _count_reads() -> list[int]:
    """Count the positional reads lazyfp8 issues (instrumentation only: the wrapped method is
    called unchanged)."""
    from lazyfp8.storage.reader import ShardFile

    counter = [0]
    original = ShardFile.read_into

    def read_into(self, dst, offset, key):
        counter[0] += 1
        return original(self, dst, offset, key)

    ShardFile.read_into = read_into  # type: ignore[method-assign]
    return counter


def _local(t: Any) -> Any:
    from lazyfp8.distributed import is_dtensor

    return t.to_local() if is_dtensor(t) else t


def _expected_bytes(view: Any, named: list[tuple[str, Any]]) -> int:
    """Stored bytes of each local box + the whole scale of each FP8 tensor with a non-empty box."""
    from safetensors import safe_open

    from lazyfp8.distributed import is_dtensor, local_box

    total = 0
    for key, t in named:
        lengths = local_box(t)[1] if is_dtensor(t) else tuple(t.shape)
        n = math.prod(lengths)
        info = view.info(key)
        total += n * info.disk_dtype.itemsize
        if n and info.scale_key is not None:
            with safe_open(info.scale_file, "pt") as f:
                scale = f.get_tensor(info.scale_key)  # a few KiB
            total += scale.numel() * scale.element_size()
    return total


def worker_main(args: argparse.Namespace) -> int:
    # Every import, the process group, the mesh, the model and its (untouched) local storage
    # come before the baseline: none of them is the load.
    import gc

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import lazyfp8
    from lazyfp8.distributed import is_dtensor, local_box

    if args.method in ("fsdp2", "dcp"):
        from torch.distributed.fsdp import fully_shard
    if args.method == "dcp":
        import torch.distributed.checkpoint as dcp
    if args.method == "tp-columns":
        from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module
    if args.method != "single":
        from torch.distributed.tensor import DTensor  # noqa: F401 - before the baseline

    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(args.rank % torch.cuda.device_count())  # one GPU: every rank on it
        torch.empty(1, device="cuda")  # the CUDA context, before the baseline
    spec = Spec(**{k: tuple(v) if k == "block" else v for k, v in json.loads(args.spec).items()})
    result: dict[str, Any] = {"rank": args.rank, "world": args.world, "method": args.method}
    distributed = args.method != "single"
    try:
        if distributed:
            dist.init_process_group(
                "gloo",
                init_method=f"file://{args.store}",
                rank=args.rank,
                world_size=args.world,
                timeout=datetime.timedelta(seconds=args.timeout),
            )
            mesh = init_device_mesh(device.type, (args.world,))
        model = build_meta_model(spec)
        if args.method in ("fsdp2", "dcp"):
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        elif args.method == "tp-columns":
            plan = {"embed": RowwiseParallel()}  # vocab-parallel: Shard(0)
            plan.update({f"layers.{i}": RowwiseParallel() for i in range(spec.layers)})  # Shard(1)
            parallelize_module(model, mesh, plan)
        if distributed:
            model.to_empty(device=device)  # allocated, not yet touched: not resident
        reads = _count_reads()
        view = lazyfp8.LazyFP8View(args.ckpt)
        reader = lazyfp8.LazyFP8StorageReader(args.ckpt) if args.method == "dcp" else None
        child.prepare_lazyfp8()  # library code, before the baseline
        gc.collect()
        if distributed:
            dist.barrier()  # every rank starts together
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            gpu_base = torch.cuda.memory_allocated()
        probe = measure.MemoryProbe()
        watch = measure.Stopwatch()
        with watch.lap("load"):
            if args.method == "single":
                lazyfp8.load_into(model, view, device=device)
            elif args.method == "dcp":
                dcp.load(model.state_dict(), storage_reader=reader)
            else:
                model.load_state_dict(view, strict=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
        probe.stop()
        if distributed:
            t_done = time.perf_counter()
            dist.barrier()
            result["wait_for_others_s"] = time.perf_counter() - t_done
        named = list(model.named_parameters())
        local_bytes = sum(_local(p).numel() * _local(p).element_size() for _, p in named)
        if device.type == "cuda":
            # parameters live on the GPU: the host holds none of them; on the GPU, the peak above
            # the memory allocated before the load, minus what the load allocated for the model
            # itself (only the single-process load allocates there)
            allocated = local_bytes if args.method == "single" else 0
            result["gpu_peak_above_params"] = torch.cuda.max_memory_allocated() - gpu_base - allocated
            result["gpu_param_bytes"] = local_bytes
        result.update(probe.report())
        result.update(
            load_s=watch.laps["load"],
            load_cpu_s=watch.cpu["load"],
            bytes_read=(reader.view if reader is not None else view).bytes_read,
            reads=reads[0],
            expected_bytes=_expected_bytes(view, named),
            local_param_bytes=local_bytes if device.type == "cpu" else 0,  # host bytes
            placements=sorted({str(tuple(p.placements)) if is_dtensor(p) else "plain" for _, p in named}),
        )
        # Bit-exactness, after every measurement: each local shard against the same box of
        # the single-process tensor.
        exact = True
        for key, p in named:
            full = view.get_tensor(key)
            if is_dtensor(p):
                offsets, lengths = local_box(p)
                full = full[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
            exact &= torch.equal(_local(p).cpu().view(torch.int16), full.contiguous().view(torch.int16))
            del full
        result["bit_exact"] = bool(exact)
    except Exception as e:  # noqa: BLE001 - recorded: the parent reports it
        result.update(child.error_fields(e, limit=8))
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    processes.write_result(args.result, result)
    return 0


# --------------------------------------------------------------------------------------------
# Parent: generate once, launch N ranks per case, report
# --------------------------------------------------------------------------------------------
def launch(method: str, world: int, manifest: dict[str, Any], spec: Spec, timeout: float, device: str = "cpu") -> list[dict[str, Any]]:
    """Run ``world`` fresh rank processes of ``method``; return their results (by rank)."""
    with tempfile.TemporaryDirectory(prefix="lazyfp8-dist-") as tmp:
        store = os.path.join(tmp, "filestore")
        env = dict(os.environ, **processes.OFFLINE_ENV)
        procs, paths = [], []
        for rank in range(world):
            paths.append(os.path.join(tmp, f"rank{rank}.json"))
            cmd = [
                sys.executable, os.path.abspath(__file__), "--worker",
                "--method", method, "--rank", str(rank), "--world", str(world),
                "--store", store, "--ckpt", manifest["path"], "--result", paths[-1],
                "--spec", json.dumps(dataclasses.asdict(spec)), "--timeout", str(int(timeout)), "--device", device,
            ]  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        busy0, child0, t0 = measure.busy_cpu_seconds(), measure.children_cpu_seconds(), time.perf_counter()
        outputs = []
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                p.kill()
                outputs.append(p.communicate()[0])
        wall = time.perf_counter() - t0
        # CPU time the rest of the machine used meanwhile: a timing taken while other processes
        # ran on the same cores is disturbed, and the report says so.
        others = max(0.0, (measure.busy_cpu_seconds() - busy0) - (measure.children_cpu_seconds() - child0))
        results = []
        for rank, (p, path, out) in enumerate(zip(procs, paths, outputs)):
            if os.path.exists(path):
                with open(path) as f:
                    r = json.load(f)
            else:
                tail = "\n".join((out or "").strip().splitlines()[-15:])
                r = {"rank": rank, "error": f"exit code {p.returncode}: {tail}"}
            r["process_wall_s"] = wall
            r["others_cpu_s"] = others
            results.append(r)
        return results


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


GPU_COLUMNS = [
    ("gpu_params_mib", "GPU params MiB / rank"),
    ("gpu_peak_above_mib", "GPU peak above params MiB / rank"),
]

COLUMNS = [
    ("method", "method"),
    ("ranks", "ranks"),
    ("read_mib", "read MiB / rank"),
    ("read_pct", "% of ckpt / rank"),
    ("bytes_exact", "= expected bytes"),
    ("reads", "reads / rank"),
    ("load_s", "load s (slowest rank)"),
    ("load_cpu_s", "CPU s / rank"),
    ("agg_gbps", "GB/s read, all ranks"),
    ("params_mib", "local params MiB / rank"),
    ("peak_above_mib", "peak above params MiB / rank"),
    ("vmhwm_mib", "VmHWM MiB / rank"),
    ("bit_exact", "bit-exact"),
]


def summarize(method: str, world: int, results: list[dict[str, Any]], manifest: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method, "ranks": world, "per_rank": results}
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        row["error"] = errors[0]
        row["bit_exact"] = "error"
        return row
    row.update(
        read_mib=measure.mib(max(r["bytes_read"] for r in results)),
        read_pct=100 * max(r["bytes_read"] for r in results) / manifest["data_bytes"],
        bytes_exact="yes" if all(r["bytes_read"] == r["expected_bytes"] for r in results) else "NO",
        reads=max(r["reads"] for r in results),
        load_s=max(r["load_s"] for r in results),
        load_cpu_s=max(r["load_cpu_s"] for r in results),
        agg_gbps=sum(r["bytes_read"] for r in results) / max(r["load_s"] for r in results) / 1e9,
        params_mib=measure.mib(max(r["local_param_bytes"] for r in results)),
        peak_above_mib=measure.mib(max(r["vmhwm"] - r["baseline_rss"] - r["local_param_bytes"] for r in results)),
        vmhwm_mib=measure.mib(max(r["vmhwm"] for r in results)),
        bit_exact="yes" if all(r["bit_exact"] for r in results) else "NO",
        hwm_reset=all(r["hwm_reset"] for r in results),
        others_cpu_s=results[0]["others_cpu_s"],
        gpu_params_mib=measure.mib(max(r.get("gpu_param_bytes", 0) for r in results)) if "gpu_param_bytes" in results[0] else None,
        gpu_peak_above_mib=measure.mib(max(r["gpu_peak_above_params"] for r in results)) if "gpu_peak_above_params" in results[0] else None,
        disturbed=results[0]["others_cpu_s"] > 0.1 * results[0]["process_wall_s"],
    )
    return row


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated launches: the times of the launch whose slowest rank was fastest (on
    a shared machine every disturbance only adds time), the largest memory peak, and bytes and
    bits checked in every launch. The launches are kept under ``"launches"``."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return dict(failed[0], launches=runs)
    row = dict(min(runs, key=lambda r: r["load_s"]))
    for key in ("peak_above_mib", "vmhwm_mib", "gpu_peak_above_mib"):
        if row.get(key) is not None:
            row[key] = max(r[key] for r in runs)
    row["bytes_exact"] = "yes" if all(r["bytes_exact"] == "yes" for r in runs) else "NO"
    row["bit_exact"] = "yes" if all(r["bit_exact"] == "yes" for r in runs) else "NO"
    row["launches"] = runs
    return row


def report(
    rows: list[dict[str, Any]], manifest: dict[str, Any], mode: str, spec: Spec, device: str = "cpu", repeat: int = 1
) -> str:
    columns = COLUMNS if device == "cpu" else COLUMNS[:-1] + GPU_COLUMNS + COLUMNS[-1:]
    where = "on CPU" if device == "cpu" else (
        f"into CUDA parameters ({_gpu_name()}; every rank on this one GPU, so ranks share its PCIe link)"
    )
    lines = [
        f"## Distributed load benchmark ({mode}, {device})",
        "",
        (
            f"- checkpoint: {measure.mib(manifest['disk_bytes']):.1f} MiB in {len(manifest['files'])} file(s): "
            f"{spec.layers} FP8 Linear weights {spec.hidden}x{spec.hidden} (float8_e4m3fn, float32 scales over "
            f"{spec.block[0]}x{spec.block[1]} blocks) + bf16 embedding {spec.vocab}x{spec.hidden} and norm; "
            f"{measure.mib(manifest['data_bytes']):.1f} MiB of tensor data"
        ),
        (
            f"- loaded as bf16 {where}; gloo, every rank a fresh process, all ranks on the same "
            f"{os.cpu_count()}-core machine; page cache warm (the files were read just before each case)"
        ),
        (
            f"- {repeat} launch(es) per row: times of the fastest, the largest memory peak; "
            "per rank: bytes read by lazyfp8 and whether they equal the exact count of its shard boxes "
            "(+ whole scales), positional reads issued, load wall time (max over ranks), memory: "
            "VmHWM − RSS before the load − the rank's local parameter bytes"
        ),
        "",
        reporting.markdown_table(rows, columns),
    ]
    busy = [f"{r['method']} x{r['ranks']}" for r in rows if r.get("disturbed")]
    if busy:
        lines.append(
            f"\nOther processes used CPU for over 10% of the wall time of {', '.join(busy)} "
            "(others_cpu_s in the JSON): those timings are disturbed; rerun on a quiet machine to trust them."
        )
    for r in rows:
        if "error" in r:
            lines.append(f"\n{r['method']} on {r['ranks']} rank(s) failed: {' '.join(r['error'].split())[:600]}")
    return "\n".join(lines)


def parent_main(args: argparse.Namespace) -> int:
    mode = cli.size_mode(args, full_repeat=2)
    spec = SPECS[mode]
    env = reporting.environment()
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with cli.work_directory(args.workdir, f"lazyfp8-bench-dist-{mode}-") as workdir:
        manifest = ensure_checkpoint(workdir, spec)
        files = checkpoints.checkpoint_files(manifest["path"])
        for method in args.methods:
            ranks = args.ranks or (QUICK_RANKS[method] if args.quick else RANKS)
            for world in ranks:
                if method == "single" and world != 1:
                    continue
                t0 = time.perf_counter()
                runs = []
                for _ in range(args.repeat):
                    pagecache.warm_page_cache(files)
                    results = launch(method, world, manifest, spec, args.timeout, args.device)
                    runs.append(summarize(method, world, results, manifest))
                row = best_of(runs)
                rows.append(row)
                status = row.get("error") or f"load {row['load_s']:.2f} s, read {row['read_mib']:.1f} MiB/rank"
                print(f"  {method} x{world}: {' '.join(status.split())[:300]} ({time.perf_counter() - t0:.1f} s)", flush=True)
    text = report(rows, manifest, mode, spec, args.device, args.repeat)
    print()
    print(text)
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    out = cli.result_path(args.out, "distributed", f"{mode}{suffix}")
    cli.save_result(
        out,
        {
            "mode": mode,
            "spec": dataclasses.asdict(spec),
            "page_cache": "warm",
            "backend": "gloo",
            "device": args.device,
            "repeat": args.repeat,
            "environment": env,
            "checkpoint": manifest,
            "rows": rows,
            "table": text,
            "total_s": round(time.perf_counter() - t_start, 1),
        },
    )
    print(f"\nsaved {out} ({time.perf_counter() - t_start:.0f} s in all)")
    return cli.exit_status(
        [f"{r['method']} x{r['ranks']}: {r['bit_exact']}, bytes {r.get('bytes_exact')}" for r in rows
         if r["bit_exact"] != "yes" or r.get("bytes_exact") != "yes"]
    )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.benchmark_parser(__doc__, "tiny model; < 60 s; for CI", "~340 MB checkpoint (the default)")
    cli.add_options(p, "workdir")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--ranks", nargs="+", type=int, help="rank counts (default: 1 2 4; --quick: fewer)")
    cli.add_options(
        p, "timeout", "repeat",
        timeout=600,
        helps={
            "timeout": "seconds allowed per launch",
            "repeat": "launches per row, best time kept (default: 1 quick, 2 full)",
        },
    )  # fmt: skip
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the parameters live")
    out_help = "JSON path (default: benchmarks/results/distributed_<mode>.json)"
    cli.add_options(p, "out", helps={"out": out_help})
    # Internal: one rank in this (fresh) process.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return worker_main(args) if args.worker else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
