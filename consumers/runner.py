"""The runner every log consumer shares: tail the log from its committed offset, hand batches
to `handle`, commit; and `supervise`, which keeps one running while its store is down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import orjson

from consumers.store.base import AuditStore, StoreError
from eventlog.base import EventLog, Position, Record
from eventlog.ratelog import AggregatingLog
from schemas.events import EVENT_ID_MARKER, EVENT_KINDS, KIND_MARKER, decode_raw, kind_marker

_KIND_LEN = len(KIND_MARKER)

log_ = logging.getLogger(__name__)
log = logging.getLogger("ledgergate")

Progress = Callable[[int, int], Any]


class LogConsumer:
    """Shared loop of the log -> ClickHouse consumers (subclasses pick table and kinds)."""

    table: str = ""
    kinds: frozenset[str] = frozenset(EVENT_KINDS)

    linger_s: float = 1.0  # at most ~1 insert a second while the log trickles

    def __init__(self, log: EventLog, store: AuditStore, name: str, *, batch: int = 50_000) -> None:
        if batch <= 0:
            raise ValueError("batch must be > 0")
        self.log = log
        self.store = store
        self.name = name
        self.batch = batch
        self.processed = 0  # records consumed (committed) by this instance
        self.inserted = 0  # events written to ClickHouse by this instance
        self.skipped = 0  # malformed or foreign records (logged, never retried)
        # per partition, the next offset this instance will consume (once running)
        self.position: Position = {}
        self._advanced = asyncio.Event()
        self._poke = asyncio.Event()
        # riding (see ride_on): the consumer whose inserts also fill this one's tables
        self.leader: LogConsumer | None = None
        self.ridden = 0  # records committed on the leader's insert, without an insert of ours
        self._ran_from: Position | None = None  # as leader: where its first run() in this process began
        self._followers: list[asyncio.Event] = []  # as leader: set at each commit

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, store={self.store!r})"

    def _wanted(self, ev: Any) -> bool:
        return isinstance(ev, dict) and isinstance(ev.get("event_id"), str) and ev.get("kind") in self.kinds

    def select(self, records: Sequence[Record], *, strict: bool = False) -> list[bytes]:
        """The payloads of ``records`` to insert (events of the wanted kinds).

        Fast path: the gateway's compact orjson payloads are recognised by their bytes
        (``"kind":"..."`` marker) and handed to ClickHouse unparsed. Anything else, and
        every record when ``strict``, is parsed with ``decode_raw``; records that are not
        JSON events are skipped and logged (never retried)."""
        out: list[bytes] = []
        markers = self._markers
        wanted = {k.encode() for k in self.kinds}
        for rec in records:
            p = rec.payload
            if not strict and p[:1] == b"{" and EVENT_ID_MARKER in p:
                k = p.find(KIND_MARKER)
                if k >= 0:
                    # the kind at the first marker (the gateway's own field) first: one find
                    # and a set lookup instead of a scan of the payload per wanted kind
                    end = p.find(b'"', k + _KIND_LEN)
                    if end > 0 and p[k + _KIND_LEN : end] in wanted:
                        out.append(p)
                        continue
                    # any later marker (agent text) of a wanted kind, as before
                    if p.find(KIND_MARKER, k + 1) >= 0 and any(m in p for m in markers):
                        out.append(p)
                    continue  # a kind this consumer does not want
            try:
                ev = decode_raw(p)
            except orjson.JSONDecodeError:
                self.skipped += 1
                log_.warning("%s: offset %d is not JSON; skipped", self.name, rec.offset)
                continue
            if not isinstance(ev, dict) or not isinstance(ev.get("event_id"), str):
                self.skipped += 1
                log_.warning("%s: offset %d is not an event; skipped", self.name, rec.offset)
                continue
            if ev.get("kind") in self.kinds:
                out.append(p)
        return out

    @property
    def _markers(self) -> list[bytes]:
        return [kind_marker(k) for k in self.kinds]

    def route(self, payloads: list[bytes]) -> list[tuple[str, list[bytes]]]:
        """(table, payloads) to insert; one table unless a subclass routes kinds."""
        return [(self.table, payloads)] if payloads else []

    async def process(self, records: Sequence[Record]) -> int:
        """Insert one batch (no commit). Returns the number of events inserted.

        If ClickHouse rejects the batch (a record the fast path let through is not valid
        JSON), the batch is re-selected with full parsing and inserted once more."""
        routed = self.routed(records)
        try:
            for table, part in routed:
                await self.store.insert_json(table, part)
        except StoreError:
            routed = self.routed(records, strict=True)
            for table, part in routed:
                await self.store.insert_json(table, part)  # idempotent: a re-insert collapses
        n = sum(len(part) for _, part in routed)
        self.inserted += n
        return n

    def routed(self, records: Sequence[Record], *, strict: bool = False) -> list[tuple[str, list[bytes]]]:
        """(table, payloads) to insert for ``records``: ``route(select(records))``."""
        return self.route(self.select(records, strict=strict))

    async def _consume(self, records: Sequence[Record], *, commit: bool = True) -> None:
        await self.process(records)
        advanced = _after(records)
        if set(advanced) == {0}:  # a one-partition log (embedded): gap detection at start-up
            await self.record_position(advanced[0])
        if commit:
            # committed only after the write succeeded: at-least-once, the writes are idempotent
            await self.log.commit_position(self.name, advanced)
        self.processed += len(records)
        if commit:
            self.position.update(advanced)
            self._advanced.set()
            for moved in self._followers:
                moved.set()

    def ride_on(self, leader: LogConsumer) -> None:
        """Commit what ``leader`` stored instead of inserting it again.

        Only for a consumer whose tables the leader's insert fills too (counters_minute is fed
        by audit_events_in, schemas/clickhouse/009_counters_from_audit.sql), on the same store,
        in the same process. ``run()`` then commits the leader's position, as far as the leader
        got in this process (its inserts ran after the migrations), without reading the log;
        records the leader does not reach within ``ride_wait_s`` are read and inserted by this
        consumer as before, so a leader that is behind or retrying never holds it, and each
        consumer keeps its own committed offset (at-least-once per consumer)."""
        if leader.store is not self.store:
            raise ValueError("a consumer rides only on a leader that writes to the same store")
        self.leader = leader

    # how long a rider waits for its leader before it inserts by itself (a few lingers)
    ride_wait_s: float = 5.0

    def _ridable(self) -> Position:
        """The position up to which the leader stored, in this process, what follows ours."""
        leader = self.leader
        if leader is None or leader._ran_from is None:
            return {}
        out: Position = {}
        for p, o in leader.position.items():
            mine = self.position.get(p, 0)
            if leader._ran_from.get(p, 0) <= mine < o:
                out[p] = o
        return out

    async def _ride(self, ahead: Position) -> None:
        """Commit ``ahead`` (the leader stored those records, its MV filled our tables). No
        log_positions row: the leader wrote one at least this far."""
        await self.log.commit_position(self.name, ahead)
        n = sum(o - self.position.get(p, 0) for p, o in ahead.items())
        self.processed += n
        self.ridden += n
        self.position.update(ahead)
        self._advanced.set()

    async def _run_riding(self) -> None:
        """run() of a rider: commit the leader's progress; read and insert only what the leader
        does not store within ``ride_wait_s`` (leader down, or this consumer behind its start)."""
        assert self.leader is not None
        leader = self.leader
        moved = asyncio.Event()
        leader._followers.append(moved)
        try:
            while True:
                moved.clear()  # before looking: a commit from here on wakes the wait below
                ahead = self._ridable()
                if ahead:
                    await self._ride(ahead)
                    continue
                end = await self.log.end_position()
                start = leader._ran_from
                if start is not None and not self.reached(start):
                    # behind where the leader began in this process: its earlier inserts may
                    # predate the view that fills our tables, so these we insert ourselves
                    await self._insert_one_batch({p: min(o, start.get(p, 0)) for p, o in end.items()})
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(moved.wait(), self.ride_wait_s)
                if moved.is_set() or self.reached(end):
                    continue
                # the leader did not get there in time (down, retrying): insert one batch ourselves
                await self._insert_one_batch(end)
        finally:
            leader._followers.remove(moved)

    async def record_position(self, next_offset: int) -> None:
        """The store remembers how far the log reached (schemas/clickhouse/004_positions.sql):
        a log that later ends below it went backwards, and start-up says so."""
        row = orjson.dumps(
            {"consumer": self.name, "next_offset": next_offset, "ts_ms": time.time_ns() // 1_000_000}
        )
        await self.store.insert_json("log_positions", [row])

    def reached(self, target: Position | int) -> bool:
        if isinstance(target, int):
            target = {0: target}
        return all(self.position.get(p, 0) >= o for p, o in target.items())

    async def wait_for(self, target: Position | int) -> None:
        """Wait until this consumer (running its `run()` loop) has consumed up to `target`
        (a position, or an offset of a one-partition log)."""
        while not self.reached(target):
            self._poke.set()
            if self.leader is not None:  # a rider advances when its leader does
                self.leader._poke.set()
            self._advanced.clear()
            await self._advanced.wait()

    async def _insert_one_batch(self, end: Position) -> None:
        """Read, insert and commit the next batch below ``end`` (the first partition behind)."""
        for partition, stop in sorted(end.items()):
            offset = self.position.get(partition, 0)
            if offset < stop:
                records = await self.log.read_partition(partition, offset, min(self.batch, stop - offset))
                if records:
                    await self._consume(records)
                    return

    async def run(self) -> None:
        """Consume forever from the committed position (cancel the task to stop)."""
        position = await self.log.committed_position(self.name)
        self.position = dict(position)
        if self._ran_from is None:
            self._ran_from = dict(position)
        self._advanced.set()
        if self.leader is not None:
            return await self._run_riding()
        async for records in self.log.tail_position(position, self.batch):
            if records:
                await self._consume(records)
                if len(records) < self.batch and self.linger_s > 0:
                    # a small batch: let events accumulate instead of paying one ClickHouse
                    # insert, its merges and one offset commit (an fsync) per trickle of
                    # events; wait_for() (a forensic query waiting) cuts the linger short
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._poke.wait(), self.linger_s)
                    self._poke.clear()

    async def _batches(self, start: Position, end: Position) -> AsyncIterator[list[Record]]:
        """Batches of [start, end), partition after partition, reading the next batch (log
        thread) while the caller inserts the current one (ClickHouse thread): the two
        overlap instead of taking turns."""
        for partition, stop in sorted(end.items()):
            offset = start.get(partition, 0)

            def read(
                offset: int, partition: int = partition, stop: int = stop
            ) -> asyncio.Future[list[Record]]:
                return asyncio.ensure_future(
                    self.log.read_partition(partition, offset, min(self.batch, stop - offset))
                )

            pending = read(offset) if offset < stop else None
            try:
                while pending is not None:
                    records = await pending
                    pending = None
                    if not records:
                        break
                    offset = records[-1].offset + 1
                    if offset < stop:
                        pending = read(offset)
                    yield records
            finally:
                if pending is not None:
                    pending.cancel()

    async def catch_up(self) -> int:
        """Consume from the committed position up to the current end; return records consumed."""
        start = await self.log.committed_position(self.name)
        end = await self.log.end_position()
        done = 0
        async for records in self._batches(start, end):
            await self._consume(records)
            done += len(records)
        return done

    async def replay(self, from_offset: Position | int = 0, progress: Progress | None = None) -> int:
        """Re-insert every record from ``from_offset`` (a position, or an offset of every
        partition) to the end (idempotent), then move the committed position forward to the
        end where it was behind. Returns records read. ``progress(done, total)`` is called
        after each batch."""
        end = await self.log.end_position()
        start = from_offset if isinstance(from_offset, dict) else dict.fromkeys(end, from_offset)
        total = sum(max(0, o - start.get(p, 0)) for p, o in end.items())
        reached: Position = {}
        done = 0
        async for records in self._batches(start, end):
            await self._consume(records, commit=False)
            done += len(records)
            reached.update(_after(records))
            if progress is not None:
                progress(done, total)
        committed = await self.log.committed_position(self.name)
        behind = {p: o for p, o in reached.items() if committed.get(p, 0) < o}
        if behind:
            await self.log.commit_position(self.name, behind)
        return done


def _after(records: Sequence[Record]) -> Position:
    """Per partition, the offset after the last of `records` there (a batch holds each
    partition's records in offset order, so the last one wins)."""
    out: Position = {}
    for r in records:
        out[r.partition] = r.offset + 1
    return out


RETRY_FIRST_S = 0.25
_STOPPED = AggregatingLog(log, 10.0)  # a store down for minutes: one line per interval, with counts
RETRY_MAX_S = 2.0  # a store back from an outage is written to within ~2 s, not 30


async def supervise(consumer: LogConsumer, *, max_delay_s: float = RETRY_MAX_S) -> None:
    """Keep a consumer running; a store that is down is retried, the log keeps every event.

    The offset is committed only after a batch is stored (LogConsumer._consume), so a retry
    starts from the first batch that did not land. Backoff doubles up to ``max_delay_s`` with
    jitter, and a forensic query waiting for this consumer (wait_for) cuts the wait short."""
    delay = RETRY_FIRST_S
    while True:
        try:
            await consumer.run()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _STOPPED.error(
                f"{consumer.name} consumer stopped",
                "%s stopped (%s); retrying in %.1f s, events wait in the log",
                consumer.name,
                exc,
                delay,
            )
            consumer._poke.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(consumer._poke.wait(), delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, max_delay_s)
