"""Audit consumer, counters and forensics against the embedded chDB store (real engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumers.store import AuditStore, open_store
from consumers.store.chdb import ChdbStore
from tests.support.audit_contract import AuditStoreContract


class TestChdbStore(AuditStoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Path):
        store = await open_store("embedded", tmp_path)
        try:
            yield store
        finally:
            await store.close()


async def test_embedded_store_persists_and_reopens(tmp_path: Path) -> None:
    store: AuditStore = await open_store("embedded", tmp_path)
    assert isinstance(store, ChdbStore) and store.path == tmp_path / "clickhouse"
    await store.insert_json("audit_calls", [b'{"event_id":"e1","call_id":"c1","server":"srv"}'])
    await store.ensure_schema()  # idempotent
    await store.close()
    store = await open_store("embedded", tmp_path)
    try:
        assert await store.query("SELECT event_id, call_id, server FROM audit_calls") == (
            ["event_id", "call_id", "server"],
            [("e1", "c1", "srv")],
        )
    finally:
        await store.close()


async def test_open_store_rejects_unknown_spec(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        await open_store("mysql://x", tmp_path)
