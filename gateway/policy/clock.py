"""The limiter's notion of now: UTC wall time that never goes backwards.

Windows are aligned to UTC wall time (a minute window is :00 to :59 of a UTC minute), so
the limiter needs the wall clock, not a monotonic one. But a wall clock can be stepped (NTP,
an operator, a VM resumed): stepped back 60 s, a spent minute window would start over and
sell its quota a second time. ``MonotonicWallClock`` answers ``max(last answer, wall)``: a
step backward freezes the limiter's now until the wall clock catches up (windows already
charged stay charged), a step forward is taken (time really may have passed) and logged.
``decide(..., now)`` stays pure: this only chooses the ``now`` it is given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("ledgergate")

__all__ = ["MonotonicWallClock"]


class MonotonicWallClock:
    """A callable ``() -> float`` (seconds since the epoch) that never decreases."""

    __slots__ = ("_last", "_mono", "_wall", "backward_s", "forward_s", "step_warn_s", "steps_back")

    def __init__(self, wall: Callable[[], float] = time.time, *, step_warn_s: float = 5.0) -> None:
        self._wall = wall
        self._last: float | None = None
        self._mono: float | None = None  # time.monotonic() at the last answer (measures a step)
        self.step_warn_s = step_warn_s  # a jump larger than elapsed monotonic time + this is logged
        self.steps_back = 0  # backward steps seen
        self.backward_s = 0.0  # the largest backward step, seconds
        self.forward_s = 0.0  # the largest forward step, seconds

    def __call__(self) -> float:
        now = self._wall()
        last = self._last
        mono = time.monotonic()
        if last is None:
            self._last, self._mono = now, mono
            return now
        if now < last:
            step = last - now
            if step >= 1.0 and step > self.backward_s:  # each new, larger step once
                log.warning(
                    "wall clock stepped back %.3f s; rate-limit windows keep the later time until the "
                    "clock catches up, so no charged window reopens",
                    step,
                )
            self.steps_back += 1
            self.backward_s = max(self.backward_s, step)
            return last
        assert self._mono is not None
        step = (now - last) - (mono - self._mono)
        if step > self.step_warn_s:
            log.warning(
                "wall clock stepped forward %.3f s (beyond the %.3f s that elapsed); rate-limit windows "
                "follow it",
                step,
                mono - self._mono,
            )
            self.forward_s = max(self.forward_s, step)
        self._last, self._mono = now, mono
        return now
