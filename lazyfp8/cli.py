"""The ``lazyfp8`` command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lazyfp8", description="Load FP8 safetensors checkpoints lazily.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="build a small FP8 checkpoint in a temp dir, load it, print memory and time")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        return run_demo()
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
