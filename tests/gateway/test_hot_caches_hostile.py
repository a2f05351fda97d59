"""The per-call caches the speed round added hold values agents (or upstreams) choose: a flood
of distinct values must keep each bounded, and every answer must stay what it would be without
the cache."""

from __future__ import annotations

import orjson

from gateway.audit import redaction
from gateway.edge import App
from schemas import events as E


def _decided(client_name: str, session: str) -> tuple:
    return (
        "gw", "call-1", "srv", "tools/call", "echo", "7", "alice", "agent-a", session, "2025-11-25",
        client_name, "1.0", "127.0.0.1", {"x": 1}, None, "allow", None, None, None, [], [],
        "v1", False, None, None, None,
    )  # fmt: skip


def test_event_fragments_stay_bounded_under_a_flood_of_client_names() -> None:
    for i in range(E._FRAGMENTS_MAX * 2 + 7):
        fields = _decided(f'client "{i}"\n', f"s{i}")
        assert len(E._FRAGMENTS) <= E._FRAGMENTS_MAX
    got = orjson.loads(E.call_decided_bytes(*fields))
    want = orjson.loads(orjson.dumps(E.call_decided(*fields)))
    for k in ("event_id", "ts"):  # per call
        got.pop(k), want.pop(k)
    assert got == want


def test_sensitive_key_cache_stays_bounded_and_still_masks() -> None:
    for i in range(redaction._SENSITIVE_MAX * 2 + 3):
        assert redaction.redact({f"k{i}": "v"}) == {f"k{i}": "v"}
        assert len(redaction._SENSITIVE) <= redaction._SENSITIVE_MAX
    assert redaction.redact({"api_key": "s3cret"}) == {"api_key": redaction.MASK}


def test_route_cache_stays_bounded_under_a_flood_of_paths() -> None:
    app = App()

    async def handler(req: object) -> None:
        return None

    app.add_post("/mcp/{server}", handler)
    for i in range(3000):
        hit = app._match(f"/mcp/s{i}")
        assert hit is not None and hit[1] == {"server": f"s{i}"}
        assert len(app._matched) <= 1024
    assert app._match("/other/path") is None
