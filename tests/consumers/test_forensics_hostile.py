"""Forensic SQL is read-only in fact: hostile queries against the real engines.

Every query here goes through the real path: ``forensics.sql`` -> ``AuditStore.forensic_query``
(chDB embedded, and the ClickHouse server fixture for the cheap cases), and through the admin
API (``POST /admin/audit/sql``) served by ``Embedded.answer`` on the gateway's HTTP server.
A secret file (a ``ledgergate.toml`` with an admin token) and a loopback TCP listener
stand for what an attacker wants: the tests assert both the refusal and that the secret
never appears in any answer, that no file was written and that no byte reached the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession, ClientTimeout

from consumers import forensics, sqlguard
from consumers.audit import AuditConsumer
from consumers.counters import CountersConsumer
from consumers.store import AuditStore, QueryLimits, ReadOnlyError, StoreError, open_store
from consumers.store.http import HttpStore
from gateway.admin import add_admin_routes, classify_error
from gateway.config import Config
from gateway.edge import App, HttpServer
from ledgergate.cli.audit import ask_gateway
from ledgergate.embedded import Embedded
from schemas import events as E
from tests.support.audit_contract import open_log, scenario
from tests.support.clickhouse import clickhouse_db_url, clickhouse_url

__all__ = ["clickhouse_db_url", "clickhouse_url"]  # fixtures used below

SECRET = "TOPSECRET-admin-token-4f9d"
TOKEN = "admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N_CALLS = 11  # call.decided events in the shared scenario

# The table functions ClickHouse documents (the engine's own list is tested too).
DOCUMENTED_TABLE_FUNCTIONS = (
    "file fileCluster url urlCluster s3 s3Cluster hdfs hdfsCluster remote remoteSecure cluster "
    "clusterAllReplicas mysql postgresql mongodb odbc jdbc sqlite redis azureBlobStorage "
    "azureBlobStorageCluster gcs iceberg icebergS3 icebergAzure icebergHDFS icebergLocal icebergCluster "
    "deltaLake deltaLakeCluster hudi hudiCluster executable input format generateRandom merge "
    "dictionary view viewIfPermitted viewExplain null values fuzzJSON fuzzQuery loop timeSeriesData "
    "timeSeriesMetrics timeSeriesTags mergeTreeIndex mergeTreeProjection paimon ytsaurus python "
    "arrowstream filesystem primes prometheusQuery"
).split()


class Listener:
    """A loopback TCP server that records every connection (url()/s3()/remote() targets)."""

    def __init__(self) -> None:
        self.hits: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Listener:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                self.hits.append(await asyncio.wait_for(reader.read(4096), 2))
            writer.close()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("victim") / "ledgergate.toml"
    path.write_text(f'[gateway]\nadmin_token = "{SECRET}"\n')
    return path


@pytest.fixture(scope="module")
async def embedded(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Embedded]:
    data: Path = tmp_path_factory.mktemp("forensic-data")
    log = await open_log(data)
    store = await open_store("embedded", data)
    try:
        evs = scenario()
        await log.append([E.encode(e) for e in evs])
        assert await AuditConsumer(log, store).catch_up() == len(evs)
        assert await CountersConsumer(log, store).catch_up() == len(evs)
        yield Embedded(Config(), log, store)
    finally:
        await store.close()
        await log.close()


@pytest.fixture
async def store(embedded: Embedded) -> AsyncIterator[AuditStore]:
    embedded.store.limits = QueryLimits()
    yield embedded.store
    embedded.store.limits = QueryLimits()


@pytest.fixture(scope="module")
async def base_url(embedded: Embedded) -> AsyncIterator[str]:
    app = App()
    add_admin_routes(app, TOKEN, embedded.answer)
    async with HttpServer(app, "127.0.0.1", 0) as server:
        yield server.url


async def refused(
    store: AuditStore, text: str, params: dict[str, Any] | None = None, *, syntax_ok: bool = False
) -> str:
    """``text`` is refused as not read-only (or, with ``syntax_ok``, does not even parse:
    e.g. ``view('...')`` wants a SELECT); the message never leaks the secret."""
    with pytest.raises(StoreError) as err:
        await forensics.sql(store, text, params)
    msg = str(err.value)
    assert SECRET not in msg and "admin_token" not in msg, msg
    if syntax_ok and not isinstance(err.value, ReadOnlyError):
        assert "Syntax error" in msg, msg
        return msg
    assert isinstance(err.value, ReadOnlyError), (text, msg)
    assert classify_error(err.value) == (400, "read_only")
    return msg


# ------------------------------------------------------------------ reproduction of the report


async def test_describe_file_does_not_quote_the_secret(store: AuditStore, secret_file: Path) -> None:
    for text in (
        f"DESCRIBE file('{secret_file}', 'JSONEachRow')",
        f"DESC TABLE file('{secret_file}', 'CSV')",
        f"SELECT * FROM file('{secret_file}', 'JSONEachRow')",
        f"SELECT * FROM file('{secret_file}', 'LineAsString')",
        f"SELECT file('{secret_file}')",  # the scalar function reads the file even under readonly=1
        f"SELECT toUInt8(file('{secret_file}'))",
        f"SELECT count() FROM audit_calls WHERE agent = file('{secret_file}')",
    ):
        await refused(store, text)


async def test_url_and_s3_send_no_request(store: AuditStore) -> None:
    async with Listener() as target:
        base = f"http://127.0.0.1:{target.port}"
        for text in (
            f"SELECT * FROM url('{base}/x', 'LineAsString')",
            f"DESCRIBE url('{base}/x', 'JSONEachRow')",
            f"SELECT * FROM s3('{base}/bucket/key.csv', 'CSV')",
            f"SELECT * FROM remote('127.0.0.1:{target.port}', system.one)",
            f"SELECT * FROM audit_calls JOIN url('{base}/y', 'CSV', 'c String') AS u ON u.c = agent",
            f"SELECT AIGenerate('{base}')",
        ):
            await refused(store, text)
        # give a stray request time to arrive (the listener records it if it ever does)
        await asyncio.sleep(0.2)
    assert target.hits == []


async def test_every_table_function_of_the_engine_is_refused(store: AuditStore, secret_file: Path) -> None:
    _, rows = await store.query("SELECT name FROM system.table_functions ORDER BY name")
    engine = {r[0] for r in rows}
    assert len(engine) > 50 and "file" in engine and "url" in engine
    names = sorted(engine | set(DOCUMENTED_TABLE_FUNCTIONS))
    allowed = []
    for name in names:
        if name in sqlguard.TABLE_FUNCTIONS:
            allowed.append(name)
            continue
        for text in (
            f"SELECT * FROM {name}('{secret_file}', 'LineAsString')",
            f"SELECT * FROM {name}()",
            f"DESCRIBE {name}('{secret_file}')",
            f"SELECT count() FROM audit_calls WHERE agent IN (SELECT * FROM {name}('{secret_file}'))",
            f"WITH t AS (SELECT * FROM {name}('x')) SELECT * FROM t",
            f"SELECT 1 UNION ALL SELECT * FROM {name}('x')",
            f"SELECT * FROM (SELECT * FROM (SELECT * FROM {name}('x')))",
            f"SELECT * FROM audit_calls AS a LEFT JOIN {name}('x') AS f ON 1",
            f"SELECT * FROM {name.upper()}('x')",
        ):
            await refused(store, text, syntax_ok=True)
    # the pure generators stay usable
    assert set(allowed) <= sqlguard.TABLE_FUNCTIONS and "numbers" in allowed
    assert (await forensics.sql(store, "SELECT sum(number) AS s FROM numbers(10)"))[1] == [(45,)]


@pytest.mark.parametrize(
    "text",
    [
        # other databases and the engine's own tables
        "SELECT * FROM system.one",
        "SELECT name FROM system.tables",
        "SELECT * FROM system.users",
        "SELECT * FROM information_schema.tables",
        "SELECT * FROM INFORMATION_SCHEMA.TABLES",
        "SELECT * FROM other_db.audit_calls",
        "SELECT count() FROM audit_calls WHERE agent IN system.users",
        "SELECT count() FROM audit_calls WHERE agent IN (SELECT name FROM system.users)",
        "WITH x AS (SELECT * FROM system.users) SELECT * FROM x",
        "SELECT (SELECT max(name) FROM system.settings)",
        "SELECT * FROM {t:Identifier}",
        "SELECT count() FROM audit_calls WHERE agent IN {t:Identifier}",
        # functions that reach out or read server state
        "SELECT dictGet('d', 'a', 1)",
        "SELECT joinGet('audit_calls', 'agent', 1)",
        "SELECT hasColumnInTable('system', 'users', 'name')",
        "SELECT getSetting('readonly')",
        "SELECT getServerSetting('path')",
        "SELECT filesystemAvailable()",
        "SELECT catboostEvaluate('/etc/passwd', 1)",
        "SELECT sleep(3)",
        "SELECT FILE('/etc/passwd')",
        # writes, DDL, settings, several statements, outputs
        "INSERT INTO audit_calls (event_id) VALUES ('evil')",
        "INSERT INTO audit_calls SELECT * FROM audit_calls",
        "ALTER TABLE audit_calls DELETE WHERE 1",
        "ALTER TABLE audit_calls UPDATE agent = 'x' WHERE 1",
        "DROP TABLE audit_calls",
        "TRUNCATE TABLE audit_calls",
        "CREATE TABLE evil (a String) ENGINE = Memory",
        "CREATE DICTIONARY d (a String) PRIMARY KEY a SOURCE(FILE(path '/etc/passwd' format 'CSV'))",
        "SELECT 1; SELECT 2",
        "SELECT 1; DROP TABLE audit_calls",
        "SELECT 1 /* ; */; DROP TABLE audit_calls -- comment",
        "SELECT 1 SETTINGS readonly = 0",
        "SELECT 1 SETTINGS max_execution_time = 100000",
        "SELECT * FROM (SELECT 1 SETTINGS max_result_rows = 0)",
        "SELECT 1 FORMAT TSV",
        "SET readonly = 0",
        "SYSTEM FLUSH LOGS",
        "KILL QUERY WHERE 1",
        "SHOW TABLES",
        "SHOW GRANTS",
        "EXPLAIN SELECT * FROM file('x')",
        "OPTIMIZE TABLE audit_calls FINAL",
        "BACKUP TABLE audit_calls TO File('x')",
        "USE system",
        "EXISTS TABLE system.users",
        "",
    ],
)
async def test_hostile_statements_are_refused(store: AuditStore, text: str) -> None:
    with pytest.raises(StoreError) as err:  # ReadOnlyError, or a plain syntax error for ""
        await forensics.sql(store, text, {"t": "system.users"})
    if text:
        assert isinstance(err.value, ReadOnlyError), err.value
    _, rows = await store.query("SELECT count() FROM audit_calls FINAL")
    assert rows == [(N_CALLS,)]


async def test_into_outfile_writes_nothing(store: AuditStore, tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    for text in (
        f"SELECT * FROM audit_calls INTO OUTFILE '{target}'",
        f"SELECT 1 INTO OUTFILE '{target}' TRUNCATE",
        f"SELECT 1 INTO OUTFILE '{target}' AND STDOUT",
        f"SELECT 1 INTO OUTFILE '{target}' COMPRESSION 'gzip'",
        f"SELECT 1 UNION ALL SELECT 2 INTO OUTFILE '{target}'",
    ):
        await refused(store, text)
    assert not target.exists()


async def test_reads_of_our_tables_still_work(store: AuditStore, embedded: Embedded) -> None:
    good = {
        "SELECT count() AS n FROM audit_calls FINAL": [(N_CALLS,)],
        "SELECT count() AS n FROM default.audit_calls FINAL": [(N_CALLS,)],
        "WITH d AS (SELECT * FROM audit_calls FINAL WHERE decision = {d:String}) SELECT count() FROM d": [
            (2,)
        ],
        "SELECT countIf(decision = 'allow') FROM audit_calls FINAL": None,
        "SELECT count() FROM audit_calls FINAL WHERE call_id IN (SELECT call_id FROM audit_outcomes)": None,
        "SELECT count() FROM (SELECT 1 FROM audit_calls UNION ALL SELECT 1 FROM audit_sessions)": None,
        "SELECT uniqExactMerge(calls) FROM counters_minute": [(N_CALLS,)],
        "select COUNT() from audit_calls final -- trailing comment": [(N_CALLS,)],
        "SELECT arrayMap(x -> x * 2, [1, 2]) AS a, toStartOfMinute(now()) > 0, lower('A')": None,
        "SELECT c.agent, o.outcome FROM audit_calls AS c FINAL "
        "JOIN audit_outcomes AS o USING call_id ORDER BY c.call_id LIMIT 1": None,
        "SELECT count() FROM audit_calls;": [(N_CALLS,)],
    }
    for text, want in good.items():
        cols, rows = await forensics.sql(store, text, {"d": "deny"})
        assert cols, text
        if want is not None:
            assert rows == want, text
        # the same answer as the trusted (unchecked) path gives
        assert (cols, rows) == await store.query(text, {"d": "deny"}), text
    # the allowlist is exactly the project's schema: every table/view it creates
    _, tables = await store.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
    assert {t[0] for t in tables} == sqlguard.project_tables()


async def test_an_answer_streamed_in_several_blocks_has_each_row_once(store: AuditStore) -> None:
    """chDB streams one block at a time, each with the names and types lines again: they are
    column headers, never rows (they came back as rows, and broke datetime columns)."""
    text = "SELECT call_id, ts FROM audit_calls FINAL UNION ALL SELECT call_id, ts FROM audit_calls FINAL"
    cols, rows = await forensics.sql(store, text, {})
    assert cols == ["call_id", "ts"] and len(rows) == 2 * N_CALLS
    trusted_cols, trusted = await store.query(text)
    assert cols == trusted_cols and sorted(rows) == sorted(trusted)


# ------------------------------------------------------------------ limits


async def test_rows_over_the_limit_are_cut_and_the_answer_says_so(store: AuditStore, base_url: str) -> None:
    store.limits = QueryLimits(max_rows=5)
    _, rows = await forensics.sql(store, "SELECT number FROM numbers(100)")
    assert rows == [(i,) for i in range(5)]
    assert rows.note and "truncated" in rows.note and "5" in rows.note  # type: ignore[attr-defined]
    _, rows = await forensics.sql(store, "SELECT number FROM numbers(5)")
    assert len(rows) == 5 and rows.note is None  # type: ignore[attr-defined]
    async with ClientSession() as http:
        resp = await http.post(
            f"{base_url}/admin/audit/sql",
            headers=AUTH,
            data=orjson.dumps({"sql": "SELECT * FROM numbers(1e9)"}),
        )
        doc = orjson.loads(await resp.read())
    assert resp.status == 200 and doc["truncated"] is True and len(doc["rows"]) == 5 and "5" in doc["note"]
    # the CLI's admin client keeps the note (cmd_audit prints it to stderr)
    _, rows = await ask_gateway(base_url, TOKEN, "sql", {"sql": "SELECT * FROM numbers(50)", "params": {}})
    assert len(rows) == 5 and "truncated" in rows.note  # type: ignore[attr-defined]
    _, rows = await ask_gateway(base_url, TOKEN, "sql", {"sql": "SELECT 1", "params": {}})
    assert rows.note is None  # type: ignore[attr-defined]


async def test_bytes_and_memory_and_time_are_bounded(store: AuditStore) -> None:
    store.limits = QueryLimits(max_bytes=1 << 20)
    _, rows = await forensics.sql(store, "SELECT repeat('x', 1000) FROM numbers(1e7)")
    assert 0 < len(rows) < 1100 and "1048576 bytes" in rows.note  # type: ignore[attr-defined]
    assert rows == [("x" * 1000,)] * len(rows)
    store.limits = QueryLimits(max_memory=64 << 20)
    with pytest.raises(StoreError) as err:
        await forensics.sql(
            store, "SELECT number % 10000000 AS k, groupArray(number) FROM numbers(1e8) GROUP BY k"
        )
    assert "MEMORY_LIMIT_EXCEEDED" in str(err.value) and classify_error(err.value) == (400, "query_error")
    store.limits = QueryLimits(timeout_s=1)
    with pytest.raises(StoreError) as err:
        await forensics.sql(store, "SELECT sum(number) FROM numbers(1e12)")
    assert "TIMEOUT_EXCEEDED" in str(err.value) and classify_error(err.value) == (400, "query_error")


def test_limits_come_from_the_config(tmp_path: Path) -> None:
    from gateway.config import parse_config
    from ledgergate.embedded import query_limits

    (tmp_path / "p.json").write_text("{}")
    data = {
        "servers": {"s": {"url": "http://127.0.0.1:1/mcp", "policy": "p.json"}},
        "store": {
            "query_timeout_s": 5,
            "query_max_rows": 10,
            "query_max_bytes": 1000,
            "query_max_memory": 2000,
        },
    }
    cfg = parse_config(data, tmp_path / "ledgergate.toml", environ={})
    assert query_limits(cfg) == QueryLimits(5, 10, 1000, 2000)
    cfg = parse_config({"servers": data["servers"]}, tmp_path / "ledgergate.toml", environ={})
    assert query_limits(cfg) == QueryLimits()
    assert QueryLimits().timeout_s == 30


# ------------------------------------------------------------------ cancellation, isolation


async def _running(store: AuditStore, needle: str) -> int:
    _, rows = await store.query(
        "SELECT count() FROM system.processes "
        "WHERE query LIKE {n:String} AND query NOT LIKE '%system.processes%'",
        {"n": f"%{needle}%"},
    )
    return int(rows[0][0])


async def _poll(pred: Any, what: str, bound_s: float = 30.0) -> None:
    deadline = time.monotonic() + bound_s
    while not await pred():
        assert time.monotonic() < deadline, f"{what}: not within {bound_s} s"
        await asyncio.sleep(0.05)


async def test_a_client_that_goes_away_stops_its_query(
    embedded: Embedded, store: AuditStore, base_url: str
) -> None:
    """The slow query is killed when its client disconnects; meanwhile the consumers' inserts
    go on (their own connection and thread); afterwards a normal query answers at once."""
    store.limits = QueryLimits(timeout_s=600)  # only the kill can end it within the test
    slow = "SELECT sum(number) AS s, 'lg-slow-marker' FROM numbers(1e13)"

    async def ask_slow() -> None:
        async with ClientSession() as http:
            await http.post(f"{base_url}/admin/audit/sql", headers=AUTH, data=orjson.dumps({"sql": slow}))

    task = asyncio.create_task(ask_slow())
    await _poll(lambda: _is_running(store), "slow query starts")
    # while it runs, the audit consumer's store keeps inserting and answering
    t0 = time.perf_counter()
    before = (await store.query("SELECT count() FROM audit_calls"))[1][0][0]
    ev = next(e for e in scenario() if isinstance(e, E.CallDecided))
    await store.insert_json("audit_events_in", [E.encode(ev)])  # a replayed event (FINAL hides it)
    after = (await store.query("SELECT count() FROM audit_calls"))[1][0][0]
    insert_s = time.perf_counter() - t0
    assert after == before + 1
    assert not task.done() and await _running(store, "lg-slow-marker") == 1
    # the client gives up
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    t1 = time.perf_counter()
    await _poll(lambda: _zero(store, "lg-slow-marker"), "the slow query is killed")
    async with ClientSession(timeout=ClientTimeout(total=30)) as http:
        resp = await http.post(
            f"{base_url}/admin/audit/sql",
            headers=AUTH,
            data=orjson.dumps({"sql": "SELECT count() FROM audit_calls"}),
        )
        assert resp.status == 200, await resp.text()
    print(
        f"insert during slow query: {insert_s * 1000:.1f} ms; "
        f"kill + next answer: {time.perf_counter() - t1:.2f} s"
    )


async def _is_running(store: AuditStore) -> bool:
    return await _running(store, "lg-slow-marker") == 1


async def _zero(store: AuditStore, needle: str) -> bool:
    return await _running(store, needle) == 0


async def test_cancelling_the_awaiting_task_kills_the_query(store: AuditStore) -> None:
    store.limits = QueryLimits(timeout_s=600)
    task = asyncio.create_task(
        forensics.sql(store, "SELECT sum(number), 'lg-cancel-marker' FROM numbers(1e13)")
    )
    await _poll(lambda: _running_bool(store, "lg-cancel-marker"), "query starts")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _poll(lambda: _zero(store, "lg-cancel-marker"), "query killed")
    assert (await forensics.sql(store, "SELECT 1 AS one"))[1] == [(1,)]


async def _running_bool(store: AuditStore, needle: str) -> bool:
    return await _running(store, needle) >= 1


async def test_a_big_answer_does_not_stall_the_event_loop(store: AuditStore, base_url: str) -> None:
    """3 M rows asked: the engine stops at query_max_rows, decoding runs off the loop."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    async with ClientSession() as http:
        resp = await http.post(
            f"{base_url}/admin/audit/sql",
            headers=AUTH,
            data=orjson.dumps({"sql": "SELECT number, toString(number) AS s FROM numbers(3000000)"}),
        )
        doc = orjson.loads(await resp.read())
    stop.set()
    await tick
    assert resp.status == 200 and doc["truncated"] is True and len(doc["rows"]) == QueryLimits().max_rows
    print(f"longest event-loop stall during a 3 M-row question: {max(gaps) * 1000:.0f} ms")
    assert max(gaps) < 2.0  # generous: today's path stalled the loop for about 2 s


# ------------------------------------------------------------------ the ClickHouse server store


class TestServerStore:
    @pytest.fixture
    async def server_store(self, clickhouse_db_url: str, tmp_path: Path) -> AsyncIterator[HttpStore]:
        store = await open_store(clickhouse_db_url, tmp_path)
        assert isinstance(store, HttpStore)
        try:
            yield store
        finally:
            await store.close()

    async def test_server_refuses_what_chdb_refuses(self, server_store: HttpStore, secret_file: Path) -> None:
        async with Listener() as target:
            for text in (
                f"DESCRIBE file('{secret_file}', 'JSONEachRow')",
                f"SELECT file('{secret_file}')",
                f"SELECT * FROM url('http://127.0.0.1:{target.port}/x', 'LineAsString')",
                f"SELECT * FROM remote('127.0.0.1:{target.port}', system.one)",
                "SELECT * FROM system.users",
                "SELECT 1 SETTINGS readonly = 0",
                "SELECT 1; DROP TABLE audit_calls",
                "DROP TABLE audit_calls",
                "SELECT * FROM default.audit_calls",  # not the store's database
            ):
                await refused(server_store, text)
            await asyncio.sleep(0.2)
        assert target.hits == []
        _, rows = await server_store.query("SELECT name FROM system.table_functions")
        for (name,) in rows:
            if name not in sqlguard.TABLE_FUNCTIONS:
                await refused(server_store, f"SELECT * FROM {name}('{secret_file}')", syntax_ok=True)

    async def test_server_limits_and_reads(self, server_store: HttpStore) -> None:
        db = (await server_store.query("SELECT currentDatabase()"))[1][0][0]
        assert (await forensics.sql(server_store, f"SELECT count() FROM {db}.audit_calls"))[1] == [(0,)]
        server_store.limits = QueryLimits(max_rows=3, timeout_s=1)
        _, rows = await forensics.sql(server_store, "SELECT number FROM numbers(1000)")
        assert rows == [(0,), (1,), (2,)] and "truncated" in rows.note  # type: ignore[attr-defined]
        with pytest.raises(StoreError) as err:
            await forensics.sql(server_store, "SELECT sum(number) FROM numbers(1e13)")
        assert "TIMEOUT_EXCEEDED" in str(err.value)

    async def test_server_query_is_killed_on_cancel(self, server_store: HttpStore) -> None:
        server_store.limits = QueryLimits(timeout_s=600)
        task = asyncio.create_task(
            forensics.sql(server_store, "SELECT sum(number), 'lg-srv-marker' FROM numbers(1e13)")
        )
        await _poll(lambda: _running_bool(server_store, "lg-srv-marker"), "query starts")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _poll(lambda: _zero(server_store, "lg-srv-marker"), "query killed")
