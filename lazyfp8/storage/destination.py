"""The destination directory of ``save``: what may be replaced there, and how to replace it so that
it loads as the old checkpoint, the new one, or nothing at every instant.

``save`` decides what to write; this module owns where and in which order: surveying the
destination (refusing what cannot be replaced safely), the lock, the private staging directory,
the commit order, and the clean-up of what killed writers left. It never reads the old index: the
files it may remove are found by listing the directory and matching our own names.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
from collections.abc import Iterator
from typing import IO

from ..errors import SaveError
from .checkpoint import CONFIG_NAME, INDEX_NAME, SINGLE_NAME

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["SINGLE_NAME", "Staging", "commit", "locked", "make_directory", "ours", "remove_dead_temporaries", "survey", "umask"]

# The file names save writes besides SINGLE_NAME, INDEX_NAME and CONFIG_NAME: huggingface_hub's
# planner names several shards ``model-00001-of-00003.safetensors``.
_SHARD_NAME = re.compile(r"model-\d{5,}-of-\d{5,}\.safetensors")
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)")
_STAGING = "lazyfp8"


def ours(name: str) -> bool:
    """Whether ``name`` is a checkpoint file save writes (and so may remove when overwriting)."""
    return name in (SINGLE_NAME, INDEX_NAME, CONFIG_NAME) or _SHARD_NAME.fullmatch(name) is not None


def survey(path: str, overwrite: bool) -> tuple[set[str], bool]:
    """(checkpoint files of ours in ``path`` but config.json, whether config.json is there),
    refusing a destination that cannot be overwritten safely."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise SaveError(f"{path} is a link to nothing; remove it or point it at a directory", path=path) from None
        return set(), False
    except OSError as e:
        raise SaveError(f"{path}: cannot use it as the destination: {e.strerror}", path=path) from None
    if not stat.S_ISDIR(st.st_mode):
        raise SaveError(f"{path} exists and is not a directory ({stat.filemode(st.st_mode)}); save writes a "
                        "directory: pass another path", path=path)
    if not os.access(path, os.W_OK | os.X_OK):
        raise SaveError(f"{path}: the directory is not writable", path=path)
    found, foreign = set(), []
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if ours(name):
            if stat.S_ISDIR(os.lstat(p).st_mode):
                raise SaveError(f"{p} is a directory where save writes a file; remove it", path=path)
            found.add(name)
        elif name.endswith(".safetensors"):
            foreign.append(name)
    config = CONFIG_NAME in found
    found.discard(CONFIG_NAME)
    if (found or foreign) and not overwrite:
        shown = ", ".join(sorted(found | set(foreign))[:3])
        raise FileExistsError(f"{path} already holds a checkpoint ({shown}); pass overwrite=True")
    if foreign:
        # A reader takes a lone *.safetensors file for a checkpoint: once the old files are gone
        # and before the new ones are in, the destination would load as that file.
        raise SaveError(
            f"{path} holds {', '.join(sorted(foreign)[:3])}, which save did not write and will not "
            "remove; with it there the destination cannot be replaced atomically: move it away or "
            "write to another directory",
            path=path,
        )
    return found, config


def make_directory(path: str) -> None:
    if os.path.isdir(path):
        return
    try:
        os.makedirs(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise SaveError(f"{path} exists and is not a directory", path=path) from None
        return
    except OSError as e:
        raise SaveError(f"{path}: cannot create the destination directory: {e.strerror}", path=path) from None
    # A umask that leaves the owner no write access would make the directory just created
    # unusable to the save that created it (mkdir -p gives its parents u+wx for the same reason).
    mode = os.stat(path).st_mode
    if mode & 0o700 != 0o700:
        os.chmod(path, stat.S_IMODE(mode) | 0o700)


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """Hold an exclusive lock on the destination directory: two saves into one directory
    would interleave their renames into a mix. Where the file system has no locks (some network
    file systems), saves are not serialized."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SaveError(f"{path}: another save is writing there; wait for it to finish", path=path) from None
            except OSError:
                pass
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_dead_temporaries(path: str) -> None:
    """Remove what writers that were killed (their process is gone) left in ``path``: their
    staging directories ``.lazyfp8.tmp-<pid>``, and the ``.<name>.tmp-<pid>`` files that earlier
    versions wrote for our own file names. Anything else that merely looks like a temporary is a
    user's and stays."""
    for entry in os.listdir(path):
        m = _TEMPORARY.fullmatch(entry)
        if m is None or not (m["name"] == _STAGING or ours(m["name"])):
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and _alive(pid):
            continue  # another writer is at work here
        p = os.path.join(path, entry)
        if m["name"] == _STAGING and stat.S_ISDIR(os.lstat(p).st_mode):
            shutil.rmtree(p, ignore_errors=True)  # removes links inside, never follows them
        else:
            _remove(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False  # no process has that pid
    return True


def _remove(p: str) -> None:
    """Remove a file or a link (never what it points to); a directory is left alone."""
    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
        os.remove(p)


class Staging:
    """A private directory ``.lazyfp8.tmp-<pid>`` in the destination where every new file is
    written under its final name, to be moved into the destination by :func:`commit`.

    A directory rather than ``.<name>.tmp-<pid>`` files beside the checkpoint: safetensors
    itself writes through a randomly named temporary in the directory of the target, which a
    killed writer would leave behind with no name to tell whose it is. Inside the staging
    directory it goes with everything else."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, f".{_STAGING}.tmp-{os.getpid()}")
        if os.path.lexists(self.path):  # left by an earlier save of this process that was interrupted
            self.discard()
        os.mkdir(self.path, 0o700)
        os.chmod(self.path, 0o700)  # whatever the umask: we must write into it

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write(self, name: str, data: str | IO[bytes]) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        with os.fdopen(os.open(self.file(name), flags, 0o600), "wb") as f:
            if isinstance(data, str):
                f.write(data.encode("utf-8"))
            else:
                shutil.copyfileobj(data, f)
            os.fchmod(f.fileno(), 0o666 & ~umask())

    def discard(self) -> None:
        if os.path.islink(self.path):
            _remove(self.path)
        else:
            shutil.rmtree(self.path, ignore_errors=True)


def commit(path: str, staging: Staging, new: list[str], old: set[str], drop_config: bool) -> None:
    """Replace the old checkpoint in ``path`` by the new files ``new``, already written in
    ``staging``; the last of ``new`` is the file that makes ``path`` loadable.

    Claim: at every instant between two of these calls, ``path`` loads as the old checkpoint,
    the new one, or not at all, whether a reader prefers ``model.safetensors`` over the index
    (transformers) or the index over ``model.safetensors``. A reader loads ``path`` through
    exactly one of: ``model.safetensors``; the index; a lone ``*.safetensors`` file that is not
    shard i of n > 1 (``survey`` refused every name but ours, so this is ``model.safetensors``
    again). config.json is read with whichever loads, and decides how its shards are read.

    1. Disable the old checkpoint, entry points first. The index goes first: a reader that
       prefers the index then falls to model.safetensors, which is still the old one; then
       model.safetensors: with both entry points gone, what is left is old shards, two or more or
       one that is i-of-n > 1, which every reader refuses; then the old shards one by one (still
       refused); then the old config.json, if no new one replaces it. Up to here the old
       checkpoint loads whole (old shards + old config) or nothing does.
    2. Put in place everything that does not make ``path`` loadable: config.json (a new config
       beside no loadable shards loads nothing), the extra files, then every shard but
       ``loadable`` (new shards with no index: refused, as above).
    3. Last, ``loadable``: the index of the new shards or the single model.safetensors. The
       moment it appears, everything it reads is new.

    ``os.replace`` and ``os.remove`` are atomic on one file system; a process killed between
    them leaves the staging directory (removed by the next save) and one of the three states.
    """
    entry_first = sorted(old, key=lambda n: (n != INDEX_NAME, n != SINGLE_NAME, n))
    for name in entry_first:
        _remove(os.path.join(path, name))
    if drop_config:
        _remove(os.path.join(path, CONFIG_NAME))
    for name in new:
        os.replace(staging.file(name), os.path.join(path, name))


def umask() -> int:
    # /proc tells without changing it; os.umask() can only be read by setting it, which would
    # race with other threads creating files.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
