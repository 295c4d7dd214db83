"""What a run reports: the markdown table, the environment stored beside the numbers, the
aggregation of repeated runs (best time, largest peak, disturbed runs), the memory bound of a
lazyfp8 load (largest stored tensor + 64 MiB) and its verdicts, ratios between cases, and the
lines on errors and failures. Pure functions of the results (no torch at import)."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .measure import MiB, mib


def environment() -> dict[str, Any]:
    """Versions and machine facts to store beside results."""
    import safetensors
    import torch
    import transformers

    import lazyfp8

    return {
        "lazyfp8_path": os.path.dirname(lazyfp8.__file__),
        "git": git_revision(os.path.dirname(os.path.dirname(os.path.abspath(lazyfp8.__file__)))),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "lazyfp8": lazyfp8.__version__,
        "llvmlite": _version_of("llvmlite"),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
    }


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def git_revision(path: str) -> str | None:
    """``<commit>[+dirty]`` of the git checkout at ``path``, or ``None`` outside one."""
    try:
        rev = subprocess.run(
            ["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
        if rev.returncode:
            return None
        dirty = subprocess.run(
            ["git", "-C", path, "status", "--porcelain", "--", "lazyfp8"],
            capture_output=True,
            text=True,
            check=False,
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return None


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with ``columns`` given as ``(key, header)``; a missing value
    prints as an empty cell."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def aggregate_runs(runs: list[dict[str, Any]], time_keys: Sequence[str], peak_keys: Sequence[str] = ()) -> dict[str, Any]:
    """One row from repeated runs of a case (as bench_load does): the smallest value of each of
    ``time_keys`` (every disturbance on a shared machine only adds time), the values of
    ``baseline_rss``, ``vmhwm`` and ``peak_keys`` from the run with the largest
    ``vmhwm - baseline_rss``, the set of ``digest`` values, and ``disturbed_runs``: runs during
    which other processes used more CPU than 10% of the run's wall time. Raw runs under
    ``"runs"``, errors under ``"errors"``."""
    ok = [r for r in runs if "error" not in r]
    row = dict(ok[0] if ok else runs[-1])
    row["runs"] = runs
    row["errors"] = [r["error"] for r in runs if "error" in r]
    if not ok:
        return row
    for key in time_keys:
        vals = [r[key] for r in ok if r.get(key) is not None]
        row[key] = min(vals) if vals else None
    if all("vmhwm" in r and "baseline_rss" in r for r in ok):
        peak = max(ok, key=lambda r: r["vmhwm"] - r["baseline_rss"])
        for key in ("baseline_rss", "vmhwm", *peak_keys):
            row[key] = peak.get(key)
    row["digests"] = sorted({r["digest"] for r in ok if r.get("digest")})
    row["disturbed_runs"] = sum(r.get("others_cpu_s", 0) > 0.1 * r.get("process_s", 1) for r in ok)
    row["others_cpu_s"] = max(r.get("others_cpu_s", 0) for r in ok)
    return row


def short_error(error: str, limit: int = 400) -> str:
    """An error's first ``limit`` characters on one line."""
    one = " ".join(str(error).split())
    return one if len(one) <= limit else f"{one[:limit]}... ({len(one)} chars; full text in the JSON)"


def disturbance_note(rows: Sequence[Mapping[str, Any]], rerun: bool = False) -> str | None:
    """A sentence naming the cases some of whose runs other processes disturbed, or ``None``;
    with ``rerun``, it ends by advising a rerun on a quiet machine (bench_load's wording)."""
    busy = [f"{r['case']} ({r['disturbed_runs']}/{len(r['runs'])})" for r in rows if r.get("disturbed_runs")]
    if not busy:
        return None
    return (
        "Other processes used CPU for over 10% of the wall time of some runs of "
        f"{', '.join(busy)}: those timings are disturbed (others_cpu_s in the JSON); "
        "the best-of-N time is reported" + (", but rerun on a quiet machine to trust it." if rerun else ".")
    )


def disturbance_lines(rows: Sequence[Mapping[str, Any]], rerun: bool = False) -> list[str]:
    """:func:`disturbance_note` as a paragraph to add to a report's lines (none if ``None``)."""
    note = disturbance_note(rows, rerun)
    return ["\n" + note] if note else []


def kernels_line(rows: list[dict[str, Any]]) -> list[str]:
    """One report line on the compiled kernels the lazyfp8 cases loaded before their baseline."""
    for r in rows:
        info = (r.get("notes") or {}).get("kernels")
        if info and info["kernels"] == "off":
            return ["- lazyfp8 kernels: pure torch (LAZYFP8_JIT=0 or no llvmlite)", ""]
        if info:
            return [
                f"- lazyfp8 kernels: {info['kernels']}, loaded before the baseline in {info['seconds'] * 1000:.0f} ms "
                f"(+{info['rss_mib']:.0f} MiB RSS, mostly LLVM's code pages; once per process, any model size)",
                "",
            ]
    return []


def status_line(r: Mapping[str, Any], limit: int = 300) -> str:
    """One run's progress line: its error (first ``limit`` characters), or its load time (and
    warm time, where it has one) and the CPU time other processes used meanwhile."""
    if "error" in r:
        return short_error(r["error"], limit)
    extra = f", warm {r['warm_s']:.2f} s" if "warm_s" in r else ""
    return f"load {r['load_s']:.2f} s{extra} (others' CPU {r['others_cpu_s']:.1f} s)"


#: The memory bound of a lazyfp8 load: the largest tensor stored in the checkpoint + 64 MiB.
BOUND_SLACK = 64 * MiB


def load_bound(manifest: Mapping[str, Any]) -> int:
    """The bound for a checkpoint whose manifest records its ``largest_fp8_tensor``."""
    return manifest["largest_fp8_tensor"]["bytes"] + BOUND_SLACK


def peak_above_params(r: dict[str, Any], mib_key: str = "peak_above_params_mib") -> int:
    """Set ``peak_above_params`` (``VmHWM`` − baseline RSS − the model's bytes: what the load
    needed besides the parameters it filled) and its MiB under ``mib_key``; return it."""
    peak = r["vmhwm"] - r["baseline_rss"] - r["model_bytes"]
    r["peak_above_params"] = peak
    r[mib_key] = mib(peak)
    return peak


def add_ratios(
    r: dict[str, Any],
    by_case: Mapping[str, Mapping[str, Any]],
    refs: Iterable[tuple[str, str]],
    key: str = "total_s",
) -> None:
    """For each ``(case, column)`` of ``refs`` that ran: ``r[column] = r[key] / that case's``."""
    for ref, col in refs:
        other = by_case.get(ref)
        if other and other.get(key):
            r[col] = r[key] / other[key]


def largest_tensor_line(manifest: Mapping[str, Any]) -> str:
    """The report's line on the largest stored tensor and the bound it sets."""
    largest = manifest["largest_fp8_tensor"]
    return (
        f"- largest on-disk tensor: {largest['key']} ({largest['dtype']}), {mib(largest['bytes']):.1f} MiB; "
        f"bound = largest + 64 MiB = {mib(load_bound(manifest)):.1f} MiB"
    )


def bound_verdicts(
    rows: Iterable[Mapping[str, Any]],
    bound: int,
    cases: Iterable[str] | None = None,
    fails: str = "does not hold",
) -> list[str]:
    """A paragraph for each row (of ``cases``, in that order, if given) that has a
    ``peak_above_params``: its peak against the bound, and whether the bound holds."""
    if cases is not None:
        by_case = {r["case"]: r for r in rows}
        rows = [by_case[c] for c in cases if c in by_case]
    lines = []
    for r in rows:
        if "peak_above_params" in r:
            verdict = "holds" if r["peak_above_params"] <= bound else fails
            lines.append(
                f"\n{r['case']}: peak above params {mib(r['peak_above_params']):.1f} MiB vs bound "
                f"{mib(bound):.1f} MiB: the bound {verdict}."
            )
    return lines


def error_lines(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """A paragraph for each row some of whose runs failed: how many, and the first error."""
    return [
        f"\n{r['case']} failed in {len(r['errors'])}/{len(r['runs'])} run(s): {short_error(r['errors'][0])}"
        for r in rows
        if r.get("errors")
    ]


def load_failures(rows: Iterable[Mapping[str, Any]], lazy_cases: Iterable[str]) -> list[str]:
    """What makes a load benchmark fail: a lazyfp8 case that did not load, or any load with
    wrong bits."""
    lazy_cases = tuple(lazy_cases)
    out = []
    for r in rows:
        if r["case"] in lazy_cases and r.get("errors"):
            out.append(f"{r['case']} failed to load")
        if r.get("bit_exact") == "NO":
            out.append(f"{r['case']} loaded different bits than the reference")
    return out
