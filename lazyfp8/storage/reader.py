"""Positional reads of tensor bytes straight into caller-owned CPU tensors.

``os.preadv`` into the destination (or a small staging buffer) rather than an mmap: the page
cache then never counts toward the process's RSS, nothing stays mapped after a read, and reads
are safe from many threads on one descriptor.

Two guarantees on top of that:

- **The bytes come from the file whose header was read.** Each :class:`ShardFile` carries the
  identity (device, inode, size, mtime) its header was read from. A descriptor is compared with
  it whenever it is (re)opened, and once per tensor read (:meth:`ShardFile.check`, one
  ``fstat``); a file replaced, rewritten, truncated or swapped for a link raises
  :class:`~lazyfp8.errors.ShardChangedError` instead of returning another file's bytes at the
  old offsets. A file renamed over while our descriptor is open is still read consistently
  from the old inode; only a reopen sees the new one, and refuses it.
- **A bounded number of descriptors.** Descriptors live in one process-wide LRU sized from
  ``RLIMIT_NOFILE`` (:func:`default_capacity`), so a checkpoint of any number of shards reads
  under any descriptor limit. A descriptor in use by a reader is never closed (its number could
  be reused for another file mid-read); it is closed when its last reader lets go.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import stat
import threading

import torch

from ..errors import CheckpointError, ShardChangedError
from .files import FileIdentity, open_regular

__all__ = ["ShardFile", "default_capacity", "writable_bytes"]

_FADV_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)


# Positional reads straight into the destination: os.preadv where the platform has it (Linux,
# the BSDs, macOS 11+). Elsewhere os.pread (bytes, then one copy into the destination, at most
# _FALLBACK_STEP at a time), and where even that is missing (Windows), a seek and a read under a
# lock per descriptor table, as positions are shared.
_FALLBACK_STEP = 1 << 24
_seek_lock = threading.Lock()


def _preadv(fd: int, buf: memoryview, offset: int) -> int:
    return os.preadv(fd, [buf], offset)


def _pread(fd: int, buf: memoryview, offset: int) -> int:
    data = os.pread(fd, min(len(buf), _FALLBACK_STEP), offset)
    buf[: len(data)] = data
    return len(data)


def _seek_read(fd: int, buf: memoryview, offset: int) -> int:
    with _seek_lock:
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, min(len(buf), _FALLBACK_STEP))
    buf[: len(data)] = data
    return len(data)


def choose_read_at(module: object = os):
    """The best positional read ``module`` (``os``) offers: ``read_at(fd, buf, offset) -> n``."""
    if hasattr(module, "preadv"):
        return _preadv
    if hasattr(module, "pread"):
        return _pread
    return _seek_read


_read_at = choose_read_at()


def writable_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory. Keep ``t`` alive while it is used."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("writable_bytes needs a contiguous CPU tensor")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def default_capacity() -> int:
    """Descriptors the LRU keeps open: a quarter of the soft ``RLIMIT_NOFILE`` (the rest is the
    application's: sockets, other files, torch's own), at most 128 and at least 4."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # not POSIX
        return 128
    if soft == getattr(resource, "RLIM_INFINITY", -1) or soft < 0:
        return 128
    return max(4, min(128, soft // 4))


class _Slot:
    """One open descriptor and how many reads are using it right now."""

    __slots__ = ("fd", "users", "dropped")

    def __init__(self, fd: int):
        self.fd = fd
        self.users = 1
        self.dropped = False  # its ShardFile closed while a read was using it: close when idle


class _Descriptors:
    """The process-wide LRU of open shard descriptors, keyed by each :class:`ShardFile`'s token
    (not the object, so that a view dropped without ``close`` is still garbage-collected)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: collections.OrderedDict[object, _Slot] = collections.OrderedDict()
        self._dead: list[object] = []  # tokens of ShardFiles collected while the lock was held
        self.capacity = default_capacity()

    def acquire(self, shard: ShardFile, key: str) -> _Slot:
        """A descriptor of ``shard``, pinned open until :meth:`release`."""
        token = shard._token
        with self._lock:
            slot = self._open.get(token)
            if slot is not None:
                self._open.move_to_end(token)
                slot.users += 1
                return slot
        fd = shard._open_checked(key)  # syscalls outside the lock
        spare = None
        with self._lock:
            slot = self._open.get(token)
            if slot is not None:  # another thread opened it meanwhile: use theirs
                slot.users += 1
                self._open.move_to_end(token)
                spare = fd
            else:
                slot = self._open[token] = _Slot(fd)
                self._shrink(self.capacity)
        if spare is not None:
            os.close(spare)
        return slot

    def release(self, slot: _Slot, shard: ShardFile, nbytes: int) -> None:
        with self._lock:
            shard.bytes_read += nbytes  # counted here, under the lock this read takes anyway
            slot.users -= 1
            if slot.users == 0:
                if slot.dropped:
                    os.close(slot.fd)
                elif len(self._open) > self.capacity:  # over budget while others were busy
                    self._shrink(self.capacity)

    def drop(self, token: object, *, blocking: bool = True) -> None:
        """Close the descriptor of the ShardFile with ``token``, or have its last reader close
        it. Not ``blocking`` (from ``__del__``, which the garbage collector may run while this
        very thread holds the lock): if the lock is taken, leave it to the next open."""
        if not self._lock.acquire(blocking):
            self._dead.append(token)
            return
        try:
            self._drop(token)
        finally:
            self._lock.release()

    def _drop(self, token: object) -> None:
        slot = self._open.pop(token, None)
        if slot is None:
            return
        if slot.users == 0:
            os.close(slot.fd)
        else:
            slot.dropped = True

    def shrink(self, limit: int) -> None:
        with self._lock:
            self._shrink(limit)

    def _shrink(self, limit: int) -> None:
        """Close least recently used idle descriptors until at most ``limit`` are open (more stay
        open while more are in use)."""
        while self._dead:
            self._drop(self._dead.pop())
        if len(self._open) <= limit:
            return
        for token in [t for t, slot in self._open.items() if slot.users == 0]:
            os.close(self._open.pop(token).fd)
            if len(self._open) <= limit:
                return

    def __len__(self) -> int:
        return len(self._open)

    def after_fork_in_child(self) -> None:
        """A forked child inherits copies of the descriptors, but not the threads that were
        using them nor a usable lock: close the copies and start over; the child reopens (and
        re-checks) each file on its first read."""
        for slot in list(self._open.values()):
            try:
                os.close(slot.fd)
            except OSError:
                pass
        self._lock = threading.Lock()
        self._open = collections.OrderedDict()
        self._dead = []
        self.capacity = default_capacity()


_DESCRIPTORS = _Descriptors()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_DESCRIPTORS.after_fork_in_child)


class ShardFile:
    """One shard, read by offset. Its descriptor opens on demand (through the process-wide
    LRU) and closes with :meth:`close` or when the LRU needs room; reading again reopens it.

    Args:
        path: the file.
        identity: what the file was when its header was read; every descriptor opened is
            checked against it. ``None`` pins whatever the first open finds.
    """

    def __init__(self, path: str, identity: FileIdentity | None = None):
        self.path = path
        self.identity = identity
        #: Bytes read from the file so far (tensor data and scales; headers are read elsewhere).
        self.bytes_read = 0
        # The LRU's key for this object's descriptor: never the path (two views of one path may
        # have pinned different files).
        self._token = object()

    def __reduce__(self) -> tuple:
        # A descriptor does not cross processes: the copy reopens the path and checks it.
        return (ShardFile, (self.path, self.identity))

    def _changed(self, key: str, how: str) -> ShardChangedError:
        return ShardChangedError(
            f"{self.path}: reading {key!r}: the file changed since the view was opened ({how}); "
            "its header no longer describes it: open a new view on the current files",
            file=self.path,
            key=key,
        )

    def _open_checked(self, key: str) -> int:
        """Open the file and check it is the one whose header was read."""
        for attempt in range(2):
            try:
                fd, found = open_regular(self.path, "shard", key=key)
                break
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE) and attempt == 0:
                    _DESCRIPTORS.shrink(0)  # out of descriptors: give back every idle one, retry
                    continue
                raise self._changed(key, f"it can no longer be opened: {e.strerror or e}") from e
            except CheckpointError:  # no longer a regular file
                mode = _mode(self.path)
                raise self._changed(key, f"it is no longer a regular file: {mode}") from None
        if self.identity is None:
            self.identity = found
        elif found != self.identity:
            os.close(fd)
            raise self._changed(key, _differences(self.identity, found))
        return fd

    def check(self, key: str) -> None:
        """Raise :class:`ShardChangedError` if the file was rewritten in place since its header
        was read (its size or mtime differ). One ``fstat``: call it once per tensor read.

        Raises:
            ShardChangedError: naming the file and ``key``.
        """
        slot = _DESCRIPTORS.acquire(self, key)
        try:
            found = FileIdentity.of(os.fstat(slot.fd))
        finally:
            _DESCRIPTORS.release(slot, self, 0)
        if found != self.identity:
            raise self._changed(key, _differences(self.identity, found))

    def read_into(self, dst: torch.Tensor, offset: int, key: str) -> None:
        """Fill contiguous CPU tensor ``dst`` with ``dst.nbytes`` bytes from file ``offset``.

        Raises:
            ShardChangedError: the file ended early (it shrank since its header was read), or a
                reopened descriptor found another file.
        """
        view = writable_bytes(dst)
        done, total = 0, len(view)
        slot = _DESCRIPTORS.acquire(self, key)
        try:
            while done < total:
                # preadv may return short counts (Linux caps one call near 2 GiB); loop until done.
                n = _read_at(slot.fd, view[done:], offset + done)
                if n == 0:
                    raise self._changed(
                        key,
                        f"it was truncated: it ended after {offset + done} bytes, but {key!r} needs "
                        f"bytes up to {offset + total}",
                    )
                done += n
        finally:
            _DESCRIPTORS.release(slot, self, done)

    def will_need(self, offset: int, nbytes: int) -> None:
        """Ask the kernel to start reading ``[offset, offset + nbytes)`` in the background, so a
        cold-cache read overlaps with the dequantization of what is already in."""
        if _FADV_WILLNEED is not None and nbytes:
            slot = _DESCRIPTORS.acquire(self, "")
            try:
                os.posix_fadvise(slot.fd, offset, nbytes, _FADV_WILLNEED)
            except OSError:  # advice only: a filesystem that refuses it loses nothing
                pass
            finally:
                _DESCRIPTORS.release(slot, self, 0)

    def drop_cache(self) -> None:
        """Evict this file from the page cache (for cold-cache benchmarks)."""
        if hasattr(os, "posix_fadvise"):
            slot = _DESCRIPTORS.acquire(self, "")
            try:
                os.posix_fadvise(slot.fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                _DESCRIPTORS.release(slot, self, 0)

    def close(self) -> None:
        """Close the descriptor (after any read still using it). Reading again reopens it."""
        _DESCRIPTORS.drop(self._token)

    def __del__(self) -> None:
        try:
            _DESCRIPTORS.drop(self._token, blocking=False)
        except Exception:  # interpreter shutdown: os may already be gone
            pass


def _differences(was: FileIdentity, now: FileIdentity) -> str:
    if (was.device, was.inode) != (now.device, now.inode):
        return "another file now has its name"
    if now.size < was.size:
        return f"it was truncated: {was.size} bytes then, {now.size} now"
    if now.size != was.size:
        return f"it has grown: {was.size} bytes then, {now.size} now"
    return "it was modified in place: same size, another mtime"


def _mode(path: str) -> str:
    try:
        return stat.filemode(os.stat(path).st_mode)
    except OSError as e:
        return e.strerror or str(e)
