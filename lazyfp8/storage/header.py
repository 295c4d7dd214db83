"""Read and validate the header of one ``.safetensors`` file. No tensor data is read.

A safetensors file is an 8-byte little-endian header length, a JSON header, then the data.
We parse the header ourselves because we read tensor bytes by offset (``os.preadv`` into the
destination), which safetensors' ``safe_open`` does not expose; tests check that we agree with
``safe_open`` on every file the writer produces.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Any, BinaryIO

from ..errors import CorruptCheckpointError, UnsupportedDtypeError
from . import dtypes as _dtypes
from .files import FileIdentity, open_error, open_regular

__all__ = ["TensorEntry", "ShardHeader", "read_header", "parse_json", "MAX_HEADER_BYTES"]

# safetensors itself refuses headers above 100 MB; a larger length is a damaged file.
MAX_HEADER_BYTES = 100_000_000
_INT64 = 2**63


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in its file.

    Attributes:
        name: the on-disk key.
        dtype: the on-disk dtype (a row of the dtype table).
        shape: the on-disk shape.
        offset: absolute byte offset of the first element in the file.
        nbytes: byte length (``numel * itemsize``).
    """

    name: str
    dtype: _dtypes.DType
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class ShardHeader:
    """The parsed header of one file: its tensors (in header order) and ``__metadata__``.

    ``identity`` is the file the header was read from (device, inode, size, mtime): tensor bytes
    are read at this header's offsets only from that same, unchanged file.
    """

    path: str
    size: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    identity: FileIdentity


class _DuplicateKey(Exception):
    pass


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def parse_json(raw: bytes, path: str, what: str) -> Any:
    """Decode JSON, refusing duplicate object keys (``json`` would keep the last one silently).

    Raises:
        CorruptCheckpointError: naming ``path``, ``what`` was being read, and the problem.
    """
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as e:
        raise CorruptCheckpointError(
            f"{path}: {what} names {e.args[0]!r} twice", file=path, key=e.args[0]
        ) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: {what} is not valid JSON ({e})", file=path) from None
    except RecursionError:
        raise CorruptCheckpointError(f"{path}: {what} nests too deeply to be a safetensors header or index", file=path) from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: str | os.PathLike[str]) -> ShardHeader:
    """Parse and validate the header of ``path``.

    Checks: the header length fits in the file, the JSON is an object of well-formed entries
    with known dtypes, each entry's byte count equals ``numel * itemsize``, every tensor lies
    inside the file, and no two tensors overlap.

    Raises:
        CorruptCheckpointError: the file is truncated or its header is damaged.
        UnsupportedDtypeError: an entry has a dtype this package does not read.
        MissingShardError: the file does not exist (a ``FileNotFoundError`` too).
        UnsafePathError: it is not a regular file (a FIFO, device, directory) or a looping link.
        CheckpointError: it cannot be opened for another reason (permissions).
    """
    path = os.fspath(path)
    try:
        fd, identity = open_regular(path, "shard")
    except OSError as e:
        raise open_error(e, path, "shard") from e
    # A private descriptor, read front to back: a plain file object (no positional reads needed).
    with os.fdopen(fd, "rb") as f:
        raw = _read_header_bytes(f, path, identity.size)
    size = identity.size
    n = len(raw)
    header = parse_json(raw, path, "the header")
    if not isinstance(header, dict):
        raise CorruptCheckpointError(
            f"{path}: header must be a JSON object, found {type(header).__name__}", file=path
        )
    data_start = 8 + n
    data_size = size - data_start
    metadata = header.pop("__metadata__", None)
    if metadata is None:  # absent or null, as safetensors allows; 0 or [] are damage
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptCheckpointError(
            f"{path}: __metadata__ must map strings to strings", file=path, key="__metadata__"
        )
    tensors: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        entry = _parse_entry(path, name, info, data_start, data_size)
        tensors[name] = entry
        if entry.nbytes:
            spans.append((entry.offset, entry.offset + entry.nbytes, name))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CorruptCheckpointError(
                f"{path}: tensors {a!r} and {b!r} overlap in the file; the header is damaged",
                file=path,
                key=b,
            )
    return ShardHeader(path=path, size=size, tensors=tensors, metadata=dict(metadata), identity=identity)


def _read_header_bytes(f: BinaryIO, path: str, size: int) -> bytes:
    """The JSON header of the file ``f`` (at its start) of ``size`` bytes, its length checked.
    A buffered ``read(n)`` returns fewer than ``n`` bytes only at the end of the file."""
    prefix = f.read(8)
    if len(prefix) < 8:
        raise CorruptCheckpointError(
            f"{path}: file is {size} bytes, too short to hold the 8-byte header length; "
            "the file is truncated or not a safetensors file",
            file=path,
        )
    (n,) = struct.unpack("<Q", prefix)
    if n > size - 8:
        raise CorruptCheckpointError(
            f"{path}: header length {n} runs past the end of the {size}-byte file; "
            "the file is truncated or not a safetensors file",
            file=path,
        )
    if n > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(
            f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit of the format",
            file=path,
        )
    raw = f.read(n)
    if len(raw) < n:  # the file shrank after fstat
        raise CorruptCheckpointError(f"{path}: file ended inside its {n}-byte header; the file is truncated", file=path)
    return raw


def _parse_entry(path: str, name: str, info: Any, data_start: int, data_size: int) -> TensorEntry:
    def bad(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: tensor {name!r}: {what}", file=path, key=name)

    if not isinstance(info, dict):
        raise bad(f"header entry must be an object, found {type(info).__name__}")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(code, str):
        raise bad(f"'dtype' must be a string, found {code!r}")
    dtype = _dtypes.by_code(code)
    if dtype is None:
        raise UnsupportedDtypeError(
            f"{path}: tensor {name!r} has dtype {code!r}, which lazyfp8 does not read",
            file=path,
            key=name,
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"'shape' must be a list of non-negative integers, found {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(f"'data_offsets' must be [begin, end] with 0 <= begin <= end, found {offsets!r}")
    # torch indexes with int64: a dimension or a stride beyond it cannot be a tensor, even an empty one.
    if any(d >= _INT64 for d in shape) or math.prod(d for d in shape if d) >= _INT64:
        raise bad(f"'shape' {shape} is too large for any tensor")
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise bad(
            f"holds {end - begin} bytes but shape {shape} of {code} needs {expected}; "
            "the header is damaged"
        )
    if end > data_size:
        raise CorruptCheckpointError(
            f"{path}: tensor {name!r} ends at data byte {end} but the file holds only "
            f"{data_size} data bytes; the file is truncated (re-download it)",
            file=path,
            key=name,
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, end - begin)
