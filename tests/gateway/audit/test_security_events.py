"""Security events: failed authentication (auth.failed) and the admin API's own trail
(admin.query / admin.reload), end to end through the real gateway (serve(): event log,
audit consumer, chDB store) with raw aiohttp requests, then the forensic answers.

"Who tried to get in?" must be answerable (address, server, reason, how many), a flood of
bad keys must not fill the log, and no key material may reach any stored row.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from gateway.audit.writer import AuthFailures
from gateway.auth import failure_reason
from gateway.config import Config, load_config
from ledgergate.embedded import Embedded, serve
from schemas.events import decode
from tests.support.gateway import SEED_POLICY, FakeClock, write_config
from tests.support.upstreams import StdioCommand

ADMIN = "admin-token-0123456789"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
GOOD_KEY = "lg-demo-key-0123456789"
BAD_KEY = "sk-ATTACKER-guess-5f3a9c1e7b"  # what an attacker sends: must never be stored
BAD_MARKERS = (BAD_KEY, BAD_KEY[:10], hashlib.sha256(BAD_KEY.encode()).hexdigest())


# ---------------------------------------------------------------- the aggregation itself


def test_first_failure_reported_at_once_then_one_sum_per_interval() -> None:
    agg = AuthFailures(interval_s=1.0, max_keys=10)
    first = agg.record("10.0.0.1", "wa", "invalid_key", now=100.0, ts_ms=1000)
    assert first == ("10.0.0.1", "wa", "invalid_key", 1, 1000, 1000, False)
    for i in range(1, 500):
        assert agg.record("10.0.0.1", "wa", "invalid_key", now=100.0 + i / 1000, ts_ms=1000 + i) is None
    assert agg.sweep(100.9) == []  # the interval has not ended
    assert agg.sweep(101.0) == [("10.0.0.1", "wa", "invalid_key", 499, 1001, 1499, False)]
    # the next interval: two more, then an idle interval drops the key
    agg.record("10.0.0.1", "wa", "invalid_key", now=101.5, ts_ms=2500)
    agg.record("10.0.0.1", "wa", "invalid_key", now=101.6, ts_ms=2600)
    assert agg.sweep(102.0) == [("10.0.0.1", "wa", "invalid_key", 2, 2500, 2600, False)]
    assert agg.sweep(103.0) == [] and len(agg) == 0
    # a key seen again after being dropped starts over with an immediate event
    assert agg.record("10.0.0.1", "wa", "invalid_key", now=104.0, ts_ms=4000) is not None


def test_tracked_keys_are_capped_and_overflow_sums_per_reason() -> None:
    agg = AuthFailures(interval_s=1.0, max_keys=3)
    reported = [agg.record(f"10.0.0.{i}", f"srv-{i}", "invalid_key", 0.0, i) for i in range(1000)]
    reported += [agg.record("10.9.9.9", "x", "missing_key", 0.0, 5000) for _ in range(7)]
    immediate = [r for r in reported if r is not None]
    assert [r[:3] for r in immediate] == [
        ("10.0.0.0", "srv-0", "invalid_key"),
        ("10.0.0.1", "srv-1", "invalid_key"),
        ("10.0.0.2", "srv-2", "invalid_key"),
        ("*", "*", "invalid_key"),  # the 4th key on: one bucket per reason
        ("*", "*", "missing_key"),
    ]
    assert len(agg) == 5  # bounded: max_keys + one per reason, whatever the attacker varies
    swept = agg.sweep(1.0)
    assert swept == [
        ("*", "*", "invalid_key", 996, 4, 999, True),
        ("*", "*", "missing_key", 6, 5000, 5000, True),
    ]
    total = sum(r[3] for r in immediate) + sum(r[3] for r in swept)
    assert total == 1007  # every failure is counted exactly once
    assert agg.drain() == [] and len(agg) == 0


def test_drain_reports_every_pending_sum() -> None:
    agg = AuthFailures(interval_s=3600.0)
    agg.record("::1", "wa", "empty_key", 0.0, 1)
    agg.record("::1", "wa", "empty_key", 0.1, 2)
    agg.record("::1", "wa", "empty_key", 0.2, 3)
    assert agg.drain() == [("::1", "wa", "empty_key", 2, 2, 3, False)]


def test_failure_reason_reads_only_the_scheme() -> None:
    assert failure_reason(None) == "missing_key"
    assert failure_reason("") == "missing_key"
    assert failure_reason("Basic dXNlcjpwdw==") == "wrong_scheme"
    assert failure_reason("Bearer ") == "empty_key"
    assert failure_reason("bearer sk-1") == "invalid_key"


# ---------------------------------------------------------------- end to end


@contextlib.asynccontextmanager
async def serving(cfg: Config) -> AsyncIterator[str]:
    """serve() (what `ledgergate run` runs) in this loop; stops (and drains) on exit."""
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, clock=FakeClock(), ready=ready.set_result, stop=stop))
    done, _ = await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    assert ready in done, "gateway not ready in 60 s"
    try:
        yield ready.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def config(tmp_path: Path, command: StdioCommand, **gateway: Any) -> Config:
    path = write_config(
        tmp_path,
        servers={"whatsapp": {"command": command.argv, "env": command.env}},
        policies={"whatsapp": SEED_POLICY},
        grants={"demo": GOOD_KEY},
        agents={"demo": "demo-agent"},
        gateway={"admin_token": ADMIN, **gateway},
    )
    return load_config(path)


async def admin_sql(http: aiohttp.ClientSession, base: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    async with http.post(
        f"{base}/admin/audit/sql", data=orjson.dumps({"sql": sql, "params": params}), headers=ADMIN_AUTH
    ) as resp:
        doc = orjson.loads(await resp.read())
        assert resp.status == 200, doc
    return [dict(zip(doc["columns"], row, strict=True)) for row in doc["rows"]]


async def poll(check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 30.0) -> Any:
    """Ask until check() returns something truthy (the consumer folds the log asynchronously)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        got = await check()
        if got:
            return got
        assert asyncio.get_running_loop().time() < deadline, f"never saw {what}"
        await asyncio.sleep(0.05)


async def all_stored_text(cfg: Config) -> str:
    """Every row of the security tables and every payload of the log, as one text."""
    emb = await Embedded.open(cfg, run_consumers=False)
    try:
        await emb.sync()
        texts = []
        for table in ("audit_auth_failures", "audit_admin", "audit_calls", "audit_sessions"):
            _, rows = await emb.store.query(f"SELECT * FROM {table} FINAL")  # fixed names
            texts.append(repr(rows))
        texts += [r.payload.decode() for r in await emb.log.read(0, 1_000_000)]
        return "\n".join(texts)
    finally:
        await emb.close()


async def test_failed_auth_is_recorded_and_shown_by_denials(
    tmp_path: Path, whatsapp_command: StdioCommand
) -> None:
    cfg = config(tmp_path, whatsapp_command, auth_failure_interval_s=0.2)
    init = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}})
    async with serving(cfg) as base, aiohttp.ClientSession() as http:
        sends = [
            ("whatsapp", None, 3),
            ("whatsapp", f"Bearer {BAD_KEY}", 5),
            ("whatsapp", f"Basic {BAD_KEY}", 1),
            ("whatsapp", "Bearer    ", 2),
            ("no-such-server", f"Bearer {BAD_KEY}", 4),  # unknown server: still a 401, still recorded
        ]
        for server, auth, n in sends:
            headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
            if auth is not None:
                headers["Authorization"] = auth
            for _ in range(n):
                async with http.post(f"{base}/mcp/{server}", data=init, headers=headers) as resp:
                    assert resp.status == 401
                    assert BAD_KEY not in (await resp.text())
        async with http.get(f"{base}/mcp/whatsapp", headers={"Accept": "text/event-stream"}) as resp:
            assert resp.status == 401  # GET and DELETE are checked (and recorded) the same way

        expected = {
            ("127.0.0.1", "whatsapp", "missing_key"): 4,
            ("127.0.0.1", "whatsapp", "invalid_key"): 5,
            ("127.0.0.1", "whatsapp", "wrong_scheme"): 1,
            ("127.0.0.1", "whatsapp", "empty_key"): 2,
            ("127.0.0.1", "no-such-server", "invalid_key"): 4,
        }

        async def sums() -> dict[tuple[str, str, str], int] | None:
            rows = await admin_sql(
                http,
                base,
                "SELECT remote, server, toString(reason) AS reason, sum(`count`) AS n, "
                "min(first_ts) <= max(last_ts) AS ordered FROM audit_auth_failures FINAL "
                "GROUP BY remote, server, reason",
            )
            assert all(r["ordered"] for r in rows)
            got = {(r["remote"], r["server"], r["reason"]): r["n"] for r in rows}
            return got if got == expected else None

        await poll(sums, "every failure summed (the trailing sums come with the 0.2 s sweep)")

        async with http.get(f"{base}/admin/audit/denials", headers=ADMIN_AUTH) as resp:
            doc = orjson.loads(await resp.read())
        assert doc["columns"] == ["agent", "tool", "rule", "count", "first", "last", "remote", "reason"]
        auth_rows = {(r[6], r[7]): r for r in doc["rows"] if r[0] == "(unauthenticated)"}
        assert {k: r[3] for k, r in auth_rows.items()} == {
            ("127.0.0.1", "invalid_key"): 9,
            ("127.0.0.1", "missing_key"): 4,
            ("127.0.0.1", "empty_key"): 2,
            ("127.0.0.1", "wrong_scheme"): 1,
        }
        assert {(r[1], r[2]) for r in auth_rows.values()} == {("", "auth")}
        # filters apply: a server narrows them, a tool or another agent leaves them out
        async with http.get(
            f"{base}/admin/audit/denials", params={"server": "no-such-server"}, headers=ADMIN_AUTH
        ) as resp:
            rows = orjson.loads(await resp.read())["rows"]
        assert [(r[0], r[3], r[6], r[7]) for r in rows] == [
            ("(unauthenticated)", 4, "127.0.0.1", "invalid_key")
        ]
        for params in ({"tool": "open_session"}, {"agent": "demo-agent"}):
            async with http.get(f"{base}/admin/audit/denials", params=params, headers=ADMIN_AUTH) as resp:
                assert orjson.loads(await resp.read())["rows"] == []
    stored = await all_stored_text(cfg)
    assert "auth.failed" in stored and "no-such-server" in stored
    for marker in BAD_MARKERS:
        assert marker not in stored, f"key material {marker!r} was stored"


async def test_a_flood_of_bad_keys_gives_a_bounded_number_of_events(
    tmp_path: Path, whatsapp_command: StdioCommand
) -> None:
    # a long interval makes the count exact: one event at the first failure, one sum at shutdown
    cfg = config(tmp_path, whatsapp_command, auth_failure_interval_s=3600, auth_failure_max_keys=50)
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    headers = {"Authorization": f"Bearer {BAD_KEY}", "Content-Type": "application/json"}
    async with serving(cfg) as base, aiohttp.ClientSession() as http:
        sem = asyncio.Semaphore(32)

        async def one(path: str) -> int:
            async with sem, http.post(f"{base}{path}", data=body, headers=headers) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one("/mcp/whatsapp") for _ in range(2000)))
        # and 300 distinct made-up server names: more keys than the cap of 50
        statuses += await asyncio.gather(*(one(f"/mcp/probe-{i}") for i in range(300)))
        assert set(statuses) == {401}
    emb = await Embedded.open(cfg, run_consumers=False)
    try:
        await emb.sync()
        _, rows = await emb.store.query(
            "SELECT server, overflow, count() AS events, sum(`count`) AS failures "
            "FROM audit_auth_failures FINAL GROUP BY server, overflow ORDER BY server"
        )
    finally:
        await emb.close()
    by_server = {(r[0], r[1]): (r[2], r[3]) for r in rows}
    assert by_server.pop(("whatsapp", False)) == (2, 2000)  # 2,000 failures, 2 events
    assert by_server.pop(("*", True)) == (2, 251)  # past the cap: one overflow bucket
    assert len(by_server) == 49 and set(by_server.values()) == {(1, 1)}
    assert sum(n for _, n in by_server.values()) + 251 == 300


async def test_admin_requests_are_audited(tmp_path: Path, whatsapp_command: StdioCommand) -> None:
    cfg = config(tmp_path, whatsapp_command, auth_failure_interval_s=0.2)
    async with serving(cfg) as base, aiohttp.ClientSession() as http:
        async with http.get(
            f"{base}/admin/audit/denials", params={"since": "1d", "server": "whatsapp"}, headers=ADMIN_AUTH
        ) as resp:
            assert resp.status == 200
        rows = await admin_sql(http, base, "SELECT {n:UInt8} + 1 AS two", n=1)
        assert rows == [{"two": 2}]
        async with http.post(
            f"{base}/admin/audit/sql",
            data=orjson.dumps({"sql": "DROP TABLE audit_calls"}),
            headers=ADMIN_AUTH,
        ) as resp:
            assert resp.status == 400
        async with http.get(f"{base}/admin/audit/calls", params={"bogus": "1"}, headers=ADMIN_AUTH) as resp:
            assert resp.status == 400
        async with http.post(f"{base}/admin/policies/reload", headers=ADMIN_AUTH) as resp:
            assert resp.status == 200
        async with http.get(
            f"{base}/admin/audit/denials", headers={"Authorization": f"Bearer {BAD_KEY}"}
        ) as resp:
            assert resp.status == 401

        async def admin_rows() -> list[dict[str, Any]] | None:
            rows = await admin_sql(
                http,
                base,
                "SELECT toString(kind) AS kind, toString(question) AS question, `sql`, params, filters, "
                "toString(caller) AS caller, remote, toString(outcome) AS outcome, status, "
                "toString(error) AS error, row_count, results FROM audit_admin FINAL ORDER BY ts, event_id",
            )
            return rows if len(rows) >= 6 else None

        rows = await poll(admin_rows, "the six admin requests")

        def one(pred: Any) -> dict[str, Any]:  # by content: events of one ms have no order
            (row,) = [r for r in rows if pred(r)]
            return row

        denials = one(lambda r: r["question"] == "denials")
        select = one(lambda r: r["sql"] == "SELECT {n:UInt8} + 1 AS two")
        drop = one(lambda r: r["sql"] == "DROP TABLE audit_calls")
        bogus = one(lambda r: r["question"] == "calls")
        reload = one(lambda r: r["kind"] == "admin.reload")
        assert (denials["kind"], denials["question"], denials["outcome"], denials["status"]) == (
            "admin.query",
            "denials",
            "ok",
            200,
        )
        assert orjson.loads(denials["filters"]) == {"since": "1d", "server": "whatsapp"}
        assert (denials["caller"], denials["remote"], denials["row_count"]) == ("token", "127.0.0.1", 0)
        assert select["sql"] == "SELECT {n:UInt8} + 1 AS two" and orjson.loads(select["params"]) == {"n": 1}
        assert (select["outcome"], select["row_count"]) == ("ok", 1)
        assert (drop["sql"], drop["outcome"], drop["status"], drop["error"]) == (
            "DROP TABLE audit_calls",
            "refused",
            400,
            "read_only",
        )
        assert (bogus["question"], bogus["outcome"], bogus["error"]) == ("calls", "refused", "bad_request")
        assert (reload["kind"], reload["outcome"]) == ("admin.reload", "ok")
        assert orjson.loads(reload["results"]) == {"whatsapp": None}
        # the polling query itself is audited too
        assert any(r["question"] == "sql" and "FROM audit_admin FINAL" in r["sql"] for r in rows)

        async def admin_auth_failure() -> list[dict[str, Any]]:
            return await admin_sql(
                http,
                base,
                "SELECT remote, toString(reason) AS reason, `count` FROM audit_auth_failures FINAL "
                "WHERE server = '(admin)'",
            )

        assert await poll(admin_auth_failure, "the wrong admin token") == [
            {"remote": "127.0.0.1", "reason": "invalid_key", "count": 1}
        ]
    stored = await all_stored_text(cfg)
    for marker in (*BAD_MARKERS, ADMIN):
        assert marker not in stored, f"key material {marker!r} was stored"


async def test_local_cli_questions_are_audited(tmp_path: Path, whatsapp_command: StdioCommand) -> None:
    cfg = config(tmp_path, whatsapp_command)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ledgergate.cli.main",
        "audit",
        "sql",
        "SELECT {x:String} AS x",
        "-p",
        "x=hello",
        "--config",
        str(cfg.source),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert "hello" in out.decode()
    emb = await Embedded.open(cfg, run_consumers=False)
    try:
        events = [decode(r.payload) for r in await emb.log.read(0, 1000)]
        await emb.sync()
        _, rows = await emb.store.query(
            "SELECT toString(caller), `sql`, params, toString(outcome), row_count FROM audit_admin FINAL"
        )
    finally:
        await emb.close()
    assert [e.kind for e in events] == ["admin.query"]
    assert rows == [("local", "SELECT {x:String} AS x", '{"x":"hello"}', "ok", 1)]
