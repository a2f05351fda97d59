"""Alerts (issue 14): the rules, and end to end through the real gateway.

End to end: serve() (what `ledgergate run` runs: event log, consumers, chDB) in this loop
with an injected clock, the real whatsapp-mcp-server over stdio, the official MCP SDK as
the agent, and a real local webhook receiver (an aiohttp server) that checks the HMAC of
every body. Windows and throttles are moved with the injected clock, never slept across.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from consumers.alerts import RuleEngine, alert_id
from gateway.config import Config, ConfigErrors, load_config, parse_config
from ledgergate.embedded import serve
from schemas.alerts import AlertRule
from schemas.events import decode
from tests.support.gateway import SEED_POLICY, FakeClock, write_config
from tests.support.upstreams import StdioCommand

ADMIN = "admin-token-alerts-0123"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
KEY = "key-alice-0123456789"
SECRET = "whsec-test-5f3a9c1e7b"
SECRET_ENV = "LEDGERGATE_TEST_ALERT_SECRET"


# ---------------------------------------------------------------- a real webhook receiver


class Receiver:
    """A webhook receiver: verifies X-Ledgergate-Signature, answers 500 ``fail`` times first."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret.encode()
        self.accepted: list[dict[str, Any]] = []  # documents answered 200 (signature checked)
        self.attempts: list[str] = []  # Idempotency-Key of every POST
        self.bodies: list[bytes] = []
        self.bad_signatures = 0
        self.fail = 0  # answer 500 to this many POSTs first
        self.fail_all = False
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, req: web.Request) -> web.Response:
        body = await req.read()
        self.attempts.append(req.headers.get("Idempotency-Key", ""))
        self.bodies.append(body)
        expected = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(req.headers.get("X-Ledgergate-Signature", ""), expected):
            self.bad_signatures += 1
            return web.Response(status=401)
        if self.fail_all or self.fail > 0:
            self.fail = max(0, self.fail - 1)
            return web.Response(status=500, text="receiver down")
        doc = orjson.loads(body)
        doc["_headers"] = dict(req.headers)
        self.accepted.append(doc)
        return web.Response(status=200)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


async def until(check: Callable[[], Any], what: str, timeout_s: float = 30.0) -> Any:
    """Poll ``check`` (sync or async) until truthy; fail after ``timeout_s`` (a bound, not a timing)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        got = check()
        if isinstance(got, Awaitable):
            got = await got
        if got:
            return got
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def alerts_toml(url: str, rules: str, **sink: Any) -> str:
    extra = "".join(f"{k} = {orjson.dumps(v).decode()}\n" for k, v in sink.items())
    return (
        rules
        + f'\n[[alerts.sinks]]\ntype = "webhook"\nurl = "{url}"\nsecret_env = "{SECRET_ENV}"\n'
        + 'format = "json"\nretry_initial_s = 0.05\nretry_max_s = 0.2\n'
        + extra
    )


EVERY_REFUSAL = '[[alerts.rules]]\nname = "every-refusal"\non = "refusal"\n'
HAMMERING = (
    '[[alerts.rules]]\nname = "hammering"\non = "refusal"\nthreshold = 5\nwindow = "1m"\n'
    'group_by = ["agent", "tool"]\nthrottle = "10m"\n'
)


def config(tmp_path: Path, command: StdioCommand, extra: str) -> Config:
    path = write_config(
        tmp_path,
        servers={"whatsapp": {"command": command.argv, "env": command.env}},
        policies={"whatsapp": SEED_POLICY},
        grants={"alice": KEY},
        agents={"alice": "agent-a"},
        gateway={"admin_token": ADMIN},
        extra=extra,
    )
    return load_config(path)


@contextlib.asynccontextmanager
async def serving(cfg: Config, clock: FakeClock) -> AsyncIterator[str]:
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, clock=clock, ready=ready.set_result, stop=stop))
    done, _ = await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    assert ready in done, "gateway not ready in 60 s"
    try:
        yield ready.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def sdk_client(base: str) -> Any:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {KEY}"}, timeout=httpx2.Timeout(30.0, read=60.0)
    )
    return Client(streamable_http_client(f"{base}/mcp/whatsapp", http_client=http), mode="legacy")


async def admin_sql(base: str, sql: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{base}/admin/audit/sql", data=orjson.dumps({"sql": sql}), headers=ADMIN_AUTH) as resp,
    ):
        doc = orjson.loads(await resp.read())
        assert resp.status == 200, doc
    return [dict(zip(doc["columns"], row, strict=True)) for row in doc["rows"]]


def log_rows(cfg: Config) -> tuple[int, int, list[dict[str, Any]]]:
    """(end of the log, the alerts consumer's committed offset, the alert.* events) read from
    the log file itself (read-only, beside the running gateway)."""
    conn = sqlite3.connect(f"file:{cfg.data_dir / 'events.db'}?mode=ro", uri=True)
    try:
        end = conn.execute("SELECT coalesce(max(offset) + 1, 0) FROM records").fetchone()[0]
        row = conn.execute("SELECT next_offset FROM consumer_offsets WHERE name = 'alerts'").fetchone()
        payloads = conn.execute(
            'SELECT payload FROM records WHERE CAST(payload AS TEXT) LIKE \'%"kind":"alert.%\''
        ).fetchall()
    finally:
        conn.close()
    return end, (row[0] if row else 0), [orjson.loads(p[0]) for p in payloads]


# ---------------------------------------------------------------- the rules, pure


def refusal(i: int, ts: int, agent: str = "a", tool: str = "send_message") -> dict[str, Any]:
    return {
        "kind": "call.decided",
        "event_id": f"ev-{i:04d}",
        "ts": ts,
        "agent": agent,
        "grant": agent,
        "server": "wa",
        "tool": tool,
        "method": "tools/call",
        "decision": "deny",
        "rule": "/default",
        "reason": "not allowed",
        "arguments": {"content": "[REDACTED]"},
    }


def test_five_in_a_window_make_one_aggregated_alert() -> None:
    rule = AlertRule(name="hammering", on="refusal", threshold=5, window="1m", group_by=["agent", "tool"])
    eng = RuleEngine([rule])
    t0 = 1_700_000_000_000
    # 4 in the window, then the window slides past the first: still 4, no alert
    out = [a for i in range(4) for a in eng.feed(refusal(i, t0 + i * 1000), i)]
    out += eng.feed(refusal(4, t0 + 60_000), 4)  # 60 s after the first: the first is out
    assert out == []
    out = eng.feed(refusal(5, t0 + 60_500), 5)
    assert len(out) == 1
    doc = out[0].doc
    assert doc["count"] == 5 and doc["group"] == {"agent": "a", "tool": "send_message"}
    assert doc["first_event_id"] == "ev-0001" and doc["last_event_id"] == "ev-0005"
    assert doc["alert_id"] == alert_id("hammering", doc["group"], "ev-0001")
    assert doc["evidence"].startswith(
        "ledgergate audit calls --agent a --grant a --tool send_message --server wa"
    )
    # another agent is another group
    assert [a for i in range(6, 10) for a in eng.feed(refusal(i, t0 + 60_600, agent="b"), i)] == []


def test_throttle_suppresses_then_summarises_on_the_clock() -> None:
    rule = AlertRule(name="h", on="refusal", threshold=2, window="1m", group_by=["agent"], throttle="10m")
    eng = RuleEngine([rule])
    t0 = 1_700_000_000_000
    fired = eng.feed(refusal(0, t0), 0) + eng.feed(refusal(1, t0 + 1), 1)
    assert len(fired) == 1
    assert [a for i in range(2, 9) for a in eng.feed(refusal(i, t0 + 1000 + i), i)] == []  # 7 suppressed
    assert eng.tick(t0 + 599_000) == []  # the throttle is not over
    (summary,) = eng.tick(t0 + 600_001)
    assert summary.doc["summary"] is True and summary.doc["suppressed"] == 7 and summary.doc["count"] == 7
    assert summary.doc["first_event_id"] == "ev-0002" and summary.doc["last_event_id"] == "ev-0008"
    assert summary.offset == 8  # the position may not pass the last suppressed event until it is settled
    # a quiet throttle ends without an alert, and the group forgets everything
    assert eng.tick(t0 + 1_200_002) == [] and eng.rules[0].groups == {}


def test_auth_failures_count_their_aggregated_count() -> None:
    rule = AlertRule(name="logins", on="auth_failure", threshold=10, group_by=["remote"])
    eng = RuleEngine([rule])
    ev = {
        "kind": "auth.failed",
        "event_id": "e1",
        "ts": 1000,
        "remote": "10.0.0.9",
        "server": "wa",
        "count": 12,
    }
    (a,) = eng.feed(ev, 0)
    assert a.doc["count"] == 12 and a.doc["group"] == {"remote": "10.0.0.9"}
    assert a.doc["evidence"].startswith("ledgergate audit denials")


def test_replay_gives_the_same_alert_ids() -> None:
    rule = AlertRule(name="every", on="refusal")
    events = [refusal(i, 1000 + i) for i in range(3)]
    ids = [[a.id for i, e in enumerate(events) for a in RuleEngine([rule]).feed(e, i)] for _ in range(2)]
    assert ids[0] == ids[1] and len(set(ids[0])) == 3


def test_config_section_validates(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(orjson.dumps(SEED_POLICY).decode())
    base = {"servers": {"wa": {"url": "http://127.0.0.1:1/mcp", "policy": "p.json"}}}
    cfg = parse_config(
        {**base, "alerts": {"rules": [{"name": "h", "on": "limit", "threshold": 3, "window": "30s"}]}},
        tmp_path / "c.toml",
    )
    assert cfg.alerts.rules[0].window_s == 30.0
    bad = {
        "rules": [{"name": "x", "on": "refusals", "window": "soon"}],
        "sinks": [{"type": "webhook"}, {"type": "pager"}],
    }
    with pytest.raises(ConfigErrors) as exc:
        parse_config({**base, "alerts": bad}, tmp_path / "c.toml")
    keys = {e.key for e in exc.value.errors}
    assert {"alerts.rules[0].on", "alerts.rules[0].window", "alerts.sinks[0]", "alerts.sinks[1].type"} <= keys


# ---------------------------------------------------------------- end to end


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


async def test_every_refusal_reaches_the_webhook_signed(
    tmp_path: Path, whatsapp_command: StdioCommand, secret_env: None
) -> None:
    async with receiver() as hook:
        cfg = config(tmp_path, whatsapp_command, alerts_toml(hook.url, EVERY_REFUSAL))
        async with serving(cfg, FakeClock()) as base:
            async with sdk_client(base) as c:
                results = [await c.call_tool("open_session", {}) for _ in range(11)]  # the 11th: limit
                denied = await c.call_tool(
                    "send_message", {"phone_number": "+100", "content": "hi", "token": "tok-SECRET-77"}
                )
            assert [r.is_error for r in results] == [False] * 10 + [True] and denied.is_error
            await until(lambda: len(hook.accepted) >= 2, "2 alerts at the webhook")
            assert hook.bad_signatures == 0
            by_tool = {d["examples"][0]["tool"]: d for d in hook.accepted}
            assert set(by_tool) == {"open_session", "send_message"} and len(hook.accepted) == 2
            for doc in hook.accepted:
                assert doc["_headers"]["Idempotency-Key"] == doc["alert_id"]
                assert doc["rule"] == "every-refusal" and doc["count"] == 1
                ex = doc["examples"][0]
                assert ex["agent"] == "agent-a" and ex["rule"].startswith("/") and ex["reason"]
                assert doc["evidence"].startswith("ledgergate audit calls --agent agent-a")
            assert by_tool["open_session"]["examples"][0]["decision"] == "rate_limited"
            # redacted arguments: the token never leaves the gateway
            assert by_tool["send_message"]["examples"][0]["arguments"]["token"] == "[REDACTED]"
            assert hook.bodies and all(b"tok-SECRET-77" not in b for b in hook.bodies)
            # alerts are events: which fired, and were they delivered?
            sql = (
                "SELECT a.alert_id AS alert_id, a.rule AS rule, d.kind AS kind, d.attempts AS attempts, "
                "d.age_ms AS age_ms FROM audit_alerts AS a FINAL "
                "LEFT JOIN audit_alert_deliveries AS d FINAL USING alert_id ORDER BY a.ts"
            )
            rows = await until(lambda: _rows_if(base, sql, 2), "the alert tables")
            assert {r["alert_id"] for r in rows} == {d["alert_id"] for d in hook.accepted}
            assert all(
                r["kind"] == "alert.delivered" and r["attempts"] == 1 and r["age_ms"] >= 0 for r in rows
            )


async def _rows_if(base: str, sql: str, n: int) -> list[dict[str, Any]] | None:
    """The rows once n alerts and each one's delivery are in the tables (folded asynchronously)."""
    rows = await admin_sql(base, sql)
    return rows if len(rows) >= n and all(r["kind"] for r in rows) else None


async def test_five_refusals_one_alert_then_the_throttle_summary(
    tmp_path: Path, whatsapp_command: StdioCommand, secret_env: None
) -> None:
    clock = FakeClock()
    async with receiver() as hook:
        cfg = config(tmp_path, whatsapp_command, alerts_toml(hook.url, HAMMERING))
        async with serving(cfg, clock) as base:
            async with sdk_client(base) as c:
                for i in range(5):
                    assert (
                        await c.call_tool("send_message", {"phone_number": "+1", "content": f"{i}"})
                    ).is_error
                (alert,) = await until(lambda: hook.accepted, "the aggregated alert")
                assert alert["count"] == 5 and alert["group"] == {"agent": "agent-a", "tool": "send_message"}
                assert alert["summary"] is False and alert["suppressed"] == 0
                assert len(alert["examples"]) == 5 and alert["window_s"] == 60 and alert["throttle_s"] == 600
                for i in range(3):  # throttled: counted, not sent
                    assert (
                        await c.call_tool("send_message", {"phone_number": "+1", "content": f"x{i}"})
                    ).is_error
            end = log_rows(cfg)[0]
            # the consumer has looked at all 8 refusals (and settled its alert) before time moves
            await until(lambda: log_rows(cfg)[1] >= end, "the alerts consumer at the end of the log")
            assert len(hook.accepted) == 1
            # past the 10-minute throttle (it runs from the alert's last event, whose ts is the
            # wall clock): the summary of what it held back
            clock.now = alert["last_ts"] / 1000 + 601
            await until(lambda: len(hook.accepted) == 2, "the throttle's summary")
            summary = hook.accepted[1]
            assert summary["summary"] is True and summary["suppressed"] == 3 and summary["count"] == 3
            assert summary["alert_id"] != alert["alert_id"]
            assert "suppressed by the 10m throttle" in summary["text"]


async def test_webhook_500_three_times_gets_it_on_the_fourth_try_once(
    tmp_path: Path, whatsapp_command: StdioCommand, secret_env: None
) -> None:
    async with receiver() as hook:
        hook.fail = 3
        cfg = config(tmp_path, whatsapp_command, alerts_toml(hook.url, EVERY_REFUSAL))
        async with serving(cfg, FakeClock()) as base:
            async with sdk_client(base) as c:
                assert (await c.call_tool("get_chats", {})).is_error
            (doc,) = await until(lambda: hook.accepted, "the alert after 3 failures")
            assert hook.attempts == [doc["alert_id"]] * 4  # same Idempotency-Key every try
            _, _, events = await until(
                lambda: (r := log_rows(cfg)) and any(e["kind"] == "alert.delivered" for e in r[2]) and r,
                "alert.delivered on the log",
            )
            kinds = [(e["kind"], e.get("attempts"), e.get("final")) for e in events]
            assert kinds == [
                ("alert.fired", None, None),
                ("alert.failed", 1, False),
                ("alert.failed", 2, False),
                ("alert.failed", 3, False),
                ("alert.delivered", 4, None),
            ]
            for e in events:
                decode(orjson.dumps(e))  # every alert event validates against its model
            async with sdk_client(base) as c:  # the next alert goes through at once
                assert (await c.call_tool("get_chats", {})).is_error
            await until(lambda: len(hook.accepted) == 2, "the next alert")
            assert len(hook.attempts) == 5 and len({d["alert_id"] for d in hook.accepted}) == 2
