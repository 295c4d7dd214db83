"""The child side of a load case: the context it gets (:class:`CaseContext`), the imports done
before its baseline so that its memory is the load's (:func:`prepare_lazyfp8`,
:func:`import_transformers_fp8`), running it between a :class:`~harness.measure.MemoryProbe`'s
readings (:func:`run_load_case`) and the fields of its result."""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable
from typing import Any

from .measure import MemoryProbe, Stopwatch, mib, proc_status
from .models import model_bytes, state_digest
from .processes import write_result


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
        "kernels": "off" if k is None else {"vbmi": "avx512-vbmi", "portable": "scalar"}.get(k.variant, k.variant),
        "seconds": round(time.perf_counter() - t0, 4),
        "rss_mib": round(mib(after["VmRSS"] - before["VmRSS"]), 1),
    }


def import_transformers_fp8() -> None:
    """Import what ``from_pretrained`` of an FP8 checkpoint imports lazily (the quantizer,
    accelerate), before the baseline, so the case's memory is the load's and not the imports'."""
    import transformers.integrations.finegrained_fp8
    import transformers.quantizers.quantizer_finegrained_fp8  # noqa: F401

    try:
        import accelerate  # noqa: F401
    except ImportError:
        pass  # from_pretrained will say so; the case records it
