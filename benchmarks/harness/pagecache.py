"""The page cache: warm it (:func:`warm_page_cache`, read every file once from the parent, so
each case starts with the checkpoint cached), read files on purpose (:func:`read_files`, timed),
evict them (:func:`drop_page_cache`, :func:`fadvise`) and count what is resident
(:func:`resident_bytes`, ``mincore`` as ``fincore`` does). Standard library only."""

from __future__ import annotations

import os
from collections.abc import Iterable

from .measure import MiB


def warm_page_cache(paths: Iterable[str], chunk: int = 16 * MiB) -> int:
    """Read every file once so that each case starts with the checkpoint in the page cache
    (the fair state to compare in: a cold cache measures the disk, not the loader). The reads
    go into one reused buffer in this (parent) process and so never count toward a case."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def drop_page_cache(paths: Iterable[str]) -> None:
    """Evict ``paths`` from the page cache: ``os.sync()`` (dirty pages cannot be dropped), then
    ``posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`` on each file. Advice: a filesystem may
    keep pages anyway, so check with :func:`resident_bytes`."""
    os.sync()
    fadvise(paths, os.POSIX_FADV_DONTNEED)


def fadvise(paths: Iterable[str], advice: int) -> None:
    """``posix_fadvise(fd, 0, 0, advice)`` on each whole file (``os.POSIX_FADV_*``)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, advice)
        finally:
            os.close(fd)


def resident_bytes(paths: Iterable[str]) -> int | None:
    """Bytes of ``paths`` in the page cache right now (``mincore(2)`` over a shared read-only
    map of each file, as util-linux's ``fincore`` does), or ``None`` where that is unavailable.
    The map is never touched, so this reads nothing into the cache."""
    import ctypes
    import ctypes.util
    import mmap

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    total = 0
    for path in paths:
        size = os.path.getsize(path)
        if not size:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                total += sum(b & 1 for b in bytes(vec)) * page
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    return total


def read_files(paths: Iterable[str], chunk: int = 16 * MiB) -> int:
    """Read every file sequentially into one reused buffer (``cat files > /dev/null``); returns
    the bytes read. Unlike :func:`warm_page_cache` it is meant to be timed."""
    return warm_page_cache(paths, chunk)
