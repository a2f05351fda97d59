"""The in-memory windowed counters (gateway/policy/limiter.py)."""

from __future__ import annotations

from gateway.policy.engine import Call, CounterKey, Decision, decide
from gateway.policy.limiter import Limiter
from schemas.policy import parse_policy

SEED = (
    b'{"version":"1","default":"deny","tools":{"open_session":{"limits":[{"counter":"open_session_rate",'
    b'"window":"minute","max":10,"scope":"grant"}]}}}'
)
T0 = 1_700_000_040


def key(counter: str = "c", k: str = "alice", w: int = 60, start: int = T0) -> CounterKey:
    return CounterKey(counter, "grant", k, w, start)


def allow(*keys: CounterKey) -> Decision:
    return Decision("allow", "/default", None, (), None, tuple(keys))


def test_charge_counts_and_view_is_live() -> None:
    lim = Limiter()
    view = lim.view()
    lim.charge(allow(key(), key("d")))
    lim.charge(allow(key()))
    assert view == {key(): 2, key("d"): 1}
    assert lim.view() is view
    assert len(lim) == 2


def test_refused_decisions_are_not_charged() -> None:
    lim = Limiter()
    for action in ("deny", "rate_limited", "invalid_arguments"):
        lim.charge(Decision(action, "/x", "r", (), 1.0, (key(),)))  # type: ignore[arg-type]
    assert lim.view() == {}


def test_expire_drops_ended_windows_only() -> None:
    lim = Limiter()
    lim.charge(allow(key(w=60), key("h", w=3600, start=T0 - 40), key("s", w=1, start=T0)))
    assert lim.expire(T0 + 0.5) == 0
    assert lim.expire(T0 + 1) == 1  # the 1 s window [T0, T0+1) ended
    assert lim.expire(T0 + 59.99) == 0
    assert lim.expire(T0 + 60) == 1
    assert set(lim.view()) == {key("h", w=3600, start=T0 - 40)}
    assert lim.expire(T0 + 10_000) == 1
    assert lim.view() == {} and lim.expire(T0 + 20_000) == 0


def test_expire_after_recharge_of_same_window() -> None:
    lim = Limiter()
    lim.charge(allow(key()))
    assert lim.expire(T0 + 60) == 1
    lim.charge(allow(key(start=T0 + 60)))
    lim.charge(allow(key(start=T0 + 60)))
    assert lim.view() == {key(start=T0 + 60): 2}
    assert lim.expire(T0 + 119) == 0
    assert lim.expire(T0 + 120) == 1


def test_rebuilt_charges_then_decide_match_live_state() -> None:
    """Replaying the charges of allowed decisions gives the same counters, hence the same decisions."""
    p = parse_policy(SEED, "policy.json")
    live = Limiter()
    log: list[CounterKey] = []
    c = Call("wa", "tools/call", "open_session", "alice", "agent", None, {})
    for i in range(7):
        d = decide(c, p, live.view(), T0 + i)
        live.charge(d)
        log.extend(d.charges)
    rebuilt = Limiter()
    for k in log:  # what the counter rebuild does with each open window's charges
        rebuilt.add(k, 1)
    assert rebuilt.view() == live.view()
    for _ in range(3):
        rebuilt.charge(decide(c, p, rebuilt.view(), T0 + 9))
    assert decide(c, p, rebuilt.view(), T0 + 9).action == "rate_limited"
