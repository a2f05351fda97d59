"""The live policy of each server, with hot reload that keeps the old policy on error."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from gateway.audit.hooks import Addon
from schemas.policy import LoadedPolicy, PolicyError, load_policy

log = logging.getLogger("ledgergate.policy")


class PolicySet:
    def __init__(self, paths: dict[str, Path], addons: Addon) -> None:
        self.paths = paths
        self.addons = addons
        self.current: dict[str, LoadedPolicy] = {}
        self._mtimes: dict[str, float] = {}

    def load_all(self) -> None:
        """Load every policy; raise PolicyError on the first broken one (start-up)."""
        for server, path in self.paths.items():
            self.current[server] = load_policy(path)
            self._mtimes[server] = _mtime(path)
            self.addons.policy_loaded(server, str(path), self.current[server].version, None)

    def __getitem__(self, server: str) -> LoadedPolicy:
        return self.current[server]

    def reload(self, server: str | None = None) -> dict[str, str | None]:
        """Reload one or all policies; a broken file is reported and the old policy stays."""
        results: dict[str, str | None] = {}
        for name in [server] if server else list(self.paths):
            path = self.paths[name]
            self._mtimes[name] = _mtime(path)
            try:
                loaded = load_policy(path)
            except PolicyError as exc:
                log.error("policy reload failed, keeping the previous policy: %s", exc)
                self.addons.policy_loaded(name, str(path), None, str(exc))
                results[name] = str(exc)
                continue
            if loaded.version != self.current[name].version:
                log.info("policy for %s reloaded from %s (version %s)", name, path, loaded.version[:12])
                self.current[name] = loaded
                self.addons.policy_loaded(name, str(path), loaded.version, None)
            results[name] = None
        return results

    def changed(self) -> list[str]:
        return [s for s, p in self.paths.items() if _mtime(p) != self._mtimes.get(s)]

    async def watch(self, interval_s: float = 1.0) -> None:
        """Reload a policy file when its mtime changes (one stat per file per interval)."""
        while True:
            await asyncio.sleep(interval_s)
            for server in self.changed():
                self.reload(server)


def _mtime(path: Path) -> float:
    try:
        return os.stat(path).st_mtime_ns / 1e9
    except OSError:
        return -1.0
