"""JSON-RPC 2.0 as MCP uses it: classify one message, build errors. orjson only."""

from __future__ import annotations

import unicodedata
from enum import Enum
from typing import Any

import orjson

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
UPSTREAM_UNAVAILABLE = -32000  # the SDKs' CONNECTION_CLOSED
UPSTREAM_TIMEOUT = -32001  # the SDKs' REQUEST_TIMEOUT
POLICY_REFUSED = -32003
UNSUPPORTED_PROTOCOL_VERSION = -32022


# The methods of MCP (2024-11-05 .. 2025-11-25), both directions. A method that differs from
# one of these only by case, Unicode compatibility form or surrounding whitespace is refused:
# the policy matches methods exactly, so an upstream that normalised "Tools/Call" would run an
# unpoliced tools/call.
MCP_METHODS = frozenset(
    {
        "initialize",
        "ping",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "tasks/get",
        "tasks/result",
        "tasks/list",
        "tasks/cancel",
        "sampling/createMessage",
        "elicitation/create",
        "roots/list",
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/progress",
        "notifications/message",
        "notifications/roots/list_changed",
        "notifications/resources/updated",
        "notifications/resources/list_changed",
        "notifications/tools/list_changed",
        "notifications/prompts/list_changed",
        "notifications/elicitation/complete",
        "notifications/tasks/status",
    }
)
_FOLDED = {m.casefold(): m for m in MCP_METHODS}
# Unicode categories never found in a method name: controls, format characters, separators
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})


def method_problem(method: str) -> str | None:
    """Why `method` is refused as a JSON-RPC method name, or None when it is acceptable."""
    if method in MCP_METHODS:
        return None
    if any(unicodedata.category(c) in _BAD_CATEGORIES for c in method):
        return '"method" must not contain whitespace or control characters'
    twin = _FOLDED.get(unicodedata.normalize("NFKC", method).casefold())
    if twin is not None:
        return f'"method" {method!r} differs from {twin!r} only by case or form'
    return None


class Kind(Enum):
    REQUEST = "request"
    NOTIFICATION = "notification"
    RESPONSE = "response"


class InvalidMessage(ValueError):
    def __init__(self, code: int, message: str, id: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.id = code, message, id


def parse(body: bytes) -> tuple[dict[str, Any], Kind]:
    """Parse one POSTed message; raise InvalidMessage with the JSON-RPC code to answer."""
    try:
        msg = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(PARSE_ERROR, f"Parse error: {exc}") from None
    if isinstance(msg, list):
        raise InvalidMessage(
            INVALID_REQUEST,
            "Invalid Request: JSON-RPC batching is not supported by the MCP protocol "
            "(removed in 2025-06-18); send one message per POST",
        )
    if not isinstance(msg, dict):
        raise InvalidMessage(INVALID_REQUEST, "Invalid Request: the body must be one JSON-RPC 2.0 object")
    return msg, classify(msg)


def classify(msg: dict[str, Any]) -> Kind:
    mid = msg.get("id")
    if msg.get("jsonrpc") != "2.0":
        raise InvalidMessage(INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"', _safe_id(mid))
    method = msg.get("method")
    if method is not None:
        if not isinstance(method, str) or not method:
            raise InvalidMessage(INVALID_REQUEST, 'Invalid Request: "method" must be a string', _safe_id(mid))
        problem = method_problem(method)
        if problem is not None:
            raise InvalidMessage(INVALID_REQUEST, f"Invalid Request: {problem}", _safe_id(mid))
        params = msg.get("params")
        if params is not None and not isinstance(params, dict):
            raise InvalidMessage(
                INVALID_REQUEST, 'Invalid Request: "params" must be an object', _safe_id(mid)
            )
        if "id" not in msg:
            return Kind.NOTIFICATION
        if not isinstance(mid, (str, int)) or isinstance(mid, bool):
            raise InvalidMessage(INVALID_REQUEST, 'Invalid Request: "id" must be a string or an integer')
        return Kind.REQUEST
    if "id" in msg and ("result" in msg or "error" in msg):
        return Kind.RESPONSE
    raise InvalidMessage(
        INVALID_REQUEST,
        "Invalid Request: not a JSON-RPC request, notification or response",
        _safe_id(mid),
    )


def _safe_id(mid: Any) -> Any:
    return mid if isinstance(mid, (str, int)) and not isinstance(mid, bool) else None


def error(id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": id, "error": err}


def error_bytes(id: Any, code: int, message: str, data: Any = None) -> bytes:
    return orjson.dumps(error(id, code, message, data))


def id_text(mid: Any) -> str | None:
    """The JSON-RPC id as JSON text (keeps 1 and "1" apart), for the audit trail."""
    return None if mid is None else orjson.dumps(mid).decode()


def members(msg: dict[str, Any]) -> dict[str, Any]:
    """Only the JSON-RPC members of a parsed (classified) message: what the gateway forwards.

    Other top-level members are dropped, so an upstream sees exactly what was decided on.
    """
    if "method" in msg:
        out: dict[str, Any] = {"jsonrpc": "2.0"}
        if "id" in msg:
            out["id"] = msg["id"]
        out["method"] = msg["method"]
        if msg.get("params") is not None:
            out["params"] = msg["params"]
        return out
    if "error" in msg:
        return {"jsonrpc": "2.0", "id": msg.get("id"), "error": msg["error"]}
    return {"jsonrpc": "2.0", "id": msg.get("id"), "result": msg.get("result")}


# characters some line readers (str.splitlines, JavaScript) take as line ends; orjson leaves
# them raw inside strings, where the JSON escape means the same
_LINE_SEPARATORS = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"), (b"\xc2\x85", b"\\u0085"))


def line(msg: dict[str, Any]) -> bytes:
    """One message as one line for a stdio upstream, serialised by the gateway, never the client.

    JSON allows raw CR/LF between tokens, and a stdio server reads one message per line, so
    client bytes could carry a second message. orjson's output is compact (no whitespace
    between tokens) and escapes every control character inside strings; the Unicode line
    separators are escaped here too. The result ends with the only newline it holds.
    """
    data = orjson.dumps(msg)
    for raw, esc in _LINE_SEPARATORS:
        if raw in data:
            data = data.replace(raw, esc)
    if b"\n" in data or b"\r" in data:  # cannot happen with orjson; refuse rather than trust that
        raise ValueError("a serialised message holds a raw line break")
    return data + b"\n"
