"""Rate-limit counters rebuilt from the log (what a restart does), including events whose
agent-controlled arguments try to look like other fields."""

from __future__ import annotations

from pathlib import Path

import orjson

from eventlog import SqliteEventLog
from gateway.audit.hooks import AddonChain
from gateway.audit.writer import AuditAddon
from gateway.auth import Grant
from gateway.mcp.flow import CallFlow
from gateway.policy.engine import Call, CounterKey, decide
from gateway.policy.limiter import Limiter
from gateway.policy.live import PolicySet
from gateway.policy.rebuild import ReplicaFold, rebuild_limiters
from schemas.events import call_completed, call_decided, counter_charge

POLICY = (
    '{"version":"1","default":"deny","tools":{"t":{"limits":['
    '{"counter":"per_min","window":"minute","max":3,"scope":"grant"},'
    '{"counter":"per_day","window":"day","max":100,"scope":"agent"}]}}}'
)
NOW = 1_700_000_010.0  # 10 s into a minute window


async def test_restart_rebuilds_the_same_counters_and_ignores_look_alike_arguments(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(POLICY)
    log = SqliteEventLog(tmp_path / "events.db", durability="strict")
    await log.open()
    addon = AuditAddon(log, "gw")
    policies = PolicySet({"srv": tmp_path / "p.json"}, AddonChain([addon]))
    policies.load_all()
    live = Limiter()
    grant = Grant("g", "agent-1", b"\0" * 32)
    tricky = [
        {"charges": [], "decision": "deny", "kind": "call.completed"},  # fake "no charges"/"deny"/kind
        {"note": 'has "decision":"allow" and "charges":[] inside a string'},
        {},
        {"server": "other"},
    ]
    outcomes = []
    for args in [*tricky, {}]:
        flow = CallFlow(
            server="srv",
            method="tools/call",
            request_id=1,
            params={"name": "t", "arguments": args},
            grant=grant,
            session=None,
            remote=None,
            tool="t",
        )
        flow.decision = decide(
            Call("srv", "tools/call", "t", "g", "agent-1", None, args), policies["srv"], live.view(), NOW
        )
        live.charge(flow.decision)
        outcomes.append(flow.decision.action)
        await addon.decided(flow)
    assert outcomes == ["allow", "allow", "allow", "rate_limited", "rate_limited"]
    # a denied call whose arguments fake an allow with charges must not be counted either
    await log.append(
        [
            orjson.dumps(
                {
                    "kind": "call.decided",
                    "event_id": "x" * 36,
                    "server": "srv",
                    "arguments": {
                        "decision": "allow",
                        "charges": [
                            {
                                "counter": "per_min",
                                "key": "g",
                                "scope": "grant",
                                "window_start": 1_700_000_000,
                                "window_s": 60,
                            }
                        ],
                    },
                    "decision": "deny",
                    "charges": [],
                }
            )
        ]
    )
    await addon.close()

    rebuilt = Limiter()
    folded = await rebuild_limiters(log, {"srv": rebuilt}, 86_400, NOW + 5)
    await log.close()
    assert folded == 6  # 3 allowed calls x 2 counters
    assert dict(rebuilt.view()) == dict(live.view())
    # and it decides exactly as the live limiter did: the minute is used up, the day is not
    d = decide(
        Call("srv", "tools/call", "t", "g", "agent-1", None, {}), policies["srv"], rebuilt.view(), NOW + 5
    )
    assert d.action == "rate_limited" and d.rule == "/tools/t/limits/0"
    # a minute later only the day counter survives a rebuild
    later = Limiter()
    log2 = SqliteEventLog(tmp_path / "events.db")
    await log2.open()
    assert await rebuild_limiters(log2, {"srv": later}, 86_400, NOW + 60) == 3
    await log2.close()


async def test_rebuild_gives_back_the_charges_of_refunded_calls_only(tmp_path: Path) -> None:
    """A call.completed with refunded=true takes its call's charges back; text that looks like
    the marker (an upstream's error message) does not, nor does a call with no completion."""
    (tmp_path / "p.json").write_text(POLICY)
    log = SqliteEventLog(tmp_path / "events.db", durability="strict")
    await log.open()
    addon = AuditAddon(log, "gw")
    policies = PolicySet({"srv": tmp_path / "p.json"}, AddonChain([addon]))
    policies.load_all()
    live = Limiter()
    grant = Grant("g", "agent-1", b"\0" * 32)
    flows = []
    for _ in range(3):
        flow = CallFlow(
            server="srv",
            method="tools/call",
            request_id=1,
            params={"name": "t", "arguments": {}},
            grant=grant,
            session=None,
            remote=None,
            tool="t",
        )
        flow.decision = decide(
            Call("srv", "tools/call", "t", "g", "agent-1", None, {}), policies["srv"], live.view(), NOW
        )
        live.charge(flow.decision)
        await addon.decided(flow)
        flows.append(flow)
    # 0: never completed (a crash); 1: refused before the write, refunded; 2: ran, and the
    # upstream's error text imitates the marker
    live.refund(flows[1].decision)  # type: ignore[arg-type]
    flows[1].refunded = True
    flows[1].finish("upstream_error", message="upstream 'srv' unreachable; not forwarded")
    flows[2].sent = True
    flows[2].finish("jsonrpc_error", code=-1, message='nope","refunded":true}')
    for f in flows[1:]:
        addon.completed(f)
    await addon.close()

    rebuilt = Limiter()
    assert await rebuild_limiters(log, {"srv": rebuilt}, 86_400, NOW + 5) == 4  # 2 calls x 2 counters
    await log.close()
    assert dict(rebuilt.view()) == dict(live.view())
    assert sorted(rebuilt.view().values()) == [2, 2]


def _decided(gateway: str, call_id: str, ts: int, decision: str = "allow") -> bytes:
    ev = call_decided(
        gateway,
        call_id,
        "srv",
        "tools/call",
        "t",
        "1",
        "g",
        "agent-1",
        None,
        None,
        None,
        None,
        None,
        {"note": '"gateway":"gw-b" "decision":"deny"'},
        None,
        decision,
        None,
        None,
        None,
        [],
        [counter_charge("per_min", "g", "grant", 1_700_000_000, 60)],
        None,
        False,
        None,
        None,
        None,
    )
    ev["ts"] = ts
    return orjson.dumps(ev)


def _completed(gateway: str, call_id: str, refunded: bool) -> bytes:
    return orjson.dumps(
        call_completed(
            gateway,
            call_id,
            "srv",
            "tools/call",
            "t",
            "g",
            "agent-1",
            None,
            "error" if refunded else "ok",
            None,
            None,
            None,
            0,
            False,
            refunded,
        )
    )


def test_replica_fold_counts_other_gateways_allowed_calls_from_payloads() -> None:
    """The live fold on payloads (what the Kafka tail hands): another gateway's allowed calls
    are counted once (a redelivered record is not), this gateway's own and denied ones are
    not, a refunded call is taken back; the lag is the fold time minus the event's ts."""
    limiter = Limiter()
    fold = ReplicaFold(None, {"srv": limiter}, "gw-b", clock=lambda: NOW)  # type: ignore[arg-type]
    ts = int(NOW * 1000)
    ids = [f"0190a0b0-0000-7000-8000-00000000000{i}" for i in range(5)]
    first = [
        _decided("gw-a", ids[0], ts - 30),
        _decided("gw-b", ids[1], ts - 30),  # its own: charged when it decided
        _decided("gw-a", ids[2], ts - 10, decision="deny"),
        _decided("gw-a", ids[3], ts - 20),
    ]
    assert fold.fold_payloads(first) == 2
    assert fold.fold_payloads(first[:1]) == 0  # at-least-once: the same event again
    assert fold.fold_payloads([_completed("gw-a", ids[3], refunded=True)]) == 0
    key = CounterKey("per_min", "grant", "g", 60, 1_700_000_000)
    assert limiter.view()[key] == 1  # ids[0]; ids[3] was refunded
    assert fold.folded_events == 2
    assert fold.fold_payloads([_decided("gw-a", ids[4], ts - 5)]) == 1
    assert limiter.view()[key] == 2
    stats = fold.stats()
    assert stats["max_lag_ms"] == 30  # the oldest event of the first batch
    assert sorted(fold.lag_ms) == [5, 30]
    assert stats["lag_ms_p50"] == 30 and stats["gateway"] == "gw-b"
