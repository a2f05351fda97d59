"""uuid7(): RFC 9562 version 7 ids that sort in the order one process made them, whatever the
clock does (same millisecond, steps back), and unique across threads."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import events as E


class _Clock:
    """A fake wall clock for time.time_ns (unit test of one function): returns the given ms."""

    def __init__(self, ms: list[int]) -> None:
        self._ms: Iterator[int] = iter(ms)

    def time_ns(self) -> int:
        return next(self._ms) * 1_000_000 + 123_456


def _ms_of(u: str) -> int:
    return int(u.replace("-", "")[:12], 16)


@settings(max_examples=300, deadline=None)
@given(
    start=st.integers(min_value=0, max_value=(1 << 48) - 10_000),
    steps=st.lists(st.integers(min_value=-5, max_value=3), min_size=1, max_size=200),
)
def test_ids_sort_in_creation_order_whatever_the_clock_does(start: int, steps: list[int]) -> None:
    """Runs within one millisecond, steps forward and steps back: each id sorts after the one
    before, as text and as a 128-bit number, and carries the highest millisecond seen so far."""
    readings, ms = [], start
    for s in steps:
        ms = max(0, ms + s)
        readings.append(ms)
    real_time, real_ms = E.time, E._uuid_ms
    E.time, E._uuid_ms = _Clock(readings), -1  # type: ignore[assignment]
    try:
        ids = [E.uuid7() for _ in readings]
    finally:
        E.time = real_time
        E._uuid_ms = max(real_ms, E._uuid_ms)  # the process's own ids stay monotonic
    assert ids == sorted(ids)
    assert [uuid.UUID(u).int for u in ids] == sorted(uuid.UUID(u).int for u in ids)
    assert len(set(ids)) == len(ids)
    highest = 0
    for u, r in zip(ids, readings, strict=True):
        highest = max(highest, r)
        parsed = uuid.UUID(u)
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert str(parsed) == u
        assert _ms_of(u) == highest


def test_a_full_counter_moves_on_to_the_next_millisecond() -> None:
    before = E.uuid7()
    E._uuid_low = E._LOW_MAX  # the counter's last value in this millisecond
    after = E.uuid7()
    assert before < after
    assert _ms_of(after) >= _ms_of(before) + 1 or E._uuid_ms > _ms_of(before)
    assert E.uuid7() > after


def test_ids_are_unique_across_threads() -> None:
    out: list[list[str]] = [[] for _ in range(4)]

    def make(bucket: list[str]) -> None:
        for _ in range(20_000):
            bucket.append(E.uuid7())

    threads = [threading.Thread(target=make, args=(b,)) for b in out]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [u for b in out for u in b]
    assert len(set(every)) == len(every)
    for b in out:  # each thread's own ids in the order it made them
        assert b == sorted(b)
