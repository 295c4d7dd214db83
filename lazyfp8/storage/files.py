"""The trust boundary on the file system: which paths we open, and how we know a file is the one
we checked.

Everything lazyfp8 reads (shards, index, config) or copies (a converter's side files) goes through
here: only regular files (a FIFO or a device would block or stream forever), only inside the
directories the checkpoint may use (a link out of it is refused, however deep), and each file
pinned by its identity (device, inode, size, mtime) so that a file replaced after it was checked
is noticed instead of read with another file's offsets. This module reads no tensor data and
imports nothing of the package but the errors.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat

from ..errors import CheckpointError, MissingShardError, UnsafePathError

__all__ = [
    "FileIdentity",
    "allowed_roots",
    "check_name",
    "inside",
    "open_error",
    "open_regular",
    "read_regular",
]

_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


@dataclasses.dataclass(frozen=True)
class FileIdentity:
    """What tells one file from another that later takes its name."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def check_name(path: str, what: str, *, file: str | None = None, key: str | None = None) -> None:
    """Refuse a path no file system can hold (an embedded NUL, or a lone surrogate that has no
    bytes in the file system's encoding), naming where it came from."""
    if "\x00" in path:
        raise UnsafePathError(f"{file or path}: {what} {path!r} holds a NUL byte", file=file or path, key=key)
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        # JSON may spell "\ud800"; os.open would raise a bare UnicodeEncodeError on it.
        raise UnsafePathError(
            f"{file or path!r}: {what} {path!r} holds characters no file name can (a lone surrogate)",
            file=file or path,
            key=key,
        ) from None


def open_error(e: OSError, path: str, what: str, *, key: str | None = None) -> CheckpointError:
    """The checkpoint error to raise for ``e``, raised opening ``path`` (``what`` it should be)."""
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return MissingShardError(f"{path}: {what} does not exist", file=path, key=key)
    if e.errno == errno.ELOOP:
        return UnsafePathError(f"{path}: {what} is a link that loops (or is nested too deep)", file=path, key=key)
    return CheckpointError(f"{path}: cannot open {what}: {e.strerror or e}", file=path, key=key)


def open_regular(path: str, what: str, *, key: str | None = None) -> tuple[int, FileIdentity]:
    """Open ``path`` read-only and return ``(fd, identity)``; the caller closes ``fd``.

    Opened non-blocking, so a FIFO where a file should be cannot hang the open, then refused
    unless it is a regular file.

    Raises:
        UnsafePathError: ``path`` is not a regular file (a FIFO, socket, device or directory).
        OSError: it cannot be opened (``FileNotFoundError`` when absent).
    """
    check_name(path, what, key=key)
    fd = os.open(path, _FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(
                f"{path}: {what} is not a regular file (mode {stat.filemode(st.st_mode)}); "
                "lazyfp8 reads only regular files",
                file=path,
                key=key,
            )
        if _FLAGS & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, FileIdentity.of(st)


def read_regular(path: str, what: str, limit: int | None = None) -> bytes:
    """The whole content of regular file ``path`` (at most ``limit`` bytes read)."""
    fd, _ = open_regular(path, what)
    with os.fdopen(fd, "rb") as f:
        return f.read() if limit is None else f.read(limit)


def allowed_roots(root: str) -> list[str]:
    """Real directories the files of the checkpoint at ``root`` may resolve into.

    The checkpoint directory itself, and, for a Hugging Face cache snapshot
    (``models--org--name/snapshots/<rev>/``), the repository's ``blobs/`` directory: the cache
    stores every file there and links to it, so refusing those links would refuse every cached
    model.
    """
    roots = [os.path.realpath(root)]
    parent = os.path.dirname(os.path.abspath(root).rstrip(os.sep))
    if os.path.basename(parent) == "snapshots":
        blobs = os.path.join(os.path.dirname(parent), "blobs")
        if os.path.isdir(blobs):
            roots.append(os.path.realpath(blobs))
    return roots


def inside(path: str, roots: list[str]) -> bool:
    """Whether ``path``, with every link resolved, lies in one of ``roots``."""
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, r]) == r for r in roots)
