"""Small tools the tests share: reference dequantization and raw checkpoint writers."""

from __future__ import annotations

import json
import os
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


def write_index(directory: str, weight_map: dict) -> None:
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def raw_file(path: str, header: object, data: bytes = b"", *, header_bytes: bytes | None = None) -> str:
    """A safetensors file with an arbitrary header, for damaged-input tests."""
    hb = header_bytes if header_bytes is not None else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + data)
    return path
