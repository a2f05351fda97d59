"""Counters are a projection of the log: rebuild the open windows' charges at start-up."""

from __future__ import annotations

import orjson

from eventlog.base import EventLog
from gateway.policy.engine import CounterKey
from gateway.policy.limiter import Limiter
from gateway.policy.live import PolicySet
from schemas.events import (
    ALLOW_MARKER,
    CALL_ID_MARKER,
    CHARGES_MARKER,
    COMPLETED_MARKER,
    DECIDED_MARKER,
    DECISION_MARKER,
    EVENT_ID_MARKER,
    KIND_MARKER,
    REFUNDED_MARKER,
    SERVER_MARKER,
)


def longest_window_s(policies: PolicySet) -> int:
    longest = 0
    for pol in policies.current.values():
        for plan in pol.tools.values():
            for spec in plan.limits:
                longest = max(longest, spec.window_s)
    return longest


async def rebuild_limiters(
    eventlog: EventLog, limiters: dict[str, Limiter], window_s: int, now: float
) -> int:
    """Fold the charges of allowed calls of the windows still open at `now` into the limiters.

    The counters are a projection of the log: after any restart (kill -9 included) a limit
    holds as if the gateway had never stopped. Returns the number of charges folded.

    A restart waits for this, so it reads bytes instead of parsing whole events: the fields
    it needs are located in the compact JSON the gateway writes, by the markers and the
    field-order contract of schemas/events.py: `kind`, `event_id` and `server` precede the
    agent-controlled `arguments` object, so their first occurrence is the event's own;
    `decision` and `charges` follow it, so their LAST occurrence is (a JSON string cannot
    hold an unescaped quote, so only the arguments object could fake these keys). Events
    with the same server and charges array are counted together and folded once.

    A call refunded in memory (charged, then never sent upstream) says so on its
    call.completed (`"refunded":true`, gateway-written, after the only upstream-written
    string, which cannot hold an unescaped quote): its charges are taken back here too, so
    a restart does not re-charge them. Only the calls not completed yet are remembered
    (call_id -> charges), so the memory is bounded by the calls in flight, not the window.
    """
    if window_s <= 0:
        return 0
    seen: set[bytes] = set()
    groups: dict[tuple[bytes, bytes], int] = {}
    open_calls: dict[bytes, tuple[bytes, bytes]] = {}  # call_id -> group, until its call.completed
    async for batch in eventlog.read_since(int((now - window_s) * 1000), 100_000):
        for rec in batch:
            p = rec.payload
            k = p.find(KIND_MARKER)
            if k < 0:
                continue
            if p.startswith(COMPLETED_MARKER, k):
                if open_calls:
                    i = p.find(CALL_ID_MARKER) + _CALL_ID_LEN
                    group = open_calls.pop(p[i : i + 36], None)
                    if group is not None and p.rfind(REFUNDED_MARKER) >= 0:
                        groups[group] -= 1
                continue
            if not p.startswith(DECIDED_MARKER, k):
                continue
            d = p.rfind(DECISION_MARKER)
            if d < 0 or not p.startswith(ALLOW_MARKER, d):
                continue
            c = p.rfind(CHARGES_MARKER)
            if c < 0 or p.startswith(b"]", c + _CHARGES_LEN):
                continue  # no charges
            e = p.find(EVENT_ID_MARKER) + _EVENT_ID_LEN
            eid = p[e : e + 36]  # a UUID's text
            if eid in seen:
                continue
            seen.add(eid)
            s = p.find(SERVER_MARKER) + _SERVER_LEN
            group = (p[s : p.find(b'"', s)], p[c + _CHARGES_LEN - 1 : p.find(b"]", c) + 1])
            groups[group] = groups.get(group, 0) + 1
            i = p.find(CALL_ID_MARKER) + _CALL_ID_LEN
            open_calls[p[i : i + 36]] = group
    folded = 0
    for (server, raw), n in groups.items():
        limiter = limiters.get(server.decode())
        if limiter is None or n <= 0:
            continue
        for ch in orjson.loads(raw):
            key = CounterKey(ch["counter"], ch["scope"], ch["key"], ch["window_s"], ch["window_start"])
            if key.window_start + key.window_s > now:
                limiter.add(key, n)
                folded += n
    return folded


_CHARGES_LEN = len(CHARGES_MARKER)
_EVENT_ID_LEN = len(EVENT_ID_MARKER)
_SERVER_LEN = len(SERVER_MARKER)
_CALL_ID_LEN = len(CALL_ID_MARKER)
