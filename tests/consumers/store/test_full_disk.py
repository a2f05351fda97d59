"""Faults at the store: a write that cannot land is never committed past (issue 17 item 1).

On a full filesystem chDB's streaming insert reported every row written and stored none,
the consumers committed their offsets anyway and `audit who` under-reported for good.
These tests fill a real small tmpfs (mounted by the test when it runs as root, as CI does);
without the rights to mount they inject the failure at the store boundary instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.audit import AuditConsumer
from consumers.store import open_store
from consumers.store.base import StoreError
from eventlog.sqlite import SqliteEventLog
from schemas.events import CallDecided, encode
from tests.support.fullfs import fill, small_tmpfs


def _decided(i: int) -> bytes:
    return encode(
        CallDecided(
            call_id=f"call-{i}",
            server="whatsapp",
            method="tools/call",
            tool="open_session",
            grant="alice",
            agent="bot",
            arguments={"padding": "x" * 400},
            decision="allow",
        )
    )


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "small-fs", "96m") as mnt:
        yield mnt


async def test_full_disk_insert_raises_and_offset_stays(small_fs: Path, tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.db", "strict")
    await log.open()
    store = await open_store("embedded", small_fs / "data")
    try:
        consumer = AuditConsumer(log, store)
        await log.append([_decided(i) for i in range(200)])
        assert await consumer.catch_up() == 200
        filler = fill(small_fs)
        await log.append([_decided(i) for i in range(200, 3200)])
        with pytest.raises(StoreError, match=r"NOT_ENOUGH_SPACE|not enough space"):
            await consumer.catch_up()
        assert await log.committed("audit") == 200  # never past a batch that is not stored
        filler.unlink()
        assert await consumer.catch_up() == 3000
        assert await log.committed("audit") == 3200
        _, rows = await store.query("SELECT count() FROM audit_calls FINAL")
        assert rows == [(3200,)]
    finally:
        await store.close()
        await log.close()


async def test_store_failure_at_the_boundary_is_not_committed(tmp_path: Path) -> None:
    """The same guarantee where no filesystem can be filled: the store raises, nothing commits."""
    log = SqliteEventLog(tmp_path / "events.db", "strict")
    await log.open()
    store = await open_store("embedded", tmp_path / "store")
    real_insert = store.insert_json
    failing = True

    async def insert_json(table: str, lines: list[bytes]) -> int:
        if failing:
            raise StoreError("Code: 243. DB::Exception: Cannot reserve 1.75 MiB, not enough space")
        return await real_insert(table, lines)

    store.insert_json = insert_json  # type: ignore[method-assign]
    try:
        consumer = AuditConsumer(log, store)
        await log.append([_decided(i) for i in range(50)])
        with pytest.raises(StoreError):
            await consumer.catch_up()
        assert await log.committed("audit") == 0
        failing = False
        assert await consumer.catch_up() == 50
        _, rows = await store.query("SELECT count() FROM audit_calls FINAL")
        assert rows == [(50,)]
    finally:
        await store.close()
        await log.close()
