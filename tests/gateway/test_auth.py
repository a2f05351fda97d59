"""Authenticator and failure_reason on their own: bearer keys by sha256 digest, never by text."""

from __future__ import annotations

import hashlib

import pytest

from gateway.auth import Authenticator, Grant, failure_reason


def grant(name: str, key: str) -> Grant:
    return Grant(name, f"agent-{name}", hashlib.sha256(key.encode()).digest())


AUTH = Authenticator([grant("alice", "key-a"), grant("bob", "key-b")])


@pytest.mark.parametrize(
    ("header", "who"),
    [
        ("Bearer key-a", "alice"),
        ("bearer key-b", "bob"),  # the scheme is case-insensitive
        ("Bearer  key-a ", "alice"),  # surrounding spaces of the token are not part of it
        ("Bearer key-c", None),
        ("Bearer KEY-A", None),  # the key is compared exactly
        ("Basic key-a", None),
        ("Bearer ", None),
        ("Bearer", None),
        ("", None),
        (None, None),
    ],
)
def test_authenticate(header: str | None, who: str | None) -> None:
    g = AUTH.authenticate(header)
    assert (g.name if g is not None else None) == who


def test_the_digest_not_the_text_is_stored() -> None:
    g = AUTH.authenticate("Bearer key-a")
    assert g is not None and g.digest == hashlib.sha256(b"key-a").digest()
    assert b"key-a" not in repr(g).encode()


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing_key"),
        ("", "missing_key"),
        ("Basic abc", "wrong_scheme"),
        ("Bearer", "empty_key"),
        ("Bearer   ", "empty_key"),
        ("Bearer nope", "invalid_key"),
    ],
)
def test_failure_reason_reads_only_the_scheme(header: str | None, reason: str) -> None:
    assert failure_reason(header) == reason
