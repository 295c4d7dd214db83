"""Progress reporting for long loads and writes: a callback, a tqdm bar, or nothing."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Union

__all__ = ["Progress", "ProgressSpec", "make_progress"]

#: ``None`` (silent), ``True`` (a tqdm bar on stderr), or ``callback(done_bytes, total_bytes, key)``.
ProgressSpec = Union[None, bool, Callable[[int, int, str], None]]


class Progress:
    """Counts bytes and forwards them to a callback and/or a bar."""

    def __init__(self, total: int, callback: Callable[[int, int, str], None] | None, bar: object | None):
        self.total = total
        self.done = 0
        self._callback = callback
        self._bar = bar

    def update(self, nbytes: int, key: str) -> None:
        self.done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)  # type: ignore[attr-defined]
        if self._callback is not None:
            self._callback(self.done, self.total, key)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()  # type: ignore[attr-defined]

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_progress(spec: ProgressSpec, total: int, desc: str) -> Progress:
    """A :class:`Progress` for ``spec``. ``True`` needs tqdm (``pip install 'lazyfp8[cli]'``)."""
    if spec is None or spec is False:
        return Progress(total, None, None)
    if spec is True:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            raise ImportError("progress=True draws a bar with tqdm: pip install 'lazyfp8[cli]'") from None
        bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)
        return Progress(total, None, bar)
    if callable(spec):
        return Progress(total, spec, None)
    raise TypeError(f"progress must be None, True or a callable, got {spec!r}")
