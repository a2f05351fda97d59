"""The Kafka event log (aiokafka): decisions on a topic, keyed by grant, with a local spool.

Topic: ``topic`` (default ``ledgergate.decisions``), created at open if missing with
``partitions`` and ``replication``. Each record is keyed by the grant found in its payload
(``grant_key``), so one grant's events land in one partition, in order. Producer: acks=all,
linger for batching, NO idempotence and NO transactions (the test broker, tansu, lacks
InitProducerId): delivery is at-least-once, every event carries its ``event_id`` and the
consumers dedupe on it.

Durability:
- ``strict``: ``append()`` returns once the broker acked every record, or, if that takes
  longer than ``spool_after_ms``, once the records are fsync'd in the local spool.
- ``batched``: ``append()`` returns at once; the producer sends within ``linger_ms``
  (default ``flush_interval_ms``); a record not acked within ``spool_after_ms`` goes to the
  spool. ``flush()`` waits until everything appended so far is acked or spooled.

Spool (``spool_path``, an embedded ``SqliteEventLog``): when the broker is unreachable at
open, fails a send, or is slower than ``spool_after_ms``, every record not yet acked (in
append order) and every later append go to the spool instead. A drainer task probes the
broker with backoff (re-creating the topic if the broker lost it), sends the spooled
records to Kafka in spool order, waits for the acks, records the drained offset in the
spool and deletes what it drained; when the spool is empty it switches appends back to
Kafka. Under steady load the spool would never be seen empty (appends keep landing in it as
fast as it drains), so once the drainer reads the spool's tail, new appends wait for the
switch (at most ``spool_after_ms``, then they go to the spool and the drainer tries again).
Appends never bypass a non-empty spool, so each grant's records stay in order
(a record whose ack was merely late can also arrive a second time: a duplicate, which the
consumers drop by event_id). Spool state: ``spooling``, ``spool_depth``, ``spool_age_s()``.

Positions: a ``Position`` is partition -> next offset. Named consumers' positions are the
offsets of the Kafka consumer group ``group_prefix + name`` (manual assignment, manual
commit: committed only when the caller commits). The end of a partition is its
*highwater* from a fetch response: this client never uses ListOffsets for the end
(``end_offsets()``/``seek_to_end``, wrong on tansu). ``position_since`` uses
offsets_for_times (ListOffsets by timestamp, which tansu answers correctly).

The int-offset API (``read``, ``end_offset``, ``committed``, ``commit``, ``tail``) works
when the topic has one partition; with more it raises ValueError (use the position API).
``append()`` returns the Kafka offset of the last record in its partition once acked, -1
when that is not known (batched mode, or the records went to the spool).

Bound to the event loop that called ``open()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    ConsumerStoppedError,
    KafkaError,
    OffsetOutOfRangeError,
    TopicAlreadyExistsError,
)

from eventlog.base import Durability, EventLog, LogUnavailable, Position, Record
from eventlog.sqlite import SqliteEventLog

__all__ = ["KafkaEventLog", "KafkaGroupReader", "grant_key"]

log = logging.getLogger(__name__)

_GRANT = b'"grant":"'
_DRAIN = "kafka-drain"  # the spool's consumer offset: next spool record to send to Kafka
_NEW, _OPEN, _CLOSING, _CLOSED = range(4)


def grant_key(payload: bytes) -> bytes | None:
    """The partitioning key of a record: its grant's name, as bytes, without parsing.

    The gateway writes compact orjson with `grant` before the agent-controlled `arguments`
    (schemas/events.py field order), and a JSON string cannot hold an unescaped quote, so
    the first ``"grant":"`` is the event's own. Records without one (policy.loaded) get no
    key (any partition)."""
    i = payload.find(_GRANT)
    if i < 0:
        return None
    i += 9
    j = payload.find(b'"', i)
    return payload[i:j] if j >= 0 else None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Done callback: mark a future's exception as seen (its failure is handled elsewhere)."""
    if not fut.cancelled():
        fut.exception()


class _Entry:
    """One direct append on its way to Kafka: settled when acked or when moved to the spool."""

    __slots__ = ("payloads", "settled", "spooled", "t0")

    def __init__(self, payloads: Sequence[bytes], t0: float, settled: asyncio.Future[int]) -> None:
        self.payloads = payloads
        self.t0 = t0
        self.settled = settled  # result: Kafka offset of the last record, or -1 once spooled
        self.spooled: asyncio.Future[int] | None = None


class KafkaEventLog(EventLog):
    def __init__(
        self,
        bootstrap: str,
        topic: str = "ledgergate.decisions",
        durability: Durability = "strict",
        flush_interval_ms: float = 5.0,
        *,
        spool_path: str | Path,
        partitions: int = 6,
        replication: int = 1,
        spool_after_ms: float = 1000.0,
        linger_ms: float | None = None,
        group_prefix: str = "ledgergate.",
        client_id: str = "ledgergate",
        fetch_wait_ms: int = 10,
        request_timeout_ms: int = 10_000,
        max_batch_size: int = 1 << 20,
        drain_batch: int = 5_000,
    ) -> None:
        if durability not in ("strict", "batched"):
            raise ValueError(f"durability must be 'strict' or 'batched', not {durability!r}")
        if flush_interval_ms <= 0 or spool_after_ms <= 0:
            raise ValueError("flush_interval_ms and spool_after_ms must be > 0")
        if partitions <= 0 or replication <= 0:
            raise ValueError("partitions and replication must be > 0")
        self.bootstrap = bootstrap
        self.topic = topic
        self.durability = durability
        self.flush_interval_ms = float(flush_interval_ms)
        self.spool_path = Path(spool_path)
        self.n_partitions = partitions
        self.replication = replication
        self.spool_after_ms = float(spool_after_ms)
        # strict callers wait for the ack: send at once, batches form while a request is in
        # flight; batched callers do not wait: linger up to the flush interval to batch
        if linger_ms is None:
            linger_ms = 0.0 if durability == "strict" else flush_interval_ms
        self.linger_ms = float(linger_ms)
        self.group_prefix = group_prefix
        self.client_id = client_id
        self.fetch_wait_ms = int(fetch_wait_ms)
        self.request_timeout_ms = int(request_timeout_ms)
        self.max_batch_size = int(max_batch_size)
        self.drain_batch = int(drain_batch)
        self._strict = durability == "strict"
        self._spool_after_s = self.spool_after_ms / 1000
        self._spool = SqliteEventLog(self.spool_path, durability, flush_interval_ms)
        self._state = _NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: AIOKafkaProducer | None = None
        self._tps: list[TopicPartition] | None = None
        self._reader: AIOKafkaConsumer | None = None
        self._read_lock = asyncio.Lock()
        self._hw: dict[int, int] = {}
        self._groups: dict[str, AIOKafkaConsumer] = {}
        self._group_lock = asyncio.Lock()
        self._tails: set[AIOKafkaConsumer] = set()
        # direct appends not yet acked, in append order (what goes to the spool on a switch)
        self._inflight: dict[int, _Entry] = {}
        self._seq = 0
        self._watchdog: asyncio.TimerHandle | None = None
        # spool state
        self._spooling = False
        self._spool_seq = 0  # records routed to the spool so far (the drainer's "nothing new")
        self._drained = 0  # next spool offset to send to Kafka
        self._spool_depth = 0
        self._spool_oldest_ms: int | None = None
        self._drain_wake = asyncio.Event()
        # set while the drainer sends the spool's tail: appends wait for the switch to Kafka
        self._tail_gate: asyncio.Event | None = None
        self._drainer: asyncio.Task[None] | None = None
        self.drained_total = 0  # records moved from the spool to Kafka by this instance

    def __repr__(self) -> str:
        return f"KafkaEventLog({self.bootstrap!r}, topic={self.topic!r}, durability={self.durability!r})"

    # ---- spool state (for /healthz) -------------------------------------------------------

    @property
    def spooling(self) -> bool:
        """Appends go to the local spool (the broker is down or slow, or the spool drains)."""
        return self._spooling

    @property
    def spool_depth(self) -> int:
        """Records in the spool not yet acked by Kafka."""
        return self._spool_depth

    def spool_age_s(self) -> float:
        """Age of the oldest record in the spool (0 when it is empty)."""
        if self._spool_depth <= 0 or self._spool_oldest_ms is None:
            return 0.0
        return max(0.0, (_now_ms() - self._spool_oldest_ms) / 1000)

    def spool_stats(self) -> dict[str, Any]:
        return {"spooling": self._spooling, "depth": self._spool_depth, "age_s": round(self.spool_age_s(), 3)}

    # ---- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        if self._state == _OPEN:
            return
        if self._state != _NEW:
            raise LogUnavailable(f"{self!r}: closed")
        self._loop = asyncio.get_running_loop()
        await self._spool.open()
        self._drained = await self._spool.committed(_DRAIN)
        self._spool_depth = max(0, await self._spool.end_offset() - self._drained)
        if self._spool_depth:
            self._spool_oldest_ms = await self._spool.timestamp(self._drained) or _now_ms()
            self._spooling = True
            log.warning("%r: %d records left in the spool; draining them first", self, self._spool_depth)
        try:
            await self._connect()
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("%r: broker unreachable (%s); appends go to the spool %s", self, exc, self.spool_path)
            self._spooling = True
        self._state = _OPEN
        self._drainer = asyncio.create_task(self._drain_loop(), name=f"kafka-drain:{self.topic}")
        if self._spooling:
            self._drain_wake.set()

    async def _ensure_topic(self) -> None:
        """Create the topic if missing and learn its partitions (also the broker probe)."""
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            request_timeout_ms=self.request_timeout_ms,
        )
        await admin.start()
        try:
            if self.topic not in await admin.list_topics():
                with contextlib.suppress(TopicAlreadyExistsError):  # another gateway was first
                    await admin.create_topics([NewTopic(self.topic, self.n_partitions, self.replication)])
            for _ in range(50):
                desc = await admin.describe_topics([self.topic])
                parts = desc[0].get("partitions") or [] if desc else []
                if parts:
                    break
                await asyncio.sleep(0.1)  # the topic is being created: poll its metadata
            else:
                raise LogUnavailable(f"{self!r}: topic {self.topic} has no partitions")
        finally:
            await admin.close()
        n = len(parts)
        if self._tps is None or len(self._tps) != n:
            self._tps = [TopicPartition(self.topic, p) for p in range(n)]

    async def _connect(self) -> None:
        await self._ensure_topic()
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                client_id=self.client_id,
                acks="all",
                enable_idempotence=False,  # not supported by tansu, and not relied upon
                linger_ms=self.linger_ms,
                max_batch_size=self.max_batch_size,
                request_timeout_ms=self.request_timeout_ms,
            )
            await producer.start()
            self._producer = producer

    async def close(self) -> None:
        """Settle what is in flight (acked or spooled), stop readers, drainer and producer.

        What is still in the spool stays there and drains at the next open()."""
        if self._state in (_CLOSING, _CLOSED):
            return
        if self._state == _NEW:
            self._state = _CLOSED
            return
        self._state = _CLOSING
        try:
            await self.flush()
        except LogUnavailable as exc:
            log.error("%r: close: %s", self, exc)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._drainer is not None:
            self._drainer.cancel()
            await asyncio.gather(self._drainer, return_exceptions=True)
            self._drainer = None
        consumers = [*self._tails, *self._groups.values()]
        if self._reader is not None:
            consumers.append(self._reader)
        self._tails.clear()
        self._groups.clear()
        self._reader = None
        for c in consumers:
            with contextlib.suppress(Exception):
                await c.stop()
        if self._producer is not None:
            producer, self._producer = self._producer, None
            # everything unacked is in the spool by now: do not wait out the broker
            try:
                await asyncio.wait_for(producer.stop(), self._spool_after_s + 1)
            except (TimeoutError, KafkaError) as exc:
                log.warning("%r: producer stop: %s", self, exc)
        await self._spool.close()
        self._state = _CLOSED

    def _check_open(self) -> None:
        if self._state != _OPEN:
            raise LogUnavailable(f"{self!r}: " + ("not open" if self._state == _NEW else "closed"))

    # ---- append -----------------------------------------------------------------------------

    async def append(self, payloads: Sequence[bytes]) -> int:
        self._check_open()
        for p in payloads:
            if type(p) is not bytes:
                raise TypeError(f"payloads must be bytes, not {type(p).__name__}")
        if not payloads:
            if self._strict:
                await self.flush()
            return -1
        if self._spooling and self._tail_gate is not None:
            # the drainer is sending the spool's last records: growing the spool now would
            # keep it from ever being empty under load, so wait for the switch (bounded)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._spool_after_s):
                    await self._tail_gate.wait()
        if self._spooling:
            fut = self._to_spool(payloads)
            if self._strict:
                await fut
            return -1
        loop = self._loop
        assert loop is not None and self._producer is not None
        key = self._seq
        self._seq += 1
        entry = _Entry(payloads, loop.time(), loop.create_future())
        self._inflight[key] = entry
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._spool_after_s, self._check_inflight)
        futs: list[asyncio.Future[Any]] = []
        send = self._producer.send
        topic = self.topic
        try:
            # send() waits when a partition's batch is full or metadata is missing: bounded
            async with asyncio.timeout(self._spool_after_s):
                for p in payloads:
                    futs.append(await send(topic, p, key=grant_key(p)))
        except (TimeoutError, KafkaError) as exc:
            for f in futs:
                f.add_done_callback(_retrieve)
            if entry.spooled is None:
                self._enter_spool(exc)
            if self._strict:
                await entry.settled
            return -1
        acks = asyncio.gather(*futs)
        acks.add_done_callback(lambda f: self._on_acks(key, entry, f))
        if not self._strict:
            return -1
        return await entry.settled

    def _on_acks(self, key: int, entry: _Entry, acks: asyncio.Future[Any]) -> None:
        exc = acks.exception() if not acks.cancelled() else asyncio.CancelledError()
        if self._inflight.get(key) is not entry:
            return  # already moved to the spool
        if exc is None:
            del self._inflight[key]
            if not entry.settled.done():
                entry.settled.set_result(acks.result()[-1].offset)
        else:
            self._enter_spool(exc)

    def _check_inflight(self) -> None:
        """Watchdog: an append not acked within spool_after_ms switches to the spool."""
        self._watchdog = None
        if not self._inflight:
            return
        oldest = next(iter(self._inflight.values()))
        waited = self._loop.time() - oldest.t0  # type: ignore[union-attr]
        if waited >= self._spool_after_s:
            self._enter_spool(TimeoutError(f"no ack within {self.spool_after_ms:g} ms"))
        else:
            self._watchdog = self._loop.call_later(  # type: ignore[union-attr]
                self._spool_after_s - waited, self._check_inflight
            )

    def _enter_spool(self, reason: BaseException) -> None:
        """Move every unacked append (in order) and all later ones to the spool."""
        if not self._spooling:
            log.warning(
                "%r: broker failing or slow (%r); appending to the spool %s", self, reason, self.spool_path
            )
            self._spooling = True
        entries = list(self._inflight.values())
        self._inflight.clear()
        if entries:
            payloads = [p for e in entries for p in e.payloads]
            try:
                fut = self._to_spool(payloads)
            except LogUnavailable as exc:
                fut = self._loop.create_future()  # type: ignore[union-attr]
                fut.set_exception(exc)
            for e in entries:
                e.spooled = fut
                fut.add_done_callback(lambda f, e=e: self._settle_spooled(e, f))

    @staticmethod
    def _settle_spooled(entry: _Entry, fut: asyncio.Future[int]) -> None:
        if entry.settled.done():
            return
        if fut.cancelled():
            entry.settled.cancel()
        elif fut.exception() is not None:
            entry.settled.set_exception(fut.exception())  # type: ignore[arg-type]
        else:
            entry.settled.set_result(-1)

    def _to_spool(self, payloads: Sequence[bytes]) -> asyncio.Future[int]:
        # append_nowait queues synchronously: spool order is call order, no await in between
        fut = self._spool.append_nowait(payloads)
        self._spool_seq += len(payloads)
        if self._spool_depth <= 0:
            self._spool_oldest_ms = _now_ms()
        self._spool_depth += len(payloads)
        self._drain_wake.set()
        return fut

    async def flush(self) -> None:
        """Wait until every record appended so far is acked by Kafka or durable in the spool."""
        if self._state == _NEW:
            self._check_open()
        entries = list(self._inflight.values())
        if entries:
            self._expedite()
            await asyncio.gather(*(e.settled for e in entries), return_exceptions=True)
            failed = [e.settled.exception() for e in entries if not e.settled.cancelled()]
            for exc in failed:
                if exc is not None:
                    raise LogUnavailable(f"{self!r}: {exc}") from exc
        await self._spool.flush()

    def _expedite(self) -> None:
        """Send the lingering batches now instead of at the end of linger_ms.

        aiokafka's public flush() only waits out the linger; its accumulator's
        flush_for_commit() closes the open batches and wakes the sender (the same thing,
        minus the wait, that a transaction commit does). Private API: if it moves, flush()
        still works, only slower."""
        acc = getattr(self._producer, "_message_accumulator", None)
        expedite = getattr(acc, "flush_for_commit", None)
        if expedite is not None:
            task = asyncio.ensure_future(expedite())
            task.add_done_callback(_retrieve)

    # ---- the drainer ------------------------------------------------------------------------

    async def _drain_loop(self) -> None:
        delay = 0.05
        while True:
            await self._drain_wake.wait()
            self._drain_wake.clear()
            if not self._spooling:
                continue
            try:
                await self._drain()
                delay = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("%r: spool not drained yet (%s); retrying in %.2f s", self, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                self._drain_wake.set()

    async def _drain(self) -> None:
        """Send the spool to Kafka in order until it is empty, then switch appends back."""
        await self._connect()  # probes the broker; a restarted broker may have lost the topic
        try:
            await self._drain_spool()
        finally:
            if self._tail_gate is not None:  # switched, or failed: waiting appends go on
                self._tail_gate.set()
                self._tail_gate = None

    async def _drain_spool(self) -> None:
        producer = self._producer
        assert producer is not None
        while True:
            seq = self._spool_seq
            await self._spool.flush()
            records = await self._spool.read(self._drained, self.drain_batch)
            if not records:
                if seq == self._spool_seq:  # nothing routed since the flush: safe to switch
                    self._spooling = False
                    self._spool_depth = 0
                    self._spool_oldest_ms = None
                    log.warning("%r: spool drained; appending to Kafka again", self)
                    return
                continue
            if len(records) < self.drain_batch and self._tail_gate is None:
                self._tail_gate = asyncio.Event()  # the tail: hold new appends until the switch
            futs: list[asyncio.Future[Any]] = []
            try:
                async with asyncio.timeout(max(10.0, 2 * self._spool_after_s)):
                    for r in records:
                        futs.append(await producer.send(self.topic, r.payload, key=grant_key(r.payload)))
                    await asyncio.gather(*futs)
            finally:
                for f in futs:
                    f.add_done_callback(_retrieve)
            self._drained = records[-1].offset + 1
            await self._spool.commit(_DRAIN, self._drained)
            await self._spool.delete_before(self._drained)
            self._spool_depth = max(0, self._spool_depth - len(records))
            self.drained_total += len(records)
            if self._spool_depth:
                self._spool_oldest_ms = await self._spool.timestamp(self._drained) or self._spool_oldest_ms

    # ---- reads ------------------------------------------------------------------------------

    async def _topic_partitions(self) -> list[TopicPartition]:
        if self._tps is None:
            try:
                await self._ensure_topic()
            except (KafkaError, OSError, TimeoutError) as exc:
                raise LogUnavailable(f"{self!r}: {exc}") from exc
        assert self._tps is not None
        return self._tps

    def _consumer(self, **kw: Any) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            enable_auto_commit=False,
            request_timeout_ms=self.request_timeout_ms,
            **kw,
        )

    async def _get_reader(self) -> AIOKafkaConsumer:
        self._check_readable()
        if self._reader is None:
            tps = await self._topic_partitions()
            # "none": an offset past the end is an error we turn into "no records",
            # never a silent jump to another offset
            c = self._consumer(fetch_max_wait_ms=self.fetch_wait_ms, auto_offset_reset="none")
            try:
                await c.start()
            except (KafkaError, OSError) as exc:
                raise LogUnavailable(f"{self!r}: {exc}") from exc
            c.assign(tps)
            c.pause(*tps)  # fetch only while a read asks for it
            self._reader = c
        return self._reader

    def _check_readable(self) -> None:
        if self._state not in (_OPEN, _CLOSING):
            self._check_open()

    def _start_round(
        self, c: Any, starts: dict[int, int]
    ) -> tuple[list[TopicPartition], dict[TopicPartition, int], dict[TopicPartition, int]]:
        """Seek the shared reader to `starts` and resume those partitions: (the partitions,
        their last poll timestamps, a count of fresh fetch responses per partition)."""
        tps = self._tps
        assert tps is not None
        wanted = [tps[p] for p in starts]
        for tp in wanted:
            c.seek(tp, starts[tp.partition])
        seen = {tp: c.last_poll_timestamp(tp) for tp in wanted}
        c.resume(*wanted)
        return wanted, seen, dict.fromkeys(wanted, 0)

    async def _poll(
        self,
        c: Any,
        wanted: list[TopicPartition],
        seen: dict[TopicPartition, int],
        fresh: dict[TopicPartition, int],
        max_records: int,
    ) -> dict[TopicPartition, list[Any]]:
        """One getmany; counts, per partition, the fetch responses that arrived since the last."""
        res = await c.getmany(*wanted, timeout_ms=self.fetch_wait_ms + 10, max_records=max_records)
        for tp in wanted:
            ts = c.last_poll_timestamp(tp)
            if ts != seen[tp]:
                seen[tp] = ts
                fresh[tp] += 1
        return res

    async def _fetch(self, starts: dict[int, int], limit: int) -> tuple[list[Record], dict[int, int]]:
        """One read round on the shared reader: records from `starts` (possibly empty) and
        the partitions' highwater after two fresh fetch responses each (the first could
        answer a request sent before the caller's append was acked)."""
        async with self._read_lock:
            c = await self._get_reader()
            wanted, seen, fresh = self._start_round(c, starts)
            deadline = time.monotonic() + self.request_timeout_ms / 1000
            try:
                while True:
                    try:
                        res = await self._poll(c, wanted, seen, fresh, max(1, limit))
                    except OffsetOutOfRangeError:
                        return [], {tp.partition: starts[tp.partition] for tp in wanted}
                    records = [
                        Record(m.offset, m.value, tp.partition)
                        for tp, msgs in res.items()
                        for m in msgs
                        if m.offset >= starts[tp.partition]
                    ]
                    hw = {tp.partition: c.highwater(tp) for tp in wanted}
                    if records:
                        return records, {p: h or 0 for p, h in hw.items()}
                    if all(
                        n >= 2 and (hw[tp.partition] or 0) <= starts[tp.partition] for tp, n in fresh.items()
                    ):
                        return [], {p: h or 0 for p, h in hw.items()}
                    if time.monotonic() > deadline:
                        raise LogUnavailable(
                            f"{self!r}: no fetch response within {self.request_timeout_ms} ms"
                        )
            finally:
                c.pause(*wanted)

    async def partitions(self) -> list[int]:
        return [tp.partition for tp in await self._topic_partitions()]

    async def read_partition(self, partition: int, offset: int, limit: int = 10_000) -> list[Record]:
        tps = await self._topic_partitions()
        if not 0 <= partition < len(tps):
            raise ValueError(f"{self.topic} has partitions 0..{len(tps) - 1}, not {partition}")
        records, _ = await self._fetch({partition: offset}, limit)
        return records[:limit]

    async def end_position(self) -> Position:
        """Per partition, its highwater (the offset the next record gets) from fresh fetches."""
        tps = await self._topic_partitions()
        _, hw = await self._fetch_end({tp.partition: self._hw.get(tp.partition, 0) for tp in tps})
        return hw

    async def _fetch_end(self, starts: dict[int, int]) -> tuple[None, dict[int, int]]:
        """The partitions' highwater from the second fresh fetch response of each (the first
        could answer a request sent before the caller's append was acked). Records fetched
        on the way are dropped and skipped by a seek to the highwater, so the freshness count
        goes on across them: while another gateway appends steadily, every response carries
        records, and a round that restarted on records (as `_fetch` does) never ended."""
        async with self._read_lock:
            c = await self._get_reader()
            wanted, seen, fresh = self._start_round(c, starts)
            deadline = time.monotonic() + self.request_timeout_ms / 1000
            try:
                while True:
                    try:
                        res = await self._poll(c, wanted, seen, fresh, 10_000)
                    except OffsetOutOfRangeError:
                        return None, {tp.partition: starts[tp.partition] for tp in wanted}
                    hw = {tp.partition: c.highwater(tp) or 0 for tp in wanted}
                    if all(n >= 2 for n in fresh.values()):
                        self._hw.update(hw)
                        return None, hw
                    for tp in res:  # records buffered: skip them, or no new fetch is sent for tp
                        c.seek(tp, max(hw[tp.partition], starts[tp.partition]))
                    if time.monotonic() > deadline:
                        raise LogUnavailable(
                            f"{self!r}: no fetch response within {self.request_timeout_ms} ms"
                        )
            finally:
                c.pause(*wanted)

    async def position_since(self, ts_ms: int) -> Position:
        tps = await self._topic_partitions()
        async with self._read_lock:
            c = await self._get_reader()
            try:
                found = await c.offsets_for_times(dict.fromkeys(tps, ts_ms))
            except KafkaError as exc:
                raise LogUnavailable(f"{self!r}: {exc}") from exc
        end = await self.end_position()
        pos: Position = {}
        for tp in tps:
            o = found.get(tp)
            # nothing at or after ts_ms: the end (tansu answers offset 0 with timestamp -1)
            pos[tp.partition] = end[tp.partition] if o is None or o.timestamp < 0 else o.offset
        return pos

    async def read_since(self, ts_ms: int, limit: int = 10_000) -> AsyncIterator[list[Record]]:
        start = await self.position_since(ts_ms)
        async for batch in self.read_position(start, limit=limit):
            yield batch

    async def tail_position(
        self, position: Position, batch: int = 10_000, *, max_wait_ms: int | None = None
    ) -> AsyncIterator[list[Record]]:
        """Endless batches from `position` (one consumer of its own, long-poll fetches: it wakes
        when records arrive, or after ``max_wait_ms``, default 500). Ends when the log closes."""
        async with contextlib.aclosing(self._tail(position, batch, max_wait_ms or 500)) as tail:
            async for res in tail:
                yield [Record(m.offset, m.value, tp.partition) for tp, msgs in res.items() for m in msgs]

    async def tail_payloads(
        self, position: Position, batch: int = 10_000, *, max_wait_ms: int = 20, pace_ms: float = 0
    ) -> AsyncIterator[tuple[list[bytes], Position]]:
        """`tail_position` for a reader that wants the payloads only (the replica fold): endless
        (payloads, position after them) pairs, no `Record` per record.

        ``pace_ms``: the next fetch is sent ``pace_ms`` after a batch arrived, not at once. A
        fetch has a fixed cost (request, response parse, task wake-ups: ~0.5-1 ms of CPU on
        this box) whatever it carries, and an unpaced tail fetches again as soon as anything
        new lands, i.e. about once per producer batch of every other gateway. Paced, the
        tail fetches at most once per ``pace_ms`` however many gateways write, and a record
        waits at most ~``pace_ms`` more in the broker (then the fetch answers at once).
        (Not the broker's fetch_min_bytes: tansu answers ~1/4 of such waits empty though
        records landed meanwhile, doubling the lag.)"""
        async with contextlib.aclosing(self._tail(position, batch, max_wait_ms, pace_ms)) as tail:
            async for res in tail:
                payloads: list[bytes] = []
                after: Position = {}
                for tp, msgs in res.items():
                    if msgs:
                        payloads += [m.value for m in msgs]
                        after[tp.partition] = msgs[-1].offset + 1
                yield payloads, after

    async def _tail(
        self, position: Position, batch: int, max_wait_ms: int, pace_ms: float = 0
    ) -> AsyncIterator[dict[TopicPartition, list[Any]]]:
        tps = await self._topic_partitions()
        c = self._consumer(
            auto_offset_reset="earliest", max_poll_records=batch, fetch_max_wait_ms=max_wait_ms
        )
        try:
            await c.start()
        except (KafkaError, OSError) as exc:
            raise LogUnavailable(f"{self!r}: {exc}") from exc
        self._tails.add(c)
        loop = asyncio.get_running_loop()
        pace_s = pace_ms / 1000
        try:
            c.assign(tps)
            for tp in tps:
                c.seek(tp, position.get(tp.partition, 0))
            while self._state == _OPEN:
                try:
                    res = await c.getmany(timeout_ms=1000, max_records=batch)
                except ConsumerStoppedError:
                    return
                if not res:
                    continue
                if pace_s:
                    # before any await: the fetcher task sends the next request on its next
                    # turn, unless the partitions are paused by then
                    c.pause(*tps)
                    resume_at = loop.time() + pace_s
                yield res
                if pace_s:
                    wait = resume_at - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    c.resume(*tps)
        finally:
            self._tails.discard(c)
            with contextlib.suppress(Exception):
                await c.stop()

    # ---- named consumers' positions (Kafka consumer groups) ---------------------------------

    async def _group(self, consumer: str) -> AIOKafkaConsumer:
        self._check_readable()
        async with self._group_lock:
            c = self._groups.get(consumer)
            if c is None:
                tps = await self._topic_partitions()
                c = self._consumer(group_id=self.group_prefix + consumer)
                try:
                    await c.start()
                except (KafkaError, OSError) as exc:
                    raise LogUnavailable(f"{self!r}: {exc}") from exc
                c.assign(tps)  # manual assignment: group offsets, no rebalancing here
                c.pause(*tps)
                self._groups[consumer] = c
            return c

    async def committed_position(self, consumer: str) -> Position:
        c = await self._group(consumer)
        assert self._tps is not None
        try:
            return {tp.partition: (await c.committed(tp)) or 0 for tp in self._tps}
        except KafkaError as exc:
            raise LogUnavailable(f"{self!r}: {exc}") from exc

    async def commit_position(self, consumer: str, position: Position) -> None:
        if any(o < 0 for o in position.values()):
            raise ValueError(f"offsets must be >= 0: {position}")
        c = await self._group(consumer)
        tps = self._tps
        assert tps is not None
        try:
            await c.commit({tps[p]: o for p, o in position.items()})
        except KafkaError as exc:
            raise LogUnavailable(f"{self!r}: {exc}") from exc

    # ---- the int-offset API: a one-partition topic only -------------------------------------

    async def _single(self) -> None:
        n = len(await self._topic_partitions())
        if n != 1:
            raise ValueError(f"{self.topic} has {n} partitions: use the position API")

    async def read(self, offset: int, limit: int = 10_000) -> list[Record]:
        await self._single()
        return await self.read_partition(0, offset, limit)

    async def end_offset(self) -> int:
        await self._single()
        return (await self.end_position())[0]

    async def first_offset_since(self, ts_ms: int) -> int:
        await self._single()
        return (await self.position_since(ts_ms))[0]

    async def committed(self, consumer: str) -> int:
        await self._single()
        return (await self.committed_position(consumer))[0]

    async def commit(self, consumer: str, offset: int) -> None:
        await self._single()
        await self.commit_position(consumer, {0: offset})

    async def tail(self, offset: int, batch: int = 10_000) -> AsyncIterator[list[Record]]:
        await self._single()
        async for records in self.tail_position({0: offset}, batch):
            yield records


# ---- group mode: consumer processes -------------------------------------------------------


class KafkaGroupReader:
    """One member of the Kafka consumer group ``group_prefix + name`` reading ``topic``: what a
    `ledgergate consume` process hands to `consumers.runner.LogConsumer` in place of the log.

    The group, not this process, owns the start positions: partitions are assigned by group
    membership (several processes of one group share the partitions; a process that dies or
    leaves has its partitions moved to the others) and each resumes from the group's
    committed offset. Manual commit only: the runner commits a batch after its write
    succeeded (at-least-once; the writes are idempotent).

    The methods the runner uses: ``committed_position`` (empty: the group knows),
    ``tail_position`` (batches of the assigned partitions; after a failed batch the next
    call rewinds the assigned partitions to their committed offsets, so the batch is
    written again), ``commit_position``. On a rebalance, ``on_partitions_revoked`` waits
    for the batch in hand to be written and committed (the runner's batch boundary, at
    most ``revoke_timeout_s``; past it the batch is abandoned and the next owner writes it
    again), so a partition moves with its committed offset.

    Lag is from each partition's *highwater* as the last fetch response gave it (never
    end_offsets / ListOffsets for the end, which tansu answers wrongly): ``lag()``.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str = "ledgergate.decisions",
        name: str = "audit",
        *,
        group_prefix: str = "ledgergate.",
        client_id: str = "ledgergate-consumer",
        partitions: int = 6,
        replication: int = 1,
        request_timeout_ms: int = 10_000,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 1_000,
        revoke_timeout_s: float = 30.0,
        max_poll_interval_ms: int = 300_000,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.name = name
        self.group = group_prefix + name
        self.client_id = client_id
        self.revoke_timeout_s = revoke_timeout_s
        # the topic is created with the gateway's settings if a consumer starts first
        self._creator = KafkaEventLog(
            bootstrap, topic, spool_path=Path("/dev/null"), partitions=partitions, replication=replication
        )
        self._consumer_kw: dict[str, Any] = {
            "bootstrap_servers": bootstrap,
            "client_id": client_id,
            "group_id": self.group,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "request_timeout_ms": request_timeout_ms,
            "session_timeout_ms": session_timeout_ms,
            "heartbeat_interval_ms": heartbeat_interval_ms,
            "max_poll_interval_ms": max_poll_interval_ms,
        }
        self._c: AIOKafkaConsumer | None = None
        self._closed = False
        self._rewind = False  # a tail is resumed after a failure: go back to the committed offsets
        self._pending: Position = {}  # the batch in hand: partition -> offset after it
        self._idle = asyncio.Event()
        self._idle.set()
        self.assigned: list[int] = []
        self.committed_offsets: Position = {}
        self.commits = 0
        self.rebalances = 0

    def __repr__(self) -> str:
        return f"KafkaGroupReader({self.bootstrap!r}, topic={self.topic!r}, group={self.group!r})"

    async def open(self) -> None:
        try:
            await self._creator._ensure_topic()
        except (KafkaError, OSError, TimeoutError) as exc:
            raise LogUnavailable(f"{self!r}: {exc}") from exc
        c = AIOKafkaConsumer(**self._consumer_kw)
        try:
            await c.start()
        except (KafkaError, OSError) as exc:
            with contextlib.suppress(Exception):
                await c.stop()
            raise LogUnavailable(f"{self!r}: {exc}") from exc
        c.subscribe([self.topic], listener=_GroupListener(self))
        self._c = c

    async def close(self) -> None:
        """Leave the group (its partitions move to the other members at once)."""
        self._closed = True
        c, self._c = self._c, None
        if c is not None:
            with contextlib.suppress(Exception):
                await c.stop()

    # -- rebalance ----------------------------------------------------------------------------

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        self.rebalances += 1
        if not self._idle.is_set():
            try:
                async with asyncio.timeout(self.revoke_timeout_s):
                    await self._idle.wait()
            except TimeoutError:
                log.warning(
                    "%r: the batch in hand was not written within %.0f s of a rebalance; its partitions "
                    "move uncommitted and the next owner writes it again",
                    self,
                    self.revoke_timeout_s,
                )
        self._pending = {}
        self._idle.set()
        gone = sorted(tp.partition for tp in revoked)
        if gone:
            log.info("%s: partitions %s revoked", self.group, gone)

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        self.assigned = sorted(tp.partition for tp in assigned)
        c = self._c
        if c is not None:
            for tp in assigned:
                with contextlib.suppress(KafkaError):
                    self.committed_offsets[tp.partition] = (await c.committed(tp)) or 0
        for p in list(self.committed_offsets):
            if p not in self.assigned:
                del self.committed_offsets[p]
        log.info("%s: partitions %s assigned", self.group, self.assigned)

    # -- what the runner uses -----------------------------------------------------------------

    async def committed_position(self, consumer: str) -> Position:
        return {}  # the group resumes each assigned partition from its committed offset

    async def tail_position(self, position: Position, batch: int = 10_000) -> AsyncIterator[list[Record]]:
        c = self._c
        if c is None:
            raise LogUnavailable(f"{self!r}: not open")
        if self._rewind:
            # the previous tail ended with a batch not written: fetch it again
            try:
                for tp in c.assignment():
                    # (not seek_to_committed: it leaves a partition never committed where it is)
                    c.seek(tp, (await c.committed(tp)) or 0)
            except KafkaError as exc:
                raise LogUnavailable(f"{self!r}: {exc}") from exc
        self._rewind = True
        self._pending = {}
        self._idle.set()
        try:
            async for records in self._batches(c, batch):
                yield records
        finally:
            # the runner left (a failed write, a stop): no batch in hand for a rebalance to wait for
            self._pending = {}
            self._idle.set()

    async def _batches(self, c: AIOKafkaConsumer, batch: int) -> AsyncIterator[list[Record]]:
        while not self._closed:
            try:
                res = await c.getmany(timeout_ms=1000, max_records=batch)
            except ConsumerStoppedError:
                return
            except KafkaError as exc:
                raise LogUnavailable(f"{self!r}: {exc}") from exc
            if not res:
                continue
            records = [Record(m.offset, m.value, tp.partition) for tp, msgs in res.items() for m in msgs]
            pending: Position = {}
            for r in records:
                pending[r.partition] = r.offset + 1
            self._pending = pending
            self._idle.clear()
            yield records

    async def commit_position(self, consumer: str, position: Position) -> None:
        c = self._c
        if c is None:
            raise LogUnavailable(f"{self!r}: not open")
        mine = {p for p in self.assigned}
        offsets = {TopicPartition(self.topic, p): o for p, o in position.items() if p in mine}
        try:
            if offsets:
                await c.commit(offsets)
                self.commits += 1
                for tp, o in offsets.items():
                    self.committed_offsets[tp.partition] = o
        except KafkaError as exc:
            # the group moved the partitions meanwhile: their new owner writes the batch
            # again from the last committed offset (idempotent writes), nothing is lost
            log.warning("%r: commit of %s not accepted (%s); the new owner redoes it", self, position, exc)
        finally:
            for p in position:
                if self._pending.get(p, -1) <= position[p]:
                    self._pending.pop(p, None)
            if not self._pending:
                self._idle.set()

    def lag(self) -> int:
        """Records of the assigned partitions not yet committed: highwater - committed offset
        (highwater from the last fetch response of each partition; 0 where none came yet)."""
        c = self._c
        if c is None:
            return 0
        total = 0
        for p in self.assigned:
            hw = c.highwater(TopicPartition(self.topic, p))
            if hw is not None:
                total += max(0, hw - self.committed_offsets.get(p, 0))
        return total


class _GroupListener(ConsumerRebalanceListener):
    def __init__(self, reader: KafkaGroupReader) -> None:
        self.reader = reader

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.reader._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.reader._assigned(set(assigned))
