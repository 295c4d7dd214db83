"""Dequantization throughput: GB/s of output for each scale format, next to memcpy and the
naive torch formulas, in one run. Each case runs in a fresh process.

    python benchmarks/bench_dequant.py --quick    # 1M elements; what CI runs
    python benchmarks/bench_dequant.py            # 64M elements (8192 x 8192), 128 MiB of bf16

lazyfp8 cases time ``dst.copy_(view[key])`` into a preallocated bf16 tensor: the real path, with
the checkpoint in the (warm) page cache, so the ``preadv`` copy of the codes is included. The
naive cases start from FP8 codes already in memory. Every result is checked bit for bit against
``(w.to(float32) * s.to(float32)).to(bfloat16)``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import cli, processes, reporting

SCHEMES = {
    "per-tensor": {"scheme": "per-tensor"},
    "per-channel": {"scheme": "per-channel", "format": "compressed-tensors"},
    "block-128x128": {"scheme": "block", "block_size": (128, 128)},
    "mx-1x32": {"scheme": "mx", "ue8m0": True},
}
NAIVE = ("memcpy", "copy_+mul_", "to+mul")


def _shape(mode: str) -> tuple[int, int]:
    return (1024, 1024) if mode == "quick" else (8192, 8192)


def generate(workdir: str, mode: str) -> None:
    import torch

    import lazyfp8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(_shape(mode), generator=g)
    for name, kw in SCHEMES.items():
        lazyfp8.save({"w.weight": w}, os.path.join(workdir, name), quantize=lambda k: True, exclude=(), **kw)


def run(args: argparse.Namespace) -> dict:
    import torch

    import lazyfp8
    from lazyfp8.testing import reference

    method, threads = args.case.rsplit(":", 1)
    threads = int(threads)
    torch.set_num_threads(min(threads, torch.get_num_threads()) if threads else torch.get_num_threads())
    shape = _shape(args.mode)
    numel = shape[0] * shape[1]
    out = torch.empty(shape, dtype=torch.bfloat16)
    scale = torch.tensor(0.0123)
    if method in NAIVE:
        src = torch.randn(shape).to(torch.bfloat16)
        codes = torch.randint(0, 256, shape, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
        fn = {
            "memcpy": lambda: out.copy_(src),
            "copy_+mul_": lambda: (out.copy_(codes), out.mul_(scale)),
            "to+mul": lambda: out.copy_(codes.to(torch.bfloat16) * scale),
        }[method]
        ref = None if method == "memcpy" else (codes.to(torch.float32) * scale).to(torch.bfloat16)
    else:
        view = lazyfp8.LazyFP8View(os.path.join(args.workdir, method), threads=threads or None,
                                   block_size=SCHEMES[method].get("block_size"))
        lazy = view["w.weight"]

        def fn() -> None:
            out.copy_(lazy)

        info = view.info("w.weight")
        with open(os.path.join(args.workdir, method, "model.safetensors"), "rb") as f:
            from safetensors.torch import load

            codes_stored = load(f.read())["w.weight"]
        ref = reference(codes_stored, view.scale("w.weight"), torch.bfloat16, info.granularity.block_size(shape))
    fn()  # warm-up: first touch of every page, tables, the thread pool
    best = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    exact = None if ref is None else bool(torch.equal(out.view(torch.int16), ref.view(torch.int16)))
    return {"case": args.case, "method": method, "threads": threads or torch.get_num_threads(),
            "numel": numel, "seconds": best, "gbps": numel * 2 / best / 1e9, "bit_exact": exact}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--case")
    p.add_argument("--result")
    p.add_argument("--workdir")
    p.add_argument("--mode")
    p.add_argument("--out")
    args = p.parse_args()
    if args.case:
        processes.write_result(args.result, run(args))
        return 0
    mode = "quick" if args.quick else "full"
    repeat = args.repeat or (2 if args.quick else 5)
    with tempfile.TemporaryDirectory(prefix="lazyfp8-dequant-") as workdir:
        generate(workdir, mode)
        rows = []
        for threads in (1, 0):
            for method in (*NAIVE, *SCHEMES):
                r = processes.run_case(__file__, f"{method}:{threads}", ["--workdir", workdir, "--mode", mode, "--repeat", str(repeat)])
                rows.append(r)
    by = {(r.get("method"), r.get("threads")): r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        mc = by.get(("memcpy", r["threads"]))
        naive = by.get(("copy_+mul_", r["threads"]))
        r["x_memcpy"] = r["gbps"] / mc["gbps"] if mc else None
        r["x_copy_mul"] = r["gbps"] / naive["gbps"] if naive else None
    table = reporting.markdown_table(
        rows,
        [("method", "method"), ("threads", "threads"), ("gbps", "GB/s of bf16 out"), ("x_memcpy", "x memcpy"),
         ("x_copy_mul", "x copy_+mul_"), ("bit_exact", "bit-exact"), ("others_cpu_s", "others' CPU s"), ("error", "error")],
    )
    shape = _shape(mode)
    print(f"## Dequantization throughput ({mode}): {shape[0]}x{shape[1]} weight, best of {repeat}\n")
    print(table)
    out = cli.result_path(args.out, "dequant", mode)
    processes.write_result(out, {"mode": mode, "shape": shape, "repeat": repeat, "environment": reporting.environment(), "rows": rows, "table": table})
    failed = [r for r in rows if "error" in r or r.get("bit_exact") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
