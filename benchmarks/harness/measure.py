"""Measuring a process from inside and the machine around it: the memory lines of
``/proc/<pid>/status`` (:func:`proc_status`, :class:`MemoryProbe` around the measured work, with
``VmHWM`` reset at the baseline), wall and CPU laps (:class:`Stopwatch`), the CPU time the whole
machine and this process's children used (to tell a disturbed timing), ``/proc/meminfo`` and the
load average. Standard library only."""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Iterator

MiB = 1 << 20


_STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The memory lines of ``/proc/<pid>/status`` in bytes: VmHWM (peak RSS since start),
    VmRSS, and its split into RssAnon (heap), RssFile (mapped file pages) and RssShmem."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in _STATUS_FIELDS:
                value, unit = rest.split()
                assert unit == "kB", line  # the kernel always reports these in kB
                out[name] = int(value) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0: write ``5`` to
    ``/proc/self/clear_refs``). Returns whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Reads the baseline just before the measured work and everything else just after it.

    ``VmHWM`` is a high-water mark over the process's whole life, so the probe resets it when
    it takes the baseline: a transient peak during the imports (unpickling, library loading)
    then cannot pass for the load's. Where the reset is not allowed, the peak still counts
    from process start (``hwm_reset`` says which).
    """

    def __init__(self) -> None:
        self.hwm_reset = reset_peak_rss()
        self.baseline = proc_status()
        self.end: dict[str, int] | None = None

    def stop(self) -> dict[str, int]:
        """Read the end state (call before anything that may allocate, e.g. hashing)."""
        self.end = proc_status()
        return self.end

    def report(self) -> dict[str, int]:
        """Baseline RSS, peak and end breakdown, in bytes."""
        end = self.end if self.end is not None else self.stop()
        return {
            "baseline_rss": self.baseline["VmRSS"],
            "vmhwm": end["VmHWM"],
            "vmrss_end": end["VmRSS"],
            "rss_anon_end": end.get("RssAnon", 0),
            "rss_file_end": end.get("RssFile", 0),
            "hwm_reset": self.hwm_reset,
        }


class Stopwatch:
    """Named laps: ``with watch.lap("load"): ...`` records wall seconds in ``laps[name]`` and
    this process's CPU seconds (all threads) in ``cpu[name]``. CPU time tells a loader that
    uses both cores from one that waits, and is less disturbed by other processes."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def lap(self, name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.laps[name] = self.laps.get(name, 0.0) + time.perf_counter() - t0
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent not idle since boot (from ``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal_and_guest = sum(fields[7:])  # steal, guest, guest_nice: not this machine's work
    return (sum(fields) - idle - steal_and_guest) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User+system seconds of this process's finished children."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def mib(n: float | None) -> float | None:
    """Bytes -> MiB (``None`` stays ``None``)."""
    return None if n is None else n / MiB


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes (``Cached``, ``Dirty``, ``MemAvailable``...)."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[name] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages (``/proc/loadavg``)."""
    with open("/proc/loadavg") as f:
        a, b, c = f.read().split()[:3]
    return float(a), float(b), float(c)
