"""One case per fresh interpreter: the parent starts ``script --case CASE --result FILE`` and
reads back the JSON the child wrote (:func:`run_case`; :func:`run_case_sampled` also samples the
child's ``VmRSS`` from outside), so every case starts from the same empty heap and its peak is its
own; :func:`run_repeated` runs every case N times, interleaved, each after a page-cache warm-up.
A crash or a timeout becomes a result with an ``error``: one failing case never hides the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .measure import busy_cpu_seconds, children_cpu_seconds
from .pagecache import warm_page_cache
from .reporting import status_line

# Children must never reach a hub: the machines have no network and a lookup would only stall.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def run_case(script: str, case: str, args: Sequence[str] = (), timeout: float = 900) -> dict[str, Any]:
    """Run ``script --case CASE --result FILE ARGS`` in a fresh interpreter and return the JSON
    it wrote to FILE. A crash or a timeout becomes ``{"case", "error"}`` with the stderr tail, so
    one failing case never hides the others' results.

    Also records ``others_cpu_s``: CPU seconds the rest of the machine used while the case ran
    (machine busy time minus the child's own), so a timing disturbed by another process on the
    same two cores can be recognized instead of trusted.
    """
    with tempfile.TemporaryDirectory(prefix="lazyfp8-case-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, script, "--case", case, "--result", result_path, *args]
        env = dict(os.environ, **OFFLINE_ENV)
        busy0, child0, t0 = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        except subprocess.TimeoutExpired:
            return {"case": case, "error": f"timed out after {timeout} s"}
        others = (busy_cpu_seconds() - busy0) - (children_cpu_seconds() - child0)
        result = _child_result(result_path, case, proc.returncode, proc.stderr, proc.stdout)
        result["process_s"] = time.perf_counter() - t0
        result["others_cpu_s"] = max(others, 0.0)
        return result


def _child_result(
    result_path: str, case: str, returncode: int | None, stderr: str, stdout: str = ""
) -> dict[str, Any]:
    """What the child wrote to ``result_path``, or, where it wrote nothing (it crashed),
    ``{"case", "error"}`` with the exit code and the tail of its stderr (else of its stdout)."""
    if os.path.exists(result_path):
        with open(result_path) as f:
            result = json.load(f)
        result.setdefault("stderr_tail", _tail(stderr))
        return result
    err = _tail(stderr) or _tail(stdout)
    return {"case": case, "error": f"exit code {returncode}: {err}"}


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def write_result(path: str, result: Mapping[str, Any]) -> None:
    """Write a child's result (the parent reads it back in :func:`run_case`)."""
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)


def run_case_sampled(
    script: str, case: str, args: Sequence[str] = (), interval: float = 0.005, timeout: float = 900
) -> dict[str, Any]:
    """:func:`run_case`, sampling the child's ``VmRSS`` from this (parent) process every
    ``interval`` seconds by reading ``/proc/<pid>/status``: the sampler cannot slow the child
    down or take its GIL. Adds ``samples``: ``[[time.monotonic(), vmrss_bytes], ...]`` (the
    monotonic clock is system-wide, so a child's own ``time.monotonic()`` marks line up)."""
    with tempfile.TemporaryDirectory(prefix="lazyfp8-case-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, script, "--case", case, "--result", result_path, *args]
        env = dict(os.environ, **OFFLINE_ENV)
        samples: list[list[float]] = []
        busy0, child0 = busy_cpu_seconds(), children_cpu_seconds()
        with open(os.path.join(tmp, "stderr"), "w+") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
            status = f"/proc/{proc.pid}/status"
            while proc.poll() is None:
                if time.perf_counter() - t0 > timeout:
                    proc.kill()
                    proc.wait()
                    return {"case": case, "error": f"timed out after {timeout} s"}
                try:
                    with open(status) as f:
                        for line in f:
                            if line.startswith("VmRSS:"):
                                samples.append([time.monotonic(), int(line.split()[1]) * 1024])
                                break
                except (OSError, ValueError):
                    pass
                time.sleep(interval)
            err.seek(0)
            stderr = err.read()
        # This process's own sampling loop is "others" too: a fraction of a core at 5 ms.
        others = (busy_cpu_seconds() - busy0) - (children_cpu_seconds() - child0)
        result = _child_result(result_path, case, proc.returncode, stderr)
        result["process_s"] = time.perf_counter() - t0
        result["others_cpu_s"] = max(others, 0.0)
        result["samples"] = samples
        return result


def run_repeated(
    script: str,
    cases: Sequence[str],
    repeat: int,
    child_args: Sequence[str] | Callable[[int, str], Sequence[str]],
    warm: Callable[[str], Iterable[str]],
    timeout: float,
    status: Callable[[dict[str, Any]], str] = status_line,
    label: str = "",
    before: Callable[[str], None] | None = None,
    after: Callable[[str], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every case ``repeat`` times, interleaved (run 1 of each case, then run 2...), each in a
    fresh interpreter (:func:`run_case`) with the files ``warm(case)`` read just before it (a
    warm page cache). ``child_args`` (or ``child_args(run_index, case)``) go to the child;
    ``before(case)`` runs after the warm-up and ``after(case)`` after the run. Prints one line a
    run; returns the runs of each case."""
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    for i in range(repeat):
        for case in cases:
            warm_page_cache(warm(case))
            if before is not None:
                before(case)
            args = child_args(i, case) if callable(child_args) else child_args
            r = run_case(script, case, args, timeout=timeout)
            if after is not None:
                after(case)
            print(f"  {label}run {i + 1}/{repeat} {case}: {status(r)}", flush=True)
            runs[case].append(r)
    return runs
