"""The ClickHouse stores behind the audit trail: one interface (``base``), one module per backend
(``chdb``: embedded, ``http``: a ClickHouse server), and ``open_store``, the factory."""

from __future__ import annotations

from pathlib import Path

from consumers.store.base import (
    AuditStore,
    QueryLimits,
    ReadOnlyError,
    StoreError,
    equal_filters,
    is_readonly_refusal,
)

__all__ = [
    "AuditStore",
    "QueryLimits",
    "ReadOnlyError",
    "StoreError",
    "equal_filters",
    "is_readonly_refusal",
    "open_store",
]


async def open_store(
    spec: str,
    data_dir: Path | str,
    limits: QueryLimits | None = None,
    *,
    user: str | None = None,
    password: str | None = None,
) -> AuditStore:
    """Open (and create the schema of) the store named by ``spec``.

    ``"embedded"`` (or ``""``): chDB persisted in ``data_dir/"clickhouse"``.
    ``http://...`` / ``https://...``: a ClickHouse server (user, password and database
    may be given in the URL: ``http://user:pw@host:8123/db``; else ``user``/``password``).
    """
    spec = (spec or "embedded").strip()
    if spec == "embedded":
        from consumers.store.chdb import ChdbStore

        store: AuditStore = ChdbStore(Path(data_dir) / "clickhouse")
    elif spec.startswith(("http://", "https://")):
        from consumers.store.http import HttpStore

        store = HttpStore(spec, user=user, password=password)
    else:
        raise ValueError(f"store spec must be 'embedded' or an http(s) URL, not {spec!r}")
    if limits is not None:
        store.limits = limits
    try:
        await store.open()
        await store.ensure_schema()
    except BaseException:
        await store.close()
        raise
    return store
