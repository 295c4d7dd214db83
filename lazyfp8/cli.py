"""The ``lazyfp8`` command line: inspect, dequantize, quantize, verify, demo."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

__all__ = ["main"]

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "fp32": "float32", "f32": "float32"}
_CHECKPOINT_FILES = ("model.safetensors.index.json", "config.json")


def _dtype(name: str) -> Any:
    import torch

    try:
        return getattr(torch, _DTYPES.get(name, name))
    except AttributeError:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; use bf16, fp16 or fp32") from None


def _mapping(value: str | None) -> Any:
    """A preset name, ``auto``, or a JSON object of ``{regex: replacement}``."""
    if value is None or not value.lstrip().startswith("{"):
        return value
    return json.loads(value)


def _progress(args: argparse.Namespace) -> bool:
    if args.quiet or not sys.stderr.isatty():
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def _print_report(report: Any) -> None:
    print(f"{report.path}: {len(report.files)} file(s), {report.tensors} tensors, scheme {report.scheme!r}")
    for f in report.files[:6]:
        print(f"  {f['name']}: {_mib(f['bytes'])}, {f['tensors']} tensors")
    if len(report.files) > 6:
        print(f"  ... {len(report.files) - 6} more")
    print("bytes by dtype: " + ", ".join(f"{d} {_mib(n)}" for d, n in sorted(report.bytes_by_dtype.items())))
    if report.fp8_summary:
        print("FP8 tensors:")
        for s in report.fp8_summary:
            print(f"  {s['count']:6d} x {s['dtype']} {s['granularity']}, scale '<name>{s['scale_suffix']}' ({s['scale_dtype']})")
    else:
        print("FP8 tensors: none")
    if report.quant_params:
        print(f"ignored quantization parameters: {len(report.quant_params)} (e.g. {report.quant_params[0]})")
    if report.config is not None:
        print("config.json: " + json.dumps(report.config))
    if report.key_mapping:
        print("key mapping rules:")
        for rule in report.key_mapping:
            print(f"  {rule}")
        for disk, runtime in list(report.runtime_names.items())[:4]:
            print(f"  e.g. {disk} -> {runtime}")
    if report.problems:
        print(f"{len(report.problems)} problem(s):")
        for p in report.problems:
            print(f"  - {p}")
    else:
        print("no problems found")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_checkpoint

    report = inspect_checkpoint(args.path, key_mapping=_mapping(args.key_mapping), scheme=args.scheme)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        print()
    else:
        _print_report(report)
    return 1 if report.problems else 0


def _prepare_destination(src: str, dst: str, force: bool) -> None:
    if os.path.exists(dst) and os.listdir(dst) and not force:
        raise FileExistsError(f"{dst} is not empty; pass --force to overwrite")
    os.makedirs(dst, exist_ok=True)


def _copy_side_files(src_root: str, dst: str) -> list[str]:
    """Copy tokenizer and other small files beside the checkpoint (not shards, index or config)."""
    copied = []
    for name in sorted(os.listdir(src_root)):
        p = os.path.join(src_root, name)
        if not os.path.isfile(p) or name.endswith(".safetensors") or name in _CHECKPOINT_FILES or name.startswith("."):
            continue
        shutil.copy2(p, os.path.join(dst, name))
        copied.append(name)
    return copied


def _root(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


def cmd_dequantize(args: argparse.Namespace) -> int:
    from . import LazyFP8View, save

    view = LazyFP8View(args.src, dtype=args.dtype, scheme=args.scheme)
    _prepare_destination(args.src, args.dst, args.force)
    copied = _copy_side_files(_root(args.src), args.dst)
    config = None
    if view.config is not None:
        config = {k: v for k, v in view.config.items() if k != "quantization_config"}
        for k in ("torch_dtype", "dtype"):
            if k in config:
                config[k] = str(args.dtype).replace("torch.", "")
    r = save(view, args.dst, scheme=None, max_shard_size=args.max_shard_size, config=config,
             overwrite=args.force, progress=_progress(args))
    fp8 = sum(view.info(k).scale_key is not None for k in view)
    if not args.quiet:
        print(f"wrote {len(r.files)} file(s), {_mib(r.total_size)}: {fp8} FP8 tensors dequantized to "
              f"{str(args.dtype).replace('torch.', '')}, {len(view) - fp8} copied; also copied {', '.join(copied) or 'no side files'}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from . import LazyFP8View, save
    from .writer import DEFAULT_EXCLUDE

    view = LazyFP8View(args.src)
    _prepare_destination(args.src, args.dst, args.force)
    copied = _copy_side_files(_root(args.src), args.dst)
    config = None if view.config is None else {k: v for k, v in view.config.items() if k != "quantization_config"}
    block = tuple(args.block_size) if args.block_size else None
    r = save(
        view, args.dst, scheme=args.scheme, block_size=block, fp8_dtype=args.fp8_dtype, format=args.format,
        exclude=args.exclude if args.exclude is not None else DEFAULT_EXCLUDE,
        max_shard_size=args.max_shard_size, config=config, overwrite=args.force, progress=_progress(args),
        ue8m0=args.scheme == "mx",
    )
    if not args.quiet:
        print(f"wrote {len(r.files)} file(s), {_mib(r.total_size)}: {len(r.quantized)} tensors quantized "
              f"({args.scheme}, {str(args.fp8_dtype).replace('torch.', '')}); also copied {', '.join(copied) or 'no side files'}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import torch

    from . import LazyFP8View

    view = LazyFP8View(args.src, key_mapping=_mapping(args.key_mapping), scheme=args.scheme)
    other = None if args.against is None else LazyFP8View(args.against, key_mapping=_mapping(args.against_key_mapping))
    worst: list[tuple[float, str]] = []
    problems = []
    total = 0
    for key in view:
        t = view.get_tensor(key)
        total += t.numel() * t.element_size()
        if other is None:
            continue
        if key not in other:
            problems.append(f"{key!r} is not in {args.against}")
            continue
        o = other.get_tensor(key)
        if o.shape != t.shape:
            problems.append(f"{key!r}: shape {list(t.shape)} vs {list(o.shape)}")
            continue
        if t.is_floating_point() or o.is_floating_point():
            a, b = t.to(torch.float32), o.to(torch.float32)
            same_nan = torch.isnan(a) == torch.isnan(b)
            err = float((a - b).abs().nan_to_num(0.0).max()) if t.numel() else 0.0
            if not bool(same_nan.all()):
                err = float("inf")
        else:
            err = 0.0 if torch.equal(t, o) else float("inf")
        worst.append((err, key))
    if other is not None:
        problems += [f"{key!r} is only in {args.against}" for key in other if key not in view]
    if not args.quiet:
        print(f"read {len(view)} tensors ({_mib(total)}) from {args.src}: every scale and shape is sound")
        if other is not None and worst:
            worst.sort(reverse=True)
            print(f"max abs error against {args.against}: {worst[0][0]:.6g} ({worst[0][1]})")
            for err, key in worst[1 : args.top]:
                print(f"  {err:.6g}  {key}")
        for p in problems:
            print(f"  - {p}")
    failed = bool(problems) or (args.atol is not None and worst and max(worst)[0] > args.atol)
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lazyfp8", description="Load, inspect and convert FP8 safetensors checkpoints.")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no summary")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="what a checkpoint holds and every problem in it (exit 1 on problems)")
    s.add_argument("path")
    s.add_argument("--key-mapping", help="a preset (mistral3), 'auto' (needs transformers), or a JSON {regex: replacement}")
    s.add_argument("--scheme", help="override the detected scheme (per-tensor, per-channel, block, mx, auto)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("dequantize", help="write a bf16/fp16/fp32 copy of an FP8 checkpoint (streaming)")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--dtype", type=_dtype, default="bf16", help="bf16 (default), fp16 or fp32")
    s.add_argument("--scheme", help="override the detected scheme")
    s.add_argument("--max-shard-size", default="5GB")
    s.add_argument("--force", action="store_true", help="overwrite a non-empty DST")
    s.set_defaults(func=cmd_dequantize)

    s = sub.add_parser("quantize", help="write an FP8 copy of a checkpoint")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--scheme", default="block", choices=["per-tensor", "per-channel", "block", "mx"])
    s.add_argument("--block-size", type=int, nargs=2, default=[128, 128], metavar=("ROWS", "COLS"))
    s.add_argument("--fp8-dtype", type=_dtype, default="float8_e4m3fn", help="float8_e4m3fn (default) or float8_e5m2")
    s.add_argument("--format", default="fp8", choices=["fp8", "compressed-tensors"])
    s.add_argument("--exclude", nargs="*", help="regexes of keys to keep unquantized (default: lm_head, embeddings)")
    s.add_argument("--max-shard-size", default="5GB")
    s.add_argument("--force", action="store_true", help="overwrite a non-empty DST")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("verify", help="read every tensor once; with --against, compare tensor by tensor")
    s.add_argument("src")
    s.add_argument("--against")
    s.add_argument("--key-mapping")
    s.add_argument("--against-key-mapping")
    s.add_argument("--scheme")
    s.add_argument("--atol", type=float, help="exit 1 if any max abs error exceeds this")
    s.add_argument("--top", type=int, default=5, help="list the N worst tensors")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("demo", help="build a small FP8 checkpoint in a temp dir, load it, print memory and time")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("lazyfp8: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line, not a traceback, unless --debug
        if args.debug:
            raise
        print(f"lazyfp8 {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
