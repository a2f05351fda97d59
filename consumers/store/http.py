"""AuditStore on a ClickHouse server over HTTP (clickhouse-connect).

The clickhouse-connect client is synchronous; calls run in a small thread pool. No
session id is used, so concurrent calls are fine. Parameters are bound server-side
(``{name:Type}`` placeholders, values sent as ``param_*``), read-only queries carry the
``readonly=1`` setting, which the server enforces.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote, urlsplit

from consumers.store.base import (
    Answer,
    AuditStore,
    ReadOnlyError,
    StoreError,
    check_identifier,
    is_readonly_refusal,
    normalize_value,
    param_text,
)

_INSERT_SETTINGS = {
    "input_format_skip_unknown_fields": 1,
    "input_format_null_as_default": 1,
    "date_time_input_format": "best_effort",
}


def _plain(value: Any) -> Any:
    value = normalize_value(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


class HttpStore(AuditStore):
    kind = "http"

    def __init__(self, url: str, *, connect_timeout: float = 10, send_receive_timeout: float = 300) -> None:
        self.url = url
        self._connect_timeout = connect_timeout
        self._timeout = send_receive_timeout
        self._client: Any = None
        self._executor: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        u = urlsplit(self.url)
        return f"HttpStore('{u.scheme}://{u.hostname}:{u.port}{u.path}')"

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="clickhouse-http")
        u = urlsplit(self.url)

        def connect() -> Any:
            import clickhouse_connect

            return clickhouse_connect.get_client(
                host=u.hostname or "127.0.0.1",
                port=u.port or (8443 if u.scheme == "https" else 8123),
                interface=u.scheme,
                username=unquote(u.username) if u.username else "default",
                password=unquote(u.password) if u.password else "",
                database=u.path.strip("/") or "__default__",
                autogenerate_session_id=False,
                connect_timeout=self._connect_timeout,
                send_receive_timeout=self._timeout,
            )

        try:
            self._client = await self._call(connect)
        except Exception as e:
            await self.close()
            raise StoreError(f"cannot connect to ClickHouse at {self!r}: {e}") from e

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        client, self._client = self._client, None
        if executor is None:
            return
        try:
            if client is not None:
                await asyncio.get_running_loop().run_in_executor(executor, client.close)
        finally:
            executor.shutdown(wait=True)

    @staticmethod
    def _params(params: Mapping[str, Any] | None) -> dict[str, Any]:
        return {k: param_text(v) for k, v in (params or {}).items()}

    @staticmethod
    def _error(e: Exception, readonly: bool = False) -> StoreError:
        msg = str(e)
        if readonly and "Multi-statements are not allowed" in msg:
            return ReadOnlyError(f"read-only query refused: expected exactly one SQL statement: {msg}")
        if is_readonly_refusal(msg):
            return ReadOnlyError(f"read-only query refused by ClickHouse: {msg}")
        return StoreError(msg)

    async def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        def run() -> None:
            try:
                self._client.command(sql, parameters=self._params(params))
            except Exception as e:
                raise self._error(e) from None

        await self._call(run)

    async def insert_json(self, table: str, lines: Sequence[bytes]) -> int:
        if not lines:
            return 0
        check_identifier(table)
        data = b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines)

        def run() -> None:
            try:
                self._client.raw_insert(
                    table, None, insert_block=data, fmt="JSONEachRow", settings=_INSERT_SETTINGS
                )
            except Exception as e:
                raise StoreError(f"insert into {table} failed: {e}") from None

        await self._call(run)
        return len(lines)

    async def query(
        self, sql: str, params: Mapping[str, Any] | None = None, *, readonly: bool = False
    ) -> Answer:
        def run() -> Answer:
            try:
                res = self._client.query(
                    sql,
                    parameters=self._params(params),
                    settings={"readonly": 1} if readonly else None,
                )
            except Exception as e:
                raise self._error(e, readonly) from None
            columns = list(res.column_names)
            rows = [tuple(_plain(v) for v in row) for row in res.result_rows]
            return columns, rows

        return await self._call(run)
