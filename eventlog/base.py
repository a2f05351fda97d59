"""The one persistence interface of ledgergate: an append-only log of event records.

Backends (one module each): `eventlog.sqlite` (embedded, default) and `eventlog.kafka`.
Gateway and consumers depend on this interface only.

A record is (partition, offset, payload): within a partition offsets are dense integers
from 0 in append order; payloads are the orjson bytes of one `schemas.events` event.
Records of one grant always land in one partition, so each grant's events stay ordered.

Two ways to address the log:
- the position API (every backend): a `Position` maps partition -> the next offset to
  read; `partitions()`, `read_partition()`, `end_position()`, `tail_position()`,
  `committed_position()`/`commit_position()` (named consumers), `position_since()`.
- the int-offset API (`read`, `end_offset`, `committed`, `commit`, `tail`,
  `first_offset_since`): the one-partition case, which the embedded log is. The
  defaults of the position API are written in terms of it, so a one-partition backend
  implements only the int API; a multi-partition backend overrides the position API.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from typing import Literal, NamedTuple, Self

Durability = Literal["strict", "batched"]

Position = dict[int, int]
"""partition -> the next offset to read there (a partition left out means offset 0)."""


class Record(NamedTuple):
    """One record. A tuple (immutable, compared by value): a backend may build it without a
    Python call per row (``tuple.__new__(Record, row)`` over ``(offset, payload, partition)``
    rows), which matters at thousands of records a second per consumer."""

    offset: int
    payload: bytes
    partition: int = 0


class LogUnavailable(RuntimeError):
    """The log cannot accept or serve records right now (disk full, broker down...)."""


class EventLog(abc.ABC):
    """Append-only, durable, offset-addressed log."""

    durability: Durability = "strict"

    @abc.abstractmethod
    async def open(self) -> None:
        """Create or open the log; after this, append/read work."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush what is pending (batched mode too) and release resources."""

    @abc.abstractmethod
    async def append(self, payloads: Sequence[bytes]) -> int:
        """Append records in order; return the offset of the last one.

        strict: returns once the records are durable (fsync'd or acked). Concurrent
        callers share one commit (group commit).
        batched: returns at once; the records become durable within the backend's
        flush interval. `flush()` waits for everything appended so far.
        """

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def flush(self) -> None:
        """Wait until every record appended so far is durable."""

    @abc.abstractmethod
    async def read(self, offset: int, limit: int = 10_000) -> list[Record]:
        """Up to `limit` durable records with offset >= `offset`, in order."""

    @abc.abstractmethod
    async def end_offset(self) -> int:
        """The offset the next durable record will get (number of durable records)."""

    @abc.abstractmethod
    async def committed(self, consumer: str) -> int:
        """The named consumer's next offset to process (0 if it never committed)."""

    @abc.abstractmethod
    async def commit(self, consumer: str, offset: int) -> None:
        """Durably store the consumer's next offset to process."""

    async def read_since(self, ts_ms: int, limit: int = 10_000) -> AsyncIterator[list[Record]]:
        """Batches of records whose events were appended at or after `ts_ms` (approximately:
        backends may start earlier, never later). Default: scan from 0."""
        offset = await self.first_offset_since(ts_ms)
        while True:
            batch = await self.read(offset, limit)
            if not batch:
                return
            yield batch
            offset = batch[-1].offset + 1

    async def first_offset_since(self, ts_ms: int) -> int:
        """An offset at or before the first record appended at or after `ts_ms`."""
        return 0

    @abc.abstractmethod
    def tail(self, offset: int, batch: int = 10_000) -> AsyncIterator[list[Record]]:
        """Endless batches of records from `offset`, waiting for new ones (no polling sleep
        loop when the backend can signal appends)."""

    # ---- the position API: defaults are the one-partition case ---------------------------

    async def partitions(self) -> list[int]:
        """The partition numbers of the log."""
        return [0]

    async def read_partition(self, partition: int, offset: int, limit: int = 10_000) -> list[Record]:
        """Up to `limit` durable records of `partition` with offset >= `offset`, in order."""
        self._only_partition_0(partition)
        return await self.read(offset, limit)

    async def end_position(self) -> Position:
        """Per partition, the offset the next durable record will get."""
        return {0: await self.end_offset()}

    async def position_since(self, ts_ms: int) -> Position:
        """Per partition, an offset at or before its first record appended at or after `ts_ms`."""
        return {0: await self.first_offset_since(ts_ms)}

    async def committed_position(self, consumer: str) -> Position:
        """The named consumer's next offsets to process (0 where it never committed)."""
        return {0: await self.committed(consumer)}

    async def commit_position(self, consumer: str, position: Position) -> None:
        """Durably store the consumer's next offsets to process (only the partitions given)."""
        for partition, offset in position.items():
            self._only_partition_0(partition)
            await self.commit(consumer, offset)

    def tail_position(
        self, position: Position, batch: int = 10_000, *, max_wait_ms: int | None = None
    ) -> AsyncIterator[list[Record]]:
        """Endless batches of records from `position` (records carry their partition).
        ``max_wait_ms``: how long a backend that polls may wait for new records (lower:
        fresher, more requests); backends that are signalled ignore it."""
        for partition in position:
            self._only_partition_0(partition)
        return self.tail(position.get(0, 0), batch)

    async def read_position(
        self, start: Position, end: Position | None = None, limit: int = 10_000
    ) -> AsyncIterator[list[Record]]:
        """Batches of the records from `start` up to `end` (default: the end position when
        called), partition after partition; in order within each partition."""
        if end is None:
            end = await self.end_position()
        for partition, stop in sorted(end.items()):
            offset = start.get(partition, 0)
            while offset < stop:
                batch = await self.read_partition(partition, offset, min(limit, stop - offset))
                if not batch:
                    break
                yield batch
                offset = batch[-1].offset + 1

    def _only_partition_0(self, partition: int) -> None:
        if partition != 0:
            raise ValueError(f"{type(self).__name__} has one partition (0), not {partition}")
