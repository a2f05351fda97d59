"""Hypothesis properties of decide() + Limiter."""

from __future__ import annotations

import json
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy.engine import Call, decide
from gateway.policy.limiter import Limiter
from schemas.policy import LoadedPolicy, parse_policy

GRANTS = ["g0", "g1", "g2", "g3"]
AGENTS = ["a0", "a1"]
SCOPES = ["grant", "agent", "session", "tool", "global"]
WINDOWS = st.one_of(st.sampled_from(["second", "minute", "hour", "day"]), st.integers(1, 200_000))


def policy(limits: list[dict[str, object]], tool: str = "t") -> LoadedPolicy:
    doc = {"version": "1", "tools": {tool: {"limits": limits}}}
    return parse_policy(json.dumps(doc).encode(), "policy.json")


def call(grant: str, agent: str = "a0", session: str | None = "s0", tool: str = "t") -> Call:
    return Call("srv", "tools/call", tool, grant, agent, session, None)


@settings(max_examples=150, deadline=None)
@given(
    mx=st.integers(0, 12),
    window=WINDOWS,
    base=st.integers(0, 4_000_000_000),
    calls=st.lists(st.sampled_from(GRANTS), max_size=60),
)
def test_exactly_min_n_max_pass_per_grant(mx: int, window: object, base: int, calls: list[str]) -> None:
    p = policy([{"counter": "c", "window": window, "max": mx, "scope": "grant"}])
    w = p.tools["t"].limits[0].window_s
    start = base // w * w
    lim = Limiter()
    passed: Counter[str] = Counter()
    for i, g in enumerate(calls):
        now = start + (w - 1e-3) * i / max(1, len(calls))  # all inside one window
        d = decide(call(g), p, lim.view(), now)
        lim.charge(d)
        if d.allowed:
            passed[g] += 1
        else:
            assert d.action == "rate_limited"
    n = Counter(calls)
    for g in GRANTS:
        assert passed[g] == min(n[g], mx)


@settings(max_examples=150, deadline=None)
@given(
    scope=st.sampled_from(SCOPES),
    mx=st.integers(1, 5),
    noise=st.lists(st.tuples(st.sampled_from(GRANTS[1:]), st.sampled_from(AGENTS)), max_size=30),
    probe_count=st.integers(0, 6),
)
def test_other_keys_never_interfere(
    scope: str, mx: int, noise: list[tuple[str, str]], probe_count: int
) -> None:
    """Charging cells of other scope values never changes a probe's outcome.

    The probe is grant g0 / agent "probe" / session "p"; the noise calls use other grants,
    agents and sessions, and a different tool for tool scope. A global limit has no "other"
    key, so there the noise goes to a different counter (another tool).
    """
    limits = [{"counter": f"c_{scope}", "window": "hour", "max": mx, "scope": scope}]
    doc = {
        "version": "1",
        "tools": {
            "t": {"limits": limits},
            "u": {"limits": [{"counter": f"other_{scope}", "window": "hour", "max": 3, "scope": scope}]},
        },
    }
    p = parse_policy(json.dumps(doc).encode(), "policy.json")
    now = 1_700_000_000.0
    noise_tool = "u" if scope in ("tool", "global") else "t"

    def outcomes(with_noise: bool) -> list[str]:
        lim = Limiter()
        out = []
        for i in range(probe_count):
            if with_noise:
                for g, a in noise:
                    lim.charge(decide(call(g, a, f"sess-{g}-{a}", noise_tool), p, lim.view(), now))
            d = decide(call("g0", "probe", "p"), p, lim.view(), now + i)
            lim.charge(d)
            out.append(d.action)
        return out

    assert outcomes(True) == outcomes(False)


@settings(max_examples=200, deadline=None)
@given(
    limits=st.lists(
        st.fixed_dictionaries(
            {
                "counter": st.sampled_from(["a", "b", "c"]),
                "max": st.integers(0, 4),
                "scope": st.sampled_from(SCOPES),
            }
        ),
        min_size=1,
        max_size=4,
    ),
    steps=st.lists(
        st.tuples(st.sampled_from(GRANTS), st.floats(0, 500_000, allow_nan=False)), min_size=1, max_size=40
    ),
    base=st.floats(0, 4e9, allow_nan=False),
)
def test_refusals_never_charge_and_retry_in_window(
    limits: list[dict[str, object]], steps: list[tuple[str, float]], base: float
) -> None:
    # one window per counter name (and one scope), as the loader requires
    windows = {"a": "minute", "b": 90, "c": "day"}
    scopes: dict[str, object] = {}
    for lim_ in limits:
        lim_["window"] = windows[lim_["counter"]]  # type: ignore[index]
        lim_["scope"] = scopes.setdefault(lim_["counter"], lim_["scope"])  # type: ignore[arg-type]
    p = policy(limits)
    specs = p.tools["t"].limits
    lim = Limiter()
    now = base
    for g, dt in steps:
        now += dt / 1000
        lim.expire(now)
        before = dict(lim.view())
        d = decide(call(g), p, lim.view(), now)
        if not d.allowed:
            assert d.charges == ()
            assert d.action == "rate_limited"
            blocking = [s for s in d.counters if s.count + 1 > s.max]
            assert blocking
            w_max = max(s.key.window_s for s in blocking)
            assert 0 < d.retry_after_s <= w_max
            for s in blocking:
                assert 0 < s.key.window_start + s.key.window_s - now <= s.key.window_s
        else:
            assert d.retry_after_s is None
            assert len(d.charges) == len({(s.counter, s.scope) for s in specs})
            for k in d.charges:
                assert k.window_start <= now < k.window_start + k.window_s
        lim.charge(d)
        if not d.allowed:
            assert dict(lim.view()) == before


@settings(max_examples=300, deadline=None)
@given(window=WINDOWS, now=st.floats(0, 1e10, allow_nan=False, allow_infinity=False))
def test_retry_after_always_in_window(window: object, now: float) -> None:
    p = policy([{"counter": "z", "window": window, "max": 0}])
    w = p.tools["t"].limits[0].window_s
    d = decide(call("g0"), p, {}, now)
    assert d.action == "rate_limited" and d.charges == ()
    assert 0 < d.retry_after_s <= w
    assert d.counters[0].key.window_start % w == 0
