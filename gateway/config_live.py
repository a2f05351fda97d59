"""Hot reload of the config file, with the rule of the policy files: a valid file applies
from the next call with a ``config.loaded`` event; an invalid one keeps the old config
(``config.loaded`` with ok=false and the error).

What applies live (`gateway.config_reload.diff_configs` says what changed):
- grants added / removed / changed (key, agent): the next request authenticates against the
  new set; sessions of a removed or changed grant end at their next request (404: initialize
  again), sessions of unchanged grants go on;
- servers added (their policy loaded, upstream started, a fresh limiter) and removed (their
  sessions closed, upstream stopped); a server whose url / command / env / cwd changed gets a
  new upstream (its sessions are closed: the old processes go);
- a server's policy path, ``redact``, ``validate_upstream_schema``;
- [gateway] allowed_hosts, allowed_origins, max_sessions_per_grant, max_inflight_per_grant.

Everything else that changed is listed in ``restart_needed`` and ignored until a restart:
[gateway] listen, data_dir, admin_token, the edge limits, the timeouts the upstreams and
the session registry took at start, [eventlog], [store], [telemetry], and [alerts] (the
alerts consumer compiles its rules and sinks once, at start).

No call sees a half-applied config: everything that can fail or wait (reading and
validating the file, loading new policies, starting new upstreams) happens first; the
switch itself is a run of assignments with no await in between, and one call reads its
grant, its upstream and its policy each once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.audit.hooks import Addon
from gateway.auth import Authenticator, Grant
from gateway.config import Config, ConfigError, load_config
from gateway.config_reload import ConfigDiff, diff_configs
from gateway.policy.limiter import Limiter
from gateway.policy.live import PolicySet
from gateway.upstreams.base import Upstream
from schemas.policy import LoadedPolicy, PolicyError, load_policy

if TYPE_CHECKING:
    from gateway.proxy import Proxy

log = logging.getLogger("ledgergate.config")

RESTART_SECTIONS = ("eventlog", "store", "telemetry", "alerts")  # set up once at start
APPLIED_GATEWAY_KEYS = frozenset(
    {"allowed_hosts", "allowed_origins", "max_sessions_per_grant", "max_inflight_per_grant"}
)


class ConfigWatcher:
    def __init__(
        self,
        cfg: Config,
        proxy: Proxy,
        policies: PolicySet,
        addons: Addon,
        server_redact: dict[str, list[str]],
        build_upstreams: Callable[[Config], dict[str, Upstream]],
    ) -> None:
        self.cfg = cfg
        self.path = cfg.source
        self.proxy = proxy
        self.policies = policies
        self.addons = addons
        self.server_redact = server_redact
        self.build_upstreams = build_upstreams
        self._mtime = _mtime(self.path)
        self._lock = asyncio.Lock()

    def changed(self) -> bool:
        return _mtime(self.path) != self._mtime

    async def reload(self) -> ConfigDiff | str:
        """Reload the config file: the diff applied, or the error (the old config stays)."""
        async with self._lock:
            return await self._reload()

    async def _reload(self) -> ConfigDiff | str:
        self._mtime = _mtime(self.path)
        try:
            data = self.path.read_bytes()
            new = load_config(self.path)
        except (ConfigError, OSError) as exc:
            return self._failed(str(exc))
        sha = hashlib.sha256(data).hexdigest()
        diff = diff_configs(self.cfg, new)
        if not diff.changed:
            return diff
        # ---- everything that can fail or wait, before anything switches
        loaded: dict[str, LoadedPolicy] = {}
        for name in diff.servers_added + diff.servers_reconfigured + diff.servers_restarted:
            if name in diff.servers_reconfigured or name in diff.servers_restarted:
                if new.policy_path(name) == self.cfg.policy_path(name):
                    continue
            try:
                loaded[name] = load_policy(new.policy_path(name))
            except PolicyError as exc:
                return self._failed(f"servers.{name}.policy: {exc}")
        fresh: dict[str, Upstream] = {}
        wanted = set(diff.servers_added) | set(diff.servers_restarted)
        if wanted:
            built = self.build_upstreams(new)
            for name in sorted(wanted):
                up = built[name]
                try:
                    await up.start()
                except Exception as exc:
                    for started in fresh.values():
                        await started.close()
                    return self._failed(f"servers.{name}: cannot start: {exc}")
                fresh[name] = up
        restart = list(diff.restart_needed)
        restart += [f"gateway.{k}" for k in diff.gateway_live if k not in APPLIED_GATEWAY_KEYS]
        restart += [f"{k} (read once at start)" for k in diff.other_live]
        # ---- the switch: no await from here to the end of the block
        proxy = self.proxy
        old_grants = {g.name: g for g in proxy.auth._grants}
        grants = []
        for name, g in new.grants.items():
            grant = Grant(name, g.agent or name, bytes.fromhex(g.digest))
            grants.append(old_grants.get(name) if old_grants.get(name) == grant else grant)
        proxy.auth = Authenticator(grants)  # type: ignore[arg-type]
        gone: list[Upstream] = []
        for name in diff.servers_removed:
            for s in list(proxy.sessions):
                if s.server == name:
                    proxy._close(s, "server_removed")
            gone.append(proxy.upstreams.pop(name))
            proxy.limiters.pop(name, None)
            self.policies.paths.pop(name, None)
            self.policies.current.pop(name, None)
            proxy.schemas.forget(name)
        for name in diff.servers_restarted:
            for s in list(proxy.sessions):
                if s.server == name:
                    proxy._close(s, "server_restarted")
            gone.append(proxy.upstreams[name])
            proxy.upstreams[name] = fresh[name]
            proxy.schemas.forget(name)
        for name in diff.servers_added:
            proxy.upstreams[name] = fresh[name]
            proxy.limiters[name] = Limiter()
        for name, pol in loaded.items():
            self.policies.paths[name] = new.policy_path(name)
            self.policies.current[name] = pol
            self.policies._mtimes[name] = _mtime(new.policy_path(name))
            self.addons.policy_loaded(name, str(new.policy_path(name)), pol.version, None)
        self.server_redact.clear()
        self.server_redact.update({n: list(s.redact) for n, s in new.servers.items() if s.redact})
        audit_redact = getattr(self.addons, "server_redact", None)
        if isinstance(audit_redact, dict):  # the audit addon's copy (call.decided arguments)
            audit_redact.clear()
            audit_redact.update(self.server_redact)
        proxy.schemas.enabled = {n for n, s in new.servers.items() if s.validate_upstream_schema}
        gw = new.gateway
        if "allowed_hosts" in diff.gateway_live:
            extra = [gw.host] if gw.host not in ("0.0.0.0", "::", "") else []
            proxy.allowed_hosts = proxy.allowed_hosts.__class__(
                {"localhost", "127.0.0.1", "::1", "[::1]"} | {h.lower() for h in gw.allowed_hosts + extra}
            )
        if "allowed_origins" in diff.gateway_live:
            proxy.allowed_origins = {o.lower().rstrip("/") for o in gw.allowed_origins}
        proxy.max_sessions_per_grant = gw.max_sessions_per_grant
        proxy.max_inflight_per_grant = gw.max_inflight_per_grant
        # keep what needs a restart as it runs: the next diff compares with what is live
        live_gw = self.cfg.gateway.model_copy(
            update={k: getattr(new.gateway, k) for k in APPLIED_GATEWAY_KEYS}
        )
        kept = {k: getattr(self.cfg, k) for k in RESTART_SECTIONS if k in type(new).model_fields}
        self.cfg = new.model_copy(update={"gateway": live_gw, **kept})
        # ---- end of the switch
        applied = [a for a in diff.applied if not _ignored(a, restart)]
        log.info("config %s reloaded: %s", self.path, ", ".join(applied) or "nothing applied")
        if restart:
            log.warning("config %s: these changes need a restart: %s", self.path, ", ".join(restart))
        self.addons.config_loaded(str(self.path), sha, None, applied, restart)
        for up in gone:
            try:
                await up.close()
            except Exception as exc:
                log.error("closing a removed upstream failed: %r", exc)
        return diff

    def _failed(self, error: str) -> str:
        log.error("config reload failed, keeping the previous config: %s", error)
        self.addons.config_loaded(str(self.path), None, error, [], [])
        return error

    async def watch(self, interval_s: float = 1.0) -> None:
        """Reload the config file when its mtime changes (one stat per interval)."""
        while True:
            await asyncio.sleep(interval_s)
            if self.changed():
                try:
                    await self.reload()
                except Exception:  # the watcher must outlive a bug in one reload
                    log.exception("config reload crashed; the previous config stays")


def _ignored(applied: str, restart: list[str]) -> bool:
    return any(applied.startswith(r.split(" ", 1)[0]) for r in restart)


def _mtime(path: os.PathLike[str] | str) -> float:
    try:
        return os.stat(path).st_mtime_ns / 1e9
    except OSError:
        return -1.0
