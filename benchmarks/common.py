"""Shared helpers for lazyfp8's benchmarks.

Everything a benchmark needs besides the thing it measures:

- memory accounting from ``/proc/self/status`` (:func:`proc_status`, :class:`MemoryProbe`);
- a deterministic Mistral3 model and its checkpoints: the FP8 "dawn-ridge" layout and an
  equivalent plain bf16 one (:class:`ModelSpec`, :func:`build_model`, :func:`ensure_checkpoints`);
- running one case per fresh interpreter, so that every case starts from the same empty heap
  and its peak (``VmHWM``) is its own (:func:`run_case`);
- a page-cache warm-up (:func:`warm_page_cache`), a state digest to check bit-exactness
  (:func:`state_digest`) and a markdown table (:func:`markdown_table`).

Benchmarks import this module as ``common`` (their own directory is on ``sys.path`` when run as
scripts) and must keep imports of torch/transformers inside functions where a child process's
baseline matters: a case decides itself what it has imported before it reads its baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

MiB = 1 << 20

#: Bump when the checkpoint layout written by :func:`ensure_checkpoints` changes, so a reused
#: ``--workdir`` is regenerated instead of silently benchmarking stale files.
CHECKPOINT_FORMAT_VERSION = 1

#: On-disk (dawn-ridge) -> runtime renaming, written out here rather than taken from lazyfp8 so
#: that the baselines do not depend on the library under test. ``lm_head`` first: its on-disk
#: name also starts with ``language_model.``.
DISK_TO_RUNTIME: tuple[tuple[str, str], ...] = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)

# Children must never reach a hub: the machines have no network and a lookup would only stall.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


# --------------------------------------------------------------------------------------------
# /proc/self/status
# --------------------------------------------------------------------------------------------
_STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The memory lines of ``/proc/<pid>/status`` in bytes: VmHWM (peak RSS since start),
    VmRSS, and its split into RssAnon (heap), RssFile (mapped file pages) and RssShmem."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in _STATUS_FIELDS:
                value, unit = rest.split()
                assert unit == "kB", line  # the kernel always reports these in kB
                out[name] = int(value) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0: write ``5`` to
    ``/proc/self/clear_refs``). Returns whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Reads the baseline just before the measured work and everything else just after it.

    ``VmHWM`` is a high-water mark over the process's whole life, so the probe resets it when
    it takes the baseline: a transient peak during the imports (unpickling, library loading)
    then cannot pass for the load's. Where the reset is not allowed, the peak still counts
    from process start (``hwm_reset`` says which).
    """

    def __init__(self) -> None:
        self.hwm_reset = reset_peak_rss()
        self.baseline = proc_status()
        self.end: dict[str, int] | None = None

    def stop(self) -> dict[str, int]:
        """Read the end state (call before anything that may allocate, e.g. hashing)."""
        self.end = proc_status()
        return self.end

    def report(self) -> dict[str, int]:
        """Baseline RSS, peak and end breakdown, in bytes."""
        end = self.end if self.end is not None else self.stop()
        return {
            "baseline_rss": self.baseline["VmRSS"],
            "vmhwm": end["VmHWM"],
            "vmrss_end": end["VmRSS"],
            "rss_anon_end": end.get("RssAnon", 0),
            "rss_file_end": end.get("RssFile", 0),
            "hwm_reset": self.hwm_reset,
        }


class Stopwatch:
    """Named laps: ``with watch.lap("load"): ...`` records wall seconds in ``laps[name]`` and
    this process's CPU seconds (all threads) in ``cpu[name]``. CPU time tells a loader that
    uses both cores from one that waits, and is less disturbed by other processes."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def lap(self, name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.laps[name] = self.laps.get(name, 0.0) + time.perf_counter() - t0
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TextSizes:
    """The sizes of a transformer text model, the leading fields of :class:`ModelSpec` and
    :class:`CausalLMSpec` (in this order: their manifests record ``dataclasses.asdict(spec)``,
    and a reused ``--workdir`` is matched against it)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class ModelSpec(TextSizes):
    """Sizes of a ``Mistral3ForConditionalGeneration``: a Mistral text model with a small Pixtral
    vision tower, the shape of the released Mistral-3.x FP8 checkpoints scaled down."""

    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int = 224
    patch_size: int = 14
    shards: int = 2
    seed: int = 0

    def config_dict(self) -> dict[str, Any]:
        """A ``config.json`` for transformers' ``Mistral3Config`` (no quantization)."""
        from transformers import Mistral3Config

        text = {
            "model_type": "mistral",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
        }
        vision = {
            "model_type": "pixtral",
            "hidden_size": self.vision_hidden,
            "intermediate_size": self.vision_intermediate,
            "num_hidden_layers": self.vision_layers,
            "num_attention_heads": self.vision_heads,
            "head_dim": self.vision_hidden // self.vision_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
        }
        # Both tie flags off: released Mistral-3 checkpoints store lm_head, and the top-level
        # Mistral3Config defaults to tying.
        config = Mistral3Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
        d = config.to_dict()
        d["architectures"] = ["Mistral3ForConditionalGeneration"]
        d["dtype"] = "bfloat16"
        return d


#: The released Mistral-3.x FP8 checkpoints' ``quantization_config``: per-tensor scales
#: (``weight_block_size: null``), static activation scales, and only the text layers' Linears
#: quantized. transformers' FineGrainedFP8 quantizer reads this; without a GPU it dequantizes.
FP8_QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "fp8",
    "activation_scheme": "static",
    "weight_block_size": None,
    "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
}

#: ``--quick``: ~17 MB, seconds per case; for CI, so the benchmark code never rots. The MLP
#: weights (8256 x 256 = 2,113,536 elements) are just over lazyfp8's default chunk of 2**21
#: elements, so even the quick run reads FP8 tensors in several chunks (and threads).
QUICK = ModelSpec(
    vocab=4096,
    hidden=256,
    intermediate=8256,
    layers=1,
    heads=4,
    kv_heads=2,
    head_dim=64,
    vision_hidden=64,
    vision_intermediate=128,
    vision_layers=1,
    vision_heads=2,
    image_size=56,
    shards=2,
)

#: Full: ~580M parameters, ~1.16 GB of bf16 (text hidden 2048, 7 layers, vocab 32768).
FULL = ModelSpec(
    vocab=32768,
    hidden=2048,
    intermediate=8192,
    layers=7,
    heads=16,
    kv_heads=8,
    head_dim=128,
    vision_hidden=256,
    vision_intermediate=1024,
    vision_layers=2,
    vision_heads=4,
    image_size=224,
    shards=4,
)

SPECS = {"quick": QUICK, "full": FULL}


@contextlib.contextmanager
def default_dtype(dtype: Any) -> Iterator[None]:
    """Construct modules in ``dtype`` (as ``from_pretrained(dtype=...)`` does), then restore."""
    import torch

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def build_model(config: Mapping[str, Any] | Any, params: str = "zeros") -> Any:
    """A bf16 ``Mistral3ForConditionalGeneration`` whose parameters are ``"meta"`` (no storage),
    ``"zeros"`` (allocated and touched, as a model about to be loaded with ``load_state_dict``),
    or ``"empty"`` (allocated, untouched; the caller fills them).

    The module tree is always built with parameters on meta (``lazyfp8.init_empty_weights``
    keeps buffers such as rotary ``inv_freq`` real); building 500M parameters with transformers'
    default initializers takes minutes on 2 cores and is not what any case measures.
    """
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    import lazyfp8

    if isinstance(config, Mapping):
        config = Mistral3Config(**{k: v for k, v in config.items() if k != "quantization_config"})
    with lazyfp8.init_empty_weights(), default_dtype(torch.bfloat16):
        model = Mistral3ForConditionalGeneration(config)
    if params != "meta":
        materialize_(model, zero=(params == "zeros"))
    return model.eval()


def materialize_(model: Any, *, zero: bool) -> None:
    """Give every meta parameter CPU storage (shared once per tied group), zeroed if ``zero``."""
    import torch

    done: dict[int, Any] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            new = done.get(id(p))
            if new is None:
                data = torch.zeros(p.shape, dtype=p.dtype) if zero else torch.empty(p.shape, dtype=p.dtype)
                new = done[id(p)] = type(p)(data, requires_grad=p.requires_grad)
            module._parameters[name] = new


def fill_random_(model: Any, seed: int) -> None:
    """Fill every parameter with N(0, 0.02) from one seeded generator, in ``named_parameters``
    order: the same spec always gives the same bits, in seconds rather than the minutes of
    transformers' initializers."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(0.0, 0.02, generator=gen)


def model_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_meta:
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 over ``(name, dtype, shape, bytes)`` of every tensor in name order: two loads are
    bit-identical exactly when their digests are equal."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def disk_to_runtime(key: str) -> str:
    """The runtime name of an on-disk dawn-ridge key (see :data:`DISK_TO_RUNTIME`)."""
    for disk, runtime in DISK_TO_RUNTIME:
        if key.startswith(disk):
            return runtime + key[len(disk) :]
    return key


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
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

    from lazyfp8.testing import DAWN_RIDGE_TO_DISK, dawn_ridge_fp8, quantize_per_tensor, write_checkpoint

    config = spec.config_dict()
    model = build_model(config, params="empty")
    fill_random_(model, spec.seed)
    sd = model.state_dict()
    write_checkpoint(
        sd,
        fp8_dir,
        quantize=dawn_ridge_fp8,
        to_disk=DAWN_RIDGE_TO_DISK,
        shards=spec.shards,
        config=dict(config, quantization_config=FP8_QUANTIZATION_CONFIG),
    )
    # The reference result of loading fp8/: quantize exactly as write_checkpoint did (it is
    # deterministic) and dequantize with the reference formula, in place.
    fp8_keys = [k for k in sd if dawn_ridge_fp8(k)]
    with torch.no_grad():
        for key in fp8_keys:
            codes, scale = quantize_per_tensor(sd[key])
            sd[key].copy_((codes.to(torch.float32) * scale).to(torch.bfloat16))
    write_checkpoint(sd, bf16_dir, shards=spec.shards, config=config)
    return {
        "digest": state_digest(sd),
        "params": sum(p.numel() for p in model.parameters()),
        "model_bytes": model_bytes(model),
        "fp8_tensors": len(fp8_keys),
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


def warm_page_cache(paths: Iterable[str], chunk: int = 16 * MiB) -> int:
    """Read every file once so that each case starts with the checkpoint in the page cache
    (the fair state to compare in: a cold cache measures the disk, not the loader). The reads
    go into one reused buffer in this (parent) process and so never count toward a case."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


# --------------------------------------------------------------------------------------------
# Running cases
# --------------------------------------------------------------------------------------------
def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent not idle since boot (from ``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal_and_guest = sum(fields[7:])  # steal, guest, guest_nice: not this machine's work
    return (sum(fields) - idle - steal_and_guest) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User+system seconds of this process's finished children."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_case(script: str, case: str, args: Sequence[str] = (), timeout: float = 900) -> dict[str, Any]:
    """Run ``script --case CASE --result FILE ARGS`` in a fresh interpreter and return the JSON
    it wrote to FILE. A crash or a timeout becomes ``{"case", "error"}`` with the stderr tail, so
    one failing case never hides the others' results.

    Also records ``others_cpu_s``: CPU seconds the rest of the machine used while the case ran
    (machine busy time minus the child's own), so a timing disturbed by another process on the
    same two cores can be recognized instead of trusted.
    """
    with tempfile.TemporaryDirectory(prefix="lazyfp8-case-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, script, "--case", case, "--result", result_path, *args]
        env = dict(os.environ, **OFFLINE_ENV)
        busy0, child0, t0 = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        except subprocess.TimeoutExpired:
            return {"case": case, "error": f"timed out after {timeout} s"}
        others = (busy_cpu_seconds() - busy0) - (children_cpu_seconds() - child0)
        result = _child_result(result_path, case, proc.returncode, proc.stderr, proc.stdout)
        result["process_s"] = time.perf_counter() - t0
        result["others_cpu_s"] = max(others, 0.0)
        return result


def _child_result(
    result_path: str, case: str, returncode: int | None, stderr: str, stdout: str = ""
) -> dict[str, Any]:
    """What the child wrote to ``result_path``, or, where it wrote nothing (it crashed),
    ``{"case", "error"}`` with the exit code and the tail of its stderr (else of its stdout)."""
    if os.path.exists(result_path):
        with open(result_path) as f:
            result = json.load(f)
        result.setdefault("stderr_tail", _tail(stderr))
        return result
    err = _tail(stderr) or _tail(stdout)
    return {"case": case, "error": f"exit code {returncode}: {err}"}


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def write_result(path: str, result: Mapping[str, Any]) -> None:
    """Write a child's result (the parent reads it back in :func:`run_case`)."""
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)


def environment() -> dict[str, Any]:
    """Versions and machine facts to store beside results."""
    import safetensors
    import torch
    import transformers

    import lazyfp8

    return {
        "lazyfp8_path": os.path.dirname(lazyfp8.__file__),
        "git": git_revision(os.path.dirname(os.path.dirname(os.path.abspath(lazyfp8.__file__)))),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "lazyfp8": lazyfp8.__version__,
        "llvmlite": _version_of("llvmlite"),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
    }


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def git_revision(path: str) -> str | None:
    """``<commit>[+dirty]`` of the git checkout at ``path``, or ``None`` outside one."""
    try:
        rev = subprocess.run(
            ["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
        if rev.returncode:
            return None
        dirty = subprocess.run(
            ["git", "-C", path, "status", "--porcelain", "--", "lazyfp8"],
            capture_output=True,
            text=True,
            check=False,
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with ``columns`` given as ``(key, header)``; a missing value
    prints as an empty cell."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def mib(n: float | None) -> float | None:
    """Bytes -> MiB (``None`` stays ``None``)."""
    return None if n is None else n / MiB


# ============================================================================================
# Added for bench_schemes.py, bench_save.py and bench_memory.py
# ============================================================================================
# --------------------------------------------------------------------------------------------
# A block-scaled causal LM (Qwen3, the layout of Qwen3-FP8 / DeepSeek-V3 releases)
# --------------------------------------------------------------------------------------------
#: The block size of DeepSeek-V3/R1 and Qwen3-FP8 releases.
BLOCK = (128, 128)


@dataclasses.dataclass(frozen=True)
class CausalLMSpec(TextSizes):
    """Sizes of a ``Qwen3ForCausalLM`` whose Linear shapes are all multiples of 128, so a
    128x128 block grid covers every weight exactly (as in the released Qwen3-FP8 checkpoints)."""

    max_shard_size: str
    seed: int = 0

    def config_dict(self) -> dict[str, Any]:
        """A ``config.json`` for transformers' ``Qwen3Config`` (no quantization)."""
        from transformers import Qwen3Config

        config = Qwen3Config(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
        d = config.to_dict()
        d["architectures"] = ["Qwen3ForCausalLM"]
        d["dtype"] = "bfloat16"
        return d


#: ``--quick``: ~2.4M parameters (4.8 MB of bf16), written in 3 shards (torch's quantized DCP
#: reader needs an index, which only a sharded checkpoint has).
QWEN3_QUICK = CausalLMSpec(
    vocab=4096, hidden=256, intermediate=768, layers=2, heads=4, kv_heads=2, head_dim=64, max_shard_size="2MB"
)
#: Full: ~587M parameters = 1.17 GB of bf16 (9 layers of hidden 2048, MLP 6144, vocab 32768,
#: untied lm_head); the block-FP8 checkpoint is ~720 MB in 3 shards of at most 300 MB.
QWEN3_FULL = CausalLMSpec(
    vocab=32768, hidden=2048, intermediate=6144, layers=9, heads=16, kv_heads=8, head_dim=128, max_shard_size="300MB"
)
QWEN3_SPECS = {"quick": QWEN3_QUICK, "full": QWEN3_FULL}

#: Bump when :func:`ensure_block_checkpoint`'s output changes.
BLOCK_CHECKPOINT_FORMAT_VERSION = 1


def build_causal_lm(config: Mapping[str, Any] | Any, params: str = "zeros") -> Any:
    """A bf16 model of ``config["architectures"][0]`` (any transformers class), parameters
    ``"meta"``, ``"zeros"`` or ``"empty"`` as in :func:`build_model`."""
    import torch
    import transformers

    import lazyfp8

    if isinstance(config, Mapping):
        d = {k: v for k, v in config.items() if k != "quantization_config"}
        arch = d["architectures"][0]
        config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    else:
        arch = config.architectures[0]
    with lazyfp8.init_empty_weights(), default_dtype(torch.bfloat16):
        model = getattr(transformers, arch)(config)
    if params != "meta":
        materialize_(model, zero=(params == "zeros"))
    return model.eval()


def random_causal_lm(config: Mapping[str, Any], seed: int) -> Any:
    """The spec's model with N(0, 0.02) parameters from one seeded generator (deterministic)."""
    model = build_causal_lm(config, params="empty")
    fill_random_(model, seed)
    return model


def reference_dequantized(path: str, dtype: Any = None) -> dict[str, Any]:
    """The state every correct loader must produce from a ``_scale_inv`` checkpoint, computed
    without lazyfp8's reader: ``safetensors.torch.load_file`` of each shard and the reference
    formula ``(w.float() * s).to(dtype)`` with the scale grid expanded over ``BLOCK`` blocks (or
    a 0-d scale). Memory-hungry (the whole state plus a float32 copy of one weight)."""
    import torch
    from safetensors.torch import load_file

    from lazyfp8.testing import reference

    dtype = dtype or torch.bfloat16
    disk: dict[str, Any] = {}
    for file in safetensors_files(path):
        disk.update(load_file(file))
    out = {}
    for key, t in disk.items():
        if key.endswith("_scale_inv"):
            continue
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            s = disk[key + "_scale_inv"]
            t = reference(t, s, dtype, BLOCK if s.dim() == 2 else None)
        out[key] = t
    return out


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
    (``digest``, see :func:`reference_dequantized`). ``Checkpoints.bf16_dir`` is unused ("")."""
    import torch

    import lazyfp8

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
    ref = reference_dequantized(fp8_dir, torch.bfloat16)
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


# --------------------------------------------------------------------------------------------
# Page cache: eviction and residency
# --------------------------------------------------------------------------------------------
def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes (``Cached``, ``Dirty``, ``MemAvailable``...)."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[name] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def drop_page_cache(paths: Iterable[str]) -> None:
    """Evict ``paths`` from the page cache: ``os.sync()`` (dirty pages cannot be dropped), then
    ``posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`` on each file. Advice: a filesystem may
    keep pages anyway, so check with :func:`resident_bytes`."""
    os.sync()
    fadvise(paths, os.POSIX_FADV_DONTNEED)


def fadvise(paths: Iterable[str], advice: int) -> None:
    """``posix_fadvise(fd, 0, 0, advice)`` on each whole file (``os.POSIX_FADV_*``)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, advice)
        finally:
            os.close(fd)


def resident_bytes(paths: Iterable[str]) -> int | None:
    """Bytes of ``paths`` in the page cache right now (``mincore(2)`` over a shared read-only
    map of each file, as util-linux's ``fincore`` does), or ``None`` where that is unavailable.
    The map is never touched, so this reads nothing into the cache."""
    import ctypes
    import ctypes.util
    import mmap

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    total = 0
    for path in paths:
        size = os.path.getsize(path)
        if not size:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                total += sum(b & 1 for b in bytes(vec)) * page
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    return total


def read_files(paths: Iterable[str], chunk: int = 16 * MiB) -> int:
    """Read every file sequentially into one reused buffer (``cat files > /dev/null``); returns
    the bytes read. Unlike :func:`warm_page_cache` it is meant to be timed."""
    return warm_page_cache(paths, chunk)


# --------------------------------------------------------------------------------------------
# RSS over time, sampled from outside the measured process
# --------------------------------------------------------------------------------------------
def run_case_sampled(
    script: str, case: str, args: Sequence[str] = (), interval: float = 0.005, timeout: float = 900
) -> dict[str, Any]:
    """:func:`run_case`, sampling the child's ``VmRSS`` from this (parent) process every
    ``interval`` seconds by reading ``/proc/<pid>/status``: the sampler cannot slow the child
    down or take its GIL. Adds ``samples``: ``[[time.monotonic(), vmrss_bytes], ...]`` (the
    monotonic clock is system-wide, so a child's own ``time.monotonic()`` marks line up)."""
    with tempfile.TemporaryDirectory(prefix="lazyfp8-case-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, script, "--case", case, "--result", result_path, *args]
        env = dict(os.environ, **OFFLINE_ENV)
        samples: list[list[float]] = []
        busy0, child0 = busy_cpu_seconds(), children_cpu_seconds()
        with open(os.path.join(tmp, "stderr"), "w+") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
            status = f"/proc/{proc.pid}/status"
            while proc.poll() is None:
                if time.perf_counter() - t0 > timeout:
                    proc.kill()
                    proc.wait()
                    return {"case": case, "error": f"timed out after {timeout} s"}
                try:
                    with open(status) as f:
                        for line in f:
                            if line.startswith("VmRSS:"):
                                samples.append([time.monotonic(), int(line.split()[1]) * 1024])
                                break
                except (OSError, ValueError):
                    pass
                time.sleep(interval)
            err.seek(0)
            stderr = err.read()
        # This process's own sampling loop is "others" too: a fraction of a core at 5 ms.
        others = (busy_cpu_seconds() - busy0) - (children_cpu_seconds() - child0)
        result = _child_result(result_path, case, proc.returncode, stderr)
        result["process_s"] = time.perf_counter() - t0
        result["others_cpu_s"] = max(others, 0.0)
        result["samples"] = samples
        return result


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages (``/proc/loadavg``)."""
    with open("/proc/loadavg") as f:
        a, b, c = f.read().split()[:3]
    return float(a), float(b), float(c)


def aggregate_runs(runs: list[dict[str, Any]], time_keys: Sequence[str], peak_keys: Sequence[str] = ()) -> dict[str, Any]:
    """One row from repeated runs of a case (as bench_load does): the smallest value of each of
    ``time_keys`` (every disturbance on a shared machine only adds time), the values of
    ``baseline_rss``, ``vmhwm`` and ``peak_keys`` from the run with the largest
    ``vmhwm - baseline_rss``, the set of ``digest`` values, and ``disturbed_runs``: runs during
    which other processes used more CPU than 10% of the run's wall time. Raw runs under
    ``"runs"``, errors under ``"errors"``."""
    ok = [r for r in runs if "error" not in r]
    row = dict(ok[0] if ok else runs[-1])
    row["runs"] = runs
    row["errors"] = [r["error"] for r in runs if "error" in r]
    if not ok:
        return row
    for key in time_keys:
        vals = [r[key] for r in ok if r.get(key) is not None]
        row[key] = min(vals) if vals else None
    if all("vmhwm" in r and "baseline_rss" in r for r in ok):
        peak = max(ok, key=lambda r: r["vmhwm"] - r["baseline_rss"])
        for key in ("baseline_rss", "vmhwm", *peak_keys):
            row[key] = peak.get(key)
    row["digests"] = sorted({r["digest"] for r in ok if r.get("digest")})
    row["disturbed_runs"] = sum(r.get("others_cpu_s", 0) > 0.1 * r.get("process_s", 1) for r in ok)
    row["others_cpu_s"] = max(r.get("others_cpu_s", 0) for r in ok)
    return row


def short_error(error: str, limit: int = 400) -> str:
    """An error's first ``limit`` characters on one line."""
    one = " ".join(str(error).split())
    return one if len(one) <= limit else f"{one[:limit]}... ({len(one)} chars; full text in the JSON)"


def disturbance_note(rows: Sequence[Mapping[str, Any]], rerun: bool = False) -> str | None:
    """A sentence naming the cases some of whose runs other processes disturbed, or ``None``;
    with ``rerun``, it ends by advising a rerun on a quiet machine (bench_load's wording)."""
    busy = [f"{r['case']} ({r['disturbed_runs']}/{len(r['runs'])})" for r in rows if r.get("disturbed_runs")]
    if not busy:
        return None
    return (
        "Other processes used CPU for over 10% of the wall time of some runs of "
        f"{', '.join(busy)}: those timings are disturbed (others_cpu_s in the JSON); "
        "the best-of-N time is reported" + (", but rerun on a quiet machine to trust it." if rerun else ".")
    )


def disturbance_lines(rows: Sequence[Mapping[str, Any]], rerun: bool = False) -> list[str]:
    """:func:`disturbance_note` as a paragraph to add to a report's lines (none if ``None``)."""
    note = disturbance_note(rows, rerun)
    return ["\n" + note] if note else []


# ============================================================================================
# The frame every bench_* script shares: its command line, the child's measurement, the
# parent's loop over cases and the pieces of its report
# ============================================================================================
# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def benchmark_parser(doc: str, quick_help: str, full_help: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the script's docstring, with the two mutually
    exclusive sizes: ``--quick`` (for CI) and ``--full`` (the default)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=quick_help)
    size.add_argument("--full", action="store_true", help=full_help)
    return p


#: The options the scripts share: flags, and their ``add_argument`` keywords (``help`` is the usual
#: text; :func:`add_options` takes others). The last four are internal: a parent passes them to
#: the fresh interpreter that runs one case.
_OPTIONS: dict[str, dict[str, Any]] = {
    "workdir": {"help": "keep the checkpoint here and reuse it (default: a temp dir, removed)"},
    "cases": {"nargs": "+"},
    "repeat": {"type": int, "help": "runs per case (default: 1 quick, 3 full)"},
    "timeout": {"type": float, "help": "seconds allowed per case run"},
    "out": {"help": "JSON result path (default: benchmarks/results/{results}_<mode>.json)"},
    "note": {"help": "a line printed above the table and stored in the JSON"},
    "case": {"help": argparse.SUPPRESS},
    "result": {"help": argparse.SUPPRESS},
    "fp8-dir": {"help": argparse.SUPPRESS},
    "bf16-dir": {"help": argparse.SUPPRESS},
}


def add_options(
    p: argparse.ArgumentParser,
    *names: str,
    cases: Sequence[str] = (),
    results: str = "",
    helps: Mapping[str, str | None] | None = None,
    timeout: float = 900,
) -> None:
    """Add the shared options ``names`` (keys of :data:`_OPTIONS`) to ``p``, in that order:
    ``--cases`` and ``--case`` choose among ``cases`` (``--cases`` defaults to all of them),
    ``--out`` names ``benchmarks/results/<results>_<mode>.json`` as its default, ``--timeout``
    defaults to ``timeout`` seconds; ``helps`` replaces an option's help text (``None``: none)."""
    helps = helps or {}
    for name in names:
        kwargs = dict(_OPTIONS[name])
        if name in ("cases", "case"):
            kwargs["choices"] = cases
        if name == "cases":
            kwargs["default"] = list(cases)
        if name == "timeout":
            kwargs["default"] = timeout
        if name in helps:
            kwargs["help"] = helps[name]  # None: no help text, as add_argument without one
        elif name == "out":
            kwargs["help"] = kwargs["help"].format(results=results)
        p.add_argument(f"--{name}", **kwargs)


def size_mode(args: argparse.Namespace, full_repeat: int = 3) -> str:
    """``"quick"`` or ``"full"``; ``args.repeat`` (runs per case) defaults to 1 quick and
    ``full_repeat`` full."""
    if args.repeat is None:
        args.repeat = 1 if args.quick else full_repeat
    return "quick" if args.quick else "full"


def main(
    parse_args: Callable[[list[str] | None], argparse.Namespace],
    child_main: Callable[[Any], int],
    parent_main: Callable[[Any], int],
    argv: list[str] | None = None,
) -> int:
    """A script's entry point: ``child_main`` in a fresh interpreter started for one ``--case``,
    ``parent_main`` (which starts those interpreters) otherwise."""
    args = parse_args(argv)
    return child_main(args) if args.case else parent_main(args)


# --------------------------------------------------------------------------------------------
# Child: one measured case
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CaseContext:
    """What a load case gets: the checkpoint it loads (``bf16_dir``: the equivalent bf16 one,
    where there is one), the model config, a stopwatch for its ``build`` and ``load`` laps and a
    place for notes (kept in its result)."""

    fp8_dir: str
    config: dict[str, Any]
    bf16_dir: str = ""
    watch: Stopwatch = dataclasses.field(default_factory=Stopwatch)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)


def error_fields(e: BaseException, limit: int = 6) -> dict[str, str]:
    """A case's exception as result fields (``error``: type and message, ``traceback``: its last
    ``limit`` frames). Recorded, not raised: "why it could not load" is a result too."""
    return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=limit)}


def load_fields(watch: Stopwatch, model: Any, cpu: bool = True) -> dict[str, Any]:
    """What a load case reports once its probe has stopped (the hashing here must not count):
    the ``build`` and ``load`` laps of ``watch`` (``build_s`` 0 where the case has none, and the
    load's CPU time unless ``cpu`` is false), the model's bytes and the digest of its state."""
    out = {"build_s": watch.laps.get("build", 0.0), "load_s": watch.laps["load"]}
    if cpu:
        out["load_cpu_s"] = watch.cpu["load"]
    out.update(model_bytes=model_bytes(model), digest=state_digest(model.state_dict()))
    return out


def run_load_case(
    result_path: str, case: str, fn: Callable[[Any], Any], ctx: Any, catch: type[BaseException] = Exception
) -> int:
    """Run ``fn(ctx)``, a case that returns the model it built and loaded (timing the laps
    ``build`` and ``load`` on ``ctx.watch``, notes in ``ctx.notes``), between a
    :class:`MemoryProbe`'s baseline and its end reading, and write the result for the parent.
    An exception of type ``catch`` (but never ``KeyboardInterrupt`` or ``SystemExit``) is
    recorded with the memory reached so far."""
    result: dict[str, Any] = {"case": case}
    probe = MemoryProbe()
    try:
        model = fn(ctx)
    except catch as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        result.update(error_fields(e))
        result.update(probe.report(), notes=ctx.notes)
        write_result(result_path, result)
        return 0
    probe.stop()  # before hashing, which must not count
    result.update(probe.report())
    result.update(load_fields(ctx.watch, model), notes=ctx.notes)
    write_result(result_path, result)
    return 0


def prepare_lazyfp8() -> dict[str, Any]:
    """Load lazyfp8's compiled kernels before the baseline, as :func:`import_transformers_fp8`
    does for transformers' lazy imports: library code (llvmlite's LLVM and the machine code,
    from the on-disk cache after the first process), loaded once per process and the same for
    any checkpoint size. Returns what that cost, for the case's notes and the report."""
    t0 = time.perf_counter()
    before = proc_status()
    from lazyfp8.kernels import jit as _jit

    k = _jit.kernels()
    after = proc_status()
    return {
        "kernels": "off" if k is None else ("avx512-vbmi" if k.vector else "scalar"),
        "seconds": round(time.perf_counter() - t0, 4),
        "rss_mib": round(mib(after["VmRSS"] - before["VmRSS"]), 1),
    }


def kernels_line(rows: list[dict[str, Any]]) -> list[str]:
    """One report line on the compiled kernels the lazyfp8 cases loaded before their baseline."""
    for r in rows:
        info = (r.get("notes") or {}).get("kernels")
        if info and info["kernels"] == "off":
            return ["- lazyfp8 kernels: pure torch (LAZYFP8_JIT=0 or no llvmlite)", ""]
        if info:
            return [
                f"- lazyfp8 kernels: {info['kernels']}, loaded before the baseline in {info['seconds'] * 1000:.0f} ms "
                f"(+{info['rss_mib']:.0f} MiB RSS, mostly LLVM's code pages; once per process, any model size)",
                "",
            ]
    return []


def import_transformers_fp8() -> None:
    """Import what ``from_pretrained`` of an FP8 checkpoint imports lazily (the quantizer,
    accelerate), before the baseline, so the case's memory is the load's and not the imports'."""
    import transformers.integrations.finegrained_fp8
    import transformers.quantizers.quantizer_finegrained_fp8  # noqa: F401

    try:
        import accelerate  # noqa: F401
    except ImportError:
        pass  # from_pretrained will say so; the case records it


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


# --------------------------------------------------------------------------------------------
# Parent: the runs, the result file, the exit status
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def work_directory(path: str | None, prefix: str) -> Iterator[str]:
    """``path`` (``--workdir``: kept, its checkpoints reused next time), or a temporary
    directory named ``prefix...``, removed afterwards."""
    workdir = path or tempfile.mkdtemp(prefix=prefix)
    try:
        yield workdir
    finally:
        if path is None:
            shutil.rmtree(workdir, ignore_errors=True)


def status_line(r: Mapping[str, Any], limit: int = 300) -> str:
    """One run's progress line: its error (first ``limit`` characters), or its load time (and
    warm time, where it has one) and the CPU time other processes used meanwhile."""
    if "error" in r:
        return short_error(r["error"], limit)
    extra = f", warm {r['warm_s']:.2f} s" if "warm_s" in r else ""
    return f"load {r['load_s']:.2f} s{extra} (others' CPU {r['others_cpu_s']:.1f} s)"


def run_repeated(
    script: str,
    cases: Sequence[str],
    repeat: int,
    child_args: Sequence[str] | Callable[[int, str], Sequence[str]],
    warm: Callable[[str], Iterable[str]],
    timeout: float,
    status: Callable[[dict[str, Any]], str] = status_line,
    label: str = "",
    before: Callable[[str], None] | None = None,
    after: Callable[[str], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every case ``repeat`` times, interleaved (run 1 of each case, then run 2...), each in a
    fresh interpreter (:func:`run_case`) with the files ``warm(case)`` read just before it (a
    warm page cache). ``child_args`` (or ``child_args(run_index, case)``) go to the child;
    ``before(case)`` runs after the warm-up and ``after(case)`` after the run. Prints one line a
    run; returns the runs of each case."""
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    for i in range(repeat):
        for case in cases:
            warm_page_cache(warm(case))
            if before is not None:
                before(case)
            args = child_args(i, case) if callable(child_args) else child_args
            r = run_case(script, case, args, timeout=timeout)
            if after is not None:
                after(case)
            print(f"  {label}run {i + 1}/{repeat} {case}: {status(r)}", flush=True)
            runs[case].append(r)
    return runs


def result_path(out: str | None, name: str, mode: str) -> str:
    """``--out``, or ``benchmarks/results/<name>_<mode>.json``."""
    return out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}_{mode}.json")


def save_result(path: str, result: Mapping[str, Any]) -> None:
    """Write the run's JSON (indented; what JSON cannot hold, as ``str``), creating its folder."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_result(path, result)


def exit_status(failures: Sequence[str]) -> int:
    """Print each failure to stderr; 1 if there was any, else 0."""
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


def finish(path: str, result: Mapping[str, Any], failures: Sequence[str]) -> int:
    """Save the run's JSON, say where, and return :func:`exit_status` of ``failures``."""
    save_result(path, result)
    print(f"\nsaved {path}")
    return exit_status(failures)


# --------------------------------------------------------------------------------------------
# Report: memory bound, ratios, verdicts
# --------------------------------------------------------------------------------------------
#: The memory bound of a lazyfp8 load: the largest tensor stored in the checkpoint + 64 MiB.
BOUND_SLACK = 64 * MiB


def load_bound(manifest: Mapping[str, Any]) -> int:
    """The bound for a checkpoint whose manifest records its ``largest_fp8_tensor``."""
    return manifest["largest_fp8_tensor"]["bytes"] + BOUND_SLACK


def peak_above_params(r: dict[str, Any], mib_key: str = "peak_above_params_mib") -> int:
    """Set ``peak_above_params`` (``VmHWM`` − baseline RSS − the model's bytes: what the load
    needed besides the parameters it filled) and its MiB under ``mib_key``; return it."""
    peak = r["vmhwm"] - r["baseline_rss"] - r["model_bytes"]
    r["peak_above_params"] = peak
    r[mib_key] = mib(peak)
    return peak


def add_ratios(
    r: dict[str, Any],
    by_case: Mapping[str, Mapping[str, Any]],
    refs: Iterable[tuple[str, str]],
    key: str = "total_s",
) -> None:
    """For each ``(case, column)`` of ``refs`` that ran: ``r[column] = r[key] / that case's``."""
    for ref, col in refs:
        other = by_case.get(ref)
        if other and other.get(key):
            r[col] = r[key] / other[key]


def largest_tensor_line(manifest: Mapping[str, Any]) -> str:
    """The report's line on the largest stored tensor and the bound it sets."""
    largest = manifest["largest_fp8_tensor"]
    return (
        f"- largest on-disk tensor: {largest['key']} ({largest['dtype']}), {mib(largest['bytes']):.1f} MiB; "
        f"bound = largest + 64 MiB = {mib(load_bound(manifest)):.1f} MiB"
    )


def bound_verdicts(
    rows: Iterable[Mapping[str, Any]],
    bound: int,
    cases: Iterable[str] | None = None,
    fails: str = "does not hold",
) -> list[str]:
    """A paragraph for each row (of ``cases``, in that order, if given) that has a
    ``peak_above_params``: its peak against the bound, and whether the bound holds."""
    if cases is not None:
        by_case = {r["case"]: r for r in rows}
        rows = [by_case[c] for c in cases if c in by_case]
    lines = []
    for r in rows:
        if "peak_above_params" in r:
            verdict = "holds" if r["peak_above_params"] <= bound else fails
            lines.append(
                f"\n{r['case']}: peak above params {mib(r['peak_above_params']):.1f} MiB vs bound "
                f"{mib(bound):.1f} MiB: the bound {verdict}."
            )
    return lines


def error_lines(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """A paragraph for each row some of whose runs failed: how many, and the first error."""
    return [
        f"\n{r['case']} failed in {len(r['errors'])}/{len(r['runs'])} run(s): {short_error(r['errors'][0])}"
        for r in rows
        if r.get("errors")
    ]


def load_failures(rows: Iterable[Mapping[str, Any]], lazy_cases: Iterable[str]) -> list[str]:
    """What makes a load benchmark fail: a lazyfp8 case that did not load, or any load with
    wrong bits."""
    lazy_cases = tuple(lazy_cases)
    out = []
    for r in rows:
        if r["case"] in lazy_cases and r.get("errors"):
            out.append(f"{r['case']} failed to load")
        if r.get("bit_exact") == "NO":
            out.append(f"{r['case']} loaded different bits than the reference")
    return out
