"""The benchmarks in quick mode, so their code never rots. No timing or memory assertion here:
the numbers live in benchmarks/results and the README; this checks that each script runs end to
end, that every case loaded, and that every case that checks bits found them exact."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(
    f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.startswith("bench_") and f.endswith(".py")
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_runs(script, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result.get("mode") == "quick"
    rows = result.get("rows") or []
    assert rows, "the benchmark produced no rows"
    assert not [r for r in rows if r.get("bit_exact") is False], "a case returned wrong bits"
