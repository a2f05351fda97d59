"""The dashboard in a real Chromium (Debian's, driven by playwright; never `playwright install`).

`ledgergate run` (a subprocess: embedded event log, chDB, consumers) serves the real
whatsapp-mcp-server; the official MCP SDK makes 12 open_session calls (10 allowed, 2 refused
by the seed policy's 10-per-minute limit); the page shows them live, filters the refusals,
opens one call, answers `audit who` with 10/2 as the admin API (what the CLI asks) does, and
shows refusals by rule, top agents/tools and the tool inventory. A screenshot of each view
goes to the test's tmp_path.

The approvals view: a second gateway serves tests/support/recording_stdio.py with echo held for
a human; calls made with the SDK in background tasks show up in the queue, one is approved
from the page (the upstream answers it), one denied with a comment (the agent reads it).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
import tomllib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.support.gateway import SEED_POLICY, write_config
from tests.support.hostile import recorded_calls, recording_stdio_server
from tests.support.procs import start_process, stop_process, wait_http
from tests.support.upstreams import StdioCommand

DOCS = Path(__file__).resolve().parents[3] / "docs"
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "dashboard-admin-token"
KEY = "key-dashboard-0123456789"
RULE = "/tools/open_session/limits/0"

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK), reason="needs Debian's chromium (make test installs it)"
)


@pytest.fixture
async def gateway(tmp_path: Path, whatsapp_command: StdioCommand) -> AsyncIterator[str]:
    cfg = write_config(
        tmp_path / "gw",
        servers={"whatsapp": {"command": whatsapp_command.argv, "env": whatsapp_command.env}},
        policies={"whatsapp": SEED_POLICY},
        grants={"demo": KEY},
        agents={"demo": "demo-agent"},
        gateway={"admin_token": TOKEN},
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERGATE_")}
    handle = start_process(
        [sys.executable, "-m", "ledgergate", "run", "--config", str(cfg)],
        env=env,
        log_path=tmp_path / "gw.log",
    )
    try:
        base = "http://" + tomllib.loads(cfg.read_text())["gateway"]["listen"]
        await asyncio.to_thread(wait_http, f"{base}/healthz", 60, handle)
        yield base
    finally:
        await asyncio.to_thread(stop_process, handle)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            await b.close()


async def wait_for_a_fresh_minute(left_s: float = 20.0) -> datetime:
    """Poll the clock until at least `left_s` seconds of the current UTC minute remain (the
    12 calls then fall in one rate-limit window). Returns the minute's start."""
    while 60 - time.time() % 60 < left_s:  # noqa: ASYNC110 - the wall clock, nothing to await
        await asyncio.sleep(0.2)
    now = time.time()
    return datetime.fromtimestamp(now - now % 60, UTC)


async def test_dashboard_live_filter_record_who(gateway: str, browser: Any, tmp_path: Path) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = await browser.new_page(viewport={"width": 1360, "height": 900})

    # the login form; a wrong token is refused, the right one gets in
    await page.goto(f"{gateway}/ui")
    await page.wait_for_selector("#login-form")
    await page.screenshot(path=shots / "login.png")
    await page.fill("#token", "not-the-token")
    await page.click("#login-submit")
    await page.wait_for_selector("#login-error")
    await page.fill("#token", TOKEN)
    await page.click("#login-submit")
    await page.wait_for_selector('#stream-state[data-state="live"]')
    cookies = {c["name"]: c for c in await page.context.cookies()}
    assert cookies["ledgergate_ui"]["httpOnly"] and cookies["ledgergate_ui"]["sameSite"] == "Strict"

    # 12 calls through the official SDK, in one UTC minute (the child starts on initialize)
    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {KEY}"}, timeout=httpx2.Timeout(30.0, read=60.0)
    )
    async with Client(
        streamable_http_client(f"{gateway}/mcp/whatsapp", http_client=http), mode="legacy"
    ) as c:
        minute = await wait_for_a_fresh_minute()
        results = [await c.call_tool("open_session", {}) for _ in range(12)]
    assert [r.is_error for r in results] == [False] * 10 + [True] * 2

    # they appear live, with their outcomes
    await page.wait_for_function(
        "document.querySelectorAll('#live-table tbody tr[data-tool=\"open_session\"]').length === 12"
    )
    await page.wait_for_function(
        "[...document.querySelectorAll('#live-table tbody tr[data-tool=\"open_session\"] td.outcome')]"
        ".filter(td => td.textContent).length === 12"
    )
    rows = await page.eval_on_selector_all(
        '#live-table tbody tr[data-tool="open_session"]',
        "trs => trs.map(tr => [tr.dataset.decision, tr.querySelector('td.outcome').textContent])",
    )
    assert sorted(map(tuple, rows)) == [("allow", "ok")] * 10 + [("rate_limited", "refused")] * 2
    await page.screenshot(path=shots / "live.png", full_page=True)

    # filter to the refusals, open one
    await page.select_option('#live-filters select[name="decision"]', "refused")
    visible = page.locator("#live-table tbody tr:visible")
    assert await visible.count() == 2
    await page.screenshot(path=shots / "live-refusals.png", full_page=True)
    await visible.first.click()
    await page.wait_for_selector('#call-record tr[data-field="decision"]')
    record = dict(
        await page.eval_on_selector_all(
            "#call-record tr", "trs => trs.map(tr => [tr.dataset.field, tr.querySelector('td').textContent])"
        )
    )
    assert record["decision"] == "rate_limited"
    assert record["rule"] == RULE
    assert record["outcome"] == "refused"
    assert record["agent"] == "demo-agent"
    assert record["tool"] == "open_session"
    assert record["arguments"] == "{}"
    await page.screenshot(path=shots / "call.png", full_page=True)

    # `audit who` for the tool and the minute: 10/2, as the admin API answers (the CLI's source)
    await page.click('#tabs button[data-view="who"]')
    await page.fill('#who-form input[name="tool"]', "open_session")
    await page.fill('#who-form input[name="since"]', minute.isoformat())
    await page.click("#who-submit")
    await page.wait_for_selector("#who-table tbody tr")
    who = await page.eval_on_selector_all(
        "#who-table tbody tr", "trs => trs.map(tr => [...tr.cells].slice(0, 4).map(td => td.textContent))"
    )
    assert who == [["demo-agent", "demo", "10", "2"]]
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"{gateway}/admin/audit/who",
            params={"tool": "open_session", "since": minute.isoformat()},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as r,
    ):
        api = await r.json()
    assert [[str(v) for v in row[:4]] for row in api["rows"]] == who
    await page.screenshot(path=shots / "who.png", full_page=True)

    # refusals by rule over time
    await page.click('#tabs button[data-view="refusals"]')
    await page.wait_for_selector("#refusals-table tbody tr")
    refusals = await page.eval_on_selector_all(
        "#refusals-table tbody tr", "trs => trs.map(tr => [...tr.cells].map(td => td.textContent))"
    )
    assert [r[1:] for r in refusals] == [[RULE, "rate_limited", "2"]]
    await page.screenshot(path=shots / "refusals.png", full_page=True)

    # top agents and tools
    await page.click('#tabs button[data-view="top"]')
    await page.wait_for_selector("#top-tools tbody tr")
    tools = await page.eval_on_selector_all(
        "#top-tools tbody tr", "trs => trs.map(tr => [...tr.cells].map(td => td.textContent))"
    )
    assert ["open_session", "12", "2"] in tools
    agents = await page.eval_on_selector_all(
        "#top-agents tbody tr", "trs => trs.map(tr => tr.cells[0].textContent)"
    )
    assert agents == ["demo-agent"]
    await page.screenshot(path=shots / "top.png", full_page=True)

    # the tool inventory with the rule in force
    await page.click('#tabs button[data-view="inventory"]')
    await page.wait_for_selector("#inventory-table tbody tr")
    inv = await page.eval_on_selector_all(
        "#inventory-table tbody tr",
        "trs => trs.map(tr => [...tr.cells].slice(0, 5).map(td => td.textContent))",
    )
    assert inv[0][:4] == ["whatsapp", "open_session", "allow", "/tools/open_session"]
    assert RULE in inv[0][4] and "10 per minute" in inv[0][4]
    assert inv[1][:4] == ["whatsapp", "*", "deny", "/default"]
    await page.screenshot(path=shots / "inventory.png", full_page=True)

    # logged out: the API refuses
    await page.click("#logout")
    await page.wait_for_selector("#login-form")
    resp = await page.request.get(f"{gateway}/ui/api/inventory")
    assert resp.status == 401

    assert sorted(p.name for p in shots.iterdir()) == [
        "call.png",
        "inventory.png",
        "live-refusals.png",
        "live.png",
        "login.png",
        "refusals.png",
        "top.png",
        "who.png",
    ]
    if os.environ.get("LEDGERGATE_UPDATE_DOCS_SCREENSHOT"):  # refresh the README's picture
        shutil.copy(shots / "live.png", DOCS / "dashboard.png")


HELD_POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {"echo": {"action": "approve", "approval": {"timeout": "120s"}, "redact": ["token"]}},
}


@pytest.fixture
async def held_gateway(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """`ledgergate run` in front of the recording stdio server; echo waits for an approval."""
    record = tmp_path / "record.log"
    cfg = write_config(
        tmp_path / "gw",
        servers={"rec": recording_stdio_server(record)},
        policies={"rec": HELD_POLICY},
        grants={"demo": KEY},
        agents={"demo": "demo-agent"},
        gateway={"admin_token": TOKEN},
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERGATE_")}
    handle = start_process(
        [sys.executable, "-m", "ledgergate", "run", "--config", str(cfg)],
        env=env,
        log_path=tmp_path / "gw.log",
    )
    try:
        base = "http://" + tomllib.loads(cfg.read_text())["gateway"]["listen"]
        await asyncio.to_thread(wait_http, f"{base}/healthz", 60, handle)
        yield base, record
    finally:
        await asyncio.to_thread(stop_process, handle)


async def test_dashboard_approves_and_denies_held_calls(
    held_gateway: tuple[str, Path], browser: Any, tmp_path: Path
) -> None:
    gateway, record = held_gateway
    page = await browser.new_page(viewport={"width": 1360, "height": 900})
    await page.goto(f"{gateway}/ui")
    await page.fill("#token", TOKEN)
    await page.click("#login-submit")
    await page.wait_for_selector('#stream-state[data-state="live"]')
    await page.click('#tabs button[data-view="approvals"]')
    await page.wait_for_selector("#approvals-empty:visible")

    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {KEY}"}, timeout=httpx2.Timeout(30.0, read=150.0)
    )
    async with Client(streamable_http_client(f"{gateway}/mcp/rec", http_client=http), mode="legacy") as c:
        # held: it shows up in the queue (polled), with the arguments as stored (redacted)
        first = asyncio.create_task(c.call_tool("echo", {"text": "hello", "token": "s3cret-value"}))
        row = page.locator('#approvals-table tbody tr[data-tool="echo"]')
        await row.wait_for()
        cells = await row.locator("td").all_text_contents()
        rid = await row.get_attribute("data-id")
        assert rid and cells[0] == rid
        assert cells[1:4] == ["rec", "echo", "demo-agent (demo)"]
        assert '"text": "hello"' in cells[4] and "token" in cells[4] and "s3cret-value" not in cells[4]
        assert cells[5].endswith(" s") and cells[6].endswith(" s")
        assert await page.locator("#approvals-count").text_content() == "1"
        assert not first.done() and recorded_calls(record) == []
        await page.screenshot(path=tmp_path / "approvals.png", full_page=True)

        # the page's POST needs its header: a cross-site form (cookie or not) cannot send it
        bare = await page.request.post(f"{gateway}/ui/api/approvals/{rid}", data={"decision": "approve"})
        assert bare.status == 403 and not first.done()

        # Approve: the call goes through and the upstream answers it
        await row.locator("button.approve").click()
        result = await first
        assert not result.is_error and result.content[0].text == "hello"
        await page.locator(f'#approvals-done li[data-id="{rid}"][data-outcome="approved"]').wait_for()
        assert "by dashboard" in (await page.locator(f'#approvals-done li[data-id="{rid}"]').text_content())
        await row.wait_for(state="detached")

        # a second held call, denied from the page with a comment the agent reads
        second = asyncio.create_task(c.call_tool("echo", {"text": "again"}))
        row2 = page.locator('#approvals-table tbody tr[data-tool="echo"]')
        await row2.wait_for()
        rid2 = await row2.get_attribute("data-id")
        assert rid2 and rid2 != rid
        await row2.locator('input[name="comment"]').fill("not on a friday")
        await page.screenshot(path=tmp_path / "approvals-deny.png", full_page=True)
        await row2.locator("button.deny").click()
        denied = await second
        assert denied.is_error
        text = denied.content[0].text
        assert "not on a friday" in text and f"approval {rid2} denied by dashboard" in text
        await page.locator(f'#approvals-done li[data-id="{rid2}"][data-outcome="denied"]').wait_for()
        await page.wait_for_selector("#approvals-empty:visible")

    # the admin API's listing (what the CLI reads) agrees: nothing pending; only the
    # approved call reached the upstream
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{gateway}/admin/approvals", headers={"Authorization": f"Bearer {TOKEN}"}) as r,
    ):
        assert (await r.json()) == {"pending": []}
    calls = recorded_calls(record)
    assert [(m["params"]["name"], m["params"]["arguments"]["text"]) for m in calls] == [("echo", "hello")]
    # deciding again is a conflict, through the same path as the admin API
    again = await page.request.post(
        f"{gateway}/ui/api/approvals/{rid2}",
        data={"decision": "approve"},
        headers={"X-Requested-With": "ledgergate-ui"},
    )
    assert again.status == 409 and "already denied" in (await again.json())["message"]
    assert (tmp_path / "approvals.png").stat().st_size > 0
