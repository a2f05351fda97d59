"""Hot reload of the config file (gateway/config_live.py), with the real SDK client and a real
stdio upstream (tests/support/recording_stdio.py): grants and servers apply from the next
call, an invalid file keeps the old config, restart-only keys are named, and a config
rewritten over and over under concurrent calls never gives a call a half-loaded config.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from eventlog.sqlite import SqliteEventLog
from gateway.app import CONFIG_KEY, POLICIES_KEY, build_app
from gateway.audit.writer import AuditAddon
from tests.support.gateway import FakeClock, RunningGateway, running_gateway, write_config
from tests.support.hostile import recording_stdio_server

KEYS = {"alice": "key-alice-0123456789", "bob": "key-bob-0123456789"}
ALLOW = {"version": "1", "default": "deny", "tools": {"echo": {}}}
DENY = {"version": "1", "default": "deny", "tools": {"echo": {"action": "deny", "reason": "B says no"}}}


@pytest.fixture
async def gw(tmp_path: Path):
    record = tmp_path / "record.log"
    cfg = write_config(
        tmp_path,
        servers={"rec": recording_stdio_server(record)},
        policies={"rec": ALLOW},
        grants={"alice": KEYS["alice"]},
    )
    (tmp_path / "deny.policy.json").write_text(json.dumps(DENY))
    log = SqliteEventLog(tmp_path / "events.db", durability="strict")
    await log.open()
    addon = AuditAddon(log, "gw-test", flush_interval_s=0.001)

    def build(cfg: Any, clock: Any) -> Any:
        app = build_app(cfg, addons=[addon], clock=clock)
        addon.policies = app[POLICIES_KEY]
        return app

    try:
        async with running_gateway(cfg, KEYS, FakeClock(), build=build) as g:
            g.extra.update(record=record, log=log, addon=addon, config=cfg, text=cfg.read_text())
            yield g
    finally:
        await log.close()


async def loaded_events(gw: RunningGateway) -> list[dict[str, Any]]:
    await gw.extra["addon"].close()  # flush the queue
    log: SqliteEventLog = gw.extra["log"]
    events = [orjson.loads(r.payload) for r in await log.read(0, 100_000)]
    return [e for e in events if e["kind"] == "config.loaded"]


def write(path: Path, text: str) -> None:
    """Rewrite in place (truncate, then write: a reader may see a half-written file)."""
    path.write_text(text)


def client(gw: RunningGateway, server: str, key: str) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=httpx2.Timeout(30.0))
    return Client(streamable_http_client(gw.url(server), http_client=http), mode="legacy")


async def test_grants_apply_from_the_next_call_and_bad_files_keep_the_old_config(gw: RunningGateway) -> None:
    watcher = gw.app[CONFIG_KEY]
    path: Path = gw.extra["config"]
    base = gw.extra["text"]
    # bob does not exist yet
    async with gw.client("rec", "alice") as c:
        assert (await c.call_tool("echo", {"text": "a"})).content[0].text == "a"
    with pytest.raises(Exception):  # noqa: B017 - the SDK raises its own HTTP error for a 401
        async with client(gw, "rec", KEYS["bob"]) as c:
            await c.list_tools()
    write(path, base + f'\n[grants.bob]\nkey = "{KEYS["bob"]}"\n')
    diff = await watcher.reload()
    assert not isinstance(diff, str) and diff.grants_added == ["bob"]
    async with client(gw, "rec", KEYS["bob"]) as c:
        assert (await c.call_tool("echo", {"text": "b"})).content[0].text == "b"
    # a broken file: the old config stays, the event says why
    write(path, base + "\n[grants.bob\n")
    error = await watcher.reload()
    assert isinstance(error, str)
    async with client(gw, "rec", KEYS["bob"]) as c:
        assert (await c.call_tool("echo", {"text": "still"})).content[0].text == "still"
    # listen needs a restart: named, not applied; the policy path applies
    text = base.replace("rec.policy.json", "deny.policy.json").replace(
        f"listen = {json.dumps(gw.config.gateway.listen)}", 'listen = "127.0.0.1:1"'
    )
    write(path, text + f'\n[grants.bob]\nkey = "{KEYS["bob"]}"\n')
    diff = await watcher.reload()
    assert not isinstance(diff, str)
    assert diff.restart_needed == ["gateway.listen"]
    async with gw.client("rec", "alice") as c:
        r = await c.call_tool("echo", {"text": "x"})
    assert r.is_error and r.content[0].text == "Refused by policy: B says no [rule /tools/echo/action]"
    events = await loaded_events(gw)
    assert [e["ok"] for e in events] == [True, False, True]
    assert events[0]["applied"] == ["grants.bob added"] and events[0]["restart_needed"] == []
    assert "grants.bob" in events[1]["error"] or "line" in events[1]["error"]
    assert events[2]["restart_needed"] == ["gateway.listen"]
    assert events[2]["applied"] == ["servers.rec changed"]


async def test_servers_are_added_and_removed_live(gw: RunningGateway, tmp_path: Path) -> None:
    path: Path = gw.extra["config"]
    base = gw.extra["text"]
    record2 = tmp_path / "record2.log"
    srv = recording_stdio_server(record2)
    added = (
        f"\n[servers.rec2]\ncommand = {json.dumps(srv['command'])}\n"
        f'env = {{ RECORD_FILE = {json.dumps(str(record2))} }}\npolicy = "rec.policy.json"\n'
    )
    write(path, base + added)
    diff = await gw.app[CONFIG_KEY].reload()
    assert not isinstance(diff, str) and diff.servers_added == ["rec2"]
    async with gw.client("rec2", "alice") as c:
        assert (await c.call_tool("echo", {"text": "new"})).content[0].text == "new"
    assert b'"echo"' in record2.read_bytes()
    write(path, base)
    diff = await gw.app[CONFIG_KEY].reload()
    assert not isinstance(diff, str) and diff.servers_removed == ["rec2"]
    assert "rec2" not in gw.proxy.upstreams
    async with httpx2.AsyncClient() as http:
        r = await http.post(
            gw.url("rec2"), headers={"Authorization": f"Bearer {KEYS['alice']}"}, content=b"{}"
        )
    assert r.status_code == 404


async def test_reload_under_load_every_call_sees_the_old_or_the_new_rule(gw: RunningGateway) -> None:
    """The config file is rewritten in place (not atomically: the watcher also reads half-written
    files) over and over while four clients call; each answer is the ALLOW rule's or the DENY
    rule's, never an error of any other kind."""
    path: Path = gw.extra["config"]
    texts = [gw.extra["text"], gw.extra["text"].replace("rec.policy.json", "deny.policy.json")]
    watch = asyncio.create_task(gw.app[CONFIG_KEY].watch(0.002))
    done = asyncio.Event()
    rewrites = 0

    async def rewrite() -> None:
        nonlocal rewrites
        while not done.is_set():
            rewrites += 1
            write(path, texts[rewrites % 2])
            await asyncio.sleep(0.01)

    seen: list[str] = []

    async def agent(i: int) -> None:
        async with gw.client("rec", "alice") as c:
            n = 0
            while n < 25 or (rewrites < 20 and n < 2000):
                r = await c.call_tool("echo", {"text": f"{i}-{n}"})
                if r.is_error:
                    assert r.content[0].text == "Refused by policy: B says no [rule /tools/echo/action]"
                    seen.append("deny")
                else:
                    assert r.content[0].text == f"{i}-{n}"
                    seen.append("allow")
                n += 1

    writer = asyncio.create_task(rewrite())
    try:
        await asyncio.gather(*(agent(i) for i in range(4)))
    finally:
        done.set()
        await writer
        watch.cancel()
    assert {"allow", "deny"} <= set(seen), f"{rewrites} rewrites, {len(seen)} calls"
    events = await loaded_events(gw)
    assert sum(e["ok"] for e in events) >= 2
