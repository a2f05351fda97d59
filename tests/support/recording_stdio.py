"""A tiny real stdio MCP server that records every raw line it reads (hostile-input tests).

Each line read from stdin is appended, exactly as received, to the file named by
$RECORD_FILE (flushed before the message is handled), so a test can assert what the
upstream got byte for byte: how many lines, and which methods it executed.

Newline-delimited JSON-RPC, as the stdio transport of MCP; a line ends at LF, CR or CRLF.
It answers initialize, ping,
tools/list and tools/call with the tools:
- echo(text)            returns the text
- delete_everything()   a tool the tests' policies deny (it must never run)
- counter(n)            returns n (used to count calls against a rate limit)
- flood(count, size)    sends `count` notifications/message of `size` bytes, then answers;
                        stops at once when the call is cancelled (notifications/cancelled)
- ask()                 sends the client a ping request (id "srv-1", "srv-2"...) and answers
                        the tool call with the client's response once it arrives
- pid()                 returns this process's pid (a test sees a restarted child)
- hang(stop_reading)    never answers; with stop_reading=true the process also stops reading
                        stdin for good (its pipe fills: a hung child)
- slow(seconds, every)  answers "slept" after `seconds` (other calls are served meanwhile);
                        with every > 0 it sends, every `every` seconds, a notifications/progress
                        (when the call has a progressToken) or else a notifications/message
Notifications are recorded and otherwise ignored. Lines that are not JSON are recorded
and ignored (a real server would log them).
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time

RECORD = open(os.environ["RECORD_FILE"], "ab", buffering=0)  # lives as long as the process
OUT = sys.stdout.buffer

TOOLS = [
    {"name": n, "description": d, "inputSchema": {"type": "object"}}
    for n, d in (
        ("echo", "echo the text"),
        ("delete_everything", "must never run"),
        ("counter", "returns n"),
        ("flood", "many log notifications"),
        ("ask", "asks the client"),
        ("pid", "returns the pid"),
        ("hang", "never answers"),
        ("slow", "answers late"),
    )
]
_out_lock = threading.Lock()  # slow() answers from its own thread
STOP_READING = threading.Event()


def send(msg: dict) -> None:
    with _out_lock:
        OUT.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
        OUT.flush()


def _slow(mid, seconds: float, every: float, token: object) -> None:
    end = time.monotonic() + seconds
    i = 0
    while (left := end - time.monotonic()) > 0:
        if every > 0:
            time.sleep(min(every, left))
            i += 1
            if token is not None:  # progress of this call, routed to its stream by the token
                params = {"progressToken": token, "progress": i}
                send({"jsonrpc": "2.0", "method": "notifications/progress", "params": params})
            else:
                send(
                    {
                        "jsonrpc": "2.0",
                        "method": "notifications/message",
                        "params": {"level": "info", "data": i},
                    }
                )
        else:
            time.sleep(left)
    text(mid, "slept")


def result(mid, res: dict) -> None:
    send({"jsonrpc": "2.0", "id": mid, "result": res})


def text(mid, t: str) -> None:
    result(mid, {"content": [{"type": "text", "text": t}], "isError": False})


_asked = 0
_waiting: dict[str, object] = {}  # our request id -> the tools/call id waiting for the answer


def handle(msg: dict) -> None:
    global _asked
    method = msg.get("method")
    mid = msg.get("id")
    if method is None:  # a response to one of our requests
        call = _waiting.pop(str(msg.get("id")), None)
        if call is not None:
            text(call, "client answered: " + json.dumps(msg.get("result", msg.get("error"))))
        return
    if "id" not in msg:
        return  # a notification
    params = msg.get("params") or {}
    if method == "initialize":
        result(
            mid,
            {
                "protocolVersion": params.get("protocolVersion", "2025-06-18"),
                "capabilities": {"tools": {}, "logging": {}},
                "serverInfo": {"name": "recording-stdio", "version": "1"},
            },
        )
    elif method == "ping":
        result(mid, {})
    elif method == "tools/list":
        result(mid, {"tools": TOOLS})
    elif method == "tools/call":
        name = params.get("name")
        args = params.get("arguments") or {}
        if name == "echo":
            text(mid, str(args.get("text", "")))
        elif name == "delete_everything":
            text(mid, "deleted everything")
        elif name == "counter":
            text(mid, str(args.get("n")))
        elif name == "flood":
            # after=true answers first, so the flood finds no call in flight (GET streams get it)
            if args.get("after"):
                text(mid, "flooding")
            blob = "x" * int(args.get("size", 1024))
            for i in range(int(args.get("count", 10))):
                if mid in CANCELLED:
                    return
                send(
                    {
                        "jsonrpc": "2.0",
                        "method": "notifications/message",
                        "params": {"level": "info", "data": f"{i} {blob}"},
                    }
                )
            if not args.get("after"):
                text(mid, "flooded")
        elif name == "pid":
            text(mid, str(os.getpid()))
        elif name == "hang":
            if args.get("stop_reading"):
                STOP_READING.set()
        elif name == "slow":
            threading.Thread(
                target=_slow,
                args=(
                    mid,
                    float(args.get("seconds", 1)),
                    float(args.get("every", 0)),
                    (params.get("_meta") or {}).get("progressToken"),
                ),
                daemon=True,
            ).start()
        elif name == "ask":
            _asked += 1
            rid = f"srv-{_asked}"
            _waiting[rid] = mid
            send({"jsonrpc": "2.0", "id": rid, "method": "ping"})
        else:
            send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32602, "message": f"no tool {name}"}})
    else:
        send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32601, "message": f"no method {method}"}})


def lines():
    """Lines ended by LF, CR or CRLF: the most permissive framing a stdio server may use
    (Python's text mode splits on all three), so a smuggled CR shows up here too."""
    buf = b""
    while chunk := os.read(0, 1 << 16):
        buf += chunk
        while True:
            i = min((j for j in (buf.find(b"\n"), buf.find(b"\r")) if j >= 0), default=-1)
            if i < 0:
                break
            yield buf[:i]
            buf = buf[i + 1 :]
    if buf:
        yield buf


CANCELLED: set[object] = set()  # request ids named by notifications/cancelled (flood stops)
INBOX: queue.Queue[bytes | None] = queue.Queue()


def read_stdin() -> None:
    """Record each line as it arrives (a thread, so a flood in progress still sees a cancel)."""
    for raw in lines():
        if not raw.strip():
            continue  # the empty "line" between CR and LF
        RECORD.write(raw + b"\n")
        try:
            msg = json.loads(raw)
        except ValueError:
            continue
        if isinstance(msg, dict) and msg.get("method") == "notifications/cancelled":
            CANCELLED.add((msg.get("params") or {}).get("requestId"))
        INBOX.put(raw)
        if STOP_READING.is_set() or (isinstance(msg, dict) and _stops_reading(msg)):
            threading.Event().wait()  # a hung child: stdin is never read again
    INBOX.put(None)


def _stops_reading(msg: dict) -> bool:
    params = msg.get("params") or {}
    return (
        msg.get("method") == "tools/call"
        and params.get("name") == "hang"
        and bool((params.get("arguments") or {}).get("stop_reading"))
    )


def main() -> None:
    threading.Thread(target=read_stdin, daemon=True).start()
    while (raw := INBOX.get()) is not None:
        try:
            msg = json.loads(raw)
        except ValueError:
            continue
        if isinstance(msg, dict):
            handle(msg)


if __name__ == "__main__":
    main()
