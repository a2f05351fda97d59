"""What forensic SQL may touch, decided on the query as ClickHouse itself parsed it.

``readonly=1`` alone is not enough: under it ClickHouse still runs ``DESCRIBE file(...)``
(schema inference quotes the file back in its error), the scalar ``file('/path')``
function (returns the whole file), ``SELECT ... INTO OUTFILE`` (writes a file on chDB),
``dictGet`` on external sources and the ``AI*`` functions (network). So before a forensic
query runs, the store asks the SAME engine to parse it (``parseQueryToJSON``; no analysis,
no schema inference, nothing is read) and ``check`` walks that tree:

- one SELECT (WITH, UNION / INTERSECT / EXCEPT, subqueries and JOINs included); no
  ``SETTINGS``, ``FORMAT`` or ``INTO OUTFILE``; every node type is one we know (unknown
  constructs are refused, so a newer engine fails closed);
- every table is one of ledgergate's own (``schemas/clickhouse/*.sql``), with or without
  the store's database as prefix, or a CTE name in scope; table names cannot be query
  parameters; the right side of ``IN`` names a table by the same rule;
- table functions: only the pure generators in ``TABLE_FUNCTIONS`` (no file, network,
  process, other-table or other-database access);
- scalar/aggregate functions: resolved like the engine does (exact name, else the
  lower-case name of a case-insensitive one, aliases followed, aggregate combinators such
  as ``If``/``Merge``/``State`` stripped) and allowed only when the engine files them
  under a pure category (``SAFE_CATEGORIES``) or in the short ``EXTRA_FUNCTIONS`` list.
  That leaves out the ``Other`` category (``file``, ``joinGet``, ``getSetting``,
  ``hasColumnInTable``, ``sleep``, ...), ``Dictionary``, ``Introspection``, ``AI``,
  ``Machine Learning`` and ``Internal``.

Refusals raise ``ReadOnlyError`` with a message that names the offending construct and
never contains data or file contents.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from consumers.store.base import ReadOnlyError, StoreError, schema_statements

# Pure table functions: they generate numbers and read nothing.
TABLE_FUNCTIONS = frozenset(
    {"numbers", "numbers_mt", "zeros", "zeros_mt", "generate_series", "generateSeries"}
)

# Categories (system.functions.categories) whose functions only compute on their arguments.
SAFE_CATEGORIES = frozenset(
    {
        "Aggregate Functions",
        "Arithmetic",
        "Arrays",
        "Bit",
        "Bitmap",
        "Comparison",
        "Conditional",
        "Dates and Times",
        "Distance",
        "Encoding",
        "Encryption",
        "Financial",
        "Geo",
        "Geo Polygon",
        "Hash",
        "IP Address",
        "JSON",
        "Logical",
        "Map",
        "Mathematical",
        "Null",
        "NumericIndexedVector",
        "QBit",
        "Random Number",
        "Rounding",
        "String",
        "String Replacement",
        "String Search",
        "String Splitting",
        "Time Series",
        "Time Window",
        "Tuple",
        "Type Conversion",
        "URL",
        "UUID",
    }
)
# Pure functions the engine files under "Other".
EXTRA_FUNCTIONS = frozenset(
    {
        "bar",
        "byteSize",
        "currentDatabase",
        "defaultValueOfArgumentType",
        "defaultValueOfTypeName",
        "errorCodeToName",
        "finalizeAggregation",
        "formatReadableDecimalSize",
        "formatReadableQuantity",
        "formatReadableSize",
        "formatReadableTimeDelta",
        "identity",
        "ignore",
        "initializeAggregation",
        "isConstant",
        "isDecimalOverflow",
        "materialize",
        "neighbor",
        "parseReadableSize",
        "parseReadableSizeOrNull",
        "parseReadableSizeOrZero",
        "parseTimeDelta",
        "runningDifference",
        "runningDifferenceStartingWithFirstValue",
        "throwIf",
        "timeZone",
        "timeZoneOf",
        "timeZoneOffset",
        "toColumnTypeName",
        "toTypeName",
        "transform",
        "version",
        "visibleWidth",
    }
)
# Functions whose second argument, when a bare identifier, names a table.
_IN_FUNCTIONS = frozenset(
    {
        "in",
        "notin",
        "globalin",
        "globalnotin",
        "nullin",
        "notnullin",
        "globalnullin",
        "globalnotnullin",
    }
)

# Every node type the check understands; anything else is refused (fail closed).
_NODE_TYPES = frozenset(
    {
        "SelectWithUnionQuery",
        "SelectIntersectExceptQuery",
        "SelectQuery",
        "ExpressionList",
        "WithElement",
        "Subquery",
        "Literal",
        "Identifier",
        "Function",
        "Asterisk",
        "QualifiedAsterisk",
        "ColumnsRegexpMatcher",
        "ColumnsListMatcher",
        "QualifiedColumnsRegexpMatcher",
        "QualifiedColumnsListMatcher",
        "ColumnsTransformerList",
        "ColumnsExceptTransformer",
        "ColumnsReplaceTransformer",
        "ColumnsReplaceTransformerReplacement",
        "ColumnsApplyTransformer",
        "TablesInSelectQuery",
        "TablesInSelectQueryElement",
        "TableExpression",
        "TableIdentifier",
        "TableJoin",
        "ArrayJoin",
        "OrderByElement",
        "InterpolateElement",
        "SampleRatio",
        "WindowDefinition",
        "WindowListElement",
        "QueryParameter",
    }
)
# Keys that would make a SELECT write a file, change settings or pick its own format.
_FORBIDDEN_KEYS = {
    "out_file": "INTO OUTFILE",
    "format_ast": "a FORMAT clause",
    "format": "a FORMAT clause",
    "settings": "a SETTINGS clause",
    "settings_ast": "a SETTINGS clause",
    "compression": "INTO OUTFILE ... COMPRESSION",
    "compression_level": "INTO OUTFILE ... COMPRESSION",
}
_OUTFILE_FLAGS = ("is_outfile_append", "is_outfile_truncate", "is_into_outfile_with_stdout")
_CREATE = re.compile(
    r"^CREATE\s+(?:TABLE|VIEW|MATERIALIZED\s+VIEW)\s+IF\s+NOT\s+EXISTS\s+([A-Za-z_][A-Za-z0-9_]*)", re.I
)


def project_tables() -> frozenset[str]:
    """Names of the tables and views that ``schemas/clickhouse/*.sql`` creates (our own DDL)."""
    names = set()
    for stmt in schema_statements():
        m = _CREATE.match(stmt)
        if m:
            names.add(m.group(1))
    return frozenset(names)


@dataclass(frozen=True)
class FunctionInfo:
    name: str
    case_insensitive: bool
    alias_to: str
    category: str
    is_aggregate: bool


@dataclass
class Catalog:
    """The engine's function list and the store's database, read once per store."""

    database: str
    functions: Mapping[str, FunctionInfo]
    combinators: tuple[str, ...]
    tables: frozenset[str] = field(default_factory=project_tables)
    _lower: dict[str, FunctionInfo] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._lower = {f.name.lower(): f for f in self.functions.values() if f.case_insensitive}
        # longest suffix first, so "SimpleState" is tried before "State"
        self.combinators = tuple(sorted(self.combinators, key=len, reverse=True))

    @classmethod
    def from_rows(
        cls, database: str, functions: Iterable[tuple[Any, ...]], combinators: Iterable[str]
    ) -> Catalog:
        """``functions``: rows of (name, case_insensitive, alias_to, categories, is_aggregate)."""
        infos = {
            str(n): FunctionInfo(str(n), bool(ci), str(alias or ""), str(cat or ""), bool(agg))
            for n, ci, alias, cat, agg in functions
        }
        return cls(database, infos, tuple(combinators))

    def lookup(self, name: str) -> FunctionInfo | None:
        f = self.functions.get(name) or self._lower.get(name.lower())
        seen = 0
        while f is not None and f.alias_to and seen < 8:
            f = self.functions.get(f.alias_to) or self._lower.get(f.alias_to.lower())
            seen += 1
        return f

    def function_allowed(self, name: str) -> bool:
        f = self.lookup(name)
        if f is not None:
            return f.name in EXTRA_FUNCTIONS or f.category in SAFE_CATEGORIES
        # an aggregate function with combinators: countIf, uniqExactMerge, sumArrayOrNull, ...
        for suffix in self.combinators:
            if len(name) > len(suffix) and name.endswith(suffix):
                base = name[: -len(suffix)]
                fb = self.lookup(base)
                if fb is not None and fb.is_aggregate:
                    return self.function_allowed(base)
                if fb is None and self.function_allowed(base):  # several combinators
                    return True
        return False


def _refuse(what: str) -> ReadOnlyError:
    return ReadOnlyError(f"read-only query refused: {what}")


class _Checker:
    def __init__(self, catalog: Catalog) -> None:
        self.cat = catalog

    def table(self, parts: list[str], scope: frozenset[str], how: str = "table") -> None:
        if len(parts) == 1 and (parts[0] in self.cat.tables or parts[0] in scope):
            return
        if len(parts) == 2 and parts[0] == self.cat.database and parts[1] in self.cat.tables:
            return
        allowed = ", ".join(sorted(t for t in self.cat.tables if not t.endswith(("_in", "_mv"))))
        raise _refuse(
            f"{how} {'.'.join(parts)!r} is not one of ledgergate's tables (forensic SQL reads only {allowed})"
        )

    def node(self, n: Any, scope: frozenset[str], key: str = "") -> None:
        if isinstance(n, list):
            for item in n:
                self.node(item, scope)
            return
        if not isinstance(n, dict):
            return
        kind = n.get("type")
        if kind is None:  # a plain record (a literal's value, a setting change, ...)
            for k, v in n.items():
                if isinstance(v, dict | list):
                    self.node(v, scope, k)
            return
        if kind not in _NODE_TYPES:
            raise _refuse(f"{kind} is not allowed (forensic SQL is one SELECT over the audit tables)")
        for bad, what in _FORBIDDEN_KEYS.items():
            if bad in n:
                raise _refuse(f"{what} is not allowed in forensic SQL")
        if any(n.get(flag) for flag in _OUTFILE_FLAGS):
            raise _refuse("INTO OUTFILE is not allowed in forensic SQL")
        if kind == "SelectQuery":
            names = {
                w["name"]
                for w in (n.get("with") or {}).get("children", [])
                if isinstance(w, dict) and w.get("type") == "WithElement" and isinstance(w.get("name"), str)
            }
            scope = scope | names
        elif kind == "TableIdentifier":
            if n.get("children"):
                raise _refuse("a table name cannot be a query parameter")
            parts = n.get("name_parts") or [n.get("name", "")]
            self.table([str(p) for p in parts], scope)
        elif kind == "QueryParameter":
            if str(n.get("param_type", "")).strip().lower() == "identifier":
                raise _refuse("Identifier parameters are not allowed (they can name tables)")
        elif kind == "Function":
            self.function(n, scope, table_function=key == "table_function")
        for k, v in n.items():
            if isinstance(v, dict | list):
                self.node(v, scope, k)

    def function(self, n: dict[str, Any], scope: frozenset[str], *, table_function: bool) -> None:
        name = str(n.get("name", ""))
        if table_function:
            if name not in TABLE_FUNCTIONS:
                raise _refuse(
                    f"table function {name}() is not allowed; forensic SQL reads ledgergate's tables "
                    f"(pure generators allowed: {', '.join(sorted(TABLE_FUNCTIONS))})"
                )
            return
        if n.get("is_lambda_function") and name == "lambda":
            return
        if not self.cat.function_allowed(name):
            raise _refuse(f"function {name}() is unknown or not allowed in forensic SQL")
        if name.lower() in _IN_FUNCTIONS:
            args = (n.get("arguments") or {}).get("children") or []
            if len(args) == 2 and isinstance(args[1], dict) and args[1].get("type") == "Identifier":
                ident = args[1]
                if ident.get("children"):
                    raise _refuse("a table name cannot be a query parameter")
                parts = ident.get("name_parts") or [ident.get("name", "")]
                self.table([str(p) for p in parts], scope, how="IN table")


def check(tree: Any, catalog: Catalog) -> None:
    """Raise ReadOnlyError unless ``tree`` (``parseQueryToJSON`` output) is one allowed SELECT."""
    if not isinstance(tree, dict):
        raise _refuse("the query did not parse to one statement")
    kind = tree.get("type")
    if kind not in ("SelectWithUnionQuery", "SelectIntersectExceptQuery"):
        raise _refuse(
            f"the statement is {kind or 'unknown'}; forensic SQL runs only SELECT (with WITH, UNION, "
            "subqueries, JOINs)"
        )
    _Checker(catalog).node(tree, frozenset())


def parse_failure(message: str) -> StoreError:
    """The error for a query the engine's parser refused: a plain syntax error is the
    caller's (query_error); anything else (several statements, a statement kind the JSON
    tree cannot show, such as INSERT with inline data) is refused as not read-only."""
    syntax = "SYNTAX_ERROR" in message or "Code: 62." in message
    message = message.split(": In scope SELECT parseQueryToJSON", 1)[0]
    if "Multi-statements" in message:
        return _refuse("expected exactly one SQL statement")
    if syntax:
        return StoreError(message if "(SYNTAX_ERROR)" in message else f"{message} (SYNTAX_ERROR)")
    return _refuse("only SELECT is allowed (the statement is not a plain SELECT)")
