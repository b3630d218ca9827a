"""Progress of long loops: a tqdm bar on a terminal, one log line about every 30 s elsewhere.

Used by every long loop of the library (training, scoring, sampling, attacks). tqdm's
carriage-return bars turn into thousands of lines in a batch job's log file or a CI
transcript; when stderr is not a terminal the same loop logs "desc: n/total unit (pct),
rate, eta" through `logging` instead, at most once per `interval` seconds.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Union

from tqdm import tqdm

log = logging.getLogger("patchscope.progress")

# Seconds between two log lines when stderr is not a terminal; read at each call, so tests may change it.
LOG_INTERVAL = 30.0


class LoggedProgress:
    """The part of tqdm's interface the library uses (iteration, update, set_postfix, close, `with`),
    reporting through `logging` every `interval` seconds instead of redrawing a bar."""

    def __init__(self, iterable: Iterable | None = None, total: float | None = None, desc: str | None = None,
                 unit: str = "it", initial: float = 0, disable: bool = False, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger = log) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self.iterable = iterable
        self.total = total
        self.desc = desc or ""
        self.unit = unit
        self.n = initial
        self.disable = bool(disable)
        self.interval = interval
        self.postfix: dict[str, Any] = {}
        self._clock = clock
        self._log = logger
        self._initial = initial
        self._started = clock()
        self._last_logged = self._started
        self._logged_n: float | None = None
        self._closed = False

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress has no iterable; call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("this progress has no total")
        return int(self.total)

    def __enter__(self) -> LoggedProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = self._clock()
        if now - self._last_logged >= self.interval:
            self._emit(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        """A last line when earlier ones were logged and the count moved since, so the log shows the end."""
        if self._closed:
            return
        self._closed = True
        if not self.disable and self._logged_n is not None and self._logged_n != self.n:
            self._emit(self._clock())

    def line(self, now: float | None = None) -> str:
        """`desc: 1200/5000 img (24%), 41 img/s, eta 1m32s, loss=0.12`."""
        elapsed = (self._clock() if now is None else now) - self._started
        done = self.n - self._initial
        rate = done / elapsed if elapsed > 0 else None
        count = _number(self.n)
        if self.total:
            count += f"/{_number(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            count += f" {self.unit}"
        parts = [count]
        if rate:
            parts.append(f"{rate:.3g} {self.unit}/s")
            if self.total and self.n < self.total:
                parts.append(f"eta {_duration((self.total - self.n) / rate)}")
        parts += [f"{key}={value}" for key, value in self.postfix.items()]
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def _emit(self, now: float) -> None:
        self._log.info("%s", self.line(now))
        self._last_logged = now
        self._logged_n = self.n


ProgressBar = Union[tqdm, LoggedProgress]


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str | None = None,
                 unit: str = "it", initial: float = 0, disable: bool | None = False, leave: bool = True,
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic,
                 **tqdm_options: Any) -> ProgressBar:
    """A tqdm bar when stderr is a terminal, else a `LoggedProgress` logging every `interval` seconds.

    Takes tqdm's arguments; `disable` True shows nothing either way (None counts as False: a
    non-terminal gets log lines rather than silence). `leave` and other tqdm-only options
    matter only to the bar. `interval` defaults to LOG_INTERVAL; `clock` is for tests.
    """
    if _stderr_is_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=bool(disable),
                    leave=leave, **tqdm_options)
    return LoggedProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=bool(disable),
                          interval=LOG_INTERVAL if interval is None else interval, clock=clock)


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


def _duration(seconds: float) -> str:
    """`42s`, `1m32s`, `2h05m`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
