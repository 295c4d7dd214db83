"""Fuzzing the whole user path over damaged checkpoints.

A small valid sharded FP8 checkpoint (three shards, per-tensor and block scales, pass-through
bf16/f32 tensors, an index and a config.json) is written once with ``lazyfp8.save``. Each
example damages a copy of it in one way (or several), then runs what a user runs:
``LazyFP8View(path)``, ``get_tensor`` on every key, ``inspect_checkpoint(path)``.

The oracle, for every example:

* ``LazyFP8View(path)`` either builds, or raises a ``LazyFP8Error`` whose message names the file
  it blames (``error.file``) and, when it blames one tensor, that tensor's key (``error.key``).
  Where one damage alone makes the outcome certain (a truncated shard, a header length past the
  end, a moved tensor, a repeated key, an index entry for an absent shard or tensor, a scale of
  a non-float dtype), the error's type, file and key are checked too.
* When the view builds, each key's outcome is predicted by a plain reader written here (``json``
  and byte offsets, nothing from lazyfp8): the tensor must be bit-identical to what the damaged
  files say (``(w.float() * s.float()).to(bf16)`` for FP8 keys), or, exactly when the file's
  scale is NaN, infinite, zero or negative, ``get_tensor`` raises ``InvalidScaleError`` naming the
  file, the scale and the weight; a header entry no torch tensor can hold (an empty tensor with a
  dimension >= 2**63) must be refused with a ``CheckpointError``. So a wrong tensor is caught even
  where the damage changed bytes legitimately (a bf16 tensor whose data bytes were overwritten
  reads back the new bytes). The reader also checks that ``view.info`` names the shard the index
  names and the scale the config's convention names.
* Independently of that reader, every key whose header entry, index entry and data bytes (and
  those of its scale) the damage did not touch must read back bit-identical to the undamaged
  checkpoint: damage elsewhere in a file never changes it.
* ``inspect_checkpoint(path)`` never raises (see ``INSPECT_RAISES_ON_UNUSABLE_INDEX``), every
  problem line names a file, the view's error is among the problem lines, and a checkpoint the
  view accepts has no problems other than orphan scales.
* Nothing hangs: each example runs under a ``SIGALRM`` deadline.

Set ``LAZYFP8_FUZZ_REPORT=/path/report.json`` to get how many examples of each kind ran and
how they ended, e.g. ``HYPOTHESIS_PROFILE=dev LAZYFP8_FUZZ_REPORT=fuzz.json pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import signal
import struct
import tempfile
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lazyfp8
from lazyfp8 import (
    CheckpointError,
    CorruptCheckpointError,
    InvalidScaleError,
    LazyFP8Error,
    LazyFP8View,
    MissingScaleError,
    MissingShardError,
    PerBlock,
    UnsafePathError,
    UnsupportedDtypeError,
)
from lazyfp8.inspection import inspect_checkpoint
from tests.helpers import reference

# --- cases that once escaped as bugs, each with a deterministic test at the end of this file ----
FUZZ_DEEP_JSON_NESTING = True  # test_deeply_nested_json_is_a_corrupt_checkpoint
FUZZ_HUGE_DIMS_OF_EMPTY_TENSORS = True  # test_empty_tensor_with_a_dimension_torch_cannot_hold
INSPECT_RAISES_ON_UNUSABLE_INDEX = False  # test_inspect_reports_an_unusable_index_as_a_problem

# ci: 25 examples x 4 per kind; dev: 300 x 4. One example takes a few milliseconds.
EXAMPLES_PER_KIND = settings().max_examples * 4
PER_EXAMPLE_SECONDS = 20

INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
SHARDS = ("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors")
BLOCK = (16, 16)

# The dtype table of the format, written out again here so the oracle does not use lazyfp8's.
CODES = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E8M0": torch.float8_e8m0fnu, "BF16": torch.bfloat16,
    "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "C64": torch.complex64,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
}
FLOAT_SCALE_CODES = ("F32", "BF16", "F16", "F64")
NON_FLOAT_SCALE_CODES = ("I8", "I16", "I32", "I64", "U16", "U32", "U64", "BOOL", "C64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ")


# --- the checkpoint before damage ----------------------------------------------------------------
def _split(blob: bytes) -> tuple[object, bytes] | None:
    """(parsed header, data bytes) of a safetensors file, or None when it does not parse."""
    if len(blob) < 8:
        return None
    (n,) = struct.unpack_from("<Q", blob)
    if n > len(blob) - 8:
        return None
    try:
        header = json.loads(blob[8 : 8 + n])
    except (ValueError, RecursionError):
        return None
    return header, blob[8 + n :]


def _join(header: object | bytes, data: bytes) -> bytes:
    hb = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


@dataclasses.dataclass(frozen=True)
class Base:
    files: dict[str, bytes]
    location: dict[str, str]  # disk key -> shard
    spans: dict[str, tuple[int, int]]  # disk key -> data-relative [begin, end)
    scale_of: dict[str, str]  # FP8 weight -> its scale key
    exposed: list[str]
    values: dict[str, torch.Tensor]  # exposed key -> what the undamaged view reads


@functools.cache
def base() -> Base:
    """Three shards from two ``lazyfp8.save`` calls (per-tensor scales; 16x16 block scales),
    merged under one index, with a compressed-tensors config declaring both granularities."""
    g = torch.Generator().manual_seed(5)
    per_tensor = {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(24, 16, generator=g).bfloat16(),
        "model.layers.0.mlp.up_proj.bias": torch.randn(24, generator=g).bfloat16(),
        "model.norm.weight": torch.randn(16, generator=g),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(8, 8, generator=g),
    }
    block = {
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 40, generator=g).bfloat16(),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(40, 24, generator=g).bfloat16(),
    }
    tmp = tempfile.mkdtemp(prefix="lazyfp8-fuzz-base-")
    try:
        a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
        ra = lazyfp8.save(per_tensor, a, scheme="per-tensor", format="compressed-tensors", max_shard_size=600)
        rb = lazyfp8.save(block, b, scheme=PerBlock(BLOCK), format="compressed-tensors")
        assert len(ra.files) == 2 and len(rb.files) == 1
        files: dict[str, bytes] = {}
        rename = dict(zip([os.path.join(a, f) for f in ra.files] + [os.path.join(b, rb.files[0])], SHARDS))
        for src, name in rename.items():
            with open(src, "rb") as f:
                files[name] = f.read()
        with open(os.path.join(a, INDEX)) as f:
            weight_map = {k: rename[os.path.join(a, v)] for k, v in json.load(f)["weight_map"].items()}
        for k in list(block) + [k + "_scale" for k in block]:
            weight_map[k] = SHARDS[2]
        files[INDEX] = json.dumps({"metadata": {"total_size": ra.total_size + rb.total_size}, "weight_map": weight_map}, indent=2).encode()
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
        files[CONFIG] = json.dumps({
            "model_type": "fuzz",
            "quantization_config": {
                "quant_method": "compressed-tensors",
                "format": "float-quantized",
                "config_groups": {
                    "per_tensor": {"targets": ["Linear"], "weights": dict(weights, strategy="tensor")},
                    "block": {"targets": ["Linear"], "weights": dict(weights, strategy="block", block_structure=list(BLOCK))},
                },
            },
        }).encode()
        ck = os.path.join(tmp, "ck")
        _write(files, {}, ck)
        view = LazyFP8View(ck)
        values = {k: view.get_tensor(k) for k in view}
        spans = {}
        for name in SHARDS:
            header, _ = _split(files[name])
            spans.update({k: tuple(e["data_offsets"]) for k, e in header.items() if k != "__metadata__"})
        scale_of = {k: view.info(k).scale_key for k in view if view.info(k).scale_key}
        return Base(files, weight_map, spans, scale_of, list(view), values)
    finally:
        shutil.rmtree(tmp)


def _write(files: dict[str, bytes], links: dict[str, str], directory: str) -> None:
    os.makedirs(directory)
    for name, blob in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(blob)
    for name, target in links.items():
        os.symlink(target, os.path.join(directory, name))


# --- damage ------------------------------------------------------------------------------------
@dataclasses.dataclass(repr=False)
class Damaged:
    """A damaged copy, and what the damage may have touched (for the "untouched keys read back
    unchanged" check) and what must happen (when one damage alone makes it certain)."""

    files: dict[str, bytes]
    kinds: list[str]
    links: dict[str, str] = dataclasses.field(default_factory=dict)
    outside: dict[str, bytes] = dataclasses.field(default_factory=dict)  # files beside the checkpoint dir
    taint_all: bool = False
    taint_files: set[str] = dataclasses.field(default_factory=set)  # headers that may now say anything
    taint_ranges: dict[str, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)
    taint_keys: set[str] = dataclasses.field(default_factory=set)
    view_error: tuple[type, str | None, str | None] | None = None  # (type, file basename, key)
    tensor_error: dict[str, type] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def expect_view_error(self, exc: type, file: str | None = None, key: str | None = None) -> None:
        self.view_error = (exc, file, key)

    def clean(self, key: str) -> bool:
        b = base()
        for k in (key, b.scale_of.get(key)):
            if k is None:
                continue
            f = b.location[k]
            if self.taint_all or k in self.taint_keys or f in self.taint_files:
                return False
            lo, hi = b.spans[k]
            if any(a < hi and lo < z for a, z in self.taint_ranges.get(f, [])):
                return False
        return True

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return f"Damaged(kinds={self.kinds}, notes={self.notes})"


def _shards(d: Damaged) -> list[str]:
    return sorted(n for n in d.files if n.endswith(".safetensors"))


def _parsed_shards(d: Damaged) -> list[str]:
    out = []
    for n in _shards(d):
        p = _split(d.files[n])
        if p is not None and isinstance(p[0], dict) and any(
            isinstance(e, dict) and isinstance(e.get("data_offsets"), list) for k, e in p[0].items() if k != "__metadata__"
        ):
            out.append(n)
    return out


def _offsets(entry: object) -> tuple[int, int] | None:
    """An entry's ``data_offsets`` when they are still two integers, else None."""
    offs = entry.get("data_offsets") if isinstance(entry, dict) else None
    if isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs):
        return offs[0], offs[1]
    return None


def _entries(header: dict) -> list[str]:
    return [k for k, e in header.items() if k != "__metadata__" and isinstance(e, dict)]


def _index(d: Damaged, strict: bool = False) -> dict | None:
    """The index's JSON when it is an object with a weight_map object (``strict``: and names no
    key twice), else None."""

    def no_repeats(pairs):
        if strict and len({k for k, _ in pairs}) < len(pairs):
            raise ValueError("a key repeats")
        return dict(pairs)

    try:
        idx = json.loads(d.files.get(INDEX, b""), object_pairs_hook=no_repeats)
    except (ValueError, RecursionError):
        return None
    return idx if isinstance(idx, dict) and isinstance(idx.get("weight_map"), dict) else None


def _scales(d: Damaged) -> list[tuple[str, str]]:
    """(shard, scale key) for every scale entry still present in a parsed header."""
    out = []
    for n in _parsed_shards(d):
        header, _ = _split(d.files[n])
        out += [(n, k) for k in _entries(header) if k.endswith("_scale") and _offsets(header[k]) is not None]
    return out


# Values of the wrong type anywhere in a header or an index.
WEIRD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.one_of(st.integers(-3, 300), st.text(max_size=2)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-3, 3), max_size=2),
)


def truncate(draw, d: Damaged) -> None:
    name = draw(st.sampled_from(_shards(d) + ([INDEX] if INDEX in d.files else [])))
    blob = d.files[name]
    if not blob:
        return
    cut = draw(st.integers(0, len(blob) - 1))
    d.files[name] = blob[:cut]
    d.notes.append(f"truncated {name} to {cut} of {len(blob)} bytes")
    if name == INDEX:
        d.taint_all = True
        return
    n = struct.unpack_from("<Q", blob)[0] if len(blob) >= 8 else 0
    if cut < 8 + n:
        d.taint_files.add(name)
    else:
        d.taint_ranges.setdefault(name, []).append((cut - 8 - n, math.inf))
    # Every byte of a shard's data region belongs to a tensor: any cut leaves one short.
    d.expect_view_error(CorruptCheckpointError, name)


def header_bytes(draw, d: Damaged) -> None:
    shards = [n for n in _shards(d) if len(d.files[n]) >= 8]
    if not shards:
        return
    name = draw(st.sampled_from(shards))
    blob = bytearray(d.files[name])
    end = min(8 + struct.unpack_from("<Q", blob)[0], len(blob))
    edits = draw(st.lists(st.tuples(st.integers(0, end - 1), st.integers(0, 255)), min_size=1, max_size=8))
    for pos, value in edits:
        blob[pos] = value
    d.files[name] = bytes(blob)
    d.taint_files.add(name)
    d.notes.append(f"overwrote header bytes of {name}: {edits}")


def header_length(draw, d: Damaged) -> None:
    shards = [n for n in _shards(d) if len(d.files[n]) >= 8]
    if not shards:
        return
    name = draw(st.sampled_from(shards))
    blob = d.files[name]
    n = draw(st.one_of(st.integers(len(blob) - 7, len(blob) + 64), st.integers(len(blob) - 7, 2**64 - 1)))
    d.files[name] = struct.pack("<Q", n) + blob[8:]
    d.taint_files.add(name)
    d.notes.append(f"header length of {name} set to {n} (file is {len(blob)} bytes)")
    d.expect_view_error(CorruptCheckpointError, name)


def _bad_entry(draw, entry: dict) -> object:
    how = draw(st.sampled_from(["replace", "drop", "field", "shape", "wrap", "extra"] + (["huge"] if FUZZ_HUGE_DIMS_OF_EMPTY_TENSORS else [])))
    e = dict(entry)
    if how == "replace":
        return draw(WEIRD)
    if how == "drop":
        for f in draw(st.lists(st.sampled_from(["dtype", "shape", "data_offsets"]), min_size=1, unique=True)):
            e.pop(f, None)
    elif how == "field":
        e[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(WEIRD)
    elif how == "shape":
        shape = list(e.get("shape", []))
        bad = draw(st.one_of(st.integers(-(2**64), -1), st.integers(2**63, 2**80), st.floats(), st.booleans(), st.text(max_size=2), st.none()))
        shape.insert(draw(st.integers(0, len(shape))), bad)
        e["shape"] = shape
    elif how == "wrap":
        field = draw(st.sampled_from([None, "dtype", "shape", "data_offsets"]))
        if field is None:
            return {draw(st.text(max_size=3)): e}
        e[field] = [e.get(field)]
    elif how == "extra":
        e.update(draw(st.dictionaries(st.text(max_size=5).filter(lambda s: s not in e), WEIRD, min_size=1, max_size=3)))
    else:  # an empty tensor whose other dimensions no torch tensor can hold
        offs = e.get("data_offsets")
        begin = offs[0] if isinstance(offs, list) and offs and isinstance(offs[0], int) else 0
        e["shape"] = [0, draw(st.integers(2**63 - 1, 2**80))]
        e["data_offsets"] = [begin, begin]
    return e


def _nest(draw, text: bytes) -> bytes:
    depth = draw(st.integers(1, 100_000 if FUZZ_DEEP_JSON_NESTING and draw(st.booleans()) else 60))
    return b"[" * depth + text + b"]" * depth


def json_shape(draw, d: Damaged) -> None:
    targets = _parsed_shards(d) + ([INDEX] if _index(d) is not None else [])
    if not targets:
        return
    name = draw(st.sampled_from(targets))
    if name == INDEX:
        idx = _index(d)
        how = draw(st.sampled_from(["document", "nest", "weight_map", "value", "wrap", "drop", "metadata", "extra"]))
        text = None
        if how == "document":
            idx = draw(st.one_of(WEIRD, st.just(list(idx["weight_map"].items())), st.just([idx])))
        elif how == "nest":
            text = _nest(draw, json.dumps(idx).encode())
        elif how == "weight_map":
            idx["weight_map"] = draw(st.one_of(WEIRD, st.just(list(idx["weight_map"].items()))))
        elif how == "value":
            k = draw(st.sampled_from(sorted(idx["weight_map"])))
            idx["weight_map"][k] = draw(st.one_of(WEIRD, st.just([idx["weight_map"][k]]), st.just({"file": idx["weight_map"][k]})))
            d.notes.append(f"index value of {k!r} -> {idx['weight_map'][k]!r}")
        elif how == "wrap":
            idx["weight_map"] = {"weight_map": idx["weight_map"]}
        elif how == "drop":
            del idx["weight_map"]
        elif how == "metadata":  # harmless: lazyfp8 does not read it
            idx["metadata"] = draw(WEIRD)
        else:
            idx.update(draw(st.dictionaries(st.sampled_from(["format", "x", "extra"]), WEIRD, min_size=1)))
        d.files[INDEX] = text if text is not None else json.dumps(idx).encode()
        d.taint_all = True
        d.notes.append(f"index: {how}")
        return
    header, data = _split(d.files[name])
    how = draw(st.sampled_from(["entry", "entry", "entry", "document", "nest", "wrap", "metadata"]))
    text = None
    if how == "entry":
        k = draw(st.sampled_from(_entries(header)))
        header[k] = _bad_entry(draw, header[k])
        d.notes.append(f"{name}: entry {k!r} -> {header[k]!r}")
    elif how == "document":
        header = draw(st.one_of(WEIRD, st.just(list(header.values())), st.just([header])))
    elif how == "nest":
        text = _nest(draw, json.dumps(header).encode())
    elif how == "wrap":
        header = {"tensors": header}
    else:
        header["__metadata__"] = draw(st.one_of(WEIRD, st.dictionaries(st.text(max_size=3), WEIRD, max_size=2)))
    d.files[name] = _join(text if text is not None else header, data)
    d.taint_files.add(name)
    d.notes.append(f"{name}: {how}")


def index_absent(draw, d: Damaged) -> None:
    idx = _index(d)
    if idx is None:
        return
    wm = idx["weight_map"]
    present = _shards(d)
    changes = draw(st.lists(st.sampled_from(["absent_shard", "unsafe", "absent_tensor", "wrong_shard", "drop"]), min_size=1, max_size=3))
    for how in changes:
        k = draw(st.sampled_from(sorted(wm)))
        if how == "absent_shard":
            wm[k] = draw(st.sampled_from([
                "model-00009-of-00009.safetensors", "sub/model.safetensors", ".", INDEX, CONFIG, ".hidden.safetensors",
            ]))
            if len(changes) == 1 and wm[k] not in (INDEX, CONFIG):
                d.expect_view_error(MissingShardError, os.path.basename(wm[k]), k)
        elif how == "unsafe":
            choice = draw(st.sampled_from(["../" + SHARDS[0], "/" + SHARDS[0], "sub/../../x.safetensors", "link"]))
            if choice == "link":
                # a link inside the directory to a copy of a shard outside it
                target = draw(st.sampled_from(present)) if present else SHARDS[0]
                d.outside[target] = d.files.get(target, b"")
                d.links["linked.safetensors"] = os.path.join("..", "outside", target)
                choice = "linked.safetensors"
            wm[k] = choice
            if len(changes) == 1:
                d.expect_view_error(UnsafePathError, None, k)
        elif how == "absent_tensor":
            ghost = draw(st.sampled_from(["model.layers.9.mlp.up_proj.weight", "model.extra", k + ".x"]))
            wm[ghost] = draw(st.sampled_from(present)) if present else SHARDS[0]
            if len(changes) == 1 and present:
                d.expect_view_error(CorruptCheckpointError, wm[ghost], ghost)
            d.taint_keys.add(ghost)
        elif how == "wrong_shard":
            others = [s for s in present if s != wm[k]]
            if not others:
                continue
            wm[k] = draw(st.sampled_from(others))
            if len(changes) == 1:
                d.expect_view_error(CorruptCheckpointError, wm[k], k)
        else:
            del wm[k]
            if len(changes) == 1 and k.endswith("_scale"):
                weight = k[: -len("_scale")]
                d.expect_view_error(MissingScaleError, None, weight)
        d.taint_keys.add(k)
        d.notes.append(f"index: {how} {k!r} -> {wm.get(k)!r}")
    d.files[INDEX] = json.dumps(idx).encode()


def offsets(draw, d: Damaged) -> None:
    shards = _parsed_shards(d)
    if not shards:
        return
    name = draw(st.sampled_from(shards))
    header, data = _split(d.files[name])
    keys = [k for k in _entries(header) if _offsets(header[k]) is not None and _offsets(header[k])[0] < _offsets(header[k])[1]]
    if not keys:
        return
    k = draw(st.sampled_from(keys))
    b, e = _offsets(header[k])
    how = draw(st.sampled_from(["shift", "copy", "swap", "past_end", "anywhere"]))
    if how in ("copy", "swap") and len(keys) > 1:
        other = draw(st.sampled_from([x for x in keys if x != k]))
        if how == "swap":
            header[k]["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], [b, e]
        else:
            header[k]["data_offsets"] = list(header[other]["data_offsets"])
    elif how == "past_end":
        begin = draw(st.integers(max(len(data) - (e - b) + 1, 0), len(data) + 8))
        header[k]["data_offsets"] = [begin, begin + e - b]
    elif how == "anywhere":
        header[k]["data_offsets"] = sorted(draw(st.lists(st.integers(0, 2**64), min_size=2, max_size=2)))
    else:
        delta = draw(st.integers(-(e - b), e - b).filter(lambda x: x != 0))
        header[k]["data_offsets"] = [max(b + delta, 0), max(b + delta, 0) + e - b]
    d.files[name] = _join(header, data)
    d.taint_files.add(name)
    d.notes.append(f"{name}: {how} offsets of {k!r} {[b, e]} -> {header[k]['data_offsets']}")
    # The data region is packed: a tensor moved anywhere else overlaps another one, runs past
    # the end, or no longer holds its byte count. Only swapping two equal sizes stays valid.
    moved = header[k]["data_offsets"] != [b, e]
    if moved and not (how == "swap" and header[k]["data_offsets"][1] - header[k]["data_offsets"][0] == e - b):
        d.expect_view_error(CorruptCheckpointError, name)


def duplicates(draw, d: Damaged) -> None:
    shards = _parsed_shards(d)
    idx = _index(d)
    if len(shards) < 2 or idx is None:
        return
    how = draw(st.sampled_from(["other_shard", "other_shard_and_index", "index_twice", "header_twice"]))
    src = draw(st.sampled_from(shards))
    header, data = _split(d.files[src])
    keys = [k for k in _entries(header) if _offsets(header[k]) is not None and _offsets(header[k])[0] <= _offsets(header[k])[1]]
    if not keys:
        return
    k = draw(st.sampled_from(keys))
    entry = header[k]
    b, e = _offsets(entry)
    if how == "index_twice":
        # json.dumps cannot write a repeated key; splice one into the text.
        text = json.dumps(idx)
        dup = json.dumps({k: draw(st.sampled_from([idx["weight_map"].get(k, src)] + shards))})[1:-1]
        at = text.index('"weight_map": {') + len('"weight_map": {')
        d.files[INDEX] = (text[:at] + dup + ", " + text[at:]).encode()
        d.taint_all = True
        d.expect_view_error(CorruptCheckpointError, INDEX, k)
        d.notes.append(f"index names {k!r} twice")
        return
    if how == "header_twice":
        text = json.dumps(header, separators=(",", ":"))
        twin = json.dumps({k: entry}, separators=(",", ":"))[1:-1]
        d.files[src] = _join((text[:-1] + "," + twin + "}").encode(), data)
        d.taint_files.add(src)
        d.expect_view_error(CorruptCheckpointError, src, k)
        d.notes.append(f"{src} names {k!r} twice")
        return
    dst = draw(st.sampled_from([s for s in shards if s != src]))
    dh, dd = _split(d.files[dst])
    payload = draw(st.sampled_from(["same", "other"]))
    extra = data[b:e] if payload == "same" else bytes(draw(st.binary(min_size=e - b, max_size=e - b)))
    # appended after the last tensor: the other entries of dst keep their meaning
    dh[k] = dict(entry, data_offsets=[len(dd), len(dd) + len(extra)])
    d.files[dst] = _join(dh, dd + extra)
    d.notes.append(f"{k!r} of {src} also in {dst} ({payload} bytes)")
    if how == "other_shard_and_index":
        idx["weight_map"][k] = dst
        d.files[INDEX] = json.dumps(idx).encode()
        d.taint_keys.add(k)
        d.notes.append(f"index now names {dst} for {k!r}")


SCALE_VALUES = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, -1e-30, -3.4e38]),
    st.floats(max_value=0.0, width=32),  # zero, negative, -inf
    st.floats(min_value=2.0**-100, max_value=1e3, width=32),  # valid: the tensor legitimately changes
)


def scale_values(draw, d: Damaged) -> None:
    scales = [(n, k) for n, k in _scales(d) if _split(d.files[n])[0][k].get("dtype") == "F32"]
    if not scales:
        return
    name, k = draw(st.sampled_from(scales))
    header, data = _split(d.files[name])
    b, e = header[k]["data_offsets"]
    if not (isinstance(b, int) and isinstance(e, int) and 0 <= b and b + 4 <= min(e, len(data))):
        return  # moved out of the file by an earlier damage
    data = bytearray(data)
    edits = draw(st.lists(st.tuples(st.integers(0, (min(e, len(data)) - b) // 4 - 1), SCALE_VALUES), min_size=1, max_size=3))
    for i, v in edits:
        struct.pack_into("<f", data, b + 4 * i, v)
    d.files[name] = _join(header, bytes(data))
    d.taint_ranges.setdefault(name, []).append((b, e))
    if any(not (math.isfinite(v) and v > 0) for _, v in edits):
        # only the last write to an element counts
        final = dict(edits)
        if any(not (math.isfinite(v) and v > 0) for v in final.values()):
            d.tensor_error[k[: -len("_scale")]] = InvalidScaleError
    d.notes.append(f"{name}: scale {k!r} elements set {edits}")


def scale_dtype(draw, d: Damaged) -> None:
    scales = _scales(d)
    if not scales:
        return
    name, k = draw(st.sampled_from(scales))
    header, data = _split(d.files[name])
    e = header[k]
    old = CODES.get(e.get("dtype"))
    code = draw(st.sampled_from(NON_FLOAT_SCALE_CODES + FLOAT_SCALE_CODES + ("U8", "F8_E8M0")))
    b, end = e["data_offsets"]
    shape = e.get("shape")
    if not isinstance(shape, list) or not all(isinstance(x, int) for x in shape):
        return
    nbytes = math.prod(shape) * CODES[code].itemsize
    e["dtype"] = code
    e["data_offsets"] = [b, b + nbytes]
    d.files[name] = _join(header, data)
    d.taint_keys.add(k)
    d.notes.append(f"{name}: scale {k!r} dtype {old} -> {code}")
    if old is not None and nbytes > end - b:
        d.expect_view_error(CorruptCheckpointError, name)  # now overlaps the next tensor or runs past the end
    elif code in NON_FLOAT_SCALE_CODES:
        d.expect_view_error(UnsupportedDtypeError, name, k)


STRUCTURED = {
    "json_shape": json_shape,
    "index_absent": index_absent,
    "offsets": offsets,
    "duplicates": duplicates,
    "scale_values": scale_values,
    "scale_dtype": scale_dtype,
}
BYTES = {"header_bytes": header_bytes, "header_length": header_length, "truncate": truncate}
KINDS = {**STRUCTURED, **BYTES}


@st.composite
def damaged(draw, kinds: list[str] | None = None) -> Damaged:
    if kinds is None:  # combined: structured damage first, then byte-level damage on the result
        kinds = draw(st.lists(st.sampled_from(sorted(STRUCTURED)), min_size=1, max_size=3))
        kinds += draw(st.lists(st.sampled_from(sorted(BYTES)), max_size=1))
        if len(kinds) < 2:
            kinds.append(draw(st.sampled_from(sorted(KINDS))))
            kinds.sort(key=lambda k: k in BYTES)
    d = Damaged(files=dict(base().files), kinds=list(kinds))
    for kind in kinds:
        KINDS[kind](draw, d)
    if len(kinds) > 1:  # several damages: which one a reader meets first is not fixed
        d.view_error = None
        d.tensor_error = {}
    return d


# --- the oracle ----------------------------------------------------------------------------------
class Hang(BaseException):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    def ring(signum, frame):
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Unrepresentable(Exception):
    """A header entry that is valid for the format but that no torch tensor can hold."""


def plain_read(path: str, key: str) -> torch.Tensor:
    """A tensor as the file says it is, read with json and byte offsets only."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack_from("<Q", blob)
    e = json.loads(blob[8 : 8 + n])[key]
    begin, end = e["data_offsets"]
    dtype, shape = CODES[e["dtype"]], e["shape"]
    raw = blob[8 + n + begin : 8 + n + end]
    assert len(raw) == end - begin == math.prod(shape) * dtype.itemsize, (path, key, e)
    if not raw:
        try:
            return torch.empty(shape, dtype=dtype)
        except (TypeError, RuntimeError, OverflowError) as e:
            raise Unrepresentable(f"{key!r}: torch has no tensor of shape {shape}") from e
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaNs included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


FP8_WEIGHT_CODES = ("F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ")


def _code(path: str, key: str) -> str:
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8 : 8 + n])[key]["dtype"]


def predicted(view: LazyFP8View, root: str, weight_map: dict, key: str) -> torch.Tensor | type:
    """What ``get_tensor(key)`` must give according to the damaged files, or InvalidScaleError.

    Found from the index and the headers alone, as the format and the checkpoint's
    compressed-tensors config define it: the shard is the one the index names; an FP8 tensor's
    scale is ``<key>_scale``; one scale value is per-tensor, else a grid of 16x16 blocks. Then
    checks that the view says the same (``info``)."""
    info = view.info(key)
    file = os.path.join(root, weight_map[key])
    assert os.path.realpath(info.file) == os.path.realpath(file), (info, file)
    try:
        w = plain_read(file, key)
    except Unrepresentable:
        return CheckpointError  # get_tensor must refuse it, naming file and key
    if _code(file, key) not in FP8_WEIGHT_CODES:
        assert info.scale_key is None, info
        return w
    scale_key = key + "_scale"
    scale_file = os.path.join(root, weight_map[scale_key])
    assert (info.scale_key, os.path.realpath(info.scale_file)) == (scale_key, os.path.realpath(scale_file)), info
    s = plain_read(scale_file, scale_key)
    if s.dtype == torch.uint8:  # ue8m0 exponent bytes
        s = s.view(torch.float8_e8m0fnu)
    assert s.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e8m0fnu), info
    rows = math.prod(w.shape[:-1]) if w.dim() > 1 else 1
    cols = w.shape[-1] if w.dim() else 1
    if s.numel() == 1 and s.dim() <= 2:
        block = None
    else:
        grid = (-(-rows // BLOCK[0]), -(-cols // BLOCK[1]))
        assert tuple(s.shape) == grid, f"the view accepted scale {list(s.shape)} for {key!r} {list(w.shape)}"
        block = BLOCK
    s = s.to(torch.float32)
    if w.numel() == 0:
        return torch.empty(w.shape, dtype=view.dtype)
    if not bool((torch.isfinite(s) & (s > 0)).all()):
        return InvalidScaleError
    return reference(w, s, view.dtype, block)


def mentions(msg: str, name: str) -> bool:
    """``name`` appears in ``msg`` as is or as Python writes it (quoted, escaped)."""
    return name in msg or repr(name)[1:-1] in msg


def names(error: BaseException, key: str | None = None) -> None:
    """A lazyfp8 error that names its file and, when it concerns one tensor, that tensor."""
    assert isinstance(error, LazyFP8Error), f"{type(error).__name__} is not a LazyFP8Error: {error}"
    msg = str(error)
    if isinstance(error, CheckpointError):
        assert error.file is not None, f"no file on {type(error).__name__}: {msg}"
        assert mentions(msg, os.path.basename(error.file)), f"{msg!r} does not name {error.file}"
        if error.key is not None:
            assert mentions(msg, error.key), f"{msg!r} does not name {error.key!r}"
    if key is not None:
        assert mentions(msg, key), f"{msg!r} does not name {key!r}"


COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def _report():
    """Write the per-kind counts to $LAZYFP8_FUZZ_REPORT when this module is done."""
    started = time.monotonic()
    yield
    out = os.environ.get("LAZYFP8_FUZZ_REPORT")
    if not out or not COUNTS:
        return
    report = {
        "profile": os.environ.get("HYPOTHESIS_PROFILE", "ci"),
        "examples_per_kind_setting": EXAMPLES_PER_KIND,
        "seconds": round(time.monotonic() - started, 1),
        "total_cases": sum(c["cases"] for c in COUNTS.values()),
        "kinds": {k: dict(sorted(c.items())) for k, c in sorted(COUNTS.items())},
    }
    with open(out, "w") as f:
        json.dump(report, f, indent=2)


def run_user_path(d: Damaged, label: str) -> None:
    b = base()
    count = COUNTS[label]
    count["cases"] += 1
    with tempfile.TemporaryDirectory(prefix="lazyfp8-fuzz-") as tmp:
        path = os.path.join(tmp, "ck")
        _write(d.files, d.links, path)
        if d.outside:
            os.makedirs(os.path.join(tmp, "outside"))
            for n, blob in d.outside.items():
                with open(os.path.join(tmp, "outside", n), "wb") as f:
                    f.write(blob)
        on_disk = set(d.files) | set(d.links)
        idx = _index(d)
        named = {os.path.basename(str(v)) for v in idx["weight_map"].values()} if idx else set()

        with deadline(PER_EXAMPLE_SECONDS):
            # 1. open
            view, view_error = None, None
            try:
                view = LazyFP8View(path)
            except LazyFP8Error as e:
                view_error = e
            except Exception as e:  # noqa: BLE001 - the point: anything else is a bug
                raise AssertionError(f"LazyFP8View raised {type(e).__name__}: {e}") from e
            if view_error is not None:
                count["view_error"] += 1
                count[f"view_error:{type(view_error).__name__}"] += 1
                names(view_error)
                assert isinstance(view_error, CheckpointError), view_error
                assert os.path.basename(view_error.file) in on_disk | named | {"ck"}, view_error.file
            else:
                count["view_ok"] += 1
            if d.view_error is not None:
                exc, file, key = d.view_error
                assert isinstance(view_error, exc), f"expected {exc.__name__}, got {view_error!r}"
                if file is not None:
                    assert os.path.basename(view_error.file) == file, view_error
                if key is not None:
                    assert view_error.key == key and mentions(str(view_error), key), view_error

            # 2. read every key
            if view is not None:
                assert idx is not None, "the view accepted an index a plain JSON reader cannot use"
                assert set(view) <= set(idx["weight_map"]), set(view) - set(idx["weight_map"])
                for k in b.exposed:
                    if d.clean(k):
                        assert k in view, f"untouched key {k!r} missing"
                        info = view.info(k)
                        assert os.path.basename(info.file) == b.location[k], info
                for k in view:
                    want = predicted(view, path, idx["weight_map"], k)
                    if k in d.tensor_error:
                        assert want is d.tensor_error[k], (k, want)
                    if want is CheckpointError:
                        with pytest.raises(CheckpointError, match=re.escape(repr(k))) as caught:
                            view.get_tensor(k)
                        names(caught.value, k)
                        count["tensor_unrepresentable"] += 1
                        continue
                    if want is InvalidScaleError:
                        with pytest.raises(InvalidScaleError, match=re.escape(repr(k))) as caught:
                            view.get_tensor(k)
                        names(caught.value, view.info(k).scale_key)
                        assert os.path.basename(caught.value.file) == os.path.basename(view.info(k).scale_file)
                        count["tensor_invalid_scale"] += 1
                        continue
                    try:
                        got = view.get_tensor(k)
                    except Exception as e:  # noqa: BLE001
                        raise AssertionError(f"get_tensor({k!r}) raised {type(e).__name__}: {e}") from e
                    assert same(got, want), f"wrong tensor for {k!r}: {got} != {want}"
                    if k in b.values and d.clean(k):
                        assert same(got, b.values[k]), f"{k!r} changed though the damage did not touch it"
                        count["tensor_unchanged"] += 1
                    else:
                        count["tensor_read_as_damaged"] += 1
                view.close()

            # 3. inspect
            try:
                report = inspect_checkpoint(path)
            except LazyFP8Error as e:
                unusable = _index(d, strict=True) is None
                if not (INSPECT_RAISES_ON_UNUSABLE_INDEX and unusable and e.file and e.file.endswith(INDEX)):
                    raise AssertionError(f"inspect_checkpoint raised {type(e).__name__}: {e}") from e
                names(e)
                count["inspect_raised_unusable_index"] += 1
                return
            except Exception as e:  # noqa: BLE001
                raise AssertionError(f"inspect_checkpoint raised {type(e).__name__}: {e}") from e
            assert all(isinstance(p, str) for p in report.problems)
            for p in report.problems:
                assert re.search(r"\.(safetensors|json)\b", p), f"problem line names no file: {p!r}"
            if view_error is not None:
                assert str(view_error) in report.problems, (str(view_error), report.problems)
                count["inspect_problems"] += 1
            else:
                assert all("belongs to no FP8 tensor" in p for p in report.problems), report.problems
                assert report.tensors == len(idx["weight_map"])
                count["inspect_clean" if not report.problems else "inspect_orphans"] += 1


# --- the fuzz tests --------------------------------------------------------------------------------
def test_base_checkpoint_is_what_the_fuzzer_assumes(tmp_path):
    b = base()
    _write(b.files, {}, str(tmp_path / "ck"))
    view = LazyFP8View(tmp_path / "ck")
    assert sorted({os.path.basename(f) for f in view.files}) == list(SHARDS)
    grans = {type(view.info(k).granularity).__name__ for k in view if view.info(k).scale_key}
    assert grans == {"PerTensor", "PerBlock"}
    assert {view.info(k).disk_dtype for k in view} >= {torch.float8_e4m3fn, torch.bfloat16, torch.float32}
    weight_map = json.loads(b.files[INDEX])["weight_map"]
    for k in view:
        assert same(view.get_tensor(k), predicted(view, str(tmp_path / "ck"), weight_map, k))
    assert inspect_checkpoint(tmp_path / "ck").problems == []
    # the undamaged checkpoint passes the whole oracle
    run_user_path(Damaged(files=dict(b.files), kinds=[]), "undamaged")


def _fuzz(kind: str | None):
    label = kind or "combined"

    @settings(max_examples=EXAMPLES_PER_KIND)
    @given(d=damaged([kind] if kind else None))
    def test(d):
        run_user_path(d, label)

    test.__name__ = f"test_fuzz_{label}"
    return test


test_fuzz_truncate = _fuzz("truncate")
test_fuzz_header_bytes = _fuzz("header_bytes")
test_fuzz_header_length_past_end = _fuzz("header_length")
test_fuzz_json_of_the_wrong_shape = _fuzz("json_shape")
test_fuzz_index_names_absent_shards_or_tensors = _fuzz("index_absent")
test_fuzz_offsets_overlapping_or_out_of_bounds = _fuzz("offsets")
test_fuzz_duplicate_keys = _fuzz("duplicates")
test_fuzz_invalid_scale_values = _fuzz("scale_values")
test_fuzz_scale_dtypes = _fuzz("scale_dtype")
test_fuzz_combined = _fuzz(None)


# --- deterministic cases the fuzzer cannot reach on its own, and known bugs ----------------------
def _one_file(tmp_path, header_text: bytes, data: bytes = b"") -> str:
    path = str(tmp_path / "model.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_text)) + header_text + data)
    return path


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.0, -0.0, -2.0])
def test_every_invalid_scale_value_is_refused(tmp_path, value):
    d = Damaged(files=dict(base().files), kinds=["scale_values"])
    header, data = _split(d.files[SHARDS[2]])
    k = "model.layers.1.self_attn.q_proj.weight_scale"
    data = bytearray(data)
    struct.pack_into("<f", data, header[k]["data_offsets"][0] + 4 * 5, value)  # the last block
    d.files[SHARDS[2]] = _join(header, bytes(data))
    d.taint_ranges[SHARDS[2]] = [tuple(header[k]["data_offsets"])]
    d.tensor_error["model.layers.1.self_attn.q_proj.weight"] = InvalidScaleError
    run_user_path(d, "invalid_scale_value")


@pytest.mark.parametrize("where", ["shard", "index"])
def test_deeply_nested_json_is_a_corrupt_checkpoint(tmp_path, where):
    files = dict(base().files)
    deep = b"[" * 100_000 + b"]" * 100_000
    if where == "shard":
        files[SHARDS[0]] = _join(deep, b"")
    else:
        files[INDEX] = deep
    path = str(tmp_path / "ck")
    _write(files, {}, path)
    bad = SHARDS[0] if where == "shard" else INDEX
    with pytest.raises(CorruptCheckpointError, match=re.escape(bad)):
        LazyFP8View(path)
    if where == "shard":
        assert any(bad in p for p in inspect_checkpoint(path).problems)


@pytest.mark.parametrize("shape", [[0, 2**64], [0, 2**63 - 1, 4]])
def test_empty_tensor_with_a_dimension_torch_cannot_hold(tmp_path, shape):
    path = _one_file(tmp_path, json.dumps({"huge": {"dtype": "BF16", "shape": shape, "data_offsets": [0, 0]}}).encode())
    try:
        view = LazyFP8View(path)
    except CheckpointError as e:  # refusing the header is a fine fix
        assert "huge" in str(e) and "model.safetensors" in str(e)
        return
    with pytest.raises(CheckpointError, match="huge"):
        view.get_tensor("huge")


@pytest.mark.parametrize("body", [b"[1]", b"{}", b'{"weight_map": []}', b"{not json", b'{"weight_map": {"a": "x", "a": "x"}}'])
def test_inspect_reports_an_unusable_index_as_a_problem(tmp_path, body):
    files = dict(base().files)
    files[INDEX] = body
    path = str(tmp_path / "ck")
    _write(files, {}, path)
    with pytest.raises(CorruptCheckpointError, match=re.escape(INDEX)):
        LazyFP8View(path)  # the view refuses it: that part is right
    report = inspect_checkpoint(path)
    assert any(INDEX in p for p in report.problems)
