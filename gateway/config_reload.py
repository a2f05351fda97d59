"""What changed between two loaded configs, and whether it can apply without a restart.

Pure: ``diff_configs(old, new)`` compares two validated `Config` objects. The gateway's
config watcher (like the policy watcher: valid applies from the next call with a
``config.loaded`` event, invalid keeps the old one) uses it to decide what to do:

- grants (added, removed, key or agent changed): live;
- servers added / removed: live (start / stop that upstream and its policy);
- a server's policy path, redact, validate_upstream_schema: live (reload the policy);
- a server's url / command / env / cwd: live with that upstream restarted;
- alerts (any section not listed below): live;
- [gateway] listen, data_dir, instance_id, admin_token, the edge limits, [eventlog],
  [store]: need a restart (the socket, the log, the store and the admin routes are set up
  once); the reload applies the rest and says these were ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.config import Config

__all__ = ["LIVE_GATEWAY_KEYS", "ConfigDiff", "diff_configs"]

# [gateway] keys the proxy reads per call or per session: safe to change live
LIVE_GATEWAY_KEYS = frozenset(
    {
        "upstream_timeout_s",
        "session_idle_timeout_s",
        "allowed_hosts",
        "allowed_origins",
        "max_sessions_per_grant",
        "max_inflight_per_grant",
        "auth_failure_interval_s",
        "auth_failure_max_keys",
    }
)
RESTART_SECTIONS = ("eventlog", "store")
UPSTREAM_KEYS = ("url", "command", "env", "cwd")


@dataclass
class ConfigDiff:
    grants_added: list[str] = field(default_factory=list)
    grants_removed: list[str] = field(default_factory=list)
    grants_changed: list[str] = field(default_factory=list)
    servers_added: list[str] = field(default_factory=list)
    servers_removed: list[str] = field(default_factory=list)
    servers_restarted: list[str] = field(default_factory=list)  # url/command/env/cwd changed
    servers_reconfigured: list[str] = field(default_factory=list)  # policy/redact/validate changed
    gateway_live: list[str] = field(default_factory=list)  # [gateway] keys applied live
    other_live: list[str] = field(default_factory=list)  # e.g. alerts.*
    restart_needed: list[str] = field(default_factory=list)  # key paths ignored until a restart

    @property
    def changed(self) -> bool:
        return bool(self.applied or self.restart_needed)

    @property
    def live(self) -> bool:
        """Everything that changed can apply without a restart."""
        return not self.restart_needed

    @property
    def applied(self) -> list[str]:
        """What applies live, as short texts (the config.loaded event's ``applied``)."""
        out = [f"grants.{g} added" for g in self.grants_added]
        out += [f"grants.{g} removed" for g in self.grants_removed]
        out += [f"grants.{g} changed" for g in self.grants_changed]
        out += [f"servers.{s} added" for s in self.servers_added]
        out += [f"servers.{s} removed" for s in self.servers_removed]
        out += [f"servers.{s} restarted" for s in self.servers_restarted]
        out += [f"servers.{s} changed" for s in self.servers_reconfigured]
        out += [f"gateway.{k} changed" for k in self.gateway_live]
        out += [f"{k} changed" for k in self.other_live]
        return out


def _dump(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(exclude={"source"})


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    """What changed from ``old`` to ``new`` and how it can apply (module doc)."""
    a, b = _dump(old), _dump(new)
    d = ConfigDiff()
    ga, gb = a.get("grants", {}), b.get("grants", {})
    d.grants_added = sorted(set(gb) - set(ga))
    d.grants_removed = sorted(set(ga) - set(gb))
    d.grants_changed = sorted(g for g in set(ga) & set(gb) if ga[g] != gb[g])
    sa, sb = a.get("servers", {}), b.get("servers", {})
    d.servers_added = sorted(set(sb) - set(sa))
    d.servers_removed = sorted(set(sa) - set(sb))
    for name in sorted(set(sa) & set(sb)):
        if any(sa[name].get(k) != sb[name].get(k) for k in UPSTREAM_KEYS):
            d.servers_restarted.append(name)
        elif sa[name] != sb[name] or old.policy_path(name) != new.policy_path(name):
            d.servers_reconfigured.append(name)
    for key in sorted(set(a.get("gateway", {})) | set(b.get("gateway", {}))):
        if a["gateway"].get(key) != b["gateway"].get(key):
            (d.gateway_live if key in LIVE_GATEWAY_KEYS else d.restart_needed).append(
                key if key in LIVE_GATEWAY_KEYS else f"gateway.{key}"
            )
    for section in sorted((set(a) | set(b)) - {"gateway", "grants", "servers"}):
        va, vb = a.get(section), b.get(section)
        if va == vb:
            continue
        if section in RESTART_SECTIONS:
            keys = sorted(k for k in set(va or {}) | set(vb or {}) if (va or {}).get(k) != (vb or {}).get(k))
            d.restart_needed += [f"{section}.{k}" for k in keys]
        else:
            d.other_live.append(section)
    return d
