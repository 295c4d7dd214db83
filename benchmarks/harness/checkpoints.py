"""The checkpoints the benchmarks read: writing (or reusing, by a manifest matched against
the spec) bench_load's FP8 "dawn-ridge" + bf16 pair (:func:`ensure_checkpoints`) and the
block-FP8 Qwen3 checkpoint (:func:`ensure_block_checkpoint`); facts read from the files without
lazyfp8 (shards, sizes, headers, the largest stored tensor, a digest of the stored tensors), and
what a script without any library does with a block-FP8 checkpoint
(:func:`naive_block_dequantized`). Checkpoints are written with ``lazyfp8.testing.write_checkpoint``
or ``lazyfp8.save``; the state a correct loader must produce is
``lazyfp8.testing.reference_state_dict``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import time
from collections.abc import Mapping
from typing import Any

from .measure import MiB
from .models import (
    BLOCK,
    FP8_QUANTIZATION_CONFIG,
    MISTRAL3_FP8,
    CausalLMSpec,
    ModelSpec,
    build_model,
    fill_random_,
    model_bytes,
    random_causal_lm,
    state_digest,
)

#: Bump when the checkpoint layout written by :func:`ensure_checkpoints` changes, so a reused
#: ``--workdir`` is regenerated instead of silently benchmarking stale files.
CHECKPOINT_FORMAT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Checkpoints:
    """Paths and facts of the generated checkpoints (what :func:`ensure_checkpoints` returns)."""

    root: str
    fp8_dir: str
    bf16_dir: str
    manifest: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        """The model's config (the bf16 checkpoint's ``config.json``)."""
        with open(os.path.join(self.bf16_dir, "config.json")) as f:
            return json.load(f)


def ensure_checkpoints(workdir: str, spec: ModelSpec, log: Any = print) -> Checkpoints:
    """Write (or reuse, if ``workdir`` already holds them for ``spec``) the two checkpoints:

    - ``fp8/``: dawn-ridge layout, on-disk names, text-layer Linear weights FP8 e4m3 with a 0-d
      f32 ``weight_scale_inv`` and an ``activation_scale``, the rest bf16, ``quantization_config``
      in ``config.json``;
    - ``bf16/``: the same model as every FP8 loader must produce it (the FP8 weights dequantized
      with the reference formula ``(w.float() * s).to(bf16)``), runtime names, no quantization.

    The manifest records the digest of that dequantized model, which every case's result is
    checked against, and the largest single tensor stored in the FP8 checkpoint.
    """
    fp8_dir, bf16_dir = os.path.join(workdir, "fp8"), os.path.join(workdir, "bf16")
    manifest_path = os.path.join(workdir, "manifest.json")
    wanted = {"format": CHECKPOINT_FORMAT_VERSION, "spec": dataclasses.asdict(spec)}
    manifest = reusable_manifest(manifest_path, wanted)
    if manifest is not None:
        log(f"reusing checkpoints in {workdir}")
        return Checkpoints(workdir, fp8_dir, bf16_dir, manifest)
    t0 = time.perf_counter()
    manifest = dict(wanted, **_write_checkpoints(fp8_dir, bf16_dir, spec))
    manifest["generate_s"] = round(time.perf_counter() - t0, 2)
    write_manifest(manifest_path, manifest)
    log(f"wrote checkpoints to {workdir} in {manifest['generate_s']} s")
    return Checkpoints(workdir, fp8_dir, bf16_dir, manifest)


def reusable_manifest(manifest_path: str, wanted: Mapping[str, Any]) -> dict[str, Any] | None:
    """The manifest at ``manifest_path`` if it was written for ``wanted`` (its format version and
    spec, compared as JSON stores them: tuples read back as lists), else ``None``: generated files
    are reused only for the exact spec that made them."""
    if not os.path.exists(manifest_path):
        return None
    with open(manifest_path) as f:
        manifest = json.load(f)
    return manifest if {k: manifest.get(k) for k in wanted} == json.loads(json.dumps(wanted)) else None


def write_manifest(manifest_path: str, manifest: Mapping[str, Any]) -> None:
    """Write a manifest for :func:`reusable_manifest` to find."""
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=2)


def _write_checkpoints(fp8_dir: str, bf16_dir: str, spec: ModelSpec) -> dict[str, Any]:
    """Generate the model and write both checkpoints; return the manifest's facts."""
    import torch

    from lazyfp8.testing import quantize_per_tensor, reference, write_checkpoint

    config = spec.config_dict()
    model = build_model(config, params="empty")
    fill_random_(model, spec.seed)
    sd = model.state_dict()
    # The released layout: on-disk names are the inverse of the "mistral3" mapping
    # (language_model.model.*, language_model.lm_head.*, vision_tower.*...).
    res = write_checkpoint(
        sd,
        fp8_dir,
        quantize=MISTRAL3_FP8,
        key_mapping="mistral3",
        activation_scales=True,
        max_shard_size=spec.max_shard_size,
        config=dict(config, quantization_config=FP8_QUANTIZATION_CONFIG),
        overwrite=True,
    )
    # The reference result of loading fp8/: quantize exactly as write_checkpoint did (it is
    # deterministic) and dequantize with the reference formula, in place.
    fp8_keys = res.quantized
    with torch.no_grad():
        for key in fp8_keys:
            sd[key].copy_(reference(*quantize_per_tensor(sd[key]), torch.bfloat16))
    plain = write_checkpoint(sd, bf16_dir, scheme=None, max_shard_size=spec.max_shard_size, config=config, overwrite=True)
    return {
        "digest": state_digest(sd),
        "params": sum(p.numel() for p in model.parameters()),
        "model_bytes": model_bytes(model),
        "fp8_tensors": len(fp8_keys),
        "fp8_shards": len(res.files),
        "bf16_shards": len(plain.files),
        "fp8_disk_bytes": dir_bytes(fp8_dir),
        "bf16_disk_bytes": dir_bytes(bf16_dir),
        "largest_fp8_tensor": largest_tensor(fp8_dir),
        "largest_bf16_tensor": largest_tensor(bf16_dir),
    }


def safetensors_files(path: str) -> list[str]:
    """The ``*.safetensors`` files of a checkpoint directory, sorted."""
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def checkpoint_files(path: str) -> list[str]:
    """Every file of a checkpoint directory (shards, index, config), sorted."""
    return sorted(os.path.join(path, f) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))


def dir_bytes(path: str) -> int:
    """Total size of the files in ``path``."""
    return sum(os.path.getsize(f) for f in checkpoint_files(path))


def safetensors_header(path: str) -> dict[str, Any]:
    """The JSON header of one ``.safetensors`` file (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def largest_tensor(path: str) -> dict[str, Any]:
    """The largest single stored tensor of a checkpoint: ``{"key", "dtype", "bytes"}``."""
    best = {"key": None, "dtype": None, "bytes": 0}
    for file in safetensors_files(path):
        for key, entry in safetensors_header(file).items():
            if key == "__metadata__":
                continue
            start, stop = entry["data_offsets"]
            if stop - start > best["bytes"]:
                best = {"key": key, "dtype": entry["dtype"], "bytes": stop - start}
    return best


#: Bump when :func:`ensure_block_checkpoint`'s output changes.
BLOCK_CHECKPOINT_FORMAT_VERSION = 2


def checkpoint_digest(path: str) -> str:
    """SHA-256 over ``(key, dtype, shape, raw bytes)`` of every tensor stored in a checkpoint
    directory, in key order, read straight from the files (no torch, no lazyfp8): two
    checkpoints hold the same tensors, however sharded, exactly when their digests are equal."""
    h = hashlib.sha256()
    entries = []
    for file in safetensors_files(path):
        header = safetensors_header(file)
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        for key, e in header.items():
            if key != "__metadata__":
                entries.append((key, file, 8 + n + e["data_offsets"][0], e["data_offsets"][1] - e["data_offsets"][0], e))
    buf = bytearray(16 * MiB)
    for key, file, start, size, e in sorted(entries):
        h.update(f"{key}|{e['dtype']}|{tuple(e['shape'])}\n".encode())
        with open(file, "rb", buffering=0) as f:
            f.seek(start)
            left = size
            while left:
                got = f.readinto(memoryview(buf)[: min(left, len(buf))])
                if not got:
                    raise ValueError(f"{file} ended inside {key}")
                h.update(memoryview(buf)[:got])
                left -= got
    return h.hexdigest()


def ensure_block_checkpoint(workdir: str, spec: CausalLMSpec, log: Any = print) -> Checkpoints:
    """Write (or reuse) ``fp8-block/``: the spec's seeded Qwen3 model saved by
    ``lazyfp8.save(state_dict, scheme=PerBlock((128, 128)), config=...)``, so on-disk names are
    the runtime names, every Linear weight but ``lm_head`` is float8_e4m3fn with a float32
    ``[rows/128, cols/128]`` ``weight_scale_inv``, and ``config.json`` carries
    ``{"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}``.

    The manifest holds the digest of the source model (``source_digest``), of the stored tensors
    (``disk_digest``, see :func:`checkpoint_digest`) and of the reference dequantized state
    (``digest``, see ``lazyfp8.testing.reference_state_dict``). ``Checkpoints.bf16_dir`` is unused ("")."""
    import torch

    import lazyfp8
    from lazyfp8.testing import reference_state_dict

    fp8_dir = os.path.join(workdir, "fp8-block")
    manifest_path = os.path.join(workdir, "manifest-block.json")
    wanted = {"format": BLOCK_CHECKPOINT_FORMAT_VERSION, "spec": dataclasses.asdict(spec)}
    manifest = reusable_manifest(manifest_path, wanted)
    if manifest is not None and os.path.isdir(fp8_dir):
        log(f"reusing the block-FP8 checkpoint in {workdir}")
        return Checkpoints(workdir, fp8_dir, "", manifest)
    t0 = time.perf_counter()
    config = spec.config_dict()
    model = random_causal_lm(config, spec.seed)
    sd = model.state_dict()
    source_digest = state_digest(sd)
    res = lazyfp8.save(
        sd, fp8_dir, scheme=lazyfp8.PerBlock(BLOCK), max_shard_size=spec.max_shard_size, config=config, overwrite=True
    )
    params, pbytes = sum(p.numel() for p in model.parameters()), model_bytes(model)
    del model, sd
    ref = reference_state_dict(fp8_dir, dtype=torch.bfloat16)
    with open(os.path.join(fp8_dir, "config.json")) as f:
        qconfig = json.load(f).get("quantization_config")
    manifest = dict(
        wanted,
        digest=state_digest(ref),
        source_digest=source_digest,
        disk_digest=checkpoint_digest(fp8_dir),
        params=params,
        model_bytes=pbytes,
        fp8_tensors=len(res.quantized),
        shards=len(res.files),
        fp8_disk_bytes=dir_bytes(fp8_dir),
        largest_fp8_tensor=largest_tensor(fp8_dir),
        quantization_config=qconfig,
    )
    del ref
    manifest["generate_s"] = round(time.perf_counter() - t0, 2)
    write_manifest(manifest_path, manifest)
    log(f"wrote the block-FP8 checkpoint to {fp8_dir} in {manifest['generate_s']} s")
    return Checkpoints(workdir, fp8_dir, "", manifest)


def naive_block_dequantized(fp8_dir: str) -> dict[str, Any]:
    """What a script without any library does with a block-FP8 checkpoint: ``load_file`` of
    every shard, then a dequantized bf16 copy of each FP8 weight with its scale grid expanded
    (``repeat_interleave``) to the weight's shape; the ``_scale_inv`` tensors dropped. The whole
    checkpoint is in memory while the whole result is made (and freed on return)."""
    import torch
    from safetensors.torch import load_file

    b0, b1 = BLOCK
    disk: dict[str, torch.Tensor] = {}
    for file in safetensors_files(fp8_dir):
        disk.update(load_file(file))
    state = {}
    for key, t in disk.items():
        if key.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = disk[key + "_scale_inv"].float()
            s = s.repeat_interleave(b0, 0)[: t.shape[0]].repeat_interleave(b1, 1)[:, : t.shape[1]]
            t = (t.float() * s).to(torch.bfloat16)
        state[key] = t
    return state
