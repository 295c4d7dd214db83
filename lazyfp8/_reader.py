"""Positional reads of tensor bytes straight into caller-owned CPU tensors.

``os.preadv`` into the destination (or a small staging buffer) rather than an mmap: the page
cache then never counts toward the process's RSS, nothing stays mapped after a read, and reads
are safe from many threads on one descriptor.
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch

from .errors import CorruptCheckpointError

__all__ = ["ShardFile", "writable_bytes"]

_FADV_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)


def writable_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory. Keep ``t`` alive while it is used."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("writable_bytes needs a contiguous CPU tensor")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


class ShardFile:
    """One open shard. The descriptor opens on first read and closes with :meth:`close`."""

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._counter = threading.Lock()
        #: Bytes read from the file so far (tensor data and scales; headers are read elsewhere).
        self.bytes_read = 0

    def _descriptor(self) -> int:
        fd = self._fd
        if fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                fd = self._fd
        return fd

    def read_into(self, dst: torch.Tensor, offset: int, key: str) -> None:
        """Fill contiguous CPU tensor ``dst`` with ``dst.nbytes`` bytes from file ``offset``.

        Raises:
            CorruptCheckpointError: the file ended early (it shrank since its header was read).
        """
        view = writable_bytes(dst)
        fd = self._descriptor()
        done, total = 0, len(view)
        while done < total:
            # preadv may return short counts (Linux caps one call near 2 GiB); loop until done.
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise CorruptCheckpointError(
                    f"{self.path}: ended after {offset + done} bytes while reading {key!r}, "
                    f"which needs bytes up to {offset + total}; the file is truncated",
                    file=self.path,
                    key=key,
                )
            done += n
        with self._counter:
            self.bytes_read += total

    def will_need(self, offset: int, nbytes: int) -> None:
        """Ask the kernel to start reading ``[offset, offset + nbytes)`` in the background, so a
        cold-cache read overlaps with the dequantization of what is already in."""
        if _FADV_WILLNEED is not None and nbytes:
            try:
                os.posix_fadvise(self._descriptor(), offset, nbytes, _FADV_WILLNEED)
            except OSError:  # advice only: a filesystem that refuses it loses nothing
                pass

    def drop_cache(self) -> None:
        """Evict this file from the page cache (for cold-cache benchmarks)."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._descriptor(), 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may already be gone
            pass
