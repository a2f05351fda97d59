"""`ledgergate policy simulate` on a recorded scenario with a known expected diff.

The seed scenario runs through the real gateway (official MCP SDK client -> gateway ->
whatsapp-mcp-server over stdio) with the real AuditAddon writing call.decided events into
the real SQLite event log in data_dir. The writer's timestamps follow the test's clock
(injected, so the minute windows of the replay are the ones the gateway decided in).
Then a candidate policy (max 5 a minute, get_chats allowed) is simulated by the CLI (a
subprocess reading the log) and over the admin API route (composition-root callable).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from aiohttp import ClientSession

from eventlog import SqliteEventLog
from gateway.admin import add_simulate_route
from gateway.app import build_app
from gateway.audit import writer
from gateway.audit.writer import AuditAddon
from gateway.config import load_config
from gateway.edge import App, HttpServer
from ledgergate.embedded import simulate_policy
from schemas import events
from tests.support.gateway import SEED_POLICY, FakeClock, running_gateway, write_config
from tests.support.upstreams import StdioCommand

KEYS = {"alice": "key-alice-0123456789", "bob": "key-bob-0123456789"}
ROOT = Path(__file__).resolve().parents[3]
CANDIDATE = {
    "version": "1",
    "default": "deny",
    "tools": {
        "open_session": {
            "limits": [{"counter": "open_session_rate", "window": "minute", "max": 5, "scope": "grant"}]
        },
        "get_chats": {},
    },
}
TOKEN = "simulate-admin-token"


@pytest.fixture
async def recorded(tmp_path: Path, whatsapp_command: StdioCommand, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Alice: 12 open_session in minute 1, 12 in minute 2, one get_chats; Bob: 3 open_session."""
    cfg_path = write_config(
        tmp_path,
        servers={"whatsapp": {"command": whatsapp_command.argv, "env": whatsapp_command.env}},
        policies={"whatsapp": SEED_POLICY},
        grants=KEYS,
        agents={"alice": "agent-a", "bob": "agent-b"},
    )
    cfg = load_config(cfg_path)
    clock = FakeClock()
    monkeypatch.setattr(writer, "_now_ms", lambda: int(clock() * 1000))
    monkeypatch.setattr(events, "now_ms", lambda: int(clock() * 1000))  # the builders' ts
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    log = SqliteEventLog(cfg.data_dir / "events.db", durability="strict")
    await log.open()
    addon = AuditAddon(log, "gw-test")

    try:
        async with running_gateway(
            cfg_path, KEYS, clock, build=lambda c, clock: build_app(c, addons=[addon], clock=clock)
        ) as gw:
            async with gw.client("whatsapp", "alice") as a, gw.client("whatsapp", "bob") as b:
                first = [await a.call_tool("open_session", {}) for _ in range(12)]
                assert [r.is_error for r in first] == [False] * 10 + [True] * 2
                assert (await a.call_tool("get_chats", {})).is_error  # default deny
                for _ in range(3):
                    assert not (await b.call_tool("open_session", {})).is_error
                clock.advance(60)
                second = [await a.call_tool("open_session", {}) for _ in range(12)]
                assert [r.is_error for r in second] == [False] * 10 + [True] * 2
    finally:
        await addon.close()
        await log.close()
    return cfg_path


def check_diff(doc: dict) -> None:
    assert doc["server"] == "whatsapp"
    assert doc["replayed"] == 12 + 1 + 3 + 12
    assert doc["allowed_to_refused"] == 10 and doc["refused_to_allowed"] == 1
    assert doc["unchanged"] == 28 - 11 and doc["undecidable"] == 0
    changes = {(c["change"], c["tool"], c["agent"]): c for c in doc["changes"]}
    assert set(changes) == {
        ("allowed -> refused", "open_session", "agent-a"),
        ("refused -> allowed", "get_chats", "agent-a"),
    }
    down = changes[("allowed -> refused", "open_session", "agent-a")]
    # exactly the 6th..10th call of each minute: 5 + 5
    assert down["count"] == 10 and down["rule"] == "/tools/open_session/limits/0"
    assert (down["old"], down["new"]) == ("allow", "rate_limited")
    assert len(down["examples"]) == 3 and all(e["call_id"] for e in down["examples"])
    assert "rate limit open_session_rate (5 per minute) reached" in down["examples"][0]["new_reason"]
    up = changes[("refused -> allowed", "get_chats", "agent-a")]
    assert up["count"] == 1 and up["rule"] == "/default" and up["old"] == "deny"


def simulate_cli(cfg_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledgergate", "policy", "simulate", *args, "-c", str(cfg_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


async def test_simulate_cli_on_recorded_seed_scenario(recorded: Path, tmp_path: Path) -> None:
    cand = tmp_path / "candidate.json"
    cand.write_text(json.dumps(CANDIDATE))
    r = simulate_cli(recorded, str(cand), "--server", "whatsapp", "--format", "json")
    assert r.returncode == 0, r.stderr
    check_diff(json.loads(r.stdout))
    r = simulate_cli(recorded, str(cand), "--server", "whatsapp")
    assert r.returncode == 0, r.stderr
    assert "allowed -> refused: 10   refused -> allowed: 1" in r.stdout
    assert "/tools/open_session/limits/0" in r.stdout and "rate_limited" in r.stdout
    # the seed policy itself changes nothing: the replay reproduces the gateway's decisions
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps(SEED_POLICY))
    r = simulate_cli(recorded, str(seed), "--server", "whatsapp", "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["replayed"] == 28 and doc["changes"] == [] and doc["unchanged"] == 28
    # a broken candidate: exit 2, the error names the file and the JSON Pointer
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1", "tools": {"open_session": {"action": "maybe"}}}')
    r = simulate_cli(recorded, str(bad), "--server", "whatsapp")
    assert r.returncode == 2 and f"{bad}: /tools/open_session/action:" in r.stderr
    r = simulate_cli(recorded, str(cand), "--server", "nope")
    assert r.returncode == 2 and "unknown server 'nope'" in r.stderr


async def test_simulate_over_the_admin_api(recorded: Path) -> None:
    cfg = load_config(recorded)
    log = SqliteEventLog(cfg.data_dir / "events.db", durability="strict")
    await log.open()
    try:
        app = App()
        add_simulate_route(
            app, TOKEN, lambda data, server, since: simulate_policy(log, cfg, data, server, since)
        )
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with HttpServer(app, "127.0.0.1", 0) as server, ClientSession(base_url=server.url) as c:
            resp = await c.post(
                "/admin/policies/simulate?server=whatsapp", headers=auth, data=orjson.dumps(CANDIDATE)
            )
            assert resp.status == 200, await resp.text()
            check_diff(orjson.loads(await resp.read()))
            # --since after everything recorded: nothing to replay
            resp = await c.post(
                "/admin/policies/simulate?server=whatsapp&since=2999-01-01",
                headers=auth,
                data=orjson.dumps(CANDIDATE),
            )
            assert resp.status == 200 and orjson.loads(await resp.read())["replayed"] == 0
            resp = await c.post(
                "/admin/policies/simulate?server=whatsapp", headers=auth, data=b'{"version": 2}'
            )
            body = orjson.loads(await resp.read())
            assert resp.status == 400 and body["error"] == "bad_request" and "/version" in body["message"]
            resp = await c.post("/admin/policies/simulate?server=whatsapp", data=orjson.dumps(CANDIDATE))
            assert resp.status == 401
    finally:
        await log.close()
