"""Log lines that stay readable under a fault: one line per kind of failure and interval.

A full disk refuses every call; one ERROR line per refused call wrote 1,409 lines in 7 s and
buried everything else. ``AggregatingLog`` writes the first occurrence of a kind at once,
counts the next ones, and writes one summary line per interval with the count and the last
message ("... 1408 more in the last 10 s, last: ..."). It lives here because the gateway, the
consumers and the log backends all depend on this package and on nothing else in common.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

__all__ = ["AggregatingLog"]


class _Kind:
    __slots__ = ("count", "last", "level", "since", "timer")

    def __init__(self, since: float) -> None:
        self.since = since  # start of the current interval (monotonic)
        self.count = 0  # occurrences counted, not written, in this interval
        self.last = ""  # the last of them, formatted
        self.level = logging.ERROR
        self.timer: asyncio.TimerHandle | None = None


class AggregatingLog:
    """``log(key, level, msg, *args)``: at most one line per ``key`` and ``interval_s``, plus a
    summary line with the count of the ones held back."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._kinds: dict[str, _Kind] = {}
        self.suppressed = 0  # lines held back (summed into summaries), for tests and metrics

    def error(self, key: str, msg: str, *args: object) -> None:
        self.log(key, logging.ERROR, msg, *args)

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.log(key, logging.WARNING, msg, *args)

    def log(self, key: str, level: int, msg: str, *args: object) -> None:
        now = self.clock()
        k = self._kinds.get(key)
        if k is None or (now - k.since >= self.interval_s and not k.count):
            # a new kind of failure, or one quiet for an interval: written at once
            if k is None and len(self._kinds) >= 1000:  # keys are kinds, not calls: a cap anyway
                self.flush()
            self._kinds[key] = _Kind(now)
            self.logger.log(level, msg, *args)
            return
        k.count += 1
        k.last = msg % args if args else msg
        k.level = level
        self.suppressed += 1
        if now - k.since >= self.interval_s:  # no loop to run the timer: summarise on the next one
            self._summary(key, k, now)
            k.since = now
            return
        if k.timer is None:  # the summary line comes at the interval's end, even if the fault stops
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            k.timer = loop.call_later(max(0.0, k.since + self.interval_s - now), self._due, key)

    def _due(self, key: str) -> None:
        k = self._kinds.get(key)
        if k is not None:
            k.timer = None
            now = self.clock()
            self._summary(key, k, now)
            k.since = now  # the flood goes on: the next line is the next interval's summary

    def _summary(self, key: str, k: _Kind, now: float) -> None:
        if k.timer is not None:
            k.timer.cancel()
            k.timer = None
        if k.count:
            self.logger.log(
                k.level,
                "%s: %d more like it in the last %.0f s (last: %s)",
                key,
                k.count,
                max(now - k.since, 0.0),
                k.last,
            )
            k.count = 0

    def flush(self) -> None:
        """Write the pending summaries now (at shutdown)."""
        now = self.clock()
        for key, k in list(self._kinds.items()):
            self._summary(key, k, now)
        self._kinds.clear()
