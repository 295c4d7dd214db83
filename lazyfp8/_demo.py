"""``lazyfp8 demo``: build a small model and its FP8 checkpoint, load it, print the figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

__all__ = ["run_demo"]


class DemoModel(nn.Module):
    """A decoder-shaped stack: embedding, ``layers`` x (4 projections + norm), head."""

    def __init__(self, vocab: int = 8192, hidden: int = 1024, layers: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "q_proj": nn.Linear(hidden, hidden, bias=False),
                    "up_proj": nn.Linear(hidden, 3 * hidden, bias=False),
                    "down_proj": nn.Linear(3 * hidden, hidden, bias=False),
                    "norm": nn.LayerNorm(hidden),
                }
            )
            for _ in range(layers)
        )
        self.lm_head = nn.Linear(hidden, vocab, bias=False)


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[name] = int(rest.split()[0]) * 1024
    return out


def _load_child(path: str) -> None:
    """Runs in a fresh process so its peak memory is the load's alone."""
    from lazyfp8 import LazyFP8View, init_empty_weights, load_into
    from lazyfp8.kernels import jit as _jit

    # The compiled kernels load once per process, like an import: timed apart from the load.
    t0 = time.perf_counter()
    k = _jit.kernels()
    names = {"vbmi": "AVX-512 VBMI", "neon": "NEON", "neon-emulated": "NEON (emulated)", "portable": "portable"}
    kernels = "pure torch" if k is None else "compiled, " + names.get(k.variant, k.variant)
    kernels += f", ready in {(time.perf_counter() - t0) * 1000:.0f} ms" if k is not None else ""
    with torch.device("meta"):
        DemoModel()  # first construction initializes torch's module machinery: not the load's cost
    with init_empty_weights():
        model = DemoModel().to(torch.bfloat16)
    before = _status()
    t0 = time.perf_counter()
    view = LazyFP8View(path, key_mapping={r"^model\.": ""})
    load_into(model, view)
    seconds = time.perf_counter() - t0
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    after = _status()
    print(json.dumps({"seconds": seconds, "params": params, "before": before, "after": after, "n": len(view), "kernels": kernels}))


def run_demo() -> int:
    from lazyfp8.testing import write_checkpoint

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="lazyfp8-demo-") as d:
        model = DemoModel().to(torch.bfloat16)
        # on-disk names "model.*", as a load with key_mapping={r"^model\.": ""} expects; 2 shards
        write_checkpoint(
            model.state_dict(), d, quantize=r"_proj\.weight$", key_mapping={r"^model\.": ""}, max_shard_size="50MB"
        )
        del model
        disk = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        out = subprocess.run(
            [sys.executable, "-c", f"from lazyfp8._demo import _load_child; _load_child({d!r})"],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    peak_above = r["after"]["VmHWM"] - r["before"]["VmRSS"] - r["params"]
    print(f"wrote an FP8 checkpoint of {disk / mib:.0f} MiB ({r['n']} tensors) for a {r['params'] / mib:.0f} MiB bf16 model")
    print(f"loaded it into a meta-device model in {r['seconds']:.2f} s ({r['params'] / r['seconds'] / 1e9:.2f} GB/s of bf16)")
    print(f"peak memory above the model's parameters: {peak_above / mib:.1f} MiB")
    print(f"dequantization kernels: {r['kernels']}")
    return 0
