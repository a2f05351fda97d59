"""The same assertions as test_audit_chdb.py, against a real ClickHouse server over HTTP
(clickhouse-connect): the server from the chdb-core wheel, or $LEDGERGATE_TEST_CLICKHOUSE_URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumers.store import open_store
from consumers.store.http import HttpStore
from tests.support.audit_contract import AuditStoreContract
from tests.support.clickhouse import clickhouse_db_url, clickhouse_url

__all__ = ["clickhouse_db_url", "clickhouse_url"]  # fixtures used by the tests below


class TestHttpStore(AuditStoreContract):
    @pytest.fixture
    async def store(self, clickhouse_db_url: str, tmp_path: Path):
        store = await open_store(clickhouse_db_url, tmp_path)
        assert isinstance(store, HttpStore)
        try:
            yield store
        finally:
            await store.close()
