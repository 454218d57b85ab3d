"""Progress display: a tqdm bar on a terminal, plain log lines otherwise.

A tqdm bar redraws itself with carriage returns; written to a file (``make demo > log 2>&1``) every refresh
becomes a frame of the log. :func:`progress` therefore draws a bar only when ``sys.stderr`` is a terminal and
otherwise logs one plain line (logger ``manifold_defense.progress``, level INFO) per unit of a short task
(``total <= 100``: stages, methods, figures) or per tenth of a long one, and one when it closes. The command
line (``python -m eval``) shows INFO lines on stderr; a library user sees them after ``logging.basicConfig``.

Example:
    >>> for step in progress(range(1000), desc="train", unit="step"):  # doctest: +SKIP
    ...     ...
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Generic, TypeVar

from tqdm import tqdm

__all__ = ["LineProgress", "progress"]

LOGGER = logging.getLogger("manifold_defense.progress")

#: Tasks of at most this many units log a line per unit; longer ones a line per tenth.
EVERY_UNIT_UP_TO = 100

T = TypeVar("T")


def _fmt_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _plural(unit: str) -> str:
    if unit == "it":
        return unit
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


class LineProgress(Generic[T]):
    """The part of tqdm's interface this project uses (iteration, ``update``, ``set_postfix``,
    ``set_postfix_str``, ``close``, context manager), reporting by log lines instead of a redrawn bar.

    Args:
        iterable: optional iterable to wrap.
        total: number of units (default ``len(iterable)`` when it has one).
        desc: name of the task, the start of every line.
        unit: name of one unit ("step", "stage", "batch").
        disable: log nothing (iteration still works).
        initial: units already done (a resumed run).
        logger: where the lines go (default ``manifold_defense.progress``).
    """

    def __init__(
        self,
        iterable: Iterable[T] | None = None,
        *,
        total: int | None = None,
        desc: str | None = None,
        unit: str = "it",
        disable: bool = False,
        initial: int = 0,
        logger: logging.Logger | None = None,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable = iterable
        self.total = total
        self.desc = desc or "progress"
        self.unit = unit
        self.disable = disable
        self.n = initial
        self._initial = initial
        self._postfix = ""
        self._logger = logger or LOGGER
        self._start = time.perf_counter()
        self._closed = False
        self._last_logged = initial
        if total is not None and total > EVERY_UNIT_UP_TO:
            self._every = max(total // 10, 1)
        else:
            self._every = 1

    # --------------------------------------------------------------------------------------------- tqdm API
    def __iter__(self) -> Iterator[T]:
        if self.iterable is None:
            raise TypeError("LineProgress: nothing to iterate over (created without an iterable)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return 0 if self.total is None else self.total

    def __enter__(self) -> LineProgress[T]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable or self._closed:
            return
        if self.n - self._last_logged >= self._every or (self.total is not None and self.n >= self.total):
            self._log()

    def set_postfix(
        self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any
    ) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.n != self._last_logged:
            self._log()
        if not self.disable and self.n > self._initial:
            elapsed = time.perf_counter() - self._start
            self._logger.info(
                "%s: finished %d %s in %s",
                self.desc,
                self.n - self._initial,
                _plural(self.unit),
                _fmt_seconds(elapsed),
            )

    # ------------------------------------------------------------------------------------------------ lines
    def _log(self) -> None:
        self._last_logged = self.n
        done = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        elapsed = _fmt_seconds(time.perf_counter() - self._start)
        tail = f" ({self._postfix})" if self._postfix else ""
        self._logger.info("%s: %s %s, %s%s", self.desc, done, _plural(self.unit), elapsed, tail)


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    disable: bool = False,
    initial: int = 0,
) -> Any:
    """A progress display over ``iterable`` (or ``total`` units updated by hand): a tqdm bar on stderr when it is
    a terminal, else a :class:`LineProgress` that logs plain lines. Both offer ``update``, ``set_postfix``,
    ``set_postfix_str``, ``close`` and the context-manager protocol; ``disable=True`` shows nothing.

    Args: as :class:`LineProgress`.
    """
    if not disable and _stderr_is_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, disable=disable, initial=initial)


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (ValueError, OSError):  # a closed or detached stream
        return False
