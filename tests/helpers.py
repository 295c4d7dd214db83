"""Small tools the tests share: raw bits, raw file writers, a deadline, a view as a Dataset.

The writers here are **not checkpoint writers**: they put exactly the given tensors into exactly
the given files (``save``, ``write_sharded``, ``write_layout``), or arbitrary header bytes into
one (``raw_file``), for reader tests that need a layout ``lazyfp8.save`` would never produce: a
damaged header, a scale in another shard than its weight, an index over a single file, a shard
split chosen key by key. An ordinary checkpoint is written with
``lazyfp8.testing.write_checkpoint``, which goes through ``lazyfp8.save``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import struct

import torch
from safetensors.torch import save_file

from lazyfp8.testing import reference  # noqa: F401  (re-exported for the tests)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so NaNs compare equal when their payloads are equal."""
    t = t.contiguous()
    if t.dtype.itemsize == 1:
        return t.view(torch.uint8)
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.dtype.itemsize])


def save(tensors: dict[str, torch.Tensor], path: str) -> str:
    """``tensors`` as one ``.safetensors`` file at ``path`` (made contiguous, nothing else)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def write_sharded(directory: str, shards: dict[str, dict[str, torch.Tensor]], config: dict | None = None) -> str:
    """Write ``{file name: tensors}`` and an index naming them."""
    os.makedirs(directory, exist_ok=True)
    weight_map = {}
    for fname, tensors in shards.items():
        save(tensors, os.path.join(directory, fname))
        weight_map.update({k: fname for k in tensors})
    write_index(directory, weight_map)
    if config is not None:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f)
    return directory


def write_layout(
    directory: str,
    tensors: dict[str, torch.Tensor],
    config: dict | None = None,
    *,
    shards: int = 1,
    scales_apart: bool = False,
    scale_pattern: str = r"_scale(_inv)?$",
) -> str:
    """``tensors`` split in key order into ``shards`` files ``model-0000i-of-0000n.safetensors``
    with a ``model.safetensors.index.json``, even for one file (torch's DCP reader needs one);
    with ``scales_apart`` every key matching ``scale_pattern`` goes to one extra, last file, so no
    scale shares a file with its weight."""
    keys = list(tensors)
    scale_keys = [k for k in keys if scales_apart and re.search(scale_pattern, k)]
    rest = [k for k in keys if k not in set(scale_keys)]
    per = max(1, math.ceil(len(rest) / shards))
    groups = [rest[i : i + per] for i in range(0, len(rest), per)]
    if scale_keys:
        groups.append(scale_keys)
    files = {
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": {k: tensors[k] for k in group}
        for i, group in enumerate(groups)
    }
    return write_sharded(directory, files, config)


def write_index(directory: str, weight_map: dict) -> None:
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def raw_file(path: str, header: object, data: bytes = b"", *, header_bytes: bytes | None = None) -> str:
    """A safetensors file with an arbitrary header, for damaged-input tests."""
    hb = header_bytes if header_bytes is not None else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + data)
    return path


@contextlib.contextmanager
def deadline(seconds: int, what: str = "the call hung"):
    """Raise TimeoutError in the main thread after ``seconds``: a hang fails the test instead of
    stalling the suite."""

    def expired(*_):
        raise TimeoutError(what)

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class ViewDataset(torch.utils.data.Dataset):
    """Item ``i``: the name and values of the ``i``-th key of a view (sorted), read in whichever
    process asks (a DataLoader worker, forked or spawned)."""

    def __init__(self, view):
        self.view = view
        self.keys = sorted(view)

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return self.keys[i], self.view.get_tensor(self.keys[i])
