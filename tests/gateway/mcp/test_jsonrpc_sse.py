"""Unit tests of the two parsers on the relay's path: SSE framing and JSON-RPC classification."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.http.sse import SseSplitter, format_event, parse_event
from gateway.mcp import jsonrpc
from gateway.mcp.jsonrpc import InvalidMessage, Kind


def test_events_split_across_chunks_are_relayed_whole_and_unchanged() -> None:
    stream = b'id: 1\nevent: message\ndata: {"a":1}\n\n: keepalive\n\nretry: 100\ndata: x\ndata: y\n\n'
    s = SseSplitter()
    events = [ev for i in range(len(stream)) for ev in s.feed(stream[i : i + 1])]
    assert b"".join(e.raw for e in events) == stream
    assert [e.data for e in events] == [b'{"a":1}', None, b"x\ny"]
    assert events[0].id == b"1" and events[0].event == b"message"
    assert s.pending == b""


def test_crlf_framing() -> None:
    events = list(SseSplitter().feed(b"data: a\r\n\r\ndata: b\r\n\r\n"))
    assert [e.data for e in events] == [b"a", b"b"]


def test_priming_event_has_an_id_and_empty_data() -> None:
    ev = parse_event(b"id: abc\ndata:\n\n")
    assert ev.id == b"abc" and ev.data == b""


@given(
    st.lists(
        st.binary(min_size=0, max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b), max_size=8
    ),
    st.integers(min_value=1, max_value=17),
)
def test_any_chunking_gives_the_same_events(datas: list[bytes], chunk: int) -> None:
    stream = b"".join(format_event(d) for d in datas)
    s = SseSplitter()
    got = [e.data for i in range(0, len(stream), chunk) for e in s.feed(stream[i : i + chunk])]
    assert got == datas


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b'{"jsonrpc":"2.0","id":1,"method":"ping"}', Kind.REQUEST),
        (b'{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"x"}}', Kind.REQUEST),
        (b'{"jsonrpc":"2.0","method":"notifications/initialized"}', Kind.NOTIFICATION),
        (b'{"jsonrpc":"2.0","id":3,"result":{}}', Kind.RESPONSE),
        (b'{"jsonrpc":"2.0","id":3,"error":{"code":1,"message":"m"}}', Kind.RESPONSE),
    ],
)
def test_classify(body: bytes, kind: Kind) -> None:
    assert jsonrpc.parse(body)[1] is kind


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{", -32700),
        (b"", -32700),
        (b"[]", -32600),
        (b"null", -32600),
        (b'{"jsonrpc":"2.0","id":1,"method":5}', -32600),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":[1]}', -32600),
        (b'{"jsonrpc":"2.0","id":{},"method":"x"}', -32600),
        (b'{"id":1,"method":"x"}', -32600),
    ],
)
def test_invalid(body: bytes, code: int) -> None:
    with pytest.raises(InvalidMessage) as err:
        jsonrpc.parse(body)
    assert err.value.code == code


def test_id_text_keeps_types_apart() -> None:
    assert jsonrpc.id_text(1) == "1" and jsonrpc.id_text("1") == '"1"' and jsonrpc.id_text(None) is None
