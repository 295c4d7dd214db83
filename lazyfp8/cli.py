"""The ``lazyfp8`` command line: inspect, dequantize, quantize, convert, verify, demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import stat
import sys
from typing import IO, Any

__all__ = ["main"]

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "fp32": "float32", "f32": "float32"}
_OUT_DTYPES = ("bfloat16", "float16", "float32")
_FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
# hf_quant_config.json declares how ModelOpt quantized the weights: it describes the source's
# tensors, not the converted ones (a reader would take a bf16 copy for NVFP4).
_CHECKPOINT_FILES = ("model.safetensors.index.json", "config.json", "hf_quant_config.json")
# Weights in another format hold the unconverted model: a copy beside the converted one would be
# a second, stale set of weights (and often many GB).
_WEIGHT_SUFFIXES = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


def _named_dtype(name: str, allowed: tuple[str, ...], hint: str) -> Any:
    import torch

    full = _DTYPES.get(name, name)
    if full not in allowed:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; use {hint}")
    return getattr(torch, full)


def _dtype(name: str) -> Any:
    return _named_dtype(name, _OUT_DTYPES, "bf16, fp16 or fp32")


def _fp8_dtype(name: str) -> Any:
    return _named_dtype(name, _FP8_DTYPES, "float8_e4m3fn or float8_e5m2")


def _scheme(name: str) -> str:
    from .formats.schemes import NAMED_SCHEMES

    if name not in NAMED_SCHEMES:
        raise argparse.ArgumentTypeError(f"unknown scheme {name!r}; use one of {', '.join(NAMED_SCHEMES)}")
    return name


def _shard_size(value: str) -> int:
    from .writer import parse_shard_size

    try:
        return parse_shard_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return n


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{value!r} is not a regular expression: {e}") from None
    return value


def _mapping(value: str | None) -> Any:
    """A preset name, ``auto``, ``transformers``, or a JSON object of ``{regex: replacement}``;
    checked here, before anything is read."""
    if value is None or value in ("auto", "transformers"):
        return value
    from .errors import KeyMappingError
    from .keymap import KeyMapping

    spec: Any = value
    if value.lstrip().startswith("{"):
        try:
            spec = json.loads(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"key mapping {value!r} is not a JSON object: {e}") from None
    try:
        KeyMapping.from_spec(spec)
    except (KeyMappingError, re.error) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


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
        print("quantized tensors:")
        for s in report.fp8_summary:
            print(
                f"  {s['count']:6d} x {s['format']} ({s['dtype']}) {s['granularity']}, "
                f"scale '<name>{s['scale_suffix']}' ({s['scale_dtype']})"
            )
    else:
        print("quantized tensors: none")
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
    if report.composites:
        print(f"composite keys (several on-disk tensors each): {len(report.composites)}")
        for key, parts in list(report.composites.items())[:3]:
            print(f"  {key} <- {len(parts)} part(s), e.g. {parts[0]}")
    if report.materialized:
        print(f"converted by materializing (not a layout): {', '.join(report.materialized[:4])}")
    if report.problems:
        print(f"{len(report.problems)} problem(s):")
        for p in report.problems:
            print(f"  - {p}")
    else:
        print("no problems found")


def _hub(args: argparse.Namespace) -> dict[str, Any]:
    """The Hub options given for SRC (a repo id), as LazyFP8View takes them."""
    given = {"revision": args.revision, "cache_dir": args.cache_dir, "local_files_only": args.local_files_only}
    return {k: v for k, v in given.items() if v not in (None, False)}


def _inspected(path: str, args: argparse.Namespace) -> str:
    """What ``inspect_checkpoint`` reads for SRC: ``path`` itself, or with Hub options the snapshot
    directory they select in the Hub cache (``inspect_checkpoint`` resolves a bare repo id alone)."""
    if not _hub(args):
        return path
    from .storage.checkpoint import open_checkpoint

    return open_checkpoint(path, [], **_hub(args)).root


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_checkpoint

    report = inspect_checkpoint(_inspected(args.path, args), key_mapping=args.key_mapping, scheme=args.scheme)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        print()
    else:
        _print_report(report)
    return 1 if report.problems else 0


def _check_destination(dst: str, force: bool) -> None:
    if os.path.isdir(dst) and os.listdir(dst) and not force:
        raise FileExistsError(f"{dst} is not empty; pass --force to overwrite")


def _open_side_files(src_root: str, stack: contextlib.ExitStack) -> dict[str, IO[bytes]]:
    """Open the tokenizer and other small files beside the checkpoint (not its shards, index or
    config, nor weights in another format), to be copied in the same atomic replacement as the
    weights (``save(extra_files=...)``).

    Only regular files are copied (directories, FIFOs, devices are skipped). A file whose real path
    leaves the checkpoint directory (or, for a Hugging Face cache snapshot, its ``blobs/``) is
    refused: a link to ``~/.ssh/id_rsa`` named ``tokenizer.json`` must not end up in DST. The check
    is made on the file opened, so a link swapped in between is caught too.

    Raises:
        UnsafePathError: a side file that is a link out of the checkpoint directory.
        CheckpointError: a side file that is a link to nothing.
    """
    from .errors import CheckpointError, UnsafePathError
    from .storage.files import FileIdentity, allowed_roots, inside, open_regular

    roots = allowed_roots(src_root)
    files: dict[str, IO[bytes]] = {}
    for name in sorted(os.listdir(src_root)):
        if name.startswith(".") or name in _CHECKPOINT_FILES or name.endswith(_WEIGHT_SUFFIXES):
            continue
        p = os.path.join(src_root, name)
        try:
            if not stat.S_ISREG(os.stat(p).st_mode):
                continue
            fd, identity = open_regular(p, "side file")
        except UnsafePathError:
            continue  # replaced by something that is not a regular file since the stat
        except FileNotFoundError:
            raise CheckpointError(f"{p}: the side file is a link to nothing; fix or remove it", file=p) from None
        f = stack.enter_context(os.fdopen(fd, "rb"))
        real = os.path.realpath(p)
        try:
            same = FileIdentity.of(os.stat(real)) == identity
        except OSError:
            same = False
        if not same or not inside(real, roots):
            raise UnsafePathError(
                f"{p}: the side file is a link that leaves {src_root} (it points to {real}); "
                f"copy the file itself into {src_root} or remove it",
                file=p,
            )
        files[name] = f
    return files


def _convert(view: Any, args: argparse.Namespace, **options: Any) -> tuple[Any, list[str]]:
    """``save`` the view to DST with SRC's side files; ``save`` refuses a DST that is SRC or
    holds SRC's files before anything is written."""
    from .writer import save

    _check_destination(args.dst, args.force)
    with contextlib.ExitStack() as stack:
        side = _open_side_files(view._checkpoint.root, stack)
        r = save(view, args.dst, max_shard_size=args.max_shard_size, extra_files=side, overwrite=args.force,
                 progress=_progress(args), **options)
    return r, list(side)


def cmd_dequantize(args: argparse.Namespace) -> int:
    from . import LazyFP8View

    view = LazyFP8View(args.src, dtype=args.dtype, scheme=args.scheme, **_hub(args))
    config = None
    if view.config is not None:
        config = {k: v for k, v in view.config.items() if k != "quantization_config"}
        for k in ("torch_dtype", "dtype"):
            if k in config:
                config[k] = str(args.dtype).replace("torch.", "")
    r, copied = _convert(view, args, scheme=None, config=config)
    fp8 = sum(view.info(k).scale_key is not None for k in view)
    if not args.quiet:
        print(f"wrote {len(r.files)} file(s), {_mib(r.total_size)}: {fp8} FP8 tensors dequantized to "
              f"{str(args.dtype).replace('torch.', '')}, {len(view) - fp8} copied; also copied {', '.join(copied) or 'no side files'}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from . import LazyFP8View
    from .writer import DEFAULT_EXCLUDE

    view = LazyFP8View(args.src, **_hub(args))
    config = None if view.config is None else {k: v for k, v in view.config.items() if k != "quantization_config"}
    block = tuple(args.block_size) if args.block_size else None
    r, copied = _convert(
        view, args, scheme=args.scheme, block_size=block, fp8_dtype=args.fp8_dtype, format=args.format,
        exclude=args.exclude if args.exclude is not None else DEFAULT_EXCLUDE, config=config, ue8m0=args.scheme == "mx",
    )
    if not args.quiet:
        print(f"wrote {len(r.files)} file(s), {_mib(r.total_size)}: {len(r.quantized)} tensors quantized "
              f"({args.scheme}, {str(args.fp8_dtype).replace('torch.', '')}); also copied {', '.join(copied) or 'no side files'}")
    return 0


#: ``convert --to``: what each target is, as ``save`` arguments (``dtype`` alone: dequantize).
CONVERT_TARGETS: dict[str, dict[str, Any]] = {
    "bf16": {"dtype": "bfloat16"},
    "fp16": {"dtype": "float16"},
    "fp32": {"dtype": "float32"},
    "fp8": {"scheme": "block", "format": "fp8"},
    "fp8-tensor": {"scheme": "per-tensor", "format": "fp8"},
    "fp8-channel": {"scheme": "per-channel", "format": "compressed-tensors"},
    "nvfp4": {"scheme": "nvfp4", "format": "compressed-tensors"},
    "nvfp4-modelopt": {"scheme": "nvfp4", "format": "modelopt"},
    "mxfp4": {"scheme": "mxfp4", "format": "mxfp4"},
    "mxfp4-compressed-tensors": {"scheme": "mxfp4", "format": "compressed-tensors"},
    "int4": {"scheme": "int4", "format": "compressed-tensors"},
    "int4-asym": {"scheme": "int4-asym", "format": "compressed-tensors"},
}


def cmd_convert(args: argparse.Namespace) -> int:
    """Any format to any other, one tensor at a time: ``save(LazyFP8View(SRC), DST, ...)``. The
    weights quantized are ``--only``'s, else the ones the source stores quantized (whatever their
    form), else save's default (Linear-like 2-D weights, not lm_head or embeddings);
    ``--exclude`` removes keys from any of them."""
    import torch

    from . import LazyFP8View
    from .writer import DEFAULT_EXCLUDE

    target = CONVERT_TARGETS[args.to]
    dtype = getattr(torch, target.get("dtype", "bfloat16"))
    if "scheme" not in target and (args.block_size or args.group_size or args.only):
        raise ValueError(f"--to {args.to} dequantizes: --block-size, --group-size and --only do not apply")
    view = LazyFP8View(args.src, dtype=dtype, scheme=args.scheme, **_hub(args))
    config = None if view.config is None else {k: v for k, v in view.config.items() if k != "quantization_config"}
    was = [k for k in view if view.info(k).scale_key is not None]
    if "scheme" not in target:
        if config is not None:
            for k in ("torch_dtype", "dtype"):
                if k in config:
                    config[k] = target["dtype"]
        r, copied = _convert(view, args, scheme=None, config=config)
        done = f"{len(was)} quantized tensors dequantized to {target['dtype']}"
    else:
        block = tuple(args.block_size) if args.block_size else ((128, 128) if target["scheme"] == "block" else None)
        chosen = args.only or (set(was).__contains__ if was else None)
        exclude = args.exclude if args.exclude is not None else (() if args.only or was else DEFAULT_EXCLUDE)
        r, copied = _convert(
            view, args, scheme=target["scheme"], format=target["format"], block_size=block, group_size=args.group_size,
            quantize=chosen, exclude=exclude, config=config,
        )
        done = f"{len(r.quantized)} tensors quantized to {args.to}"
    if not args.quiet:
        print(f"wrote {len(r.files)} file(s), {_mib(r.total_size)}: {done}, the rest copied; "
              f"also copied {', '.join(copied) or 'no side files'}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import torch

    from . import LazyFP8View
    from .inspection import inspect_checkpoint

    # What the headers alone say is wrong (an index beside model.safetensors, an empty weight_map
    # beside shards, orphan scales) fails verify even where the view can read every tensor.
    problems = list(inspect_checkpoint(_inspected(args.src, args), key_mapping=args.key_mapping, scheme=args.scheme).problems)
    view = LazyFP8View(args.src, key_mapping=args.key_mapping, scheme=args.scheme, **_hub(args))
    other = None if args.against is None else LazyFP8View(args.against, key_mapping=args.against_key_mapping)
    worst: list[tuple[float, str]] = []
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
        sound = "every scale and shape is sound" if not problems else f"{len(problems)} problem(s)"
        print(f"read {len(view)} tensors ({_mib(total)}) from {args.src}: {sound}")
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


def _hub_options() -> argparse.ArgumentParser:
    """SRC may be a Hugging Face Hub repo id (org/name) when no local path has that name."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("Hugging Face Hub (SRC given as a repo id org/name)")
    g.add_argument("--revision", help="branch, tag or commit hash (default: main)")
    g.add_argument("--cache-dir", help="the Hub cache (default: HF_HUB_CACHE)")
    g.add_argument("--local-files-only", action="store_true",
                   help="never download; read only what the cache holds (as HF_HUB_OFFLINE=1)")
    return p


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lazyfp8", description="Load, inspect and convert quantized safetensors checkpoints.")
    hub = [_hub_options()]
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no summary")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="what a checkpoint holds and every problem in it (exit 1 on problems)", parents=hub)
    s.add_argument("path")
    s.add_argument("--key-mapping", type=_mapping,
                   help="a preset (mistral3), 'auto' (needs transformers), 'transformers' (its conversion mapping: fused experts), or a JSON {regex: replacement}")
    s.add_argument("--scheme", type=_scheme, help="override the detected scheme (per-tensor, per-channel, block, mx, auto)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("dequantize", help="write a bf16/fp16/fp32 copy of an FP8 checkpoint (streaming)", parents=hub)
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--dtype", type=_dtype, default="bf16", help="bf16 (default), fp16 or fp32")
    s.add_argument("--scheme", type=_scheme, help="override the detected scheme")
    s.add_argument("--max-shard-size", type=_shard_size, default="5GB", help="a positive size: 5GB (default), 500MB, or bytes")
    s.add_argument("--force", action="store_true", help="overwrite a non-empty DST")
    s.set_defaults(func=cmd_dequantize)

    s = sub.add_parser("quantize", help="write an FP8 copy of a checkpoint", parents=hub)
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--scheme", default="block", choices=["per-tensor", "per-channel", "block", "mx"])
    s.add_argument("--block-size", type=_positive_int, nargs=2, default=[128, 128], metavar=("ROWS", "COLS"))
    s.add_argument("--fp8-dtype", type=_fp8_dtype, default="float8_e4m3fn", help="float8_e4m3fn (default) or float8_e5m2")
    s.add_argument("--format", default="fp8", choices=["fp8", "compressed-tensors"])
    s.add_argument("--exclude", type=_regex, nargs="*", help="regexes of keys to keep unquantized (default: lm_head, embeddings)")
    s.add_argument("--max-shard-size", type=_shard_size, default="5GB", help="a positive size: 5GB (default), 500MB, or bytes")
    s.add_argument("--force", action="store_true", help="overwrite a non-empty DST")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser(
        "convert",
        help="transcode a checkpoint to another format, one tensor at a time (e.g. FP8 -> NVFP4, NVFP4 -> bf16)",
        description="Write SRC in format --to, streaming: each tensor is read, dequantized and re-quantized "
        "alone, so neither memory nor disk ever holds a bf16 copy of the model. The weights SRC stores "
        "quantized are the ones quantized (a SRC with none: Linear-like 2-D weights, not lm_head or "
        "embeddings; --only chooses others). DST loads as its old checkpoint, the new one or nothing at "
        "every instant.",
        parents=hub,
    )
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--to", required=True, choices=list(CONVERT_TARGETS),
                   help="bf16/fp16/fp32 (dequantize); fp8 (128x128 blocks, HF fp8; --block-size), fp8-tensor, "
                   "fp8-channel (compressed-tensors); nvfp4 (compressed-tensors), nvfp4-modelopt; mxfp4 (gpt-oss "
                   "_blocks/_scales), mxfp4-compressed-tensors; int4, int4-asym (compressed-tensors pack-quantized, "
                   "symmetric or with zero points; --group-size)")
    s.add_argument("--block-size", type=_positive_int, nargs=2, metavar=("ROWS", "COLS"), help="FP8 block (default 128 128)")
    s.add_argument("--group-size", type=_positive_int, help="int4 group size (default 128)")
    s.add_argument("--scheme", type=_scheme, help="override the scheme SRC is read with")
    s.add_argument("--only", type=_regex, nargs="+", metavar="REGEX",
                   help="quantize the keys these match (default: what SRC stores quantized, else Linear-like 2-D weights)")
    s.add_argument("--exclude", type=_regex, nargs="*", help="regexes of keys to leave unquantized")
    s.add_argument("--max-shard-size", type=_shard_size, default="5GB", help="a positive size: 5GB (default), 500MB, or bytes")
    s.add_argument("--force", action="store_true", help="overwrite a non-empty DST")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("verify", help="read every tensor once; with --against, compare tensor by tensor", parents=hub)
    s.add_argument("src")
    s.add_argument("--against")
    s.add_argument("--key-mapping", type=_mapping)
    s.add_argument("--against-key-mapping", type=_mapping)
    s.add_argument("--scheme", type=_scheme)
    s.add_argument("--atol", type=float, help="exit 1 if any max abs error exceeds this")
    s.add_argument("--top", type=int, default=5, help="list the N worst tensors")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("demo", help="build a small FP8 checkpoint in a temp dir, load it, print memory and time")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        # File and tensor names in messages may hold bytes that are not text (a non-UTF-8 file
        # name decodes to lone surrogates): print them escaped rather than die on printing.
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
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
