"""The one persistence interface of ledgergate: an append-only log of event records.

Backends (one module each): `eventlog.sqlite` (embedded, default), later
`eventlog.kafka`. Gateway and consumers depend on this interface only.

A record is (offset, payload): offsets are dense integers from 0 in append order,
payloads are the orjson bytes of one `schemas.events` event. Consumers keep named
offsets ("the next offset I have not processed") in the log itself.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Self

Durability = Literal["strict", "batched"]


@dataclass(frozen=True, slots=True)
class Record:
    offset: int
    payload: bytes


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
