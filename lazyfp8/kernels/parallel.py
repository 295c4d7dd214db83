"""A small shared thread pool for chunk work. torch ops and ``preadv`` release the GIL, so
chunks of one tensor dequantize on several cores at once; each worker brings its own buffers."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["default_threads", "run_split"]

T = TypeVar("T")

# One pool for the process, never shut down (a reader may hold it at any time). Its threads
# start on demand, so the cap costs nothing until that many workers are asked for at once.
_MAX_WORKERS = 64
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A forked child has none of the pool's threads, but the executor object still counts them as
    # idle and would queue work for them forever (os.fork, DataLoader and multiprocessing "fork"
    # workers). The lock may have been held by a thread that does not exist here. Start afresh.
    # (torch's own OpenMP pool is not ours to reset: parallel torch ops on the thread that forked
    # hang in the child whatever lazyfp8 does; torch.utils.data workers set one thread for that.)
    global _pool, _lock
    _pool = None
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which cannot fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def default_threads() -> int:
    """Workers per tensor: the CPUs this process may use, at most 4 (beyond that a load is bound
    by memory bandwidth, not by arithmetic)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 4))


def _get_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=_MAX_WORKERS, thread_name_prefix="lazyfp8")
        return _pool


def run_split(items: Sequence[T], workers: int, work: Callable[[Sequence[T]], None]) -> None:
    """Run ``work`` on ``workers`` interleaved slices of ``items`` (slice ``i`` holds items
    ``i, i + workers, ...``), one slice on the calling thread; re-raise the first error."""
    workers = max(1, min(workers, len(items), _MAX_WORKERS))
    if workers == 1:
        work(items)
        return
    slices = [items[i::workers] for i in range(workers)]
    pool = _get_pool()
    futures = [pool.submit(work, s) for s in slices[1:]]
    try:
        work(slices[0])
    finally:
        errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e
