"""The frame every ``bench_*.py`` script shares: its command line (:func:`benchmark_parser`,
:func:`add_options`, :func:`size_mode`), the entry point that runs a child case or the parent
(:func:`main`), the work directory, and the end of a run: the result file under
``benchmarks/results/`` and the exit status (:func:`finish`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from .processes import write_result

#: ``benchmarks/results/``, where a run's JSON goes unless ``--out`` says otherwise.
RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


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


def result_path(out: str | None, name: str, mode: str) -> str:
    """``--out``, or ``benchmarks/results/<name>_<mode>.json``."""
    return out or os.path.join(RESULTS_DIR, f"{name}_{mode}.json")


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
