"""LogConsumer.select: the fast byte path keeps exactly what a full parse keeps."""

from __future__ import annotations

import orjson

from consumers.counters import CountersConsumer
from consumers.runner import LogConsumer
from eventlog.base import Record
from schemas.events import EVENT_KINDS


def _records() -> list[Record]:
    # the gateway's compact field order: event_id, then kind, then the rest (agent text last)
    docs = [
        {"event_id": f"e{i}", "kind": kind, "ts_ms": 1, "arguments": {"note": "a kind-less argument"}}
        for i, kind in enumerate(sorted(EVENT_KINDS))
    ]
    docs.append({"event_id": "x", "kind": "not.a.kind", "ts_ms": 1})
    return [Record(i, orjson.dumps(d)) for i, d in enumerate(docs)]


def _consumer(cls: type[LogConsumer]) -> LogConsumer:
    return cls(None, None, "t")  # type: ignore[arg-type]  # select() touches neither


def test_fast_path_agrees_with_full_parse() -> None:
    records = _records()
    for cls in (LogConsumer, CountersConsumer):
        c = _consumer(cls)
        fast = c.select(records)
        assert fast == c.select(records, strict=True)
        kinds = [orjson.loads(p)["kind"] for p in fast]
        assert kinds == sorted(k for k in EVENT_KINDS if k in c.kinds)


def test_first_kind_decides_for_gateway_events() -> None:
    c = _consumer(CountersConsumer)
    decided = orjson.dumps({"event_id": "a", "kind": "call.decided", "arguments": {"kind": "session.opened"}})
    completed = orjson.dumps({"event_id": "b", "kind": "call.completed", "error_message": "x"})
    assert c.select([Record(0, decided), Record(1, completed)]) == [decided]


def test_audit_one_pass_routes_like_select_then_route() -> None:
    """AuditConsumer.routed (one pass over the bytes) sends every payload where route(select())
    sends it: kinds by their first marker (an agent's "kind" in the arguments moves nothing),
    non-compact JSON and garbage through the full parse."""
    from consumers.audit import AuditConsumer

    c = AuditConsumer(None, None)  # type: ignore[arg-type]  # routing touches neither
    records = _records()
    extra = [
        {"event_id": "s", "kind": "call.decided", "arguments": {"kind": "auth.failed"}},
        {"event_id": "t", "kind": "auth.failed", "arguments": {"kind": "call.decided"}},
        {"event_id": "u", "kind": "not.a.kind", "arguments": {"kind": "call.decided"}},
    ]
    records += [Record(len(records) + i, orjson.dumps(d)) for i, d in enumerate(extra)]
    records.append(Record(len(records), b'  {"kind": "auth.failed", "event_id": "v"}'))  # not compact
    records.append(Record(len(records), b"not json"))
    records.append(Record(len(records), b'{"event_id": "w"'))

    def by_table(routed: list[tuple[str, list[bytes]]]) -> dict[str, list[bytes]]:
        return {t: sorted(part) for t, part in routed}

    expected = by_table(c.route(c.select(records)))
    assert set(expected) == {c.table, c.security_table, c.alerts_table, c.approvals_table}
    assert by_table(c.routed(records)) == expected
    assert by_table(c.routed(records, strict=True)) == by_table(c.route(c.select(records, strict=True)))
