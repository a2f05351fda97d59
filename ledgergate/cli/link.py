"""How a CLI command reaches the running gateway: one function, ``find_gateway``, for every
command that needs it (``audit``, ``replay``'s refusal, and later ``approvals``, ``alerts tail``).

The order:

1. the local admin socket, with no token: a gateway serving ``data_dir`` names it in
   ``data_dir/lock`` (``admin_socket PATH``, next to its pid); mode 0600, so it answers
   the gateway's own user (and root) only: the file's permissions are the credential;
2. TCP at ``[gateway] listen`` with ``[gateway] admin_token``, when one is configured (remote
   HTTP access, or a CLI run by another user);
3. no gateway running: ``None``, the caller opens the log and store itself;
4. a gateway runs but neither way can ask it: a ``CliError`` saying why and what to do.

    link = await find_gateway(cfg)
    if link is not None:
        async with link.session(aiohttp.ClientTimeout(total=30)) as http:
            async with http.get(link.url("/admin/health")) as resp: ...
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import aiohttp
import orjson

from gateway.config import Config, ConfigError, load_config

HEALTH_TIMEOUT_S = 1.5


class CliError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class GatewayLink:
    """A way to the running gateway's admin API: its socket (no token) or TCP (token)."""

    base: str  # URL prefix; over the socket the host part is only a formality
    token: str | None = None
    unix_socket: str | None = None
    pid: int | None = None  # the gateway's, when its lock file names it

    @property
    def where(self) -> str:
        """For messages: which gateway, reached how."""
        if self.unix_socket is not None:
            pid = f" (pid {self.pid})" if self.pid is not None else ""
            return f"the gateway{pid} on its admin socket {self.unix_socket}"
        return f"the gateway at {self.base}"

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def session(self, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
        """An HTTP session toward the gateway (the caller closes it: ``async with``)."""
        return session(timeout, self.token, self.unix_socket)


def gateway_url(cfg: Config) -> str:
    host = cfg.gateway.host
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.gateway.port}"


def session(
    timeout: aiohttp.ClientTimeout, token: str | None = None, unix_socket: str | None = None
) -> aiohttp.ClientSession:
    """An HTTP session toward the gateway: over TCP with the admin token, or (``unix_socket``)
    over the gateway's local socket, where no token is needed."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    connector = aiohttp.UnixConnector(path=unix_socket) if unix_socket else None
    return aiohttp.ClientSession(timeout=timeout, headers=headers, connector=connector)


async def health_problem(
    base: str, timeout_s: float = HEALTH_TIMEOUT_S, *, unix_socket: str | None = None
) -> str | None:
    """None when a ledgergate gateway answers GET /healthz (``{"ok": true}``) at ``base``, else
    why not: ``refused`` (nothing listens: a stale socket file), ``permission denied`` (a
    socket of another user), or what went wrong."""
    try:
        async with (
            session(aiohttp.ClientTimeout(total=timeout_s), unix_socket=unix_socket) as http,
            http.get(f"{base}/healthz") as resp,
        ):
            if resp.status != 200:
                return f"GET /healthz answered HTTP {resp.status}"
            doc = orjson.loads(await resp.read())
            if isinstance(doc, dict) and doc.get("ok") is True:
                return None
            return "GET /healthz did not answer as a ledgergate gateway"
    except aiohttp.ClientConnectorError as exc:
        code = exc.os_error.errno if exc.os_error is not None else None
        if code in (errno.EACCES, errno.EPERM):
            return "permission denied"
        if code in (errno.ECONNREFUSED, errno.ENOENT):
            return "refused"
        return str(exc.os_error or exc)
    except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError) as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def gateway_answers(
    base: str, timeout_s: float = HEALTH_TIMEOUT_S, *, unix_socket: str | None = None
) -> bool:
    """A ledgergate gateway answers GET /healthz at ``base`` (``{"ok": true, ...}``)."""
    return await health_problem(base, timeout_s, unix_socket=unix_socket) is None


async def find_gateway(cfg: Config) -> GatewayLink | None:
    """The running gateway of ``cfg``'s data dir: over its socket, else over TCP with the
    admin token; None when no gateway runs (open the store locally). Raises CliError when a
    gateway runs but cannot be asked (its socket is another user's and no token is set)."""
    from ledgergate.embedded import admin_socket

    pid, path = admin_socket(cfg.data_dir)
    socket_problem: str | None = None
    if path is not None:
        socket_problem = await health_problem("http://localhost", unix_socket=str(path))
        if socket_problem is None:
            return GatewayLink("http://localhost", unix_socket=str(path), pid=pid)
    base = gateway_url(cfg)
    tcp_up = await gateway_answers(base)
    if tcp_up and cfg.gateway.admin_token:
        return GatewayLink(base, token=cfg.gateway.admin_token, pid=pid)
    if socket_problem == "permission denied":
        raise CliError(
            3,
            f"a gateway{f' (pid {pid})' if pid else ''} serves {cfg.data_dir}, but its admin socket {path} "
            "is owner-only and you are not its owner: run this as the user running the gateway, or "
            f"set [gateway] admin_token in {cfg.source} (and restart the gateway) to ask it over HTTP",
        )
    if tcp_up:  # a gateway listens but has no socket here we can use, and no token is set
        why = f" (its admin socket {path}: {socket_problem})" if path is not None and socket_problem else ""
        raise CliError(
            2,
            f"a gateway is running at {base} and holds the store, but it does not answer on an admin "
            f"socket in {cfg.data_dir}{why}: set [gateway] admin_token in {cfg.source} (and restart the "
            "gateway) to ask it over HTTP, or stop it",
        )
    return None  # no gateway: the caller opens the store (a data dir still held says by whom)


def load_cli_config(path: str) -> Config:
    """The config a CLI command was given; a broken file is exit 2 with file, key and reason."""
    try:
        return load_config(path)
    except ConfigError as exc:
        raise CliError(2, str(exc)) from None
