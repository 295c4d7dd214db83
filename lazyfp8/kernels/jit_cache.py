"""The on-disk cache of compiled kernels: machine code kept between processes, so only the first
process on a machine pays for code generation (~90 ms; a hit costs a few ms)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading

__all__ = ["ObjectCache", "cache_dir"]

log = logging.getLogger(__name__)


def cache_dir() -> str | None:
    """Where compiled objects are kept between processes: ``$LAZYFP8_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/lazyfp8``, else ``~/.cache/lazyfp8``; an empty ``LAZYFP8_CACHE_DIR`` turns
    the cache off."""
    path = os.environ.get("LAZYFP8_CACHE_DIR")
    if path is not None:
        return path or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lazyfp8")


def _private(st: os.stat_result) -> bool:
    """Owned by this user and not writable by anyone else: machine code from a file another
    user could have written would run as ours."""
    if not hasattr(os, "getuid"):  # no POSIX ownership to check
        return True
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


class ObjectCache:
    """MCJIT's object cache on disk, keyed by everything the machine code depends on: the IR, the
    host CPU and its features, and the LLVM build. A cache hit skips optimisation and code
    generation (80 ms -> a few ms); any I/O problem just means compiling again. Objects are only
    read from a directory and file of this user that nobody else can write."""

    def __init__(self, directory: str | None, key: str):
        self.path = os.path.join(directory, f"kernels-{key}.o") if directory else None

    def load(self) -> bytes | None:
        if self.path is None:
            return None
        try:
            with open(self.path, "rb") as f:
                if not (_private(os.fstat(f.fileno())) and _private(os.stat(os.path.dirname(self.path)))):
                    log.debug("lazyfp8: ignoring %s: not private to this user", self.path)
                    return None
                blob = f.read()
        except OSError:
            return None
        # A damaged object would be executed, not parsed: only take one whose digest matches.
        digest, data = blob[:32], blob[32:]
        return data if len(blob) > 32 and hashlib.sha256(data).digest() == digest else None

    def store(self, data: bytes) -> None:
        if self.path is None:
            return
        tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(hashlib.sha256(data).digest() + data)
            os.replace(tmp, self.path)  # readers see the whole object or none
        except OSError as e:
            log.debug("lazyfp8: could not cache compiled kernels in %s: %s", self.path, e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
