"""JSON-RPC 2.0 as MCP uses it: classify one message, build errors. orjson only."""

from __future__ import annotations

from enum import Enum
from typing import Any

import orjson

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
UPSTREAM_UNAVAILABLE = -32000  # the SDKs' CONNECTION_CLOSED
UPSTREAM_TIMEOUT = -32001  # the SDKs' REQUEST_TIMEOUT
POLICY_REFUSED = -32003
UNSUPPORTED_PROTOCOL_VERSION = -32022


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
