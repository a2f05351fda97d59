"""The ClickHouse store of the consumers: one small interface, two backends.

- ``consumers.store.chdb.ChdbStore``: the embedded engine (chDB) persisted in
  ``data_dir/"clickhouse"``; every chDB call runs in one dedicated thread.
- ``consumers.store.http.HttpStore``: a ClickHouse server over HTTP (clickhouse-connect).

Both speak the same SQL (the DDL in ``schemas/clickhouse/*.sql`` and every forensic
query run unchanged on both) and both bind parameters server-side: SQL text carries
``{name:Type}`` placeholders and the values travel separately, never spliced into SQL.

Query answers are normalised the same way by both backends: ``(columns, rows)`` with
rows as tuples of plain Python values; DateTime/DateTime64 values are timezone-aware
UTC ``datetime`` objects.
"""

from __future__ import annotations

import abc
import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime
from importlib import resources
from typing import Any, TypeVar

import orjson

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
SCHEMA_FILES = (
    "000_migrations.sql",
    "001_audit.sql",
    "002_counters.sql",
    "003_security.sql",
    "004_positions.sql",
    "005_alerts.sql",
    "006_outcomes_shutdown.sql",
    "007_calls_policy_depth.sql",
    "008_approvals.sql",
    "009_counters_from_audit.sql",
)
MIGRATIONS_TABLE = "ledgergate_migrations"

Rows = list[tuple[Any, ...]]
Answer = tuple[list[str], Rows]


class StoreError(RuntimeError):
    """A store operation failed (the message is ClickHouse's own error)."""


class ReadOnlyError(StoreError):
    """A read-only query tried to write, change settings, or run several statements."""


@dataclass(frozen=True)
class QueryLimits:
    """Limits on every forensic (user-written) query; ``[store] query_*`` in the config."""

    timeout_s: float = 30.0  # max_execution_time
    max_rows: int = 100_000  # rows beyond are cut and the answer says so
    max_bytes: int = 64 << 20  # max_result_bytes (the engine stops reading there)
    max_memory: int = 1 << 30  # max_memory_usage per query

    def settings(self) -> dict[str, Any]:
        """ClickHouse settings enforcing the limits. ``result_overflow_mode='break'`` makes
        the engine stop at the limit and return what it has (whole blocks, so it may give a
        few more rows than asked: one extra row is asked for, and ``cut`` trims and notes)."""
        return {
            "max_execution_time": max(1, round(self.timeout_s)),
            "max_result_rows": self.max_rows + 1,
            "max_result_bytes": self.max_bytes,
            "result_overflow_mode": "break",
            "max_memory_usage": self.max_memory,
        }


class Rows(list[tuple[Any, ...]]):
    """Answer rows; ``note`` says when they are not the whole answer (a limit cut them)."""

    note: str | None = None


def cut(rows: list[tuple[Any, ...]], limits: QueryLimits, over_bytes: bool = False) -> Rows:
    """The first ``max_rows`` rows, with a note when a limit cut the answer."""
    out = Rows(rows[: limits.max_rows])
    if len(rows) > limits.max_rows:
        out.note = (
            f"truncated: only the first {limits.max_rows} rows ([store] query_max_rows); "
            "add LIMIT / WHERE / GROUP BY to narrow the query"
        )
    elif over_bytes:
        out.note = (
            f"truncated: the answer reached {limits.max_bytes} bytes ([store] query_max_bytes); "
            "select fewer or shorter columns, or fewer rows"
        )
    return out


def check_identifier(name: str) -> str:
    """Table/column names are not parameters in ClickHouse: accept plain identifiers only."""
    if not _IDENT.match(name):
        raise ValueError(f"not a plain identifier: {name!r}")
    return name


def schema_statements() -> list[str]:
    """The DDL statements of ``schemas/clickhouse/*.sql`` in file order (all idempotent)."""
    return [stmt for _, _, stmts in schema_files() for stmt in stmts]


def schema_files() -> list[tuple[int, str, list[str]]]:
    """(version, file name, statements) of each ``schemas/clickhouse/NNN_*.sql``, in order."""
    base = resources.files("schemas") / "clickhouse"
    return [
        (int(name[:3]), name, _statements((base / name).read_text(encoding="utf-8"))) for name in SCHEMA_FILES
    ]


def _statements(text: str) -> list[str]:
    out: list[str] = []
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("--")]
    current: list[str] = []
    for ln in lines:
        current.append(ln)
        if ln.rstrip().endswith(";"):
            stmt = "\n".join(current).strip().rstrip(";").strip()
            if stmt:
                out.append(stmt)
            current = []
    rest = "\n".join(current).strip()
    if rest:
        out.append(rest)
    return out


def param_text(value: Any) -> str | None:
    """A parameter value as ClickHouse parses it for ``{name:Type}`` (before escaping).

    datetimes become UTC ``YYYY-MM-DD hh:mm:ss.ffffff`` (naive ones are taken as UTC),
    bools ``true``/``false``, None stays None (NULL, for ``Nullable`` types),
    lists/tuples ClickHouse array literals of their quoted items.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        items = []
        for item in value:
            t = param_text(item)
            if t is None:
                items.append("NULL")
            elif isinstance(item, int | float) and not isinstance(item, bool):
                items.append(t)
            else:
                items.append("'" + t.replace("\\", "\\\\").replace("'", "\\'") + "'")
        return "[" + ",".join(items) + "]"
    return str(value)


def normalize_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


def equal_filters(values: Mapping[str, str | None], alias: str = "") -> tuple[list[str], dict[str, Any]]:
    """`col = {col:String}` conditions (and their server-side parameters) for the values given."""
    where: list[str] = []
    params: dict[str, Any] = {}
    for col, value in values.items():
        if value is not None:
            where.append(f"{alias}`{col}` = {{{col}:String}}")
            params[col] = value
    return where, params


T = TypeVar("T")


class AuditStore(abc.ABC):
    """Where consumers write and forensics read. Async; backends hide their threading."""

    kind: str = ""
    # the backend's blocking client runs on these threads, never on the event loop
    _executor: ThreadPoolExecutor | None = None
    limits: QueryLimits = QueryLimits()

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise StoreError("store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect (for chDB: start the engine thread and open the data dir)."""

    async def ensure_schema(self) -> list[str]:
        """Apply the schema migrations not yet applied (idempotent; ``000_migrations.sql``
        says how). Returns the names of the files applied now."""
        files = schema_files()
        stmts = files[0][2]
        for stmt in stmts:  # the migrations table itself
            await self.execute(stmt)
        _, rows = await self.query(f"SELECT DISTINCT version FROM {MIGRATIONS_TABLE}")
        done = {int(r[0]) for r in rows}
        applied: list[str] = []
        for version, name, stmts in files:
            # every statement is idempotent (CREATE ... IF NOT EXISTS, ADD COLUMN IF NOT EXISTS):
            # run them all at every start, so a table whose definition was lost comes back
            # (the projection check then rebuilds it from the log); the table records versions
            for stmt in stmts:
                await self.execute(stmt)
            if version not in done:
                await self.insert_json(MIGRATIONS_TABLE, [orjson.dumps({"version": version, "name": name})])
                applied.append(name)
        return applied

    @abc.abstractmethod
    async def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        """Run one statement that returns nothing (DDL, INSERT ... SELECT, OPTIMIZE)."""

    @abc.abstractmethod
    async def insert_json(self, table: str, lines: Sequence[bytes]) -> int:
        """Insert JSONEachRow lines (each one JSON object, with or without a trailing
        newline); unknown keys are ignored, JSON null becomes the column default.
        Returns the number of lines sent."""

    @abc.abstractmethod
    async def query(
        self, sql: str, params: Mapping[str, Any] | None = None, *, readonly: bool = False
    ) -> Answer:
        """Run one SELECT with server-side ``{name:Type}`` parameters.

        readonly=True is ``forensic_query`` (user-written SQL).
        """

    @abc.abstractmethod
    async def forensic_query(self, sql: str, params: Mapping[str, Any] | None = None) -> Answer:
        """Run user-written SQL: parsed by the engine and checked by ``consumers.sqlguard``
        (one SELECT over ledgergate's tables, no table functions that reach files, network,
        processes or other databases), then run under ``readonly=1`` and ``self.limits``.
        Raises ReadOnlyError when refused. Cancelling the awaiting task kills the query."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection (for chDB: the data dir and the engine thread)."""

    async def __aenter__(self) -> AuditStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def is_readonly_refusal(message: str) -> bool:
    return "READONLY" in message or "Code: 164" in message
