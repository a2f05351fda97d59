"""AuditStore on embedded chDB (the ClickHouse engine in-process), persisted on disk.

Thread rule: chDB calls block and the engine is process-global, so the store owns ONE
dedicated thread and runs every chDB call (connect, queries, inserts, close) there;
the asyncio side only awaits futures. One process can have one chDB data dir open at a
time ("EmbeddedServer already initialized with path ..."), and one data dir must not be
opened by two processes: open one ChdbStore per process and share it (the audit and
counters consumers and the forensic API can all use the same instance).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from consumers.store.base import (
    Answer,
    AuditStore,
    ReadOnlyError,
    StoreError,
    check_identifier,
    is_readonly_refusal,
    param_text,
)

# Session settings applied once at connect (not per query, so readonly=1 queries never
# have to change a setting).
_SESSION_SETTINGS = (
    "SET output_format_json_quote_64bit_integers = 0",
    "SET output_format_json_quote_denormals = 0",
    "SET input_format_skip_unknown_fields = 1",
    "SET input_format_null_as_default = 1",
    "SET date_time_input_format = 'best_effort'",
    "SET session_timezone = 'UTC'",
)
_WRAPPERS = re.compile(r"^(Nullable|LowCardinality)\((.*)\)$")
_TZ = re.compile(r"'([^']+)'")


def escape_param(text: str | None) -> str:
    """ClickHouse parses ``{name:Type}`` values in the escaped (TSV) text format."""
    if text is None:
        return "\\N"
    return (
        text.replace("\\", "\\\\")
        .replace("\t", "\\t")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\0", "\\0")
    )


def _converter(ch_type: str) -> Callable[[Any], Any] | None:
    t = ch_type
    while m := _WRAPPERS.match(t):
        t = m.group(2)
    if t.startswith("DateTime"):
        m = _TZ.search(t)
        tz = ZoneInfo(m.group(1)) if m else UTC

        def conv_dt(v: Any) -> Any:
            if v is None:
                return None
            return datetime.fromisoformat(v).replace(tzinfo=tz).astimezone(UTC)

        return conv_dt
    if t.startswith("Date"):
        return lambda v: None if v is None else date.fromisoformat(v)
    if t.startswith(("Float", "Decimal")):
        return lambda v: v if v is None or isinstance(v, float) else float(v)
    return None


class ChdbStore(AuditStore):
    kind = "embedded"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._conn: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._thread_ident: int | None = None

    def __repr__(self) -> str:
        return f"ChdbStore({str(self.path)!r})"

    # ---- lifecycle -----------------------------------------------------------------

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chdb")

        def connect() -> None:
            import chdb

            self._thread_ident = threading.get_ident()
            self.path.mkdir(parents=True, exist_ok=True)
            conn = chdb.connect(f"file:{self.path}")
            for stmt in _SESSION_SETTINGS:
                conn.query(stmt)
            self._conn = conn

        try:
            await self._call(connect)
        except Exception as e:
            await self.close()
            raise StoreError(f"cannot open chDB store at {self.path}: {e}") from e

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return

        def disconnect() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        try:
            await asyncio.get_running_loop().run_in_executor(executor, disconnect)
        finally:
            executor.shutdown(wait=True)

    # ---- writes --------------------------------------------------------------------

    def _run(self, sql: str, params: Mapping[str, Any] | None, fmt: str = "CSV") -> Any:
        assert threading.get_ident() == self._thread_ident, "chDB used outside its thread"
        if self._conn is None:
            raise StoreError("store is closed")
        escaped = {k: escape_param(param_text(v)) for k, v in (params or {}).items()}
        try:
            return self._conn.query(sql, fmt, params=escaped)
        except Exception as e:
            msg = str(e)
            if is_readonly_refusal(msg):
                raise ReadOnlyError(f"read-only query refused by ClickHouse: {msg}") from None
            raise StoreError(msg) from None

    async def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        await self._call(lambda: self._run(sql, params))

    async def insert_json(self, table: str, lines: Sequence[bytes]) -> int:
        if not lines:
            return 0
        check_identifier(table)
        data = b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines)

        # A plain INSERT with the rows inline, not chDB's streaming send_insert: on a full disk
        # send_insert reports every row written and stores none, while the plain INSERT raises
        # NOT_ENOUGH_SPACE. A consumer commits its offset only after this returns, so a write
        # that fails silently would lose those events from every forensic answer.
        query = f"INSERT INTO {table} FORMAT JSONEachRow\n".encode() + data

        def insert() -> None:
            if self._conn is None:
                raise StoreError("store is closed")
            try:
                self._conn.query(query.decode("utf-8", "surrogateescape"), "Null")
            except Exception as e:
                raise StoreError(f"insert into {table} failed: {e}") from None

        await self._call(insert)
        return len(lines)

    # ---- reads ---------------------------------------------------------------------

    def _classify(self, sql: str) -> dict[str, Any]:
        raw = getattr(self._conn, "_conn", self._conn)  # chdb.Connection wraps the C object
        return dict(raw.classify_query(sql))

    def _readonly_sql(self, sql: str) -> str:
        """One read-only statement, then run under ``SETTINGS readonly = 1``.

        chDB (unlike the HTTP server) executes several ``;``-separated statements in one
        call, so the statement is classified by ClickHouse's own parser first (one
        statement, class READ_ONLY); the engine then enforces readonly=1 on it.
        """
        body = sql.strip()
        while body.endswith(";"):
            body = body[:-1].rstrip()
        info = self._classify(body)
        count = info.get("statement_count", 0)
        qclass = getattr(info.get("query_class"), "name", str(info.get("query_class")))
        if count != 1:
            raise ReadOnlyError(
                "read-only query refused: expected exactly one SQL statement"
                + (" (it does not parse)" if count == 0 else f", got {count}")
            )
        if qclass != "READ_ONLY":
            raise ReadOnlyError(
                f"read-only query refused: the statement is {qclass}, only reads are allowed "
                "(SELECT, WITH, SHOW, DESCRIBE, EXPLAIN, EXISTS)"
            )
        guarded = f"{body}\nSETTINGS readonly = 1"
        info = self._classify(guarded)
        if info.get("statement_count") != 1:
            raise ReadOnlyError("read-only query refused: cannot apply readonly=1 to this statement")
        return guarded

    async def query(
        self, sql: str, params: Mapping[str, Any] | None = None, *, readonly: bool = False
    ) -> Answer:
        def q() -> Answer:
            text = self._readonly_sql(sql) if readonly else sql
            res = self._run(text, params, "JSONCompact")
            raw = res.bytes() if hasattr(res, "bytes") else bytes(res)
            if not raw.strip():
                return [], []
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise StoreError("query answer is not JSON (no FORMAT clause, please)") from None
            meta = doc.get("meta", [])
            columns = [m["name"] for m in meta]
            convs = [(i, c) for i, m in enumerate(meta) if (c := _converter(m["type"])) is not None]
            rows = []
            for r in doc.get("data", []):
                for i, c in convs:
                    r[i] = c(r[i])
                rows.append(tuple(r))
            return columns, rows

        return await self._call(q)
