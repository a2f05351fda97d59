"""SessionRegistry on its own: per-grant counts, idle sessions, Retry-After (an injected clock)."""

from __future__ import annotations

from gateway.auth import Grant
from gateway.mcp.sessions import Session, SessionRegistry, new_session_id

ALICE = Grant("alice", "agent-a", b"a" * 32)
BOB = Grant("bob", "agent-b", b"b" * 32)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def session(grant: Grant, clock: Clock) -> Session:
    return Session(id=new_session_id(), server="srv", grant=grant, last_seen=clock.now)


def test_counts_follow_add_and_remove_per_grant() -> None:
    reg = SessionRegistry(60.0, Clock())
    a1, a2, b1 = session(ALICE, Clock()), session(ALICE, Clock()), session(BOB, Clock())
    for s in (a1, a2, b1):
        reg.add(s)
    reg.add(a1)  # adding the same session again does not count it twice
    assert (len(reg), reg.count("alice"), reg.count("bob")) == (3, 2, 1)
    assert reg.get(a2.id) is a2
    assert reg.remove(a2.id) is a2
    assert reg.remove(a2.id) is None  # removing twice is a no-op
    assert (len(reg), reg.count("alice")) == (2, 1)
    reg.remove(b1.id)
    assert reg.count("bob") == 0 and set(reg) == {a1}


def test_idle_lists_only_idle_inactive_sessions_and_removes_none() -> None:
    clock = Clock()
    reg = SessionRegistry(60.0, clock)
    old, busy, fresh = session(ALICE, clock), session(ALICE, clock), session(ALICE, clock)
    busy.active = 1  # an open request or stream: never idle
    for s in (old, busy, fresh):
        reg.add(s)
    clock.now += 61
    fresh.last_seen = clock.now
    assert reg.idle() == [old]
    assert len(reg) == 3  # the proxy closes them (one path): the registry only lists them


def test_retry_after_is_the_wait_for_the_next_idle_session_of_the_grant() -> None:
    clock = Clock()
    reg = SessionRegistry(60.0, clock)
    a, b = session(ALICE, clock), session(ALICE, clock)
    reg.add(a)
    reg.add(b)
    clock.now += 20
    b.last_seen = clock.now - 5
    assert reg.retry_after("alice") == 40.0  # a expires first: 60 - 20
    a.active = b.active = 1
    assert reg.retry_after("alice") == 60.0  # all busy: the idle timeout
    assert reg.retry_after("nobody") == 60.0


def test_session_ids_are_unique_visible_ascii() -> None:
    ids = {new_session_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(i.isascii() and i.isprintable() and len(i) >= 43 for i in ids)
