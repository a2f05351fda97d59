"""The admin HTTP API on the gateway's own HTTP server, answered by a real embedded store.

Events of the shared audit scenario are appended to a real SqliteEventLog and folded
into a real chDB store by the audit and counters consumers; ``Embedded.answer`` (the
composition root's answer function) serves the routes. One store for the whole module
(chDB holds one data dir per process).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession

from consumers.audit import AuditConsumer
from consumers.counters import CountersConsumer
from consumers.store import StoreError, open_store
from gateway.admin import add_admin_routes, classify_error
from gateway.config import Config
from gateway.edge import App, HttpServer
from ledgergate.embedded import Embedded
from schemas import events as E
from tests.support.audit_contract import QUOTED_AGENT, RULE_LIMIT, at, open_log, scenario

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def iso(seconds: float) -> str:
    return at(seconds).isoformat()


@pytest.fixture(scope="module")
async def embedded(tmp_path_factory: pytest.TempPathFactory):
    data: Path = tmp_path_factory.mktemp("admin-data")
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


reloads: list[int] = []


def reload() -> dict[str, str | None]:
    reloads.append(1)
    return {"whatsapp": None, "github": "github.json: /tools: not an object"}


@pytest.fixture(scope="module")
async def client(embedded: Embedded):
    app = App()
    add_admin_routes(app, TOKEN, embedded.answer, reload)
    async with serving(app) as c:
        yield c


@contextlib.asynccontextmanager
async def serving(app: App) -> AsyncIterator[ClientSession]:
    """``app`` on a free loopback port; a client session whose base URL is that server."""
    async with HttpServer(app, "127.0.0.1", 0) as server, ClientSession(base_url=server.url) as c:
        yield c


async def get_json(client: ClientSession, path: str, status: int = 200, **kw: Any) -> Any:
    resp = await client.get(path, headers=AUTH, **kw)
    body = await resp.read()
    assert resp.status == status, body
    assert resp.content_type == "application/json"
    return orjson.loads(body)


async def post_sql(client: ClientSession, doc: Any, status: int = 200) -> Any:
    resp = await client.post("/admin/audit/sql", headers=AUTH, data=orjson.dumps(doc))
    body = await resp.read()
    assert resp.status == status, body
    return orjson.loads(body)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer "},
    ],
)
async def test_missing_or_wrong_token_is_401(client: ClientSession, headers: dict[str, str]) -> None:
    for method, path in [
        ("GET", "/admin/audit/who?tool=open_session"),
        ("GET", "/admin/audit/calls"),
        ("GET", "/admin/audit/denials"),
        ("POST", "/admin/audit/sql"),
        ("POST", "/admin/policies/reload"),
    ]:
        resp = await client.request(method, path, headers=headers, data=b'{"sql": "SELECT 1"}')
        assert resp.status == 401, (method, path)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await resp.json())["error"] == "unauthorized"
    assert reloads == []


async def test_who(client: ClientSession) -> None:
    doc = await get_json(client, "/admin/audit/who", params={"tool": "open_session"})
    assert doc["columns"] == ["agent", "grant", "allowed", "refused", "first", "last"]
    assert doc["rows"] == [
        ["agent-a", "g-alice", 4, 0, iso(0), iso(86400 * 3)],
        ["agent-b", "g-bob", 1, 2, iso(20), iso(70)],
        [QUOTED_AGENT, "g-q'uote", 0, 1, iso(130), iso(130)],
    ]
    doc = await get_json(
        client,
        "/admin/audit/who",
        params={"tool": "open_session", "server": "whatsapp", "since": iso(5), "until": iso(75)},
    )
    assert doc["rows"] == [
        ["agent-a", "g-alice", 1, 0, iso(10), iso(10)],
        ["agent-b", "g-bob", 1, 2, iso(20), iso(70)],
    ]
    doc = await get_json(
        client, "/admin/audit/who", params={"tool": "open_session", "decision": "rate_limited"}
    )
    assert doc["rows"] == [["agent-b", "g-bob", 0, 2, iso(30), iso(70)]]
    doc = await get_json(client, "/admin/audit/who", params={"tool": "x' OR 1=1 --"})
    assert doc == {"columns": ["agent", "grant", "allowed", "refused", "first", "last"], "rows": []}


async def test_calls(client: ClientSession) -> None:
    doc = await get_json(client, "/admin/audit/calls", params={"tool": "send_message"})
    row = dict(zip(doc["columns"], doc["rows"][0], strict=True))
    assert row["call_id"] == "call-007" and row["ts"] == iso(80)
    assert orjson.loads(row["arguments"]) == {"phone_number": "+100", "content": "[REDACTED]"}
    assert (row["decision"], row["outcome"], row["upstream_ms"]) == ("allow", "ok", 6000.0)
    doc = await get_json(client, "/admin/audit/calls", params={"limit": "2"})
    assert [r[1] for r in doc["rows"]] == ["call-011", "call-010"]
    doc = await get_json(
        client, "/admin/audit/calls", params={"agent": QUOTED_AGENT, "grant": "g-q'uote", "decision": "deny"}
    )
    assert [r[1] for r in doc["rows"]] == ["call-010"]
    doc = await get_json(client, "/admin/audit/calls", params={"tool": "open_session", "since": iso(75)})
    by_id = {r[1]: dict(zip(doc["columns"], r, strict=True)) for r in doc["rows"]}
    assert set(by_id) == {"call-006", "call-010", "call-011"}
    assert by_id["call-006"]["outcome"] is None and by_id["call-006"]["upstream_ms"] is None


async def test_denials(client: ClientSession) -> None:
    doc = await get_json(client, "/admin/audit/denials")
    assert doc["columns"] == ["agent", "tool", "rule", "count", "first", "last", "remote", "reason"]
    assert doc["rows"] == [
        ["agent-b", "open_session", RULE_LIMIT, 2, iso(30), iso(70), "", ""],
        ["agent-b", "delete_chat", "/default", 1, iso(90), iso(90), "", ""],
        [QUOTED_AGENT, "open_session", "/default", 1, iso(130), iso(130), "", ""],
    ]
    doc = await get_json(client, "/admin/audit/denials", params={"since": iso(60), "agent": "agent-b"})
    assert doc["rows"] == [
        ["agent-b", "delete_chat", "/default", 1, iso(90), iso(90), "", ""],
        ["agent-b", "open_session", RULE_LIMIT, 1, iso(70), iso(70), "", ""],
    ]


async def test_sql_with_server_side_params(client: ClientSession) -> None:
    doc = await post_sql(
        client,
        {
            "sql": "SELECT agent, count() AS n, max(ts) AS last FROM audit_calls FINAL "
            "WHERE agent = {a:String} AND ts >= {t:DateTime64(3, 'UTC')} GROUP BY agent",
            "params": {"a": QUOTED_AGENT, "t": "2025-01-06 10:00:00"},
        },
    )
    assert doc == {"columns": ["agent", "n", "last"], "rows": [[QUOTED_AGENT, 1, iso(130)]]}
    doc = await post_sql(client, {"sql": "SELECT {v:String} AS v", "params": {"v": "x'; DROP TABLE t --"}})
    assert doc["rows"] == [["x'; DROP TABLE t --"]]
    doc = await post_sql(client, {"sql": "SELECT 1 AS one"})
    assert doc == {"columns": ["one"], "rows": [[1]]}


@pytest.mark.parametrize(
    "text",
    [
        "DROP TABLE audit_calls",
        "INSERT INTO audit_calls (event_id, call_id) VALUES ('evil', 'evil')",
        "SELECT 1; DROP TABLE audit_calls",
        "SELECT 1 SETTINGS readonly = 0",
        "SELECT * FROM file('/etc/passwd', 'LineAsString')",
    ],
)
async def test_sql_read_only_violation_is_400(client: ClientSession, text: str) -> None:
    doc = await post_sql(client, {"sql": text}, status=400)
    assert doc["error"] == "read_only"
    assert "read-only" in doc["message"].lower() or "readonly" in doc["message"].lower()
    doc = await post_sql(client, {"sql": "SELECT count() AS n FROM audit_calls FINAL"})
    assert doc["rows"] == [[11]]


async def test_sql_errors_of_the_query_are_400(client: ClientSession) -> None:
    doc = await post_sql(client, {"sql": "SELECT no_such_column FROM audit_calls"}, status=400)
    assert doc["error"] == "query_error" and "no_such_column" in doc["message"]
    doc = await post_sql(client, {"sql": "SELECT * FROM audit_calls WHERE"}, status=400)
    assert doc["error"] == "query_error" and "Syntax error" in doc["message"]
    # a table that is not one of ledgergate's is refused before it is looked up
    doc = await post_sql(client, {"sql": "SELECT * FROM no_such_table"}, status=400)
    assert doc["error"] == "read_only" and "no_such_table" in doc["message"]
    doc = await post_sql(client, {"sql": "SELECT {x:UInt8} AS x"}, status=400)
    assert doc["error"] == "query_error" and "x" in doc["message"]
    for body in (
        {},
        {"sql": ""},
        {"sql": 1},
        {"sql": "SELECT 1", "params": [1]},
        {"sql": "SELECT 1", "x": 1},
    ):
        doc = await post_sql(client, body, status=400)
        assert doc["error"] == "bad_request", body
    resp = await client.post("/admin/audit/sql", headers=AUTH, data=b"{not json")
    assert resp.status == 400 and (await resp.json())["error"] == "bad_request"


async def test_bad_filters_are_400(client: ClientSession) -> None:
    doc = await get_json(
        client, "/admin/audit/who", status=400, params={"tool": "open_session", "since": "last tuesday"}
    )
    assert doc["error"] == "bad_request" and "last tuesday" in doc["message"]
    doc = await get_json(client, "/admin/audit/denials", status=400, params={"until": "soon"})
    assert "soon" in doc["message"]
    doc = await get_json(client, "/admin/audit/who", status=400)  # tool is required
    assert "tool" in doc["message"]
    doc = await get_json(client, "/admin/audit/calls", status=400, params={"limit": "many"})
    assert doc["error"] == "bad_request"
    doc = await get_json(client, "/admin/audit/calls", status=400, params={"limit": "0"})
    assert doc["error"] == "bad_request"
    doc = await get_json(client, "/admin/audit/denials", status=400, params={"grant": "g-bob"})
    assert "grant" in doc["message"]  # not a filter of denials
    doc = await get_json(client, "/admin/audit/calls?tool=a&tool=b", status=400)
    assert "more than once" in doc["message"]
    resp = await client.get("/admin/audit/everything", headers=AUTH)
    assert resp.status == 404


async def test_policy_reload(client: ClientSession) -> None:
    resp = await client.post("/admin/policies/reload", headers=AUTH)
    assert resp.status == 422  # github's policy failed: not a success
    assert await resp.json() == {"whatsapp": None, "github": "github.json: /tools: not an object"}
    assert reloads == [1]


async def test_store_failures_are_503_and_no_reload_route_without_reload() -> None:
    async def broken(question: str, params: dict[str, Any]) -> Any:
        raise StoreError("Code: 210. DB::Exception: Connection refused (NETWORK_ERROR)")

    app = App()
    add_admin_routes(app, TOKEN, broken)
    async with serving(app) as c:
        resp = await c.get("/admin/audit/denials", headers=AUTH)
        assert resp.status == 503
        doc = await resp.json()
        assert doc["error"] == "store_unavailable" and "Connection refused" in doc["message"]
        resp = await c.post("/admin/policies/reload", headers=AUTH)
        assert resp.status in (404, 405)
    with pytest.raises(ValueError):
        add_admin_routes(App(), "", broken)


def test_classify_error_contract() -> None:
    from consumers.store.base import ReadOnlyError

    assert classify_error(ValueError("bad since")) == (400, "bad_request")
    assert classify_error(PermissionError("writes")) == (400, "read_only")
    assert classify_error(ReadOnlyError("writes")) == (400, "read_only")
    assert classify_error(StoreError("Code: 62. DB::Exception: Syntax error (SYNTAX_ERROR)")) == (
        400,
        "query_error",
    )
    assert classify_error(StoreError("store is closed")) == (503, "store_unavailable")
    assert classify_error(OSError("disk")) == (503, "store_unavailable")
