"""Counters are a projection of the log: rebuild the open windows' charges at start-up, and
(replicas on one Kafka topic) keep folding the other gateways' charges as they arrive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

import orjson

from eventlog.base import EventLog, Position, Record
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
    GATEWAY_MARKER,
    KIND_MARKER,
    REFUNDED_MARKER,
    SERVER_MARKER,
    TS_MARKER,
)

log = logging.getLogger("ledgergate")


def longest_window_s(policies: PolicySet) -> int:
    longest = 0
    for pol in policies.current.values():
        for plan in pol.tools.values():
            for spec in plan.limits:
                longest = max(longest, spec.window_s)
    return longest


Groups = dict[tuple[bytes, bytes], int]


def allowed_charges(
    records: Iterable[Record],
    seen: set[bytes] | OrderedDict[bytes, None],
    groups: Groups,
    skip_gateway: bytes = b"",
    stamps: list[int] | None = None,
    open_calls: dict[bytes, tuple[bytes, bytes]] | None = None,
) -> int:
    """Add the charges of the allowed `call.decided` events of `records` to `groups`
    ((server, charges JSON) -> number of events); returns how many events were counted.

    Reads bytes instead of parsing whole events: the fields it needs are located in the
    compact JSON the gateway writes, by the markers and the field-order contract of
    schemas/events.py: `event_id`, `gateway`, `kind`, `call_id` and `server` precede the
    agent-controlled `arguments` object, so their first occurrence is the event's own;
    `decision` and `charges` follow it, so their LAST occurrence is (a JSON string cannot
    hold an unescaped quote, so only the arguments object could fake these keys). Events
    whose id is in `seen` are skipped (at-least-once delivery: a spooled record can arrive
    twice) and their ids added; events written by the gateway instance `skip_gateway` are
    skipped (it charged them itself). The `ts` of each event counted is appended to
    `stamps` when given.

    With `open_calls`, a call refunded in memory (charged, then never sent upstream) is
    taken back too: its call.completed says `"refunded":true` (gateway-written, after the
    only upstream-written string, which cannot hold an unescaped quote), and the group of its
    call.decided loses one. Only calls not completed yet are remembered (call_id -> group),
    so the memory is bounded by the calls in flight, not the window."""
    return payload_charges([r.payload for r in records], seen, groups, skip_gateway, stamps, open_calls)


def payload_charges(
    payloads: Iterable[bytes],
    seen: set[bytes] | OrderedDict[bytes, None],
    groups: Groups,
    skip_gateway: bytes = b"",
    stamps: list[int] | None = None,
    open_calls: dict[bytes, tuple[bytes, bytes]] | None = None,
) -> int:
    """`allowed_charges` on the payloads themselves (the replica fold's tail hands no Records)."""
    counted = 0
    for p in payloads:
        k = p.find(KIND_MARKER)
        if k < 0:
            continue
        if skip_gateway:
            g = p.find(GATEWAY_MARKER)
            if 0 <= g < k and p.startswith(skip_gateway, g + _GATEWAY_LEN):
                continue
        if p.startswith(COMPLETED_MARKER, k):
            if open_calls:
                i = p.find(CALL_ID_MARKER) + _CALL_ID_LEN
                group = open_calls.pop(p[i : i + 36], None)
                if group is not None and p.rfind(REFUNDED_MARKER) >= 0:
                    groups[group] = groups.get(group, 0) - 1
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
        if isinstance(seen, OrderedDict):
            seen[eid] = None
        else:
            seen.add(eid)
        s = p.find(SERVER_MARKER) + _SERVER_LEN
        group = (p[s : p.find(b'"', s)], p[c + _CHARGES_LEN - 1 : p.find(b"]", c) + 1])
        groups[group] = groups.get(group, 0) + 1
        if open_calls is not None:
            i = p.find(CALL_ID_MARKER) + _CALL_ID_LEN
            open_calls[p[i : i + 36]] = group
        counted += 1
        if stamps is not None:
            stamps.append(_ts(p))
    return counted


def fold_groups(groups: Groups, limiters: dict[str, Limiter], now: float) -> int:
    """Add the grouped charges to the limiters (cells of windows still open at `now`)."""
    folded = 0
    for (server, raw), n in groups.items():
        limiter = limiters.get(server.decode())
        if limiter is None or n == 0:
            continue
        for ch in orjson.loads(raw):
            key = CounterKey(ch["counter"], ch["scope"], ch["key"], ch["window_s"], ch["window_start"])
            if key.window_start + key.window_s > now:
                limiter.add(key, n)
                folded += n
    return folded


async def rebuild_limiters(
    eventlog: EventLog, limiters: dict[str, Limiter], window_s: int, now: float
) -> int:
    """Fold the charges of allowed calls of the windows still open at `now` into the limiters.

    The counters are a projection of the log: after any restart (kill -9 included) a limit
    holds as if the gateway had never stopped. Returns the number of charges folded.
    (A restart waits for this: see `allowed_charges` for how it avoids parsing events.)
    """
    folded, _ = await rebuild_limiters_to(eventlog, limiters, window_s, now)
    return folded


async def rebuild_limiters_to(
    eventlog: EventLog, limiters: dict[str, Limiter], window_s: int, now: float
) -> tuple[int, Position]:
    """`rebuild_limiters`, also returning the end position it folded up to (where a
    `ReplicaFold` goes on from, so no event is folded twice)."""
    end = await eventlog.end_position()
    if window_s <= 0:
        return 0, end
    start = await eventlog.position_since(int((now - window_s) * 1000))
    seen: set[bytes] = set()
    groups: Groups = {}
    open_calls: dict[bytes, tuple[bytes, bytes]] = {}  # call_id -> group, until its call.completed
    async for batch in eventlog.read_position(start, end, 100_000):
        allowed_charges(batch, seen, groups, open_calls=open_calls)
    return fold_groups(groups, limiters, now), end


class ReplicaFold:
    """Gateway replicas on one topic share limits: fold the OTHER gateways' allowed calls into
    this gateway's limiters as they arrive on the topic (its own it charged when it decided).

    A background tail of the log from `start` (the end of the start-up rebuild). A limit
    then holds across replicas up to the replication lag: a call another replica allowed
    is not yet counted here until it is acked by the broker and fetched by this tail
    (README "Scale out"). `max_lag_ms` is the largest lag seen: this gateway's fold time
    minus the event's `ts` (both wall clock ms; replicas on one host share the clock)."""

    DEDUPE = 200_000  # event ids remembered to drop at-least-once duplicates
    max_wait_ms = 20  # the tail's fetch wait: a fetch may hold new records back this long
    # at most one fetched batch per pace_ms: under load the tail fetches at the rate it does
    # when idle (once per max_wait_ms) instead of once per producer batch of every other
    # gateway, whose fixed cost each was most of the fold's CPU (eventlog/kafka.py tail_payloads)
    pace_ms = 20

    def __init__(
        self,
        eventlog: EventLog,
        limiters: dict[str, Limiter],
        gateway_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.log = eventlog
        self.limiters = limiters
        self.skip = orjson.dumps(gateway_id)[1:]  # the id as JSON text, with its closing quote
        self.clock = clock
        self.folded_events = 0  # other gateways' allowed calls folded
        self.max_lag_ms = 0
        self.lag_ms: deque[int] = deque(
            maxlen=10_000
        )  # recent samples, one per folded batch (its oldest event)
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._open: dict[bytes, tuple[bytes, bytes]] = {}  # other gateways' calls not completed yet
        self._task: asyncio.Task[None] | None = None

    def start(self, position: Position) -> None:
        self._task = asyncio.create_task(self._run(position), name="replica-fold")

    async def _run(self, position: Position) -> None:
        delay = 0.1
        payloads_tail = getattr(self.log, "tail_payloads", None)  # the Kafka log: no Record per record
        while True:
            try:
                # a short fetch wait: what the broker holds back is overshoot across replicas
                if payloads_tail is not None:
                    async for payloads, after in payloads_tail(
                        position, 10_000, max_wait_ms=self.max_wait_ms, pace_ms=self.pace_ms
                    ):
                        self.fold_payloads(payloads)
                        position.update(after)
                        delay = 0.1
                    return
                async for batch in self.log.tail_position(position, 10_000, max_wait_ms=self.max_wait_ms):
                    self.fold(batch)
                    for r in batch:
                        position[r.partition] = r.offset + 1
                    delay = 0.1
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker is away: limits hold locally meanwhile
                log.warning("replica fold: %s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def fold(self, batch: list[Record]) -> int:
        return self.fold_payloads([r.payload for r in batch])

    def fold_payloads(self, payloads: list[bytes]) -> int:
        groups: Groups = {}
        stamps: list[int] = []
        n = payload_charges(payloads, self._seen, groups, self.skip, stamps, self._open)
        if not groups:
            return 0
        now = self.clock()
        fold_groups(groups, self.limiters, now)
        self.folded_events += n
        while len(self._seen) > self.DEDUPE:
            self._seen.popitem(last=False)
        if len(self._open) > self.DEDUPE:  # completions lost (a crashed replica): forget the oldest
            for k in list(self._open)[: len(self._open) - self.DEDUPE]:
                del self._open[k]
        if not stamps:
            return n
        oldest = min(stamps)
        if oldest < 1 << 62:
            lag = max(0, int(now * 1000) - oldest)
            self.lag_ms.append(lag)
            self.max_lag_ms = max(self.max_lag_ms, lag)
        return n

    def stats(self) -> dict[str, object]:
        """`max_lag_ms` since the start (what a bound needs), and the median and p99 of the
        recent batches' lag (what the overshoot follows: it grows with the typical lag)."""
        recent = sorted(self.lag_ms)
        return {
            "gateway": self.skip[:-1].decode(),
            "folded_events": self.folded_events,
            "max_lag_ms": self.max_lag_ms,
            "lag_ms_p50": recent[len(recent) // 2] if recent else None,
            "lag_ms_p99": recent[len(recent) * 99 // 100] if recent else None,
        }

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        log.info(
            "replica fold: %d allowed calls of other gateways folded, max lag %d ms",
            self.folded_events,
            self.max_lag_ms,
        )


def _ts(payload: bytes) -> int:
    t = payload.find(TS_MARKER)
    if t < 0:
        return 1 << 62
    t += _TS_LEN
    try:  # the gateway writes `"ts":<int>,` (a field follows it)
        return int(payload[t : payload.find(b",", t)])
    except ValueError:
        return 1 << 62


_CHARGES_LEN = len(CHARGES_MARKER)
_EVENT_ID_LEN = len(EVENT_ID_MARKER)
_SERVER_LEN = len(SERVER_MARKER)
_CALL_ID_LEN = len(CALL_ID_MARKER)
_GATEWAY_LEN = len(GATEWAY_MARKER)
_TS_LEN = len(TS_MARKER)
