"""Assemble the HTTP app (gateway.edge.App) from a config: upstreams, policies, proxy, addons."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gateway.approvals_live import LiveApprovals
from gateway.audit.hooks import Addon, AddonChain
from gateway.audit.redaction import redact
from gateway.auth import Authenticator
from gateway.config import Config
from gateway.edge import App, EdgeLimits
from gateway.policy.clock import MonotonicWallClock
from gateway.policy.live import PolicySet
from gateway.policy.upstream_schema import UpstreamSchemas
from gateway.proxy import Proxy, health, health_detail
from gateway.upstreams.base import Upstream
from gateway.upstreams.http import HttpUpstream
from gateway.upstreams.stdio import StdioUpstream

log = logging.getLogger("ledgergate")

PROXY_KEY = "proxy"  # app[PROXY_KEY] is the Proxy
POLICIES_KEY = "policies"  # app[POLICIES_KEY] is the PolicySet
CONFIG_KEY = "config"  # app[CONFIG_KEY] is the ConfigWatcher (hot reload of the config file)
SERVER_REDACT_KEY = "server_redact"  # app[SERVER_REDACT_KEY]: server -> [redact paths], live
UI_KEY = "ui"  # app.get(UI_KEY) is the dashboard (gateway.ui.dashboard.Dashboard), if mounted


def build_upstreams(cfg: Config) -> dict[str, Upstream]:
    ups: dict[str, Upstream] = {}
    for name, srv in cfg.servers.items():
        if srv.url is not None:
            ups[name] = HttpUpstream(
                name,
                srv.url,
                cfg.gateway.upstream_timeout_s,
                max_head_bytes=cfg.gateway.max_upstream_head_bytes,
                max_body_bytes=cfg.gateway.max_upstream_body_bytes,
            )
        else:
            cwd = str(cfg.resolve(srv.cwd)) if srv.cwd else None
            gw = cfg.gateway
            ups[name] = StdioUpstream(
                name,
                cfg.command(name),
                srv.env,
                cwd,
                gw.upstream_timeout_s,
                queue_bytes=gw.stream_queue_bytes,
                queue_messages=gw.stream_queue_messages,
                max_consecutive_timeouts=srv.max_consecutive_timeouts or gw.stdio_max_consecutive_timeouts,
                max_stdin_bytes=gw.stdio_max_stdin_bytes,
            )
    return ups


def build_app(
    cfg: Config,
    addons: list[Addon] | None = None,
    clock: Callable[[], float] = time.time,
    admin: Callable[[str, dict[str, Any]], Awaitable[tuple[list[str], list[tuple[Any, ...]]]]] | None = None,
    metrics: Any = None,
    trace_incoming: bool = False,
    ui_events: Callable[[], AsyncIterator[list[bytes]]] | None = None,
) -> App:
    """The gateway app. `addons` hook into every flow (audit, metrics); `admin` answers the
    forensic questions of the admin API and the dashboard (mounted when the config has an
    admin_token). `metrics` (gateway.observability.metrics.Metrics): its addon joins the
    chain and GET /metrics is served behind the admin token. `trace_incoming`: keep each
    request's traceparent for the tracing addon. `ui_events`: the dashboard's live stream."""
    chain = AddonChain(addons)
    # windows follow UTC wall time, but a clock stepped back must never reopen a charged window
    if not isinstance(clock, MonotonicWallClock):
        clock = MonotonicWallClock(clock)
    if metrics is not None:
        chain.add(metrics.addon)
    policies = PolicySet({name: cfg.policy_path(name) for name in cfg.servers}, chain)
    policies.load_all()  # raises PolicyError naming the file: fail at start, never serve without a policy
    upstreams = build_upstreams(cfg)
    server_redact = {name: list(srv.redact) for name, srv in cfg.servers.items() if srv.redact}

    def redact_args(server: str, tool: str, args: dict[str, Any] | None) -> dict[str, Any] | None:
        if args is None:
            return None
        return redact(args, [*server_redact.get(server, ()), *policies[server].redact_paths(tool)])

    proxy = Proxy(
        auth=Authenticator.from_config(cfg),
        policies=policies,
        upstreams=upstreams,
        addons=chain,
        max_body_bytes=cfg.gateway.max_body_bytes,
        session_idle_timeout_s=cfg.gateway.session_idle_timeout_s,
        allowed_hosts=cfg.gateway.allowed_hosts
        + ([cfg.gateway.host] if cfg.gateway.host not in ("0.0.0.0", "::", "") else []),
        allowed_origins=cfg.gateway.allowed_origins,
        clock=clock,
        max_sessions_per_grant=cfg.gateway.max_sessions_per_grant,
        max_inflight_per_grant=cfg.gateway.max_inflight_per_grant,
        drain_timeout_s=cfg.gateway.drain_timeout_s,
        schemas=UpstreamSchemas(
            enabled={name for name, srv in cfg.servers.items() if srv.validate_upstream_schema}
        ),
        approvals=LiveApprovals(chain, clock),
        redact_args=redact_args,
    )
    app_server_redact = server_redact  # the config watcher updates it in place (app[SERVER_REDACT_KEY])
    gw = cfg.gateway
    app = App(
        EdgeLimits(
            max_body_bytes=gw.max_body_bytes,
            header_timeout_s=gw.header_timeout_s,
            body_timeout_s=gw.body_timeout_s,
            keepalive_timeout_s=gw.keepalive_timeout_s,
            max_connections=gw.max_connections,
            max_header_line_bytes=gw.max_header_line_bytes,
            max_headers=gw.max_headers,
            lingering_s=min(2.0, gw.body_timeout_s),
        )
    )
    app[PROXY_KEY] = proxy
    app[POLICIES_KEY] = policies
    app[SERVER_REDACT_KEY] = app_server_redact
    from gateway.config_live import ConfigWatcher

    watcher = ConfigWatcher(cfg, proxy, policies, chain, app_server_redact, build_upstreams)
    app[CONFIG_KEY] = watcher
    post = proxy.post
    if trace_incoming:  # only with tracing on: otherwise the hot path has no wrapper at all
        from gateway.observability.propagate import capture

        post = capture(post)
    app.add_post("/mcp/{server}", post)
    app.add_get("/mcp/{server}", proxy.get)
    app.add_delete("/mcp/{server}", proxy.delete)
    app.add_head("/mcp/{server}", proxy.head)
    app.add_get("/healthz", health)
    app.add_head("/healthz", health)
    if cfg.gateway.admin_token:
        app.add_get("/admin/health", health_detail(proxy, cfg.gateway.admin_token))
        from gateway.admin import add_approval_routes

        add_approval_routes(app, cfg.gateway.admin_token, proxy.approvals)
    if admin is not None and cfg.gateway.admin_token:
        from gateway.admin import add_admin_routes

        add_admin_routes(app, cfg.gateway.admin_token, admin, policies.reload, chain)
        from gateway.ui.dashboard import add_ui_routes

        app[UI_KEY] = add_ui_routes(
            app, cfg.gateway.admin_token, admin, policies, chain, ui_events, approvals=proxy.approvals
        )
    if metrics is not None:
        metrics.proxy = proxy
        metrics.addon.bind_policies(policies)
        if cfg.gateway.admin_token:
            app.add_get("/metrics", metrics.handler(cfg.gateway.admin_token))

    async def lifecycle(app: App) -> AsyncIterator[None]:
        for up in upstreams.values():
            await up.start()
        tasks = [
            asyncio.create_task(proxy.expire_sessions(), name="expire-sessions"),
            asyncio.create_task(policies.watch(), name="policy-watch"),
        ]
        if cfg.source.exists():  # a config built in code has no file to watch
            tasks.append(asyncio.create_task(watcher.watch(), name="config-watch"))

        def sighup() -> None:
            policies.reload()
            if cfg.source.exists():
                t = asyncio.create_task(watcher.reload(), name="config-reload")
                tasks.append(t)

        with contextlib.suppress(RuntimeError):  # a loop outside the main thread has no signals
            import signal

            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, sighup)
        yield
        ui = app.get(UI_KEY)
        if ui is not None:
            ui.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        proxy.close_all()
        for up in upstreams.values():
            await up.close()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(proxy.drain)  # SIGTERM: drain, then cut late calls with an error
    return app
