"""Transparent streaming front for MCP Streamable HTTP that adds one header.

The official conformance client cannot send headers, so this sits in front of an authenticating
gateway: every request, whatever its path (e.g. http://127.0.0.1:PORT/mcp), goes to TARGET_URL
(path included, e.g. http://127.0.0.1:G/mcp/conformance; the request's query string, if any, is
appended) unchanged -- method, body, Host and all other headers -- plus `Authorization: Bearer KEY`.
The answer streams back chunk by chunk (SSE and server-to-client requests pass, nothing is
buffered), with the upstream's status and headers; the body stays encoded as the upstream sent it.
An unreachable target answers 502.

usage: python inject_auth.py TARGET_URL PORT KEY [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
        "authorization",
    }
)
TARGET_KEY = web.AppKey("target", str)
AUTH_KEY = web.AppKey("auth", str)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)


async def handle(req: web.Request) -> web.StreamResponse:
    app = req.app
    headers = {k: v for k, v in req.headers.items() if k.lower() not in HOP}
    headers["Authorization"] = app[AUTH_KEY]
    body = await req.read()
    target = app[TARGET_KEY]
    if req.query_string:
        target += ("&" if "?" in target else "?") + req.query_string
    try:
        up = await app[SESSION_KEY].request(
            req.method,
            target,
            headers=headers,
            data=body or None,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        )
    except aiohttp.ClientError as e:
        return web.Response(status=502, text=f"inject_auth: upstream {target} unreachable: {e}\n")
    out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
    resp = web.StreamResponse(status=up.status, reason=up.reason, headers=out)
    try:
        await resp.prepare(req)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client went away mid-stream (e.g. closed its GET SSE stream): drop the upstream side too
    finally:
        up.release()
    return resp


def make_app(target: str, key: str) -> web.Application:
    """The aiohttp app: any method, any path -> `target`, with `Authorization: Bearer key` added."""
    app = web.Application(client_max_size=8 << 20)
    app[TARGET_KEY] = target
    app[AUTH_KEY] = f"Bearer {key}"

    async def session(app: web.Application):
        app[SESSION_KEY] = aiohttp.ClientSession(
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            connector=aiohttp.TCPConnector(limit=0),
        )
        yield
        await app[SESSION_KEY].close()

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Forward every request to TARGET_URL adding a Bearer token.")
    ap.add_argument("target", metavar="TARGET_URL")
    ap.add_argument("port", metavar="PORT", type=int)
    ap.add_argument("key", metavar="KEY")
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args(argv)
    web.run_app(
        make_app(args.target, args.key), host=args.host, port=args.port, print=None, shutdown_timeout=1.0
    )


if __name__ == "__main__":
    main()
