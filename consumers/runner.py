"""The runner every log consumer shares: tail the log from its committed offset, hand batches
to `handle`, commit; and `supervise`, which keeps one running while its store is down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import orjson

from consumers.store.base import AuditStore, StoreError
from eventlog.base import EventLog, Record
from schemas.events import EVENT_ID_MARKER, EVENT_KINDS, KIND_MARKER, decode_raw, kind_marker

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
        self.position = 0  # the next offset this instance will consume (once running)
        self._advanced = asyncio.Event()
        self._poke = asyncio.Event()

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
        for rec in records:
            p = rec.payload
            if not strict and p[:1] == b"{" and EVENT_ID_MARKER in p:
                hit = [m for m in markers if m in p]
                if hit:
                    out.append(p)
                    continue
                if KIND_MARKER in p:
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
        payloads = self.select(records)
        try:
            for table, part in self.route(payloads):
                await self.store.insert_json(table, part)
        except StoreError:
            payloads = self.select(records, strict=True)
            for table, part in self.route(payloads):
                await self.store.insert_json(table, part)  # idempotent: a re-insert collapses
        self.inserted += len(payloads)
        return len(payloads)

    async def _consume(self, records: Sequence[Record], *, commit: bool = True) -> None:
        await self.process(records)
        if commit:
            await self.log.commit(self.name, records[-1].offset + 1)
        self.processed += len(records)
        if commit:
            self.position = records[-1].offset + 1
            self._advanced.set()

    async def wait_for(self, offset: int) -> None:
        """Wait until this consumer (running its `run()` loop) has consumed up to `offset`."""
        while self.position < offset:
            self._poke.set()
            self._advanced.clear()
            await self._advanced.wait()

    async def run(self) -> None:
        """Consume forever from the committed offset (cancel the task to stop)."""
        offset = await self.log.committed(self.name)
        self.position = offset
        self._advanced.set()
        async for records in self.log.tail(offset, self.batch):
            if records:
                await self._consume(records)
                if len(records) < self.batch and self.linger_s > 0:
                    # a small batch: let events accumulate instead of paying one ClickHouse
                    # insert, its merges and one offset commit (an fsync) per trickle of
                    # events; wait_for() (a forensic query waiting) cuts the linger short
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._poke.wait(), self.linger_s)
                    self._poke.clear()

    async def _batches(self, offset: int, end: int) -> AsyncIterator[list[Record]]:
        """Batches of [offset, end), reading the next batch (log thread) while the caller
        inserts the current one (ClickHouse thread): the two overlap instead of taking turns."""
        pending = (
            asyncio.ensure_future(self.log.read(offset, min(self.batch, end - offset)))
            if offset < end
            else None
        )
        try:
            while pending is not None:
                records = await pending
                pending = None
                if not records:
                    return
                offset = records[-1].offset + 1
                if offset < end:
                    pending = asyncio.ensure_future(self.log.read(offset, min(self.batch, end - offset)))
                yield records
        finally:
            if pending is not None:
                pending.cancel()

    async def catch_up(self) -> int:
        """Consume from the committed offset up to the current end; return records consumed."""
        offset = await self.log.committed(self.name)
        end = await self.log.end_offset()
        done = 0
        async for records in self._batches(offset, end):
            await self._consume(records)
            done += len(records)
        return done

    async def replay(self, from_offset: int = 0, progress: Progress | None = None) -> int:
        """Re-insert every record from ``from_offset`` to the end (idempotent), then move
        the committed offset forward to the end if it was behind. Returns records read.
        ``progress(done, total)`` is called after each batch."""
        end = await self.log.end_offset()
        total = max(0, end - from_offset)
        offset, done = from_offset, 0
        async for records in self._batches(from_offset, end):
            await self._consume(records, commit=False)
            done += len(records)
            offset = records[-1].offset + 1
            if progress is not None:
                progress(done, total)
        if await self.log.committed(self.name) < offset:
            await self.log.commit(self.name, offset)
        return done


RETRY_FIRST_S = 0.25
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
            log.error(
                "%s stopped (%s); retrying in %.1f s, events wait in the log", consumer.name, exc, delay
            )
            consumer._poke.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(consumer._poke.wait(), delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, max_delay_s)
