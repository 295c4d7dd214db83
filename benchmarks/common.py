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

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import resource
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
class ModelSpec:
    """Sizes of a ``Mistral3ForConditionalGeneration``: a Mistral text model with a small Pixtral
    vision tower, the shape of the released Mistral-3.x FP8 checkpoints scaled down."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
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
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if {k: manifest.get(k) for k in wanted} == wanted:
            log(f"reusing checkpoints in {workdir}")
            return Checkpoints(workdir, fp8_dir, bf16_dir, manifest)
    t0 = time.perf_counter()
    manifest = dict(wanted, **_write_checkpoints(fp8_dir, bf16_dir, spec))
    manifest["generate_s"] = round(time.perf_counter() - t0, 2)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=2)
    log(f"wrote checkpoints to {workdir} in {manifest['generate_s']} s")
    return Checkpoints(workdir, fp8_dir, bf16_dir, manifest)


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
        if os.path.exists(result_path):
            with open(result_path) as f:
                result = json.load(f)
            result.setdefault("stderr_tail", _tail(proc.stderr))
        else:
            err = _tail(proc.stderr) or _tail(proc.stdout)
            result = {"case": case, "error": f"exit code {proc.returncode}: {err}"}
        result["process_s"] = time.perf_counter() - t0
        result["others_cpu_s"] = max(others, 0.0)
        return result


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
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
    }


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
