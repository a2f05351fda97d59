"""`ledgergate` command line: the composition root (the only place wiring gateway and consumers)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from gateway.config import Config, ConfigError, load_config
from ledgergate.cli import audit as cli_audit
from schemas.policy import PolicyError, load_policy

log = logging.getLogger("ledgergate")


def _check(cfg_path: str) -> tuple[Config, list[str]]:
    cfg = load_config(cfg_path)
    notes = []
    for name in cfg.servers:
        pol = load_policy(cfg.policy_path(name))
        notes.append(f"server {name}: policy {cfg.policy_path(name)} (version {pol.version[:12]}) ok")
    for name, grant in cfg.grants.items():
        if grant.key is not None:
            notes.append(
                f"grant {name}: WARNING: plain-text key in the config (use key_sha256 outside demos)"
            )
    return cfg, notes


def cmd_check(args: argparse.Namespace) -> int:
    try:
        _, notes = _check(args.config)
    except (ConfigError, PolicyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for n in notes:
        print(n)
    print(f"{args.config}: ok")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ledgergate.embedded import StartupError, serve

    try:
        cfg, notes = _check(args.config)
    except (ConfigError, PolicyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for n in notes:
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
        runner(serve(cfg, ready=lambda url: print(banner(cfg), flush=True)))
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
        lines += [
            "",
            "Connect with the official MCP SDK (in this venv: .venv/bin/python examples/client.py):",
            "",
            SNIPPET.format(key=demo[0][1].key, url=f"{base}/mcp/{server}"),
            "",
        ]
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ledgergate")
    except PackageNotFoundError:
        return "dev"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ledgergate", description="MCP policy gateway")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="serve the gateway")
    p.add_argument("--config", "-c", default="ledgergate.toml")
    p.add_argument("--listen", help="HOST:PORT, overrides [gateway] listen")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("check", help="validate a config and its policies without serving")
    p.add_argument("config")
    p.set_defaults(fn=cmd_check)
    cli_audit.add_commands(sub)
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
