"""In-memory windowed rate-limit counters: what `decide()` reads, charged after an allow.

The state is a projection of the event log: on start-up it is rebuilt by folding the
`charges` of past allowed `call.decided` events (`fold`). Cells of ended windows are
dropped by `expire`, which costs O(1) when nothing has ended (a heap of window ends).

Not thread-safe; in asyncio, call `decide()` and `charge()` with no await between them.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from gateway.policy.engine import CounterKey, Decision

__all__ = ["Limiter"]


class Limiter:
    __slots__ = ("_cells", "_ends", "_heap")

    def __init__(self) -> None:
        self._cells: dict[CounterKey, int] = {}
        self._ends: dict[int, list[CounterKey]] = {}  # window end -> cells created for it
        self._heap: list[int] = []  # the keys of _ends

    def view(self) -> Mapping[CounterKey, int]:
        """The live cell dict (no copy): pass it to decide()."""
        return self._cells

    def _add(self, key: CounterKey, n: int = 1) -> None:
        cells = self._cells
        c = cells.get(key)
        if c is not None:
            cells[key] = c + n
            return
        cells[key] = n
        end = key.window_start + key.window_s
        bucket = self._ends.get(end)
        if bucket is None:
            self._ends[end] = [key]
            heapq.heappush(self._heap, end)
        else:
            bucket.append(key)

    def charge(self, decision: Decision) -> None:
        """+1 on each of decision.charges; no-op unless the decision allowed the call."""
        if decision.action != "allow":
            return
        cells = self._cells
        for key in decision.charges:
            c = cells.get(key)
            if c is None:
                self._add(key)
            else:
                cells[key] = c + 1

    def refund(self, decision: Decision) -> None:
        """Undo exactly what charge(decision) added: the call was never forwarded.

        A cell already dropped by expire() (its window ended) stays dropped; a count never
        goes below zero. The cell itself is kept until its window ends (expire drops it).
        """
        if decision.action != "allow":
            return
        cells = self._cells
        for key in decision.charges:
            c = cells.get(key)
            if c is not None and c > 0:
                cells[key] = c - 1

    def expire(self, now: float) -> int:
        """Drop the cells whose window has ended at `now`; returns how many were dropped."""
        heap = self._heap
        dropped = 0
        while heap and heap[0] <= now:
            end = heapq.heappop(heap)
            for key in self._ends.pop(end, ()):
                if self._cells.pop(key, None) is not None:
                    dropped += 1
        return dropped

    def add(self, key: CounterKey, n: int) -> None:
        """Rebuild: add `n` charges of one cell (the caller checked its window is open)."""
        self._add(key, n)

    def __len__(self) -> int:
        return len(self._cells)
