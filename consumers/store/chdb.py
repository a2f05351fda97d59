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
import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

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
    param_text,
)

log = logging.getLogger("ledgergate")

# Session settings applied once at connect (not per query, so readonly=1 queries never
# have to change a setting).
_SESSION_SETTINGS = (
    "SET output_format_json_quote_64bit_integers = 0",
    "SET output_format_json_quote_denormals = 0",
    "SET input_format_skip_unknown_fields = 1",
    "SET input_format_null_as_default = 1",
    "SET date_time_input_format = 'best_effort'",
    "SET session_timezone = 'UTC'",
    # a consumer's insert is one block of a few MB: parsing it in one thread costs ~10 % less
    # CPU per event than splitting it over parser threads (measured, issue 18)
    "SET input_format_parallel_parsing = 0",
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
        # Forensic (user-written) SQL runs on its own chDB connection and thread, so a slow
        # or huge query never holds the consumers' inserts; that connection is readonly=1
        # with the query limits set for its whole session.
        self._fexecutor: ThreadPoolExecutor | None = None
        self._fconn: Any = None
        self._catalog: sqlguard.Catalog | None = None
        self._flimits: Any = None
        self._fkilled = False

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
            try:
                await self._call(connect)
            except Exception:
                # a broken table definition (a 0-byte metadata file after a crash or a full disk)
                # stops the whole engine; the tables are projections of the log, so set the file
                # aside and open without it: the projection check rebuilds the table from the log
                if not await asyncio.to_thread(self._quarantine_broken_metadata):
                    raise
                await self._call(connect)
        except Exception as e:
            await self.close()
            raise StoreError(f"cannot open chDB store at {self.path}: {e}") from e

    def _quarantine_broken_metadata(self) -> list[Path]:
        """Move table definitions the engine cannot parse (empty, or not an ATTACH statement)
        to ``quarantine/`` next to the data; returns the files moved."""
        moved = []
        for sql in [*self.path.glob("store/*/*/*.sql"), *self.path.glob("metadata/*/*.sql")]:
            try:
                head = sql.read_bytes()[:64].lstrip()
            except OSError:
                continue
            if head.upper().startswith((b"ATTACH", b"CREATE")):
                continue
            dest = self.path / "quarantine" / f"{int(time.time())}-{sql.parent.name}-{sql.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            sql.rename(dest)
            moved.append(dest)
            log.error(
                "chDB store %s: the table definition %s is broken (%d bytes); moved to %s, the table is "
                "recreated empty and rebuilt from the event log",
                self.path,
                sql,
                dest.stat().st_size,
                dest,
            )
        return moved

    async def close(self) -> None:
        fexecutor, self._fexecutor = self._fexecutor, None
        if fexecutor is not None:

            def fdisconnect() -> None:
                conn, self._fconn = self._fconn, None
                if conn is not None:
                    conn.close()

            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(fexecutor, fdisconnect)
            fexecutor.shutdown(wait=True)
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
        head = f"INSERT INTO {table} FORMAT JSONEachRow\n".encode()

        # A plain INSERT with the rows inline, not chDB's streaming send_insert: on a full disk
        # send_insert reports every row written and stores none, while the plain INSERT raises
        # NOT_ENOUGH_SPACE. A consumer commits its offset only after this returns, so a write
        # that fails silently would lose those events from every forensic answer.
        def insert() -> None:
            # the rows are joined here, on the chDB thread: a pass over every line that the
            # event loop (serving calls) need not make
            query = head + b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines)
            if self._conn is None:
                raise StoreError("store is closed")
            try:
                self._conn.query(query.decode("utf-8", "surrogateescape"), "Null")
            except Exception as e:
                raise StoreError(f"insert into {table} failed: {e}") from None

        await self._call(insert)
        return len(lines)

    # ---- reads ---------------------------------------------------------------------

    async def query(
        self, sql: str, params: Mapping[str, Any] | None = None, *, readonly: bool = False
    ) -> Answer:
        if readonly:
            return await self.forensic_query(sql, params)

        def q() -> Answer:
            res = self._run(sql, params, "JSONCompact")
            return _decode(res.bytes() if hasattr(res, "bytes") else bytes(res))

        return await self._call(q)

    # ---- forensic (user-written) SQL -----------------------------------------------

    def _forensic_conn(self) -> Any:
        """The forensic connection (forensic thread only): the function catalog is read
        first, then the session gets the limits and, last, readonly=1 (which freezes them)."""
        if self._fconn is not None and self._flimits == self.limits and not self._fkilled:
            return self._fconn
        # the limits changed (they are frozen in the old session), or a query of this
        # connection was killed: chDB then fails the connection's next query, so start afresh
        self._fkilled = False
        if self._fconn is not None:
            self._fconn.close()
            self._fconn = None
        import chdb

        conn = chdb.connect(f"file:{self.path}")
        try:
            for stmt in _SESSION_SETTINGS:
                conn.query(stmt)
            db = _decode(conn.query("SELECT currentDatabase()", "JSONCompact").bytes())[1][0][0]
            funcs = _decode(
                conn.query(
                    "SELECT name, case_insensitive, alias_to, categories, is_aggregate FROM system.functions",
                    "JSONCompact",
                ).bytes()
            )[1]
            combs = _decode(
                conn.query("SELECT name FROM system.aggregate_function_combinators", "JSONCompact").bytes()
            )[1]
            self._catalog = sqlguard.Catalog.from_rows(db, funcs, [c[0] for c in combs])
            for name, value in self.limits.settings().items():
                conn.query(f"SET {name} = {value!r}" if isinstance(value, str) else f"SET {name} = {value}")
            conn.query("SET readonly = 1")
        except Exception:
            conn.close()
            raise
        self._fconn, self._flimits = conn, self.limits
        return conn

    def _forensic(self, text: str, params: Mapping[str, Any] | None) -> Answer:
        conn = self._forensic_conn()
        assert self._catalog is not None
        try:
            raw = conn.query(
                "SELECT parseQueryToJSON({q:String})", "TSVRaw", params={"q": escape_param(text)}
            )
        except Exception as e:
            raise sqlguard.parse_failure(str(e)) from None
        try:
            tree = orjson.loads(raw.bytes())
        except orjson.JSONDecodeError:
            raise ReadOnlyError(
                "read-only query refused: the query does not parse to one statement"
            ) from None
        sqlguard.check(tree, self._catalog)
        # second, independent opinion of the same parser: one statement, class READ_ONLY
        info = dict(getattr(conn, "_conn", conn).classify_query(text))
        qclass = getattr(info.get("query_class"), "name", str(info.get("query_class")))
        if info.get("statement_count") != 1 or qclass != "READ_ONLY":
            raise ReadOnlyError(f"read-only query refused: one read-only statement expected ({qclass})")
        escaped = {k: escape_param(param_text(v)) for k, v in (params or {}).items()}
        # Streamed block by block and stopped at the byte limit: the engine's
        # max_result_bytes counts blocks before the SELECT list is computed, so
        # repeat('x', 1000) FROM numbers(1e6) would otherwise hand over 1 GB.
        chunks: list[bytes] = []
        size = lines = 0
        over_bytes = False
        try:
            stream = conn.send_query(text, "JSONCompactEachRowWithNamesAndTypes", params=escaped)
            head = b""
            for chunk in stream:
                data = chunk.bytes()
                # every streamed block repeats the names and types lines: keep the first only
                if not head and data.count(b"\n") >= 2:
                    head = b"\n".join(data.split(b"\n", 2)[:2]) + b"\n"
                elif head and data.startswith(head):
                    data = data[len(head) :]
                chunks.append(data)
                size += len(data)
                lines += data.count(b"\n")
                if size > self.limits.max_bytes or lines > self.limits.max_rows + 2:
                    over_bytes = size > self.limits.max_bytes
                    stream.cancel()
                    break
        except Exception as e:
            msg = str(e)
            if is_readonly_refusal(msg):
                raise ReadOnlyError(f"read-only query refused by ClickHouse: {msg}") from None
            raise StoreError(msg) from None
        columns, rows = _decode_each_row(b"".join(chunks), self.limits.max_bytes if over_bytes else None)
        return columns, cut(rows, self.limits, over_bytes)

    def _kill(self, marker: str) -> None:
        self._fkilled = True
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.query(
                    "KILL QUERY WHERE startsWith(query, {m:String}) ASYNC", "CSV", params={"m": marker}
                )

    async def forensic_query(self, sql: str, params: Mapping[str, Any] | None = None) -> Answer:
        if self._executor is None:
            raise StoreError("store is not open")
        if self._fexecutor is None:
            self._fexecutor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chdb-forensic")
        # The marker names this query in system.processes, so it can be killed from the
        # consumers' connection: a chDB call cannot be interrupted from another thread.
        marker = f"/* ledgergate forensic {uuid.uuid4().hex} */"
        text = sql.strip()
        while text.endswith(";"):
            text = text[:-1].rstrip()
        text = f"{marker}\n{text}"
        fut = asyncio.get_running_loop().run_in_executor(self._fexecutor, self._forensic, text, params)
        fut.add_done_callback(_retrieve)
        try:
            # the engine stops at max_execution_time; this is the safety net behind it
            return await asyncio.wait_for(asyncio.shield(fut), self.limits.timeout_s + 10)
        except (asyncio.CancelledError, TimeoutError) as exc:
            # the client went away (or the engine overran): kill the query, do not wait for it
            self._executor.submit(self._kill, marker)
            if isinstance(exc, TimeoutError):
                raise StoreError(
                    f"forensic query exceeded {self.limits.timeout_s} s ([store] query_timeout_s) "
                    "(TIMEOUT_EXCEEDED)"
                ) from None
            raise


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """A cancelled caller leaves the future behind: read its error so none is logged."""
    if not fut.cancelled():
        fut.exception()


def _decode_each_row(raw: bytes, max_bytes: int | None) -> Answer:
    """JSONCompactEachRowWithNamesAndTypes -> (columns, rows); with ``max_bytes`` only the
    rows that fit in it (the last, partial chunk line included or not as a whole)."""
    out = raw.split(b"\n")
    if len(out) < 2:
        return [], []
    columns = orjson.loads(out[0])
    types = orjson.loads(out[1])
    convs = [(i, c) for i, t in enumerate(types) if (c := _converter(t)) is not None]
    rows = []
    used = len(out[0]) + len(out[1])
    for line in out[2:]:
        if not line:
            continue
        used += len(line) + 1
        if max_bytes is not None and used > max_bytes:
            break
        r = orjson.loads(line)
        for i, c in convs:
            r[i] = c(r[i])
        rows.append(tuple(r))
    return columns, rows


def _decode(raw: bytes) -> Answer:
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
