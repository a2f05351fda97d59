"""Grants: API keys mapped to agents. Keys are stored and compared as sha256 digests,
in constant time, and never forwarded upstream."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from gateway.config import Config


@dataclass(frozen=True, slots=True)
class Grant:
    name: str
    agent: str
    digest: bytes


class Authenticator:
    def __init__(self, grants: list[Grant]) -> None:
        self._grants = grants

    @classmethod
    def from_config(cls, cfg: Config) -> Authenticator:
        return cls([Grant(name, g.agent or name, bytes.fromhex(g.digest)) for name, g in cfg.grants.items()])

    def authenticate(self, authorization: str | None) -> Grant | None:
        """The grant whose key is the bearer token, else None.

        Every grant's digest is compared (hmac.compare_digest), so the time taken does not
        depend on which grant, or how much of a digest, matched.
        """
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for grant in self._grants:
            if hmac.compare_digest(grant.digest, digest):
                found = grant
        return found


def failure_reason(authorization: str | None) -> str:
    """Why ``authorization`` was refused, for the auth.failed event: missing_key,
    wrong_scheme, empty_key or invalid_key. Reads only the scheme, never the key."""
    if not authorization:
        return "missing_key"
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return "wrong_scheme"
    if not token.strip():
        return "empty_key"
    return "invalid_key"
