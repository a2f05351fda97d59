"""The `ledgergate` command: run, check, replay, and the subcommands of cli/audit.py, live.py, policy.py."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from gateway.config import Config, ConfigError
from ledgergate.cli import approvals as cli_approvals
from ledgergate.cli import audit as cli_audit
from ledgergate.cli import consume as cli_consume
from ledgergate.cli import live as cli_live
from ledgergate.cli import policy as cli_policy
from ledgergate.cli import tools as cli_tools
from schemas.policy import PolicyError, load_policy

log = logging.getLogger("ledgergate")


class Findings:
    """What `check` found. ``errors`` make `run` refuse to start too (exit 2); ``problems``
    are errors for `check` that `run` meets later on its own: a data dir or listen address it
    cannot use (exit 3 when it opens them), or a stdio command that is not installed (an
    ERROR line at start-up, then it serves the other servers; calls to that one fail)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.problems: list[str] = []
        self.notes: list[str] = []


def _url_problem(url: str) -> str | None:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if not parts.hostname:
        return f"no host in {url!r}"
    if port == 0:
        return f"port 0 in {url!r}"
    return None


def _listen_problem(cfg: Config) -> str | None:
    """Would `run` be able to listen? Resolve the host and try to bind (then let go)."""
    import errno
    import socket

    host, port = cfg.gateway.host, cfg.gateway.port
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve host {host!r}: {exc.strerror}"
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"{cfg.gateway.listen} is in use by another process"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine"
            return f"cannot listen on {cfg.gateway.listen}: {exc.strerror}"
    return None


def _data_dir_problem(cfg: Config) -> str | None:
    d = cfg.data_dir
    if d.exists():
        if not d.is_dir():
            return f"{d} exists and is not a directory"
        return None if os.access(d, os.W_OK | os.X_OK) else f"{d} is not writable"
    parent = d.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {d}: {parent} is not a writable directory"
    return None


def _kafka_problem(bootstrap: str, timeout_s: float = 2.0) -> str | None:
    """None when one of the bootstrap brokers accepts a TCP connection (run would reach it)."""
    import socket

    hosts = [h.strip() for h in bootstrap.split(",") if h.strip()]
    if not hosts:
        return "needs HOST:PORT of at least one Kafka broker"
    for hp in hosts:
        host, sep, port = hp.rpartition(":")
        if not sep or not port.isdigit():
            return f"{hp!r} is not HOST:PORT"
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
            return None
        except OSError:
            continue
    return f"no Kafka broker answers at {bootstrap} (run could not create or reach the topic)"


def _check(cfg_path: str, *, probe_listen: bool = False) -> tuple[Config | None, Findings]:
    """Everything `run` would refuse, all of it (not only the first error)."""
    from eventlog import BACKENDS
    from gateway.config import config_errors, read_toml, stdio_command_problem
    from ledgergate.embedded import data_dir_holder

    found = Findings()
    try:
        data = read_toml(cfg_path)
    except ConfigError as exc:
        found.errors.append(str(exc))
        return None, found
    cfg, errors = config_errors(data, Path(cfg_path))
    found.errors += [str(e) for e in errors]
    if cfg is None:
        return None, found
    src = Path(cfg_path)  # as the user wrote it, like the errors above

    def err(key: str, reason: str) -> None:
        found.errors.append(str(ConfigError(src, key, reason, _env_var(key))))

    if cfg.eventlog.backend == "kafka":
        problem = _kafka_problem(cfg.eventlog.bootstrap)
        if problem:
            err("eventlog.bootstrap", problem)
    if cfg.eventlog.backend not in BACKENDS:
        err(
            "eventlog.backend",
            f"{cfg.eventlog.backend!r} is not available yet: this version has only "
            f'{", ".join(repr(b) for b in BACKENDS)} (the SQLite log in data_dir); use backend = "embedded"',
        )
    store = (cfg.store.clickhouse or "embedded").strip()
    if store != "embedded":
        problem = (
            _url_problem(store)
            if store.startswith(("http://", "https://"))
            else ('must be "embedded" (chDB in data_dir) or a ClickHouse http(s)://host:8123 URL')
        )
        if problem:
            err("store.clickhouse", problem)
    problem = _data_dir_problem(cfg)
    if problem:  # run finds this itself when it opens the log (exit 3, as for the listen address)
        found.problems.append(
            str(ConfigError(src, "gateway.data_dir", problem, _env_var("gateway.data_dir")))
        )
    for name, srv in cfg.servers.items():
        if srv.url is not None:
            problem = _url_problem(srv.url)
            if problem:
                err(f"servers.{name}.url", problem)
        else:
            problem = stdio_command_problem(cfg, name)
            if problem:
                found.problems.append(
                    str(ConfigError(src, f"servers.{name}.command", f"cannot start the server: {problem}"))
                )
            if srv.cwd and not cfg.resolve(srv.cwd).is_dir():
                err(f"servers.{name}.cwd", f"no such directory: {cfg.resolve(srv.cwd)}")
        if not cfg.policy_path(name).is_file():
            continue  # reported above
        try:
            pol = load_policy(cfg.policy_path(name))
        except PolicyError as exc:
            found.errors.append(str(exc))
        else:
            found.notes.append(
                f"server {name}: policy {cfg.policy_path(name)} (version {pol.version[:12]}) ok"
            )
    if probe_listen and not any(e.key == "gateway.listen" for e in errors):
        problem = _listen_problem(cfg)
        holder = data_dir_holder(cfg.data_dir)
        if problem and holder is not None:
            found.notes.append(
                f"gateway.listen: {problem}; a gateway (pid {holder}) is running on {cfg.data_dir}"
            )
        elif problem:
            found.problems.append(
                str(ConfigError(src, "gateway.listen", problem, _env_var("gateway.listen")))
            )
    _check_alerts(cfg, err, found, src)
    for name, grant in cfg.grants.items():
        if grant.key is not None:
            found.notes.append(
                f"grant {name}: WARNING: plain-text key in the config (use key_sha256 outside demos)"
            )
    return cfg, found


def _check_alerts(cfg: Config, err: Any, found: Findings, src: Path) -> None:
    """[[alerts.rules]] / [[alerts.sinks]] beyond their schema: sinks that cannot run here."""
    from consumers.alert_sinks import kafka_bootstrap, sink_problem

    alerts = cfg.alerts
    probed = {cfg.eventlog.bootstrap} if cfg.eventlog.backend == "kafka" else set()  # checked above
    for i, spec in enumerate(alerts.sinks):
        problem = sink_problem(spec, cfg.eventlog)
        if problem:
            err(f"alerts.sinks[{i}].{'bootstrap' if spec.type == 'kafka' else 'type'}", problem)
        elif spec.type == "kafka":
            bootstrap = kafka_bootstrap(spec, cfg.eventlog)
            assert bootstrap is not None
            whence = "its bootstrap" if spec.bootstrap else "[eventlog] bootstrap"
            found.notes.append(
                f"alerts.sinks[{i}] ({spec.key}): topic {spec.topic} on {bootstrap} ({whence})"
            )
            problem = None if bootstrap in probed else _kafka_problem(bootstrap)
            probed.add(bootstrap)
            if problem:  # not an error for run: alerts wait in the sink's queue, retried
                problem = problem.replace(
                    "(run could not create or reach the topic)",
                    "(run starts, but alerts wait in this sink's queue, retried, until one does)",
                )
                found.problems.append(str(ConfigError(src, f"alerts.sinks[{i}].bootstrap", problem)))
        if spec.url is not None:
            problem = _url_problem(spec.url)
            if problem:
                err(f"alerts.sinks[{i}].url", problem)
        if spec.secret_env and not os.environ.get(spec.secret_env):
            err(f"alerts.sinks[{i}].secret_env", f"the environment variable {spec.secret_env} is not set")
    if alerts.rules:
        sinks = ", ".join(s.key for s in alerts.sinks) or "none: alert.fired events on the log only"
        found.notes.append(f"alerts: {len(alerts.rules)} rule(s), sinks: {sinks}")
    elif alerts.sinks:
        found.notes.append("alerts: sinks but no [[alerts.rules]]: no alerts will fire")


def _env_var(key: str) -> str | None:
    """The LEDGERGATE_* variable that set ``key`` (section.key), if one did."""
    section, _, name = key.partition(".")
    var = f"LEDGERGATE_{section.upper()}_{name.upper()}"
    return var if "." not in name and var in os.environ else None


def cmd_check(args: argparse.Namespace) -> int:
    path = args.config_opt or args.config or "ledgergate.toml"
    _, found = _check(path, probe_listen=True)
    for n in found.notes:
        print(n)
    failures = found.errors + found.problems
    for e in failures:
        print(f"error: {e}", file=sys.stderr)
    if failures:
        print(f"{path}: {len(failures)} error{'s' if len(failures) != 1 else ''}", file=sys.stderr)
        return 2
    print(f"{path}: ok")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ledgergate.embedded import StartupError, serve

    cfg, found = _check(args.config)
    if found.errors or cfg is None:
        for e in found.errors:
            print(f"error: {e}", file=sys.stderr)
        return 2
    for n in found.notes:
        if "WARNING" in n:
            log.warning(n)
    if args.listen:
        cfg.gateway.listen = args.listen
    try:
        import uvloop  # type: ignore[import-not-found]

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(
            serve(cfg, ready=lambda url: print(banner(cfg), flush=True), accept_log_gap=args.accept_log_gap)
        )
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        pass
    return 0


SNIPPET = """\
    import asyncio, httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async def main():
        http = httpx2.AsyncClient(headers={{"Authorization": "Bearer {key}"}})
        async with Client(streamable_http_client("{url}", http_client=http)) as c:
            print([t.name for t in (await c.list_tools()).tools])
            for i in range(12):
                r = await c.call_tool("open_session", {{}})
                print(i + 1, r.content[0].text)

    asyncio.run(main())"""


def banner(cfg: Config) -> str:
    host = cfg.gateway.host if cfg.gateway.host not in ("0.0.0.0", "::") else "127.0.0.1"
    base = f"http://{host}:{cfg.gateway.port}"
    lines = ["", f"ledgergate {_version()} listening on {base}"]
    for name in cfg.servers:
        lines.append(f"  server {name:<12} {base}/mcp/{name}   (policy {cfg.policy_path(name)})")
    demo = [(n, g) for n, g in cfg.grants.items() if g.key is not None]
    for name, grant in demo:
        lines.append(f"  demo key of grant {name!r} (agent {grant.agent or name!r}): {grant.key}")
    if demo:
        server = next(iter(cfg.servers))
        import importlib.util

        # say where the SDK is only if it is really there (`make run` installs the example extra)
        if importlib.util.find_spec("mcp") is not None:
            how = f"installed in this Python: {_short(sys.executable)} examples/client.py"
        else:
            how = "not installed here: pip install 'ledgergate[example]', then python examples/client.py"
        lines += [
            "",
            f"Connect with the official MCP SDK ({how}):",
            "",
            SNIPPET.format(key=demo[0][1].key, url=f"{base}/mcp/{server}"),
            "",
        ]
    config = _short(str(cfg.source))
    # the CLI asks this gateway over data_dir/admin.sock: no token, nothing to set
    lines.append(f"Who called what, from another terminal: ledgergate audit who --tool TOOL -c {config}")
    return "\n".join(lines)


def _short(path: str) -> str:
    """``path`` relative to the current directory when it is below it (copy-paste friendly)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ledgergate")
    except PackageNotFoundError:
        return "dev"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ledgergate", description="MCP policy gateway")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--version", action="version", version=f"ledgergate {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="serve the gateway")
    p.add_argument("--config", "-c", default="ledgergate.toml")
    p.add_argument("--listen", help="HOST:PORT, overrides [gateway] listen")
    p.add_argument(
        "--accept-log-gap",
        action="store_true",
        help="serve although the event log went backwards (records lost); records a log.gap event",
    )
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser(
        "check", help="validate a config, its policies, backends, commands and listen address; serve nothing"
    )
    p.add_argument("config", nargs="?", help="the config file (or -c FILE; default ledgergate.toml)")
    p.add_argument("--config", "-c", dest="config_opt", metavar="CONFIG", help="the config file")
    p.set_defaults(fn=cmd_check)
    cli_audit.add_commands(sub)
    cli_live.add_commands(sub)
    cli_policy.add_commands(sub)
    cli_approvals.add_commands(sub)
    cli_tools.add_commands(sub)
    cli_consume.add_commands(sub)
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
