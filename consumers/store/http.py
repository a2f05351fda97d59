"""AuditStore on a ClickHouse server over HTTP (clickhouse-connect).

The clickhouse-connect client is synchronous; calls run in a small thread pool. No
session id is used, so concurrent calls are fine. Parameters are bound server-side
(``{name:Type}`` placeholders, values sent as ``param_*``), read-only queries carry the
``readonly=1`` setting, which the server enforces.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

from consumers import sqlguard
from consumers.store.base import (
    Answer,
    AuditStore,
    ReadOnlyError,
    StoreError,
    check_identifier,
    cut,
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

    def __init__(
        self,
        url: str,
        *,
        user: str | None = None,
        password: str | None = None,
        connect_timeout: float = 10,
        send_receive_timeout: float = 300,
    ) -> None:
        self.url = url
        self._user = user  # used when the URL names no user
        self._password = password
        self._connect_timeout = connect_timeout
        self._timeout = send_receive_timeout
        self._client: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._catalog: sqlguard.Catalog | None = None

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
                username=unquote(u.username) if u.username else (self._user or "default"),
                password=unquote(u.password) if u.username else (self._password or ""),
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
        if readonly:
            return await self.forensic_query(sql, params)

        def run() -> Answer:
            try:
                res = self._client.query(sql, parameters=self._params(params))
            except Exception as e:
                raise self._error(e) from None
            columns = list(res.column_names)
            rows = [tuple(_plain(v) for v in row) for row in res.result_rows]
            return columns, rows

        return await self._call(run)

    # ---- forensic (user-written) SQL -----------------------------------------------
    #
    # The server path relies on: the parse check of consumers.sqlguard on the server's own
    # parser (parseQueryToJSON, ClickHouse >= 25.x; without it every forensic query is
    # refused), readonly=1 and the limits sent with each query, and the configured user's
    # grants. Give the gateway a ClickHouse user limited to the audit database for defence
    # in depth (README "Security and limits"); the tests' server has only passwordless
    # "default".

    def _load_catalog(self) -> sqlguard.Catalog:
        if self._catalog is None:
            ro = {"readonly": 1}
            db = self._client.query("SELECT currentDatabase()", settings=ro).result_rows[0][0]
            funcs = self._client.query(
                "SELECT name, case_insensitive, alias_to, categories, is_aggregate FROM system.functions",
                settings=ro,
            ).result_rows
            combs = self._client.query(
                "SELECT name FROM system.aggregate_function_combinators", settings=ro
            ).result_rows
            self._catalog = sqlguard.Catalog.from_rows(str(db), funcs, [str(c[0]) for c in combs])
        return self._catalog

    def _forensic(self, text: str, params: Mapping[str, Any] | None, query_id: str) -> Answer:
        try:
            catalog = self._load_catalog()
            res = self._client.query(
                "SELECT parseQueryToJSON({q:String})", parameters={"q": text}, settings={"readonly": 1}
            )
        except Exception as e:
            msg = str(e)
            if "UNKNOWN_FUNCTION" in msg and "parseQueryToJSON" in msg:
                raise ReadOnlyError(
                    "read-only query refused: this ClickHouse server cannot parse queries for checking "
                    "(no parseQueryToJSON function; upgrade the server)"
                ) from None
            raise sqlguard.parse_failure(msg) from None
        tree = orjson.loads(res.result_rows[0][0])
        sqlguard.check(tree, catalog)
        settings = {"readonly": 1, **self.limits.settings(), "query_id": query_id}
        try:
            res = self._client.query(text, parameters=self._params(params), settings=settings)
        except Exception as e:
            raise self._error(e, True) from None
        columns = list(res.column_names)
        rows = [tuple(_plain(v) for v in row) for row in res.result_rows]
        return columns, cut(rows, self.limits)

    def _kill(self, query_id: str) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.command(
                    "KILL QUERY WHERE query_id = {q:String} ASYNC", parameters={"q": query_id}
                )

    async def forensic_query(self, sql: str, params: Mapping[str, Any] | None = None) -> Answer:
        if self._executor is None:
            raise StoreError("store is not open")
        query_id = f"ledgergate-forensic-{uuid.uuid4().hex}"
        text = sql.strip()
        while text.endswith(";"):
            text = text[:-1].rstrip()
        fut = asyncio.get_running_loop().run_in_executor(
            self._executor, self._forensic, text, params, query_id
        )
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # none left unread
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.limits.timeout_s + 10)
        except (asyncio.CancelledError, TimeoutError) as exc:
            self._executor.submit(self._kill, query_id)  # the client went away: stop the server's work
            if isinstance(exc, TimeoutError):
                raise StoreError(
                    f"forensic query exceeded {self.limits.timeout_s} s ([store] query_timeout_s) "
                    "(TIMEOUT_EXCEEDED)"
                ) from None
            raise
