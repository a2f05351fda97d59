"""gateway.audit.redaction: path masks, default secret-key masks, args_sha256."""

from __future__ import annotations

import copy
import hashlib

import orjson
from hypothesis import given
from hypothesis import strategies as st

from gateway.audit.redaction import MASK, args_sha256, is_sensitive_key, redact


def test_paths_mask_values() -> None:
    args = {
        "phone_number": "+1",
        "content": "hi",
        "credentials": {"user": "u", "pin": 1234},
        "a": {"b": 1, "c": 2},
        "items": [{"body": "x", "id": 1}, {"body": "y", "id": 2}],
    }
    out = redact(args, ["content", "credentials.*", "a.b", "items.body", "missing.path"])
    assert out == {
        "phone_number": "+1",
        "content": MASK,
        "credentials": {"user": MASK, "pin": MASK},
        "a": {"b": MASK, "c": 2},
        "items": [{"body": MASK, "id": 1}, {"body": MASK, "id": 2}],
    }


def test_default_sensitive_keys_at_any_depth() -> None:
    args = {
        "apiKey": "k",
        "x_api_key": "k",
        "GREENAPI_API_TOKEN": "t",
        "Authorization": "Bearer z",
        "nested": [{"password": "p", "client_secret": "s", "ok": 1}],
        "api-key": "k",
        "name": "n",
    }
    out = redact(args, [])
    assert out == {
        "apiKey": MASK,
        "x_api_key": MASK,
        "GREENAPI_API_TOKEN": MASK,
        "Authorization": MASK,
        "nested": [{"password": MASK, "client_secret": MASK, "ok": 1}],
        "api-key": MASK,
        "name": "n",
    }
    assert not is_sensitive_key("phone_number") and is_sensitive_key("refreshToken")


def test_none_and_input_untouched() -> None:
    assert redact(None, ["x"]) is None
    args = {"content": {"deep": "v"}, "token": "t"}
    before = copy.deepcopy(args)
    redact(args, ["content.deep"])
    assert args == before


def test_args_sha256_is_of_the_canonical_original() -> None:
    args = {"b": 1, "a": {"y": [1, 2], "x": "é"}}
    expected = hashlib.sha256(orjson.dumps(args, option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert args_sha256(args) == expected == args_sha256({"a": {"x": "é", "y": [1, 2]}, "b": 1})
    assert args_sha256(args) != args_sha256(redact(args, ["b"]))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=10,
)


@given(
    st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    st.lists(st.sampled_from(["a", "a.b", "*", "x.*", "content"]), max_size=3),
)
def test_redact_properties(args: dict, paths: list[str]) -> None:
    before = copy.deepcopy(args)
    once = redact(args, paths)
    assert args == before  # pure
    assert redact(once, paths) == once  # idempotent
    assert set(once) == set(args)  # keys kept, only values masked
    for k in args:
        if is_sensitive_key(k):
            assert once[k] == MASK
