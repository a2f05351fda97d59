"""SIGTERM mid-call: every caller is told what happened (issue 17, item 7).

A real `ledgergate run` process with a real stdio child (tests/support/recording_stdio.py)
and a small `[gateway] drain_timeout_s`. Two slow calls are in flight when it gets SIGTERM:
one streams progress (its SSE head is out), one has sent nothing yet (a JSON answer).
Past the drain timeout both are cut: the streamed one gets a JSON-RPC error event, the
other a JSON-RPC error response, before the connection closes. The audit trail (read with
`ledgergate audit sql` once the gateway is gone) records outcome "shutdown" and that the
upstream had not answered, and the record file shows the child did receive both calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import orjson

from tests.support.gateway import start_gateway_process, write_config
from tests.support.hostile import INIT, recorded_calls, recording_stdio_server, sse_messages
from tests.support.procs import stop_process

KEY = "key-shutdown-0123456789"
KEYS = {"qa": KEY}
POLICY = {"version": "1", "default": "allow", "tools": {}}


async def request(base: str, body: bytes, session: str | None = None) -> tuple[asyncio.StreamReader, Any]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        b"POST /mcp/rec HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n" % KEY.encode()
    )
    if session:
        head += b"Mcp-Session-Id: %s\r\n" % session.encode()
    writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    await writer.drain()
    return reader, writer


def split(data: bytes) -> tuple[bytes, dict[str, str], bytes]:
    head, _, rest = data.partition(b"\r\n\r\n")
    headers = {}
    for ln in head.split(b"\r\n")[1:]:
        k, _, v = ln.partition(b":")
        headers[k.decode().strip().lower()] = v.decode().strip()
    if headers.get("transfer-encoding") == "chunked":
        out, data = b"", rest
        while data:
            size, _, data = data.partition(b"\r\n")
            n = int(size.split(b";")[0] or b"0", 16)
            if n == 0:
                break
            out, data = out + data[:n], data[n + 2 :]
        rest = out
    return head.split(b"\r\n")[0], headers, rest


def tools_call(rid: str, args: dict[str, Any], token: str | None = None) -> bytes:
    params: dict[str, Any] = {"name": "slow", "arguments": args}
    if token:
        params["_meta"] = {"progressToken": token}
    return orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params})


async def audit_sql(config: Path, sql: str) -> list[dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ledgergate",
        "audit",
        "sql",
        sql,
        "--format",
        "json",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def test_sigterm_cuts_late_calls_with_a_jsonrpc_error_and_an_audited_shutdown_outcome(
    tmp_path: Path,
) -> None:
    record = tmp_path / "record.log"
    config = write_config(
        tmp_path,
        servers={"rec": recording_stdio_server(record)},
        policies={"rec": POLICY},
        grants=KEYS,
        gateway={"drain_timeout_s": 1.0, "upstream_timeout_s": 60.0},
    )
    gw, base = start_gateway_process(config, tmp_path / "gateway.log")
    try:
        r, w = await request(base, INIT)
        _, headers, _ = split(await r.read())
        w.close()
        sid = headers["mcp-session-id"]
        r, w = await request(base, b'{"jsonrpc":"2.0","method":"notifications/initialized"}', sid)
        await r.read()
        w.close()

        # streamed: progress every 0.1 s, so its SSE head and first event are out
        sr, sw = await request(base, tools_call("streamed", {"seconds": 60, "every": 0.1}, "tok"), sid)
        first = await asyncio.wait_for(sr.readuntil(b"\n\n"), 30)  # the head
        first += await asyncio.wait_for(sr.readuntil(b"\n\n"), 30)  # the first progress event
        assert b"text/event-stream" in first and b"notifications/progress" in first, first
        # quiet: nothing comes before its answer, so no head goes out
        qr, qw = await request(base, tools_call("quiet", {"seconds": 60}), sid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(recorded_calls(record)) < 2:
            assert loop.time() < deadline, "the child never got the quiet call"
            await asyncio.sleep(0.02)

        os.kill(gw.pid, signal.SIGTERM)  # the gateway only, as a service manager does
        streamed = first + await asyncio.wait_for(sr.read(), 30)
        quiet = await asyncio.wait_for(qr.read(), 30)
        sw.close()
        qw.close()
        assert await asyncio.wait_for(loop.run_in_executor(None, gw.proc.wait), 30) == 0
    finally:
        stop_process(gw)

    # the streamed call: its progress, then a JSON-RPC error event naming the shutdown
    status, _, body = split(streamed)
    assert b" 200 " in status
    msgs = sse_messages(body)
    assert any(m.get("method") == "notifications/progress" for m in msgs)
    err = msgs[-1]
    assert err["id"] == "streamed" and "error" in err, msgs[-3:]
    assert "shut down before this call finished" in err["error"]["message"]
    assert "the upstream had not answered" in err["error"]["message"]
    assert err["error"]["data"] == {"upstream": "rec", "shutdown": True, "upstream_answered": False}
    # the quiet call: a whole JSON-RPC error response
    status, headers, body = split(quiet)
    assert b" 200 " in status and headers["content-type"].startswith("application/json")
    doc = orjson.loads(body)
    assert doc["id"] == "quiet" and "drain timeout 1 s" in doc["error"]["message"], doc

    # the upstream executed both calls (it read them); the audit trail says both were cut
    rows = await audit_sql(
        config,
        "SELECT c.request_id AS request_id, c.decision AS decision, o.outcome AS outcome, "
        "o.upstream_answered AS upstream_answered, o.error_message AS error_message "
        "FROM audit_calls AS c FINAL JOIN audit_outcomes AS o FINAL ON o.call_id = c.call_id "
        "WHERE c.tool = 'slow' ORDER BY request_id",
    )
    assert [(r["request_id"], r["decision"], r["outcome"], r["upstream_answered"]) for r in rows] == [
        ('"quiet"', "allow", "shutdown", False),
        ('"streamed"', "allow", "shutdown", False),
    ], rows
    assert all("drain timeout 1 s" in r["error_message"] for r in rows)
    assert len(recorded_calls(record)) == 2
