"""``lazyfp8 demo``, the README's first command: it runs, loads, and reports sane figures."""

import re
import subprocess
import sys


def test_demo_reports_a_bounded_load():
    r = subprocess.run([sys.executable, "-m", "lazyfp8", "demo"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert re.search(r"wrote an FP8 checkpoint of \d+ MiB \(32 tensors\)", out), out
    assert re.search(r"loaded it into a meta-device model in [\d.]+ s", out), out
    peak = float(re.search(r"peak memory above the model's parameters: ([\d.]+) MiB", out).group(1))
    assert peak < 64, out
    assert re.search(r"dequantization kernels: (pure torch|compiled, (AVX-512 VBMI|NEON|NEON \(emulated\)|portable), ready in \d+ ms)", out), out
