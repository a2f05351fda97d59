"""The ClickHouse DDL (schemas/clickhouse/*.sql) agrees with the event models of schemas/events.py.

The schema is created in the real engine (chDB) and read back from system.columns /
system.tables, so what is checked is what ClickHouse made of the SQL. The consumers insert
payloads as-is (JSONEachRow, input_format_skip_unknown_fields=1): a model field with no
column would be dropped without a word, and a column no event fills stays empty forever.

- inbox (Null) tables: every column is a field of a kind routed there, with a compatible
  type; every field of those kinds is a column, unless the inbox is a deliberate subset
  (counters_in);
- materialized views: each one's WHERE names kinds routed to its inbox; every column it
  writes is a field of those kinds (or a declared computed column), with a compatible type
  in the target table; every field of those kinds reaches the target of a full copy."""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import pytest_asyncio
from pydantic import BaseModel

from consumers.audit import AuditConsumer
from consumers.counters import CountersConsumer
from consumers.store import open_store
from schemas import events as E

# inbox -> the kinds the consumers insert into it (from the consumers themselves)
ROUTES: dict[str, frozenset[str]] = {
    AuditConsumer.table: AuditConsumer._calls,
    AuditConsumer.security_table: AuditConsumer._security,
    AuditConsumer.alerts_table: AuditConsumer._alerts,
    AuditConsumer.approvals_table: AuditConsumer._approvals,
    CountersConsumer.table: frozenset(CountersConsumer.kinds),
}
# inboxes that deliberately keep only some fields (everything else stores every field)
SUBSET_INBOXES = {CountersConsumer.table}
# tables that aggregate some fields of their events (not full copies), whichever inbox feeds
# them: counters_minute from counters_in (002) and from audit_events_in (009)
AGGREGATES = {"counters_minute"}
# columns a view computes rather than copies from a field
COMPUTED = {"counters_minute_mv": {"minute", "calls"}, "counters_minute_audit_mv": {"minute", "calls"}}

MODELS: dict[str, type[E._Event]] = {
    m.model_fields["kind"].default: m for m in get_args(get_args(E.Event)[0])
}


@dataclass
class View:
    name: str
    source: str
    target: str
    kinds: list[str]
    columns: dict[str, str]  # what the view writes: name -> type


@dataclass
class Catalog:
    columns: dict[str, dict[str, str]]  # table -> column -> type
    inboxes: list[str]
    views: list[View]


@pytest_asyncio.fixture(scope="module")
async def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    store = await open_store("embedded", Path(tmp_path_factory.mktemp("ddl")))
    try:
        _, cols = await store.query(
            "SELECT table, name, type FROM system.columns WHERE database = currentDatabase() "
            "ORDER BY table, position"
        )
        _, tables = await store.query(
            "SELECT name, engine, as_select, create_table_query FROM system.tables "
            "WHERE database = currentDatabase()"
        )
    finally:
        await store.close()
    columns: dict[str, dict[str, str]] = {}
    for table, name, ch_type in cols:
        columns.setdefault(table, {})[name] = ch_type
    views = []
    for name, engine, as_select, create in tables:
        if engine != "MaterializedView":
            continue
        target = re.search(r"\bTO (?:\w+\.)?(\w+)", create)
        source = re.search(r"\bFROM (?:\w+\.)?(\w+)", as_select)
        where = re.search(r"\bWHERE kind (?:= '([^']+)'|IN \(([^)]*)\))", as_select)
        assert target and source and where, f"{name}: cannot read TO / FROM / WHERE kind of {as_select}"
        kinds = [where.group(1)] if where.group(1) else re.findall(r"'([^']+)'", where.group(2))
        views.append(View(name, source.group(1), target.group(1), kinds, columns[name]))
    inboxes = [n for n, engine, *_ in tables if engine == "Null"]
    return Catalog(columns, inboxes, views)


def strip(ch_type: str) -> tuple[str, bool]:
    """(base type, nullable) without LowCardinality / Nullable wrappers."""
    nullable = False
    while m := re.fullmatch(r"(Nullable|LowCardinality)\((.*)\)", ch_type):
        nullable |= m.group(1) == "Nullable"
        ch_type = m.group(2)
    return ch_type, nullable


def py_kind(ann: Any) -> tuple[str, bool]:
    """(str | int | float | bool | json, optional) of a model field's annotation."""
    origin, args = get_origin(ann), get_args(ann)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        assert len(inner) == 1, f"teach py_kind about {ann!r}"
        return py_kind(inner[0])[0], type(None) in args
    if origin is Literal:
        return {type(a) for a in args}.pop().__name__, False
    if origin in (dict, list) or ann is Any or (isinstance(ann, type) and issubclass(ann, BaseModel)):
        return "json", False
    assert ann in (str, int, float, bool), f"teach py_kind about {ann!r}"
    return ann.__name__, False


STORED_AS = {
    "str": r"String",
    "json": r"String",  # objects and arrays arrive as their JSON text
    "int": r"U?Int(8|16|32|64|128|256)|DateTime64\(3, 'UTC'\)|DateTime\('UTC'\)",
    "float": r"Float(32|64)",
    "bool": r"Bool",
}


def incompatible(model: type[BaseModel], field: str, ch_type: str) -> str | None:
    """Why ``field`` of ``model`` cannot live in a ``ch_type`` column, or None."""
    kind, optional = py_kind(model.model_fields[field].annotation)
    base, nullable = strip(ch_type)
    if not re.fullmatch(STORED_AS[kind], base):
        return f"{model.__name__}.{field} is {kind}, the column is {ch_type}"
    if optional and kind in ("int", "float", "bool") and not nullable:
        # None would be stored as 0 / false: an answer that lies
        return f"{model.__name__}.{field} may be None, the column {ch_type} should be Nullable"
    return None


def fields_of(kinds: Any) -> dict[str, list[type[E._Event]]]:
    out: dict[str, list[type[E._Event]]] = {}
    for k in sorted(kinds):
        for f in MODELS[k].model_fields:
            out.setdefault(f, []).append(MODELS[k])
    return out


def test_every_inbox_is_routed_and_every_routed_kind_is_an_event(catalog: Catalog) -> None:
    assert sorted(catalog.inboxes) == sorted(ROUTES), "an inbox no consumer writes, or the reverse"
    for inbox, kinds in ROUTES.items():
        assert set(kinds) <= set(MODELS), f"{inbox}: routed kinds without a model {set(kinds) - set(MODELS)}"


@pytest.mark.parametrize("inbox", sorted(ROUTES))
def test_inbox_columns_are_model_fields_with_compatible_types(catalog: Catalog, inbox: str) -> None:
    fields = fields_of(ROUTES[inbox])
    problems = []
    for column, ch_type in catalog.columns[inbox].items():
        if column not in fields:
            problems.append(f"column {column} is no field of {sorted(ROUTES[inbox])}")
            continue
        problems += [p for m in fields[column] if (p := incompatible(m, column, ch_type))]
    assert not problems, f"{inbox} vs schemas/events.py:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("inbox", sorted(set(ROUTES) - SUBSET_INBOXES))
def test_every_model_field_has_an_inbox_column(catalog: Catalog, inbox: str) -> None:
    missing = [
        f"{m.__name__}.{f}"
        for f, models in fields_of(ROUTES[inbox]).items()
        for m in models
        if f not in catalog.columns[inbox]
    ]
    assert not missing, (
        f"{inbox} has no column for {missing}: the insert drops these fields silently "
        "(add the column to schemas/clickhouse/*.sql and to the view that stores it)"
    )


def test_views_route_the_kinds_their_inbox_receives(catalog: Catalog) -> None:
    by_inbox: dict[str, set[str]] = {}
    for v in catalog.views:
        assert v.source in ROUTES, f"{v.name} reads {v.source}, which no consumer writes"
        stray = set(v.kinds) - ROUTES[v.source]
        assert not stray, f"{v.name} selects kinds {stray} that never reach {v.source}"
        by_inbox.setdefault(v.source, set()).update(v.kinds)
    for inbox, kinds in ROUTES.items():
        assert by_inbox.get(inbox) == set(kinds), (
            f"{inbox}: kinds no view stores {set(kinds) - by_inbox[inbox]}"
        )


def test_view_columns_are_model_fields_and_reach_their_table(catalog: Catalog) -> None:
    problems = []
    assert catalog.views
    for v in catalog.views:
        fields = fields_of(v.kinds)
        target = catalog.columns[v.target]
        computed = COMPUTED.get(v.name, set())
        for column in v.columns:
            if column in computed:
                continue
            if column not in fields:
                problems.append(f"{v.name} writes {column}, no field of {v.kinds}")
                continue
            problems += [
                f"{v.target}: {p}" for m in fields[column] if (p := incompatible(m, column, target[column]))
            ]
        if v.source in SUBSET_INBOXES or v.target in AGGREGATES:
            continue
        # a full copy: every field of its kinds is stored (kind only where the table mixes kinds)
        expected = set(fields) - ({"kind"} if len(v.kinds) == 1 else set())
        problems += [
            f"{v.target} has no column for field {f} of {v.kinds}" for f in sorted(expected - set(target))
        ]
        problems += [f"{v.name} does not write {f} of {v.kinds}" for f in sorted(expected - set(v.columns))]
    written: dict[str, set[str]] = {}
    for v in catalog.views:
        written.setdefault(v.target, set()).update(v.columns)
    for table, names in written.items():
        problems += [
            f"{table}.{c}: no view writes it, it stays empty"
            for c in catalog.columns[table]
            if c not in names
        ]
    assert not problems, "schemas/clickhouse/*.sql vs schemas/events.py:\n  " + "\n  ".join(problems)


def test_the_checks_catch_a_field_missing_from_the_ddl(catalog: Catalog) -> None:
    """The checks above are not vacuous: a field the DDL lacks, or a column of the wrong type, is named."""
    cols = dict(catalog.columns["audit_events_in"])
    del cols["upstream_ms"]
    missing = [f for f in fields_of(ROUTES["audit_events_in"]) if f not in cols]
    assert "upstream_ms" in missing
    assert incompatible(E.CallCompleted, "upstream_ms", "Float64") is not None  # optional, not Nullable
    assert incompatible(E.CallCompleted, "response_bytes", "String") is not None
    assert incompatible(E.CallDecided, "arguments", "String") is None
    assert incompatible(E.AuthFailed, "first_ts", "DateTime64(3, 'UTC')") is None
