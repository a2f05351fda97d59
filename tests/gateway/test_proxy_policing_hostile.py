"""Every request is decided and recorded, and a call never forwarded costs no quota.

Exact bytes over a raw socket against the real gateway, with two recording upstreams: the
stdio one (tests/support/recording_stdio.py, every line it read) and an aiohttp HTTP one
(every request it got). The audit trail is the real AuditAddon on a real SQLite event log.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventlog import SqliteEventLog
from gateway.app import POLICIES_KEY, build_app
from gateway.audit.writer import AuditAddon
from gateway.proxy import NOTIFICATION_RULE
from tests.support.gateway import FakeClock, RunningGateway, running_gateway, write_config
from tests.support.hostile import (
    RecordingHttp,
    call,
    open_session,
    raw_post,
    recorded,
    recorded_calls,
    recording_stdio_server,
    sync_point,
)
from tests.support.procs import free_port

KEY = "key-policing-0123456789"
KEYS = {"qa": KEY}
LIMIT = 10
POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "echo": {},
        "counter": {"limits": [{"counter": "c", "window": "minute", "max": LIMIT, "scope": "grant"}]},
    },
}


@pytest.fixture
async def gw(tmp_path: Path):
    record = tmp_path / "record.log"
    http = RecordingHttp()
    await http.start(free_port())
    cfg = write_config(
        tmp_path,
        servers={"rec": recording_stdio_server(record), "rh": {"url": http.url}},
        policies={"rec": POLICY, "rh": POLICY},
        grants=KEYS,
    )
    log = SqliteEventLog(tmp_path / "events.db", durability="strict")
    await log.open()
    addon = AuditAddon(log, "gw-test", flush_interval_s=0.001)

    def build(cfg: Any, clock: Any) -> Any:
        app = build_app(cfg, addons=[addon], clock=clock)
        addon.policies = app[POLICIES_KEY]
        return app

    try:
        async with running_gateway(cfg, KEYS, FakeClock(), build=build) as g:
            g.extra.update(record=record, http=http, log=log, addon=addon)
            yield g
    finally:
        await http.stop()
        await log.close()


async def wait_until(pred: Any) -> None:
    """Poll a condition (not a timed wait); fail after 60 s."""
    async with asyncio.timeout(60.0):
        while not pred():  # noqa: ASYNC110 - a file written by another process: nothing to await
            await asyncio.sleep(0.01)


async def events(gw: RunningGateway, kind: str) -> list[dict[str, Any]]:
    await gw.extra["addon"].close()  # flush what is queued (the addon keeps working after)
    out = []
    for rec in await gw.extra["log"].read(0, 100_000):
        ev = orjson.loads(rec.payload)
        if ev["kind"] == kind:
            out.append(ev)
    return out


async def session(gw: RunningGateway, server: str) -> str:
    if server == "rec":
        return await open_session(gw, server, KEY)
    before = len(gw.extra["http"].seen)
    sid = await open_session(gw, server, KEY)
    assert len(gw.extra["http"].seen) > before
    return sid


async def upstream_got(gw: RunningGateway, server: str, sid: str) -> list[dict[str, Any]]:
    """Every message the upstream received so far (stdio: after a sync point)."""
    if server == "rec":
        await sync_point(gw, server, KEY, sid)
        return [orjson.loads(x) for x in recorded(gw.extra["record"])]
    return gw.extra["http"].posted()


def quota_used(gw: RunningGateway, server: str) -> int:
    return sum(gw.proxy.limiters[server].view().values())


async def assert_quota_intact(gw: RunningGateway, server: str, sid: str) -> None:
    for i in range(LIMIT):
        r = await call(gw, server, KEY, sid, "counter", {"n": i}, rid=1000 + i)
        assert "isError" not in r["result"] or r["result"]["isError"] is False, r
    r = await call(gw, server, KEY, sid, "counter", {"n": 99}, rid=2000)
    assert r["result"]["structuredContent"]["decision"] == "rate_limited"


# ---- tools/call as a notification ----------------------------------------------------------------


@pytest.mark.parametrize("server", ["rec", "rh"])
async def test_tools_call_notification_is_refused_recorded_and_not_forwarded(
    gw: RunningGateway, server: str
) -> None:
    sid = await session(gw, server)
    before = len(await upstream_got(gw, server, sid))
    body = b'{"jsonrpc":"2.0","method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}}}'
    a = await raw_post(gw, server, KEY, body, sid)
    assert a.status == 400
    err = a.json()["error"]
    assert err["code"] == -32600
    assert "tools/call must be a request" in err["message"]
    got = (await upstream_got(gw, server, sid))[before:]
    assert all(m.get("method") != "tools/call" for m in got), got
    denied = [e for e in await events(gw, "call.decided") if e["decision"] == "deny"]
    assert len(denied) == 1
    ev = denied[0]
    assert (ev["method"], ev["tool"], ev["request_id"], ev["rule"], ev["session"]) == (
        "tools/call",
        "echo",
        None,
        NOTIFICATION_RULE,
        sid,
    )
    assert "tools/call must be a request" in ev["reason"]
    done = [e for e in await events(gw, "call.completed") if e["call_id"] == ev["call_id"]]
    assert done and done[0]["outcome"] == "refused"
    assert quota_used(gw, server) == 0


async def test_any_non_notification_method_without_id_is_refused(gw: RunningGateway) -> None:
    sid = await session(gw, "rec")
    before = len(await upstream_got(gw, "rec", sid))
    for method in (b"resources/read", b"prompts/get", b"x/custom"):
        a = await raw_post(gw, "rec", KEY, b'{"jsonrpc":"2.0","method":"%s","params":{}}' % method, sid)
        assert a.status == 400 and a.json()["error"]["code"] == -32600
    assert len((await upstream_got(gw, "rec", sid))[before:]) == 1  # the sync ping only


# ---- methods that differ from tools/call by case or whitespace ---------------------------------------


@pytest.mark.parametrize("server", ["rec", "rh"])
@pytest.mark.parametrize(
    "method",
    [
        b"Tools/Call",
        b"TOOLS/CALL",
        b" tools/call",
        b"tools/call ",
        b"tools/call\\n",
        b"\\ttools/call",
        b"tools/call\\u0000",
    ],
)
@pytest.mark.parametrize("with_id", [True, False])
async def test_case_or_whitespace_variants_of_tools_call_are_invalid(
    gw: RunningGateway, server: str, method: bytes, with_id: bool
) -> None:
    sid = await session(gw, server)
    before = len(await upstream_got(gw, server, sid))
    rid = b'"id":5,' if with_id else b""
    body = b'{"jsonrpc":"2.0",%b"method":"%b","params":{"name":"echo","arguments":{"text":"x"}}}' % (
        rid,
        method,
    )
    a = await raw_post(gw, server, KEY, body, sid)
    assert a.status == 400
    assert a.json()["error"]["code"] == -32600
    assert a.json()["id"] == (5 if with_id else None)
    got = (await upstream_got(gw, server, sid))[before:]
    assert [m.get("method") for m in got] == (["ping"] if server == "rec" else []), got
    assert quota_used(gw, server) == 0


# ---- a call never forwarded costs no quota ------------------------------------------------------------


async def test_non_utf8_header_is_a_clean_400_and_not_charged(gw: RunningGateway) -> None:
    sid = await session(gw, "rh")
    before = len(gw.extra["http"].seen)
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"counter","arguments":{"n":1}}}'
    for _ in range(LIMIT + 5):
        a = await raw_post(gw, "rh", KEY, body, sid, extra=b"\r\nUser-Agent: agent\xff\xfe")
        assert a.status == 400, a
        err = a.json()["error"]
        assert (
            err["code"] == -32600
            and "user-agent" in err["message"].lower()
            and "not forwarded" in err["message"]
        )
        assert b"Error" not in a.body and b"codec" not in a.body  # no exception text
    assert len(gw.extra["http"].seen) == before  # the upstream received nothing
    assert quota_used(gw, "rh") == 0
    await assert_quota_intact(gw, "rh", sid)


async def test_upstream_down_before_the_write_is_not_charged(gw: RunningGateway) -> None:
    sid = await session(gw, "rh")
    await gw.extra["http"].stop()  # connection refused from now on
    gw.proxy.upstreams["rh"].pool._idle.clear()  # no kept-alive connection to the old server
    for i in range(LIMIT + 5):
        r = await call(gw, "rh", KEY, sid, "counter", {"n": i}, rid=i + 1)
        assert r["error"]["code"] == -32000 and "upstream 'rh' unreachable" in r["error"]["message"]
    assert quota_used(gw, "rh") == 0
    await gw.extra["http"].start(int(gw.extra["http"].url.rsplit(":", 1)[1].split("/")[0]))
    await assert_quota_intact(gw, "rh", sid)


async def test_audit_log_failure_is_503_without_detail_and_not_charged(gw: RunningGateway) -> None:
    sid = await session(gw, "rec")
    before = len(recorded_calls(gw.extra["record"]))
    await gw.extra["log"].close()  # the log refuses every append from now on
    body = b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"counter","arguments":{"n":1}}}'
    for _ in range(3):
        a = await raw_post(gw, "rec", KEY, body, sid)
        assert a.status == 503
        assert a.json()["error"] == {
            "code": -32603,
            "message": "Service Unavailable: the audit log cannot record this call, so it was not forwarded",
        }
    # a notification is not audited, so it still passes: once the child read it, it had read
    # anything sent before it (the child reads in order)
    marker = (
        b'{"jsonrpc":"2.0","method":"notifications/progress",'
        b'"params":{"progressToken":"marker","progress":1}}'
    )
    assert (await raw_post(gw, "rec", KEY, marker, sid)).status == 202
    await wait_until(lambda: any(b'"marker"' in x for x in recorded(gw.extra["record"])))
    assert len(recorded_calls(gw.extra["record"])) == before
    assert quota_used(gw, "rec") == 0


async def test_internal_error_before_forwarding_is_a_generic_500_and_not_charged(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = await session(gw, "rec")
    up = gw.proxy.upstreams["rec"]

    async def broken(*args: Any, **kwargs: Any) -> Any:  # a bug before anything is written
        raise RuntimeError("secret detail /etc/ledgergate.toml")

    monkeypatch.setattr(up, "request", broken)
    body = b'{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"counter","arguments":{"n":1}}}'
    for _ in range(LIMIT + 2):
        a = await raw_post(gw, "rec", KEY, body, sid)
        assert a.status == 500
        assert b"secret" not in a.body and b"RuntimeError" not in a.body
        assert a.json()["error"]["message"] == (
            "Internal error: the gateway failed to handle this call; it was not forwarded"
        )
    assert quota_used(gw, "rec") == 0
    monkeypatch.undo()
    await assert_quota_intact(gw, "rec", sid)
