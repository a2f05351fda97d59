"""Incremental Server-Sent Events framing for a streaming relay.

The relay forwards each upstream event's bytes unchanged as soon as the event is
complete, and only looks inside (the `data` field) to find the JSON-RPC response
that ends a call or to rewrite a tools/list result.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

_SEPARATORS = (b"\r\n\r\n", b"\n\n", b"\r\r")


@dataclass(slots=True)
class SseEvent:
    raw: bytes  # the whole event, separator included, exactly as received
    data: bytes | None  # data lines joined by \n; None when the event has no data field
    id: bytes | None
    event: bytes | None


def parse_event(raw: bytes) -> SseEvent:
    data: list[bytes] = []
    eid = etype = None
    has_data = False
    for line in raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            has_data = True
            data.append(value)
        elif field == b"id":
            eid = value
        elif field == b"event":
            etype = value
    return SseEvent(raw, b"\n".join(data) if has_data else None, eid, etype)


class EventTooLarge(ValueError):
    """An SSE event (still incomplete) over the splitter's ``max_event_bytes``."""


class SseSplitter:
    """Feed chunks, get complete events back; keeps the incomplete tail (at most
    ``max_event_bytes``: a longer event raises ``EventTooLarge``, so a stream with no event
    separator cannot grow the relay)."""

    __slots__ = ("_buf", "_max")

    def __init__(self, max_event_bytes: int | None = None) -> None:
        self._buf = b""
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> Iterator[SseEvent]:
        buf = self._buf + chunk if self._buf else chunk
        start = 0
        while True:
            end = -1
            sep_len = 0
            for sep in _SEPARATORS:
                i = buf.find(sep, start)
                if i != -1 and (end == -1 or i < end):
                    end, sep_len = i, len(sep)
            if end == -1:
                break
            if self._max is not None and end - start > self._max:
                raise EventTooLarge(f"an upstream SSE event is over {self._max} bytes")
            yield parse_event(buf[start : end + sep_len])
            start = end + sep_len
        self._buf = buf[start:]
        if self._max is not None and len(self._buf) > self._max:
            self._buf = b""
            raise EventTooLarge(f"an upstream SSE event is over {self._max} bytes")

    @property
    def pending(self) -> bytes:
        return self._buf


def format_event(data: bytes, event_id: str | None = None, event: str = "message") -> bytes:
    head = f"event: {event}\n".encode()
    if event_id is not None:
        head += f"id: {event_id}\n".encode()
    return head + b"data: " + data.replace(b"\n", b"\ndata: ") + b"\n\n"
