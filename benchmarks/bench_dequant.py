"""Dequantization throughput: GB/s of output for each scale format, next to memcpy and the
naive torch formulas, in one run; the 4-bit formats (NVFP4, MXFP4, INT4) with the compiled and
the torch kernel next to a memcpy of the same output; then the compiled kernels written with
llvmlite's IR builder side by side with the textual IR they replaced (commit e8a1373), and what
the compiled kernels cost at first use. Each case runs in a fresh process.

    python benchmarks/bench_dequant.py --quick    # 1M elements; what CI runs
    python benchmarks/bench_dequant.py            # 64M elements (8192 x 8192), 128 MiB of bf16

lazyfp8 cases time ``dst.copy_(view[key])`` into a preallocated bf16 tensor: the real path, with
the checkpoint in the (warm) page cache, so the ``preadv`` copy of the codes is included. The
naive cases start from FP8 codes already in memory. Every result is checked bit for bit against
``(w.to(float32) * s.to(float32)).to(bfloat16)``.

4-bit cases (``packed:{nvfp4-1x16,mxfp4-1x32,int4-g128}:{1,2}``) time ``dst.copy_(view[key])``
too, each in one process four ways, alternating round by round: a memcpy of the same bf16
output, the read with the compiled kernels (``LAZYFP8_JIT`` as the parent has it) and with the
torch kernels (``LAZYFP8_JIT=0``), and the compiled ``GroupKernel`` alone over the codes in
memory (the read minus reading the file and preparing the scales, which is serial, once a
tensor: ``setup ms``); all must agree bit for bit (the torch ``GroupKernel`` is the formula's
reference). Checkpoints written by ``lazyfp8.save``: NVFP4 in
ModelOpt's form (e4m3 scales per 16, a global scale), MXFP4 in gpt-oss's (e8m0 per 32), INT4
in compressed-tensors' (groups of 128, its scales rewritten as bf16 as its producer stores
them).

Kernel cases (``kernel:{per-tensor,block-128x128}:{1,2}``) run lazyfp8's own kernel objects
over FP8 codes already in memory, chunked as a read chunks them, into a 128 MiB bf16
destination, twice in one process, alternating: ``new`` compiled from ``lazyfp8.kernels.ir``,
``old`` from the textual IR of ``git show e8a1373:lazyfp8/kernels/ir.py`` through the same
engine (same CPU, features, optimisation pipeline, object cache and ctypes wrappers: only the
IR differs). First-use cases
time ``import llvmlite``, building the IR, compiling with a cold on-disk cache and loading with a
warm one. Without git (or that commit), the ``old`` cases are skipped with a note.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import cli, processes, reporting

SCHEMES = {
    "per-tensor": {"scheme": "per-tensor"},
    "per-channel": {"scheme": "per-channel", "format": "compressed-tensors"},
    "block-128x128": {"scheme": "block", "block_size": (128, 128)},
    "mx-1x32": {"scheme": "mx", "ue8m0": True},
}
NAIVE = ("memcpy", "copy_+mul_", "to+mul")
#: 4-bit formats, as ``lazyfp8.save`` writes them (every one a grid of 1 x b1 blocks).
PACKED = {
    "nvfp4-1x16": {"scheme": "nvfp4", "format": "modelopt"},  # e2m1, e4m3 scale per 16, global scale
    "mxfp4-1x32": {"scheme": "mxfp4"},  # e2m1, e8m0 scale per 32 (gpt-oss blocks)
    "int4-g128": {"scheme": "int4", "group_size": 128},  # int4, a scale per 128 (rewritten as bf16)
}
PACKED_THREADS = (1, 2)
PACKED_ROUNDS = 3  # alternating rounds of memcpy, compiled and torch in one process (quick: 1)

#: The commit whose textual-IR kernels the ``old`` cases compile.
BASELINE = "e8a1373"
KERNELS = ("per-tensor", "block-128x128")
KERNEL_THREADS = (1, 2)
KERNEL_ROUNDS = 6  # alternating rounds of old and new in one process (full mode; quick runs 3)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shape(mode: str) -> tuple[int, int]:
    return (1024, 1024) if mode == "quick" else (8192, 8192)


def generate(workdir: str, mode: str) -> None:
    import torch

    import lazyfp8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(_shape(mode), generator=g)
    for name, kw in SCHEMES.items():
        lazyfp8.save({"w.weight": w}, os.path.join(workdir, name), quantize=lambda k: True, exclude=(), **kw)
    for name, kw in PACKED.items():
        # config={}: a config.json with the quantization_config (int4 is not read without one)
        lazyfp8.save({"w.weight": w}, os.path.join(workdir, name), quantize=lambda k: True, exclude=(), config={}, **kw)
    from safetensors.torch import load_file, save_file

    path = os.path.join(workdir, "int4-g128", "model.safetensors")
    tensors = load_file(path)
    tensors["w.weight_scale"] = tensors["w.weight_scale"].to(torch.bfloat16)  # as compressed-tensors stores them
    save_file(tensors, path, metadata={"format": "pt"})


def run(args: argparse.Namespace) -> dict:
    import torch

    import lazyfp8
    from lazyfp8.testing import reference

    method, threads = args.case.rsplit(":", 1)
    threads = int(threads)
    torch.set_num_threads(min(threads, torch.get_num_threads()) if threads else torch.get_num_threads())
    shape = _shape(args.mode)
    numel = shape[0] * shape[1]
    out = torch.empty(shape, dtype=torch.bfloat16)
    scale = torch.tensor(0.0123)
    if method in NAIVE:
        src = torch.randn(shape).to(torch.bfloat16)
        codes = torch.randint(0, 256, shape, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
        fn = {
            "memcpy": lambda: out.copy_(src),
            "copy_+mul_": lambda: (out.copy_(codes), out.mul_(scale)),
            "to+mul": lambda: out.copy_(codes.to(torch.bfloat16) * scale),
        }[method]
        ref = None if method == "memcpy" else (codes.to(torch.float32) * scale).to(torch.bfloat16)
    else:
        view = lazyfp8.LazyFP8View(os.path.join(args.workdir, method), threads=threads or None,
                                   block_size=SCHEMES[method].get("block_size"))
        lazy = view["w.weight"]

        def fn() -> None:
            out.copy_(lazy)

        info = view.info("w.weight")
        with open(os.path.join(args.workdir, method, "model.safetensors"), "rb") as f:
            from safetensors.torch import load

            codes_stored = load(f.read())["w.weight"]
        ref = reference(codes_stored, view.scale("w.weight"), torch.bfloat16, info.granularity.block_size(shape))
    fn()  # warm-up: first touch of every page, tables, the thread pool
    best = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    exact = None if ref is None else bool(torch.equal(out.view(torch.int16), ref.view(torch.int16)))
    return {"case": args.case, "method": method, "threads": threads or torch.get_num_threads(),
            "numel": numel, "seconds": best, "gbps": numel * 2 / best / 1e9, "bit_exact": exact}


def run_packed(args: argparse.Namespace) -> dict:
    """One ``packed:FORMAT:THREADS`` case, in this process, alternating round by round:

    - ``memcpy``: ``out.copy_(src)`` of the same bf16 output;
    - ``compiled`` and ``torch``: ``out.copy_(view[key])`` with the compiled kernels
      (``LAZYFP8_JIT`` as the parent has it) and with the torch kernels (``LAZYFP8_JIT=0``): the
      whole read, scales included (reading, converting and checking them is serial, once a tensor);
    - ``kernel``: the compiled ``GroupKernel`` alone, built once, over the codes in memory,
      chunked and spread over the threads as a read does (``run_kernel``'s way).

    Best of ``repeat`` runs per round (one torch run a round: it is 10-250x slower); ``setup_ms``:
    the best time to build the compiled kernel (``TensorSource.kernel``: read, convert and
    check the scales). ``bit_exact``: the compiled and the torch read agree bit for bit, and the
    kernel alone gives the same bits."""
    import torch

    import lazyfp8
    from lazyfp8.kernels.dequant import choose_backend, thread_workspace
    from lazyfp8.kernels.parallel import run_split

    _, name, threads = args.case.split(":")
    threads = int(threads)
    torch.set_num_threads(min(threads, torch.get_num_threads()))
    shape = _shape(args.mode)
    numel = shape[0] * shape[1]
    view = lazyfp8.LazyFP8View(os.path.join(args.workdir, name), threads=threads)
    lazy = view["w.weight"]
    source = lazy._source  # the TensorSource behind the value: its plan, codes and kernel
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    src = torch.randn(shape).to(torch.bfloat16)
    flags = {"compiled": os.environ.get("LAZYFP8_JIT", "1"), "torch": "0"}

    def read(flag: str) -> None:
        os.environ["LAZYFP8_JIT"] = flag  # read again at each tensor read: chooses the kernels
        out.copy_(lazy)

    os.environ["LAZYFP8_JIT"] = flags["compiled"]
    setup = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        kernel = source.kernel(torch.device("cpu"))
        setup = min(setup, time.perf_counter() - t0)
    plan = source.plan()
    codes = torch.empty(sum(source.code_bytes(r) for r in plan.chunks), dtype=torch.uint8)
    starts = []
    at = 0
    for rect in plan.chunks:
        n = source.code_bytes(rect)
        source.read_rect(codes[at : at + n], rect)
        starts.append(at)
        at += n
    jobs = list(zip(plan.chunks, starts))

    def kernel_alone() -> None:
        def work_on(chunk) -> None:
            work = thread_workspace()
            for rect, start in chunk:
                kernel(codes[start : start + source.code_bytes(rect)], flat[rect.local : rect.local + rect.numel], rect, work, True)

        run_split(jobs, threads, work_on)

    fns = {"memcpy": lambda: out.copy_(src), "compiled": lambda: read(flags["compiled"]), "torch": lambda: read("0"), "kernel": kernel_alone}
    backends = {}
    results = {}
    for impl in ("torch", "compiled", "kernel"):  # warm-up: first touch of every page, the pool, the kernels
        fns[impl]()
        os.environ["LAZYFP8_JIT"] = flags["compiled" if impl == "kernel" else impl]
        backends[impl] = choose_backend().name
        results[impl] = out.clone()
    fns["memcpy"]()
    want = results["torch"].view(torch.int16)
    exact = all(bool(torch.equal(results[impl].view(torch.int16), want)) for impl in ("compiled", "kernel"))
    del results, want
    best = dict.fromkeys(fns, float("inf"))
    impls = list(fns)
    for i in range(args.rounds):
        for impl in impls if i % 2 == 0 else impls[::-1]:
            for _ in range(1 if impl == "torch" else args.repeat):
                t0 = time.perf_counter()
                fns[impl]()
                best[impl] = min(best[impl], time.perf_counter() - t0)
    os.environ["LAZYFP8_JIT"] = flags["compiled"]
    gbps = {impl: numel * 2 / t / 1e9 for impl, t in best.items()}
    return {"case": args.case, "method": name, "threads": threads, "numel": numel, "rounds": args.rounds,
            "kernel": backends["compiled"], "memcpy_gbps": gbps["memcpy"], "gbps": gbps["compiled"],
            "x_memcpy": gbps["compiled"] / gbps["memcpy"], "torch_gbps": gbps["torch"],
            "torch_x_memcpy": gbps["torch"] / gbps["memcpy"], "x_torch": gbps["compiled"] / gbps["torch"],
            "kernel_gbps": gbps["kernel"], "kernel_x_memcpy": gbps["kernel"] / gbps["memcpy"],
            "setup_ms": setup * 1000, "bit_exact": exact}  # fmt: skip


def packed_section(workdir: str, mode: str, repeat: int) -> tuple[list[dict], str]:
    """Run the 4-bit cases; return their rows and their table."""
    rounds = 1 if mode == "quick" else PACKED_ROUNDS
    extra = ["--workdir", workdir, "--mode", mode, "--repeat", str(repeat), "--rounds", str(rounds)]
    rows = [processes.run_case(__file__, f"packed:{name}:{threads}", extra) for threads in PACKED_THREADS for name in PACKED]
    table = reporting.markdown_table(
        rows,
        [("method", "format"), ("threads", "threads"), ("kernel", "kernels"), ("memcpy_gbps", "memcpy GB/s"),
         ("gbps", "read, compiled GB/s"), ("x_memcpy", "x memcpy"), ("torch_gbps", "read, torch GB/s"),
         ("torch_x_memcpy", "x memcpy"), ("x_torch", "compiled / torch"), ("kernel_gbps", "kernel alone GB/s"),
         ("kernel_x_memcpy", "x memcpy"), ("setup_ms", "setup ms"), ("bit_exact", "bit-exact"),
         ("others_cpu_s", "others' CPU s"), ("error", "error")],
    )
    return rows, table


def baseline_ir(workdir: str) -> tuple[str | None, str | None]:
    """``(path, None)``: the textual IR module of ``BASELINE`` written to ``workdir``, or
    ``(None, why)`` when git or the commit is not there."""
    try:
        proc = subprocess.run(["git", "-C", ROOT, "show", f"{BASELINE}:lazyfp8/kernels/ir.py"],
                              capture_output=True, text=True, timeout=60, check=False)
    except OSError as e:
        return None, f"no git ({e})"
    if proc.returncode != 0:
        return None, f"git show {BASELINE} failed: {proc.stderr.strip()[:200]}"
    path = os.path.join(workdir, "old_ir.py")
    with open(path, "w") as f:
        f.write(proc.stdout)
    return path, None


def _new_functions(module: str, old: str) -> str:
    """The functions of today's module (text) that the ``old`` module's text does not define
    (the group kernels and the ``permute16`` they call), and the intrinsics they declare that
    it does not: ``jit`` wraps the group kernels (they are not timed here)."""
    import re

    define = r'^define [^@\n]*@"?([\w.]+)"?\(.*?^}$'
    defined = set(re.findall(define, old, re.M | re.S))
    functions = [m[0] for m in re.finditer(define, module, re.M | re.S) if m[1] not in defined]
    intrinsic = r'@"?(llvm\.[\w.]+)"?'
    used = set(re.findall(intrinsic, "".join(functions))) - set(re.findall(intrinsic, old))
    declares = [line for line in module.splitlines() if line.startswith("declare") and re.search(intrinsic, line)[1] in used]
    return "\n" + "\n".join(declares + functions) + "\n"


def use_old_ir(path: str) -> None:
    """Make ``lazyfp8.kernels.jit`` compile the textual IR at ``path`` instead of the IRBuilder
    module: a stand-in for ``lazyfp8.kernels.ir`` with the same tables (the old functions have
    the same C signatures) whose ``assemble`` returns the old text, under the same target triple
    and data layout. Everything else (engine, cache, wrappers, kernel objects) is today's."""
    import lazyfp8.kernels
    import lazyfp8.kernels.ir as new_ir

    old = types.ModuleType("old_ir")
    with open(path) as f:
        exec(compile(f.read(), f"{BASELINE}:lazyfp8/kernels/ir.py", "exec"), old.__dict__)
    shim = types.ModuleType("lazyfp8.kernels.ir")
    # The old module had two variants: AVX-512 VBMI, and portable for every other CPU.
    shim.VARIANTS = {k: new_ir.VARIANTS["vbmi" if k == "vbmi" else "portable"] for k in new_ir.VARIANTS}
    shim.SIGNATURES = new_ir.SIGNATURES
    shim.TABLE_BYTES = old.TABLE_BYTES
    shim.GROUP_TABLE_BYTES = new_ir.GROUP_TABLE_BYTES

    def assemble(variant: str, triple: str | None = None, data_layout: str | None = None) -> str:
        head = (f'target triple = "{triple}"\n' if triple else "") + (f'target datalayout = "{data_layout}"\n' if data_layout else "")
        text = old.assemble(variant == "vbmi")
        return head + text + _new_functions(str(new_ir.assemble(variant)), text)

    shim.assemble = assemble
    sys.modules["lazyfp8.kernels.ir"] = shim
    lazyfp8.kernels.ir = shim


def run_kernel(args: argparse.Namespace) -> dict:
    """One ``kernel:KERNEL:THREADS`` case: lazyfp8's kernel object over in-memory codes into a
    final destination, chunked and spread over threads as ``TensorSource.read_box_into`` does,
    once compiled from the IRBuilder module (``new``) and once from the old textual IR (``old``),
    both in this process on the same buffers, alternating round by round: the two see the same
    memory placement and the same disturbances (timings of one build vary by up to 1.5x from
    one process to the next on a shared machine, for either module)."""
    import torch

    _, kernel_name, threads = args.case.split(":")
    threads = int(threads)
    from lazyfp8.kernels import jit as _jit
    from lazyfp8.kernels.dequant import Backend, GridKernel, PerTensorKernel, thread_workspace
    from lazyfp8.kernels.parallel import run_split
    from lazyfp8.kernels.plan import plan_box
    from lazyfp8.kernels.source import DEFAULT_CHUNK_ELEMENTS
    from lazyfp8.testing import reference

    compiled = {"new": _jit.kernels()}
    if args.old_ir:
        _jit._compile.cache_clear()  # compile again, from the old text
        use_old_ir(args.old_ir)
        compiled["old"] = _jit.kernels()
    if any(k is None for k in compiled.values()):
        return {"case": args.case, "error": "compiled kernels unavailable"}
    shape = _shape(args.mode)
    rows, cols = shape
    numel = rows * cols
    fp8 = torch.float8_e4m3fn
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (numel,), dtype=torch.int32, generator=g).to(torch.uint8)
    out = torch.empty(numel, dtype=torch.bfloat16)
    kernels = {}
    for impl, k in compiled.items():
        backend = Backend(k.variant, k)
        if kernel_name == "per-tensor":
            scale, block, budget = torch.tensor(0.0123), None, DEFAULT_CHUNK_ELEMENTS
            kernels[impl] = PerTensorKernel(fp8, scale, torch.bfloat16, numel, backend=backend)
        else:
            # what TensorSource.plan gives a scale grid: half a chunk
            block, budget = (128, 128), DEFAULT_CHUNK_ELEMENTS // 2
            scale = torch.rand((-(-rows // 128), -(-cols // 128)), generator=torch.Generator().manual_seed(1)) * 0.02 + 1e-3
            kernels[impl] = GridKernel(fp8, scale, block, rows, backend=backend)
    plan = plan_box(shape, (0, 0), shape, budget, 0, 1)

    def run_once(kernel) -> float:
        def work_on(chunks) -> None:
            work = thread_workspace()
            for rect in chunks:
                a, b = rect.local, rect.local + rect.numel
                kernel(codes[a:b], out[a:b], rect, work, True)

        t0 = time.perf_counter()
        run_split(plan.chunks, threads, work_on)
        return time.perf_counter() - t0

    ref = reference(codes.view(fp8).view(shape), scale, torch.bfloat16, block).reshape(-1).view(torch.int16)
    result: dict = {"case": args.case, "kernel": kernel_name, "threads": threads, "numel": numel,
                    "variant": compiled["new"].variant, "rounds": args.rounds}
    best = {impl: float("inf") for impl in kernels}
    for impl, kernel in kernels.items():
        run_once(kernel)  # warm-up: first touch of the destination, tables, the thread pool
        result[f"{impl}_bit_exact"] = bool(torch.equal(out.view(torch.int16), ref))
    for i in range(args.rounds):
        for impl in sorted(kernels, reverse=i % 2 == 1):  # alternate which goes first
            best[impl] = min([best[impl]] + [run_once(kernels[impl]) for _ in range(args.repeat)])
    for impl, seconds in best.items():
        result[f"{impl}_seconds"] = seconds
        result[f"{impl}_gbps"] = numel * 2 / seconds / 1e9
    result["bit_exact"] = all(result[f"{impl}_bit_exact"] for impl in kernels)
    return result


def run_first_use(args: argparse.Namespace) -> dict:
    """One ``first:IMPL:CACHE`` case in a fresh interpreter (``LAZYFP8_CACHE_DIR`` set by the
    parent: empty for ``cold``, filled by the cold case for ``warm``): seconds to import
    llvmlite, to build the module's IR once, and for ``_jit.kernels()`` (which builds the IR
    again, then compiles, or loads the machine code from the cache)."""
    import torch  # noqa: F401  (imported by lazyfp8 anyway: not the kernels' cost)

    _, impl, cache = args.case.split(":")
    t0 = time.perf_counter()
    import llvmlite.binding as llvm
    import llvmlite.ir  # noqa: F401

    import_s = time.perf_counter() - t0
    if impl == "old":
        use_old_ir(args.old_ir)
    from lazyfp8.kernels import ir
    from lazyfp8.kernels import jit as _jit

    llvm.initialize_native_target()
    variant = _jit._variant("best", __import__("platform").machine(), llvm.get_host_cpu_features().flatten())
    t0 = time.perf_counter()
    text = str(ir.assemble(variant))
    assemble_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    k = _jit.kernels()
    kernels_s = time.perf_counter() - t0
    if k is None:
        return {"case": args.case, "error": "compiled kernels unavailable"}
    return {"case": args.case, "impl": impl, "cache": cache, "variant": k.variant, "from_cache": k.from_cache,
            "import_s": import_s, "assemble_s": assemble_s, "kernels_s": kernels_s, "ir_lines": text.count("\n")}


def kernel_section(workdir: str, mode: str, repeat: int) -> tuple[list[dict], list[dict], str, list[str]]:
    """Run the kernel and first-use cases; return their rows, the printed tables and notes."""
    old_ir, why = baseline_ir(workdir)
    notes = [] if old_ir else [f"old (textual IR of {BASELINE}) skipped: {why}"]
    impls = ("new", "old") if old_ir else ("new",)
    rounds = 3 if mode == "quick" else KERNEL_ROUNDS
    extra = ["--workdir", workdir, "--mode", mode, "--repeat", str(repeat), "--rounds", str(rounds)]
    extra += ["--old-ir", old_ir] if old_ir else []
    saved = os.environ.get("LAZYFP8_CACHE_DIR")
    kernel_rows, first_rows = [], []
    try:
        os.environ["LAZYFP8_CACHE_DIR"] = os.path.join(workdir, "cache")
        for threads in KERNEL_THREADS:
            for kernel_name in KERNELS:
                kernel_rows.append(processes.run_case(__file__, f"kernel:{kernel_name}:{threads}", extra))
        # First use, old and new alternating: each with a fresh (cold) cache, then again with
        # the cache that run filled (warm). The table keeps the fastest of `repeat`.
        for i in range(repeat):
            for impl in impls if i % 2 == 0 else impls[::-1]:
                os.environ["LAZYFP8_CACHE_DIR"] = os.path.join(workdir, f"cache-{impl}-{i}")
                for cache in ("cold", "warm"):
                    first_rows.append(processes.run_case(__file__, f"first:{impl}:{cache}", extra))
    finally:
        if saved is None:
            os.environ.pop("LAZYFP8_CACHE_DIR", None)
        else:
            os.environ["LAZYFP8_CACHE_DIR"] = saved
    table_rows = []
    for r in kernel_rows:
        row = {"kernel": r.get("kernel", r["case"]), "threads": r.get("threads"), "variant": r.get("variant"),
               "old": r.get("old_gbps"), "new": r.get("new_gbps"), "bit_exact": r.get("bit_exact"),
               "others": r.get("others_cpu_s"), "error": r.get("error")}
        row["ratio"] = row["new"] / row["old"] if row["new"] and row["old"] else None
        table_rows.append(row)
    kernel_table = reporting.markdown_table(
        table_rows,
        [("kernel", "kernel"), ("threads", "threads"), ("variant", "variant"), ("old", f"old GB/s ({BASELINE} text)"),
         ("new", "new GB/s (IRBuilder)"), ("ratio", "new/old"), ("bit_exact", "bit-exact"), ("others", "others' CPU s"),
         ("error", "error")],
    )

    def best(impl: str, cache: str, key: str) -> float | None:
        vals = [r[key] for r in first_rows if "error" not in r and r["impl"] == impl and r["cache"] == cache]
        return min(vals) if vals else None

    first = []
    for label, cache, key in (("import llvmlite", "cold", "import_s"), ("build the IR", "cold", "assemble_s"),
                              ("kernels(), cold cache (build + optimise + codegen)", "cold", "kernels_s"),
                              ("kernels(), warm cache (build + load)", "warm", "kernels_s")):
        o, n = best("old", cache, key), best("new", cache, key)
        first.append({"step": label, "old_ms": o and o * 1000, "new_ms": n and n * 1000,
                      "ratio": n / o if n and o else None})
    first_table = reporting.markdown_table(
        first, [("step", "first use"), ("old_ms", "old ms"), ("new_ms", "new ms"), ("ratio", "new/old")])
    cold_hits = [r for r in first_rows if "error" not in r and r["cache"] == "cold" and r["from_cache"]]
    warm_misses = [r for r in first_rows if "error" not in r and r["cache"] == "warm" and not r["from_cache"]]
    if cold_hits or warm_misses:
        notes.append(f"cache not as expected: {len(cold_hits)} cold runs hit, {len(warm_misses)} warm runs missed")
    return kernel_rows, first_rows, kernel_table + "\n\n" + first_table, notes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--case")
    p.add_argument("--result")
    p.add_argument("--workdir")
    p.add_argument("--mode")
    p.add_argument("--out")
    p.add_argument("--old-ir", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        child = {"kernel": run_kernel, "first": run_first_use, "packed": run_packed}.get(args.case.split(":")[0], run)
        processes.write_result(args.result, child(args))
        return 0
    mode = "quick" if args.quick else "full"
    repeat = args.repeat or (2 if args.quick else 5)
    with tempfile.TemporaryDirectory(prefix="lazyfp8-dequant-") as workdir:
        generate(workdir, mode)
        rows = []
        for threads in (1, 0):
            for method in (*NAIVE, *SCHEMES):
                r = processes.run_case(__file__, f"{method}:{threads}", ["--workdir", workdir, "--mode", mode, "--repeat", str(repeat)])
                rows.append(r)
        packed_rows, packed_table = packed_section(workdir, mode, repeat)
        kernel_rows, first_rows, kernel_tables, notes = kernel_section(workdir, mode, repeat)
    by = {(r.get("method"), r.get("threads")): r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        mc = by.get(("memcpy", r["threads"]))
        naive = by.get(("copy_+mul_", r["threads"]))
        r["x_memcpy"] = r["gbps"] / mc["gbps"] if mc else None
        r["x_copy_mul"] = r["gbps"] / naive["gbps"] if naive else None
    table = reporting.markdown_table(
        rows,
        [("method", "method"), ("threads", "threads"), ("gbps", "GB/s of bf16 out"), ("x_memcpy", "x memcpy"),
         ("x_copy_mul", "x copy_+mul_"), ("bit_exact", "bit-exact"), ("others_cpu_s", "others' CPU s"), ("error", "error")],
    )
    shape = _shape(mode)
    print(f"## Dequantization throughput ({mode}): {shape[0]}x{shape[1]} weight, best of {repeat}\n")
    print(table)
    print(f"\n## 4-bit formats ({mode}): compiled and torch kernels, memcpy of the same output, one process each\n")
    print(packed_table)
    print(f"\n## Compiled kernels: IRBuilder (new) and the textual IR of {BASELINE} (old), same engine\n")
    for note in notes:
        print(f"- {note}")
    print(kernel_tables)
    out = cli.result_path(args.out, "dequant", mode)
    processes.write_result(out, {"mode": mode, "shape": shape, "repeat": repeat, "environment": reporting.environment(),
                                 "rows": rows + packed_rows, "table": table, "packed_table": packed_table,
                                 "kernel_rows": kernel_rows, "first_use_rows": first_rows,
                                 "kernel_tables": kernel_tables, "notes": notes})
    failed = [r for r in rows + packed_rows + kernel_rows + first_rows if "error" in r or r.get("bit_exact") is False]
    for r in failed:
        print(f"FAIL: {r.get('case')}: {r.get('error') or 'wrong bits'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
