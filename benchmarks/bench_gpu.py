"""The CUDA path: GB/s and peak GPU memory of loading FP8 weights into GPU parameters.

    python benchmarks/bench_gpu.py            # ~1.6 GB of bf16 parameters; < 2 min on one H100
    python benchmarks/bench_gpu.py --quick    # small; on a machine without a GPU it says so and exits 0

For each scheme it writes a checkpoint of ``--layers`` 4096 x 4096 FP8 weights, then times, in one
process on one GPU:

- ``lazyfp8``: ``param_cuda.copy_(view[key])``: FP8 bytes cross PCIe through pinned double
  buffers, dequantized on the GPU straight into the parameter;
- ``cpu-dequant+copy``: ``param_cuda.copy_(view_cpu.get_tensor(key))``: dequantize on the CPU,
  send bf16 (what a loader without a GPU path does);
- ``bf16-h2d``: ``param_cuda.copy_(bf16_cpu_tensor)`` from pinned memory: the PCIe bound for bf16.

It reports GB/s of bf16 parameters produced, the peak GPU memory above the parameters
(``torch.cuda.max_memory_allocated``) and checks every lazyfp8 result bit for bit against the CPU
path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--out")
    args = p.parse_args()
    import torch

    import lazyfp8

    mode = "quick" if args.quick else "full"
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"gpu_{mode}.json")
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: nothing to measure")
        with open(out_path, "w") as f:
            json.dump({"mode": mode, "rows": [{"case": "skipped", "reason": "no CUDA GPU"}]}, f)
        return 0
    layers = args.layers or (2 if args.quick else 48)
    n = 1024 if args.quick else 4096
    schemes = {"per-tensor": {"scheme": "per-tensor"}, "block-128x128": {"scheme": "block", "block_size": (128, 128)}}
    rows = []
    with tempfile.TemporaryDirectory(prefix="lazyfp8-gpu-") as d:
        g = torch.Generator().manual_seed(0)
        sd = {f"layers.{i}.weight": torch.randn(n, n, generator=g) for i in range(layers)}
        for name, kw in schemes.items():
            lazyfp8.save(sd, os.path.join(d, name), quantize=lambda k: True, exclude=(), max_shard_size="2GB", **kw)
        params = [torch.empty(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(layers)]
        total = layers * n * n * 2
        for name, kw in schemes.items():
            path = os.path.join(d, name)
            gpu = lazyfp8.LazyFP8View(path, device="cuda", block_size=kw.get("block_size"))
            cpu = lazyfp8.LazyFP8View(path, block_size=kw.get("block_size"))
            # gpu and cpu bound as defaults (each fn runs only within this iteration anyway)
            for case, fn in [
                ("lazyfp8", lambda gpu=gpu: [p.copy_(gpu[k]) for p, k in zip(params, sd)]),
                ("cpu-dequant+copy", lambda cpu=cpu: [p.copy_(cpu.get_tensor(k)) for p, k in zip(params, sd)]),
            ]:
                fn()  # warm-up: page cache, pinned buffers, CUDA context
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated() - base
                exact = all(torch.equal(p.cpu().view(torch.int16), cpu.get_tensor(k).view(torch.int16)) for p, k in zip(params, sd))
                rows.append({"scheme": name, "case": case, "seconds": dt, "gbps": total / dt / 1e9,
                             "peak_gpu_mib_above_params": peak / 2**20, "bit_exact": exact})
        host = [torch.randn(n, n).to(torch.bfloat16).pin_memory() for _ in range(min(layers, 8))]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i, p_ in enumerate(params):
            p_.copy_(host[i % len(host)], non_blocking=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rows.append({"scheme": "-", "case": "bf16-h2d", "seconds": dt, "gbps": total / dt / 1e9})
    print(f"## GPU load ({mode}): {layers} x {n}x{n} weights, {total / 2**30:.2f} GiB of bf16, {torch.cuda.get_device_name()}\n")
    print("| scheme | case | s | GB/s of bf16 | peak GPU MiB above params | bit-exact |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['case']} | {r['seconds']:.3f} | {r['gbps']:.1f} | {r.get('peak_gpu_mib_above_params', 0):.1f} | {r.get('bit_exact', '')} |")
    with open(out_path, "w") as f:
        json.dump({"mode": mode, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)
    return 1 if any(r.get("bit_exact") is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
