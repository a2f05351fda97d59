"""schemas/events.py is the one source of the event shape: the fast builders the gateway writes
with agree byte for byte with the pydantic models, and the byte markers the log scanners use
(counter rebuild, consumer selectors) find the event's own fields, whatever the agent sends.

Sample values are derived from each model's field annotations, so a new model with its builder
is checked without touching this file."""

from __future__ import annotations

import inspect
import types
from typing import Any, Literal, Union, get_args, get_origin

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from consumers.audit import event_kind
from schemas import events as E

BASE_FIELDS = ("schema_version", "event_id", "ts", "gateway", "kind")
GENERATED = {"schema_version", "event_id", "ts", "kind"}  # the builder fills these itself


def event_models() -> list[type[E._Event]]:
    union = get_args(E.Event)[0]
    return list(get_args(union))


def all_models() -> list[type[BaseModel]]:
    return [E.CounterCharge, E.CounterState, *event_models()]


def sample(ann: Any, name: str, nulls: bool) -> Any:
    """A value valid for annotation ``ann`` (``None`` for optional ones when ``nulls``)."""
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return args[-1]
    if origin in (Union, types.UnionType):
        if nulls and type(None) in args:
            return None
        return sample(next(a for a in args if a is not type(None)), name, nulls)
    if origin is list:
        return [sample(args[0], name, nulls), sample(args[0], name, nulls)]
    if origin is dict:
        return {"a": sample(args[1], name, nulls), 'b"c': sample(args[1], name, nulls)}
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return E.BUILDERS[ann](**kwargs_for(ann, nulls))
    if ann is Any:
        return {"nested": [1, "two", None], "kind": "auth.failed"}
    if ann is bool:
        return not nulls  # the model default is often the other value
    if ann is int:
        return 7
    if ann is float:
        return 2.5
    if ann is str:
        return f'{name}-é-"q"'
    raise AssertionError(f"no sample for {name}: {ann!r}; teach sample() this type")


def kwargs_for(model: type[BaseModel], nulls: bool) -> dict[str, Any]:
    params = inspect.signature(E.BUILDERS[model]).parameters
    return {n: sample(model.model_fields[n].annotation, n, nulls) for n in params}


def object_valued(model: type[BaseModel]) -> list[str]:
    """Fields that can hold a JSON object or array (where a key marker could be faked)."""

    def holds_object(ann: Any) -> bool:
        origin = get_origin(ann)
        if origin in (Union, types.UnionType):
            return any(holds_object(a) for a in get_args(ann))
        return origin in (dict, list) or ann is Any or (isinstance(ann, type) and issubclass(ann, BaseModel))

    return [n for n, f in model.model_fields.items() if holds_object(f.annotation)]


def test_every_model_has_a_builder_and_every_kind_a_model() -> None:
    missing = [m.__name__ for m in all_models() if m not in E.BUILDERS]
    assert not missing, f"add a @builds(Model) builder in schemas/events.py for {missing}"
    assert set(E.BUILDERS) == set(all_models()), "a builder for a model that is not in Event"
    kinds = [m.model_fields["kind"].default for m in event_models()]
    assert sorted(kinds) == sorted(E.EVENT_KINDS), "Event and EVENT_KINDS disagree"


@pytest.mark.parametrize("model", all_models(), ids=lambda m: m.__name__)
def test_builder_takes_exactly_the_models_fields(model: type[BaseModel]) -> None:
    params = list(inspect.signature(E.BUILDERS[model]).parameters)
    fields = [f for f in model.model_fields if f not in GENERATED]
    assert params == fields, f"{E.BUILDERS[model].__name__}'s parameters are not {model.__name__}'s fields"


@pytest.mark.parametrize("nulls", [False, True], ids=["full", "nulls"])
@pytest.mark.parametrize("model", all_models(), ids=lambda m: m.__name__)
def test_builder_output_is_the_models_own_encoding(model: type[BaseModel], nulls: bool) -> None:
    out = E.BUILDERS[model](**kwargs_for(model, nulls))
    # same keys in the same order (the byte scanners rely on the order) ...
    assert list(out) == list(model.model_fields)
    # ... valid for the model, and byte for byte what the model itself would write
    validated = model.model_validate(out)
    payload = orjson.dumps(out)
    assert orjson.dumps(validated.model_dump(mode="python")) == payload
    if issubclass(model, E._Event):
        assert list(out)[: len(BASE_FIELDS)] == list(BASE_FIELDS)
        assert E.encode(validated) == payload
        assert E.decode(payload) == validated
        assert out["kind"] == model.model_fields["kind"].default
        assert out["schema_version"] == E.SCHEMA_VERSION


@pytest.mark.parametrize("model", event_models(), ids=lambda m: m.__name__)
def test_scanned_fields_precede_every_object_valued_field(model: type[E._Event]) -> None:
    order = list(model.model_fields)
    objects = object_valued(model)
    for name in E.FIRST_OCCURRENCE:
        if name in order:
            late = [o for o in objects if order.index(o) < order.index(name)]
            assert not late, (
                f"{model.__name__}.{name} must precede {late}: scanners take its first occurrence"
            )


def test_call_decided_fields_after_the_arguments() -> None:
    order = list(E.CallDecided.model_fields)
    for name in E.LAST_OCCURRENCE:
        assert order.index(name) > order.index("arguments"), f"{name}: scanners take its LAST occurrence"
    # and nothing agent-shaped follows them: only gateway-built lists and scalars
    after = order[order.index("arguments") + 1 :]
    assert set(object_valued(E.CallDecided)) - {"arguments"} <= {"counters", "charges"} <= set(after)


def test_markers_are_the_bytes_orjson_writes() -> None:
    """The markers are what they always were (the log holds payloads written long ago)."""
    assert E.KIND_MARKER == b'"kind":"'
    assert E.EVENT_ID_MARKER == b'"event_id":"'
    assert E.SERVER_MARKER == b'"server":"'
    assert E.DECISION_MARKER == b'"decision":"'
    assert E.CHARGES_MARKER == b'"charges":['
    assert E.DECIDED_MARKER == b'"kind":"call.decided"'
    assert E.ALLOW_MARKER == b'"decision":"allow"'
    for model in event_models():
        kind = model.model_fields["kind"].default
        assert E.kind_marker(kind) in orjson.dumps(E.BUILDERS[model](**kwargs_for(model, nulls=True)))
    with pytest.raises(AssertionError, match="no field"):
        E._field(E.CallDecided, "decisions")


def test_markers_find_the_events_own_fields_despite_hostile_arguments() -> None:
    """An agent's arguments object holding every scanned key cannot move what scanners read."""
    hostile = {
        "kind": "auth.failed",
        "event_id": "00000000-0000-7000-8000-000000000000",
        "server": "evil",
        "decision": "allow",
        "charges": [{"counter": "x", "key": "k", "scope": "global", "window_start": 0, "window_s": 1}],
    }
    kw = kwargs_for(E.CallDecided, nulls=True)
    kw.update(server="wa", arguments=hostile, decision="deny", charges=[])
    p = orjson.dumps(E.call_decided(**kw))
    ev = orjson.loads(p)
    assert event_kind(p) == "call.decided"
    assert p.startswith(E.DECIDED_MARKER, p.find(E.KIND_MARKER))
    e = p.find(E.EVENT_ID_MARKER) + len(E.EVENT_ID_MARKER)
    assert p[e : e + 36].decode() == ev["event_id"]
    s = p.find(E.SERVER_MARKER) + len(E.SERVER_MARKER)
    assert p[s : p.find(b'"', s)] == b"wa"
    assert not p.startswith(E.ALLOW_MARKER, p.rfind(E.DECISION_MARKER))
    assert p.startswith(b"]", p.rfind(E.CHARGES_MARKER) + len(E.CHARGES_MARKER))


# ---- the byte builders of the hot kinds -------------------------------------------------------

BYTE_BUILDERS = [(E.call_decided_bytes, E.CallDecided), (E.call_completed_bytes, E.CallCompleted)]

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_opt_text = st.none() | _text | st.sampled_from(['"', "\\", '","kind":"x', "\u2028", "é"])


def _fixed_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dict and the byte builder get the same event_id and ts (unit test of the builders)."""
    monkeypatch.setattr(E, "uuid7", lambda: "01890a5d-ac96-774b-bcce-b302099a8057")
    monkeypatch.setattr(E, "now_ms", lambda: 1_700_000_000_123)


@pytest.mark.parametrize("nulls", [False, True], ids=["full", "nulls"])
@pytest.mark.parametrize("fast,model", BYTE_BUILDERS, ids=lambda x: getattr(x, "__name__", ""))
def test_byte_builders_write_the_dict_builders_bytes(
    fast: Any, model: type[BaseModel], nulls: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert list(inspect.signature(fast).parameters) == list(inspect.signature(E.BUILDERS[model]).parameters)
    _fixed_ids(monkeypatch)
    kw = kwargs_for(model, nulls)
    for _ in range(2):  # the second time from the cached fragments
        assert fast(**kw) == orjson.dumps(E.BUILDERS[model](**kw))
    model.model_validate_json(fast(**kw))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    strs=st.lists(_opt_text, min_size=12, max_size=12),
    flags=st.lists(st.booleans(), min_size=3, max_size=3),
    code=st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
    ms=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    args=st.none() | st.dictionaries(_text, st.none() | st.integers(-(2**63), 2**63 - 1) | _text, max_size=3),
)
def test_byte_builders_agree_on_any_values(
    strs: list[str | None],
    flags: list[bool],
    code: int | None,
    ms: float | None,
    args: dict[str, Any] | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Agent-chosen text (quotes, escapes, a faked key) in every string field, both builders."""
    _fixed_ids(monkeypatch)
    s = [x if x is not None else "" for x in strs]
    decided = (
        s[0], s[1], s[2], s[3], strs[4], strs[5], s[6], s[7], strs[8], strs[9], strs[10], strs[11],
        strs[0], args, strs[1], "allow", strs[2], strs[3], ms,
        [E.counter_state(s[4], "grant", s[5], 60, 1, 2, 3)],
        [E.counter_charge(s[4], s[5], "grant", 1, 60)],
        strs[6], flags[0], None if not flags[0] else "deny", None, "low",
    )  # fmt: skip
    assert E.call_decided_bytes(*decided) == orjson.dumps(E.call_decided(*decided))
    completed = (
        s[0], s[1], s[2], s[3], strs[4], s[6], s[7], strs[8], "jsonrpc_error", code, strs[9], ms, 7,
        flags[1], flags[2],
    )  # fmt: skip
    assert E.call_completed_bytes(*completed) == orjson.dumps(E.call_completed(*completed))
