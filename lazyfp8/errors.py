"""Exceptions. Each subclasses the builtin a caller would already catch.

Every message names the file and the tensor involved and, where there is one, the fix.
"""

from __future__ import annotations

__all__ = [
    "LazyFP8Error",
    "CheckpointError",
    "CorruptCheckpointError",
    "ShardChangedError",
    "MissingShardError",
    "RepoNotCachedError",
    "UnsafePathError",
    "UnsupportedDtypeError",
    "MissingScaleError",
    "ScaleShapeError",
    "InvalidScaleError",
    "UnsupportedSchemeError",
    "KeyMappingError",
    "TensorNotFoundError",
    "SaveError",
]


def raise_or_collect(problems: "list[CheckpointError] | None", error: "CheckpointError") -> None:
    """Raise ``error``, or, when a caller collects every problem (``inspect``), append it."""
    if problems is None:
        raise error
    problems.append(error)


class LazyFP8Error(Exception):
    """Base class of every error lazyfp8 raises on purpose."""


class CheckpointError(LazyFP8Error, ValueError):
    """A checkpoint is not what it claims to be.

    Attributes:
        file: the file the problem is in (``None`` if it concerns the checkpoint as a whole).
        key: the tensor it concerns (``None`` if it concerns a whole file).
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        super().__init__(message)
        self.file = file
        self.key = key


class CorruptCheckpointError(CheckpointError):
    """A header, an index or a tensor's bytes are damaged or inconsistent (truncated file,
    bad JSON, offsets out of bounds or overlapping, wrong byte count)."""


class ShardChangedError(CorruptCheckpointError):
    """A shard was replaced, rewritten or truncated after its header was read: reading it at the
    header's offsets would return another file's bytes. Open a new view."""


class MissingShardError(CheckpointError, FileNotFoundError):
    """The index names a shard file that does not exist, or the path holds no checkpoint."""


class RepoNotCachedError(MissingShardError):
    """A Hugging Face Hub repo id whose files are not in the local Hub cache and may not be
    downloaded (``local_files_only=True``, ``HF_HUB_OFFLINE=1``) or cannot be (the Hub cannot be
    reached, or huggingface_hub is not installed). The message says how to fetch them.

    Attributes:
        repo_id: the repo id asked for.
        revision: the revision asked for (``None``: the default branch).
    """

    def __init__(
        self,
        message: str,
        *,
        repo_id: str,
        revision: str | None = None,
        file: str | None = None,
        key: str | None = None,
    ):
        super().__init__(message, file=file, key=key)
        self.repo_id = repo_id
        self.revision = revision


class UnsafePathError(CheckpointError):
    """The index names a shard outside the checkpoint directory (``..``, absolute, or a link)."""


class UnsupportedDtypeError(CheckpointError):
    """A tensor's dtype is one this package cannot read, or cannot use where it is found."""


class MissingScaleError(CheckpointError):
    """An FP8 tensor has no scale sibling; its raw bytes are never passed through."""


class ScaleShapeError(CheckpointError):
    """A scale's shape does not match any granularity for its weight's shape."""


class InvalidScaleError(CorruptCheckpointError):
    """A scale holds NaN, an infinity, zero or a negative value."""


class UnsupportedSchemeError(CheckpointError):
    """The checkpoint's quantization is not an FP8 scheme lazyfp8 reads, or its config is
    malformed; raised rather than reading packed or differently-scaled bytes as weights."""


class KeyMappingError(LazyFP8Error, ValueError):
    """A key mapping is unknown, malformed, or maps two keys to one name."""


class TensorNotFoundError(LazyFP8Error, KeyError):
    """A key that the view does not hold. A ``KeyError``, so ``Mapping`` semantics hold."""

    def __str__(self) -> str:
        # KeyError.__str__ shows repr(args[0]); a message reads better unquoted.
        return str(self.args[0]) if self.args else ""


class SaveError(LazyFP8Error, ValueError):
    """``save`` refuses what it was asked to write, or where, before touching the destination:
    the destination is the source, is not a directory, or holds files ``save`` would not own; a
    key safetensors cannot store; a value that is not a tensor with data.

    Attributes:
        path: the destination.
        key: the tensor concerned, or ``None``.
    """

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None):
        super().__init__(message)
        self.path = path
        self.key = key
