"""Composition root of embedded mode (with cli.py, the only module wiring gateway and consumers).

One process holds the event log (SQLite WAL in data_dir), the embedded ClickHouse store
(chDB in data_dir) and runs the consumers as asyncio tasks next to the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

from consumers import forensics
from consumers.audit import AuditConsumer
from consumers.counters import CountersConsumer
from consumers.runner import supervise
from consumers.store import AuditStore, ReadOnlyError, open_store
from consumers.store.base import QueryLimits
from eventlog import open_log
from eventlog.base import EventLog
from gateway.app import POLICIES_KEY, PROXY_KEY, build_app
from gateway.audit.writer import AuditAddon, instance_id
from gateway.config import Config, stdio_command_problem
from gateway.edge import HttpServer
from gateway.policy.rebuild import ReplicaFold, longest_window_s, rebuild_limiters_to

log = logging.getLogger("ledgergate")

QUESTIONS = ("who", "calls", "denials", "sql")


class Embedded:
    """The embedded log + store + consumers of one data dir."""

    def __init__(self, cfg: Config, eventlog: EventLog, store: AuditStore) -> None:
        self.cfg = cfg
        self.log = eventlog
        self.store = store
        self.audit = AuditConsumer(eventlog, store)
        self.counters = CountersConsumer(eventlog, store)
        self._tasks: list[asyncio.Task[None]] = []
        self._lock: IO[str] | None = None
        # a forensic answer waits at most this long for running consumers to catch up,
        # then answers from the tables as they are and says how far behind they are
        self.sync_timeout_s = 10.0

    @classmethod
    async def open(cls, cfg: Config, *, run_consumers: bool) -> Embedded:
        data_dir = cfg.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_data_dir(data_dir) if cfg.store.clickhouse == "embedded" else None
        try:
            eventlog = open_log(
                cfg.eventlog.backend,
                data_dir,
                cfg.eventlog.durability,
                cfg.eventlog.flush_interval_ms,
                **cfg.eventlog.open_log_options(),
            )
            await eventlog.open()
        except BaseException:
            if lock is not None:
                lock.close()
            raise
        user, password = cfg.store.credentials()
        try:
            store = await open_store(
                cfg.store.clickhouse, data_dir, query_limits(cfg), user=user, password=password
            )
        except BaseException:
            await eventlog.close()
            if lock is not None:
                lock.close()
            raise
        self = cls(cfg, eventlog, store)
        self._lock = lock
        try:
            if self.folds_here:
                await self.repair_offsets()
        except BaseException:
            await self.close()
            raise
        if run_consumers:
            self._tasks = [
                asyncio.create_task(supervise(self.audit), name="audit-consumer"),
                asyncio.create_task(supervise(self.counters), name="counters-consumer"),
            ]
        return self

    async def repair_offsets(self) -> list[str]:
        """A consumer whose committed offset is past the end of the log would wait forever for
        records that already got lower offsets, and the tables would silently freeze (this is
        what `replay --from` past the end used to do). Reset such a consumer to 0: it folds the
        whole log again and the idempotent writes drop what the tables already hold.
        Returns the names of the consumers repaired."""
        end = await self.log.end_position()
        repaired = []
        for consumer in (self.audit, self.counters):
            at = await self.log.committed_position(consumer.name)
            past = {p: o for p, o in at.items() if o > end.get(p, 0)}
            if past:
                if list(end) == [0]:  # one partition: offsets and records, as users know them
                    where = f"committed offset {past[0]} is past the end of the event log ({end[0]} records)"
                else:
                    where = (
                        f"committed position {past} is past the end of the event log "
                        f"({ {p: end.get(p, 0) for p in past} })"
                    )
                log.warning(
                    "consumer %s: %s, so new events would never reach its tables; reset to 0 (the log "
                    "is folded again, duplicates are dropped)",
                    consumer.name,
                    where,
                )
                await self.log.commit_position(consumer.name, dict.fromkeys(past, 0))
                repaired.append(consumer.name)
        return repaired

    @property
    def folds_here(self) -> bool:
        """Whether this process may fold the log into the store itself. Not when consumer
        processes (`ledgergate consume`) own that: committing their group's offsets from here
        would move them under the group's feet."""
        return self.cfg.eventlog.consumers_in_gateway

    async def sync(self) -> None:
        """Every event appended so far is in the ClickHouse tables (when this process folds;
        else nothing to do: answers say how far the consumer processes are behind)."""
        if not self.folds_here and not self._tasks:
            return
        await self.log.flush()
        end = await self.log.end_position()
        if self._tasks:
            await asyncio.gather(self.audit.wait_for(end), self.counters.wait_for(end))
        else:
            await self.audit.catch_up()
            await self.counters.catch_up()

    async def answer(self, question: str, params: dict[str, Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
        """A forensic question. Raises ValueError for bad input (an unknown --server too),
        PermissionError for SQL that writes. The answer unpacks as (columns, rows) and carries
        ``.lag`` (forensics.Lag, None when the tables hold the whole log)."""
        p = {k: v for k, v in params.items() if v not in (None, "")}
        if self._tasks:  # consumers running: answer from what they folded, say how far behind
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.sync(), self.sync_timeout_s)
        else:
            await self.sync()
        if question != "sql" and "server" in p:
            await self._known_server(str(p["server"]))
        columns, rows = await self._answer(question, p)
        lag = await forensics.lag_behind(
            self.log, [self.audit.name, self.counters.name], int(time.time() * 1000)
        )
        return forensics.LaggedAnswer(columns, rows, lag)

    async def _known_server(self, server: str) -> None:
        """A --server filter that names no server is a typo, not an empty answer."""
        if server in self.cfg.servers:
            return
        _, rows = await self.store.query("SELECT DISTINCT server FROM audit_calls ORDER BY server")
        seen = [r[0] for r in rows]
        if server in seen:
            return
        known = f"servers in {self.cfg.source.name}: {', '.join(sorted(self.cfg.servers)) or 'none'}"
        gone = [s for s in seen if s not in self.cfg.servers]
        if gone:
            known += f"; only in the audit trail: {', '.join(gone)}"
        raise ValueError(f"unknown server {server!r} ({known})")

    async def _answer(self, question: str, p: dict[str, Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
        try:
            if question == "who":
                if "tool" not in p:
                    raise ValueError("who needs a tool")
                return await forensics.who(
                    self.store,
                    p["tool"],
                    server=p.get("server"),
                    since=p.get("since"),
                    until=p.get("until"),
                    decision=p.get("decision"),
                )
            if question == "calls":
                limit = int(p.get("limit", 100))
                if limit <= 0:
                    raise ValueError("limit must be positive")
                return await forensics.calls(
                    self.store,
                    tool=p.get("tool"),
                    server=p.get("server"),
                    since=p.get("since"),
                    until=p.get("until"),
                    decision=p.get("decision"),
                    agent=p.get("agent"),
                    grant=p.get("grant"),
                    limit=limit,
                )
            if question == "denials":
                return await forensics.denials(
                    self.store,
                    since=p.get("since"),
                    until=p.get("until"),
                    server=p.get("server"),
                    tool=p.get("tool"),
                    agent=p.get("agent"),
                )
            if question == "sql":
                if not isinstance(p.get("sql"), str):
                    raise ValueError("sql needs the SQL text")
                sql_params = p.get("params") or {}
                if not isinstance(sql_params, dict):
                    raise ValueError("params must be an object of name -> value")
                return await forensics.sql(self.store, p["sql"], sql_params)
        except ReadOnlyError as exc:
            raise PermissionError(str(exc)) from None
        raise ValueError(f"unknown question {question!r}; one of {', '.join(QUESTIONS)}")

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        try:
            await self.store.close()
        finally:
            await self.log.close()
            if self._lock is not None:
                self._lock.close()
                self._lock = None


def query_limits(cfg: Config) -> QueryLimits:
    s = cfg.store
    return QueryLimits(s.query_timeout_s, s.query_max_rows, s.query_max_bytes, s.query_max_memory)


class DataDirBusy(RuntimeError):
    pass


class StartupError(RuntimeError):
    """The gateway cannot start: the message says what and where."""


def lock_data_dir(data_dir: Path) -> IO[str]:
    """One process owns an embedded store (chDB) at a time: take an exclusive lock on
    data_dir/lock or say clearly who holds it and how to stop it."""
    f = open(data_dir / "lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        m = _PID.search(holder)
        how = (
            f"stop it with `kill {m.group(1)}` (or Ctrl-C in its terminal)"
            if m
            else "stop it (see `fuser` on the lock file)"
        )
        raise DataDirBusy(
            f"the data dir {data_dir} is in use by {holder} (another gateway holds it): {how} before "
            "starting another one here, or ask the running one over its admin API"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"ledgergate pid {os.getpid()}\n")
    f.flush()
    return f


_PID = re.compile(r"\bpid (\d+)")


def data_dir_holder(data_dir: Path) -> int | None:
    """The pid of the live process named in data_dir/lock, if any (a hint: the lock is
    taken with flock, which only its holder can see; this never takes it)."""
    try:
        m = _PID.search((data_dir / "lock").read_text())
    except OSError:
        return None
    if m is None:
        return None
    pid = int(m.group(1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, someone else's
    return pid


def replicas_handler(replicas: ReplicaFold, admin_token: str) -> Callable[[Any], Awaitable[Any]]:
    """GET /admin/replicas (admin token): what this gateway folded of the other replicas'
    calls and the largest lag seen (README "Scale out")."""
    import hmac

    import orjson
    from aiohttp.web import Response

    expected = f"Bearer {admin_token}".encode()

    async def handler(req: Any) -> Response:
        given = req.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            return Response(
                status=401,
                body=b'{"error":"unauthorized","message":"missing or wrong admin token"}',
                content_type="application/json",
            )
        return Response(body=orjson.dumps(replicas.stats()), content_type="application/json")

    return handler


async def serve(
    cfg: Config,
    *,
    clock: Callable[[], float] = time.time,
    ready: Callable[[str], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the gateway with its embedded log, store and consumers until SIGINT/SIGTERM (or `stop`).

    Raises StartupError (with what failed and where) when the log, the store or the listening
    socket cannot be opened."""
    for name, srv in cfg.servers.items():
        problem = stdio_command_problem(cfg, name) if srv.command is not None else None
        if problem:  # serve the other servers; calls to this one fail, so say it now, loudly
            log.error(
                "server %s: cannot start its stdio command: %s; calls to /mcp/%s will fail until it "
                "is installed (scripts/install-upstreams.sh for the example) and the gateway restarted",
                name,
                problem,
                name,
            )
    try:
        embedded = await Embedded.open(cfg, run_consumers=cfg.eventlog.consumers_in_gateway)
    except DataDirBusy as exc:
        raise StartupError(str(exc)) from exc
    except Exception as exc:
        raise StartupError(f"cannot open the event log and store in {cfg.data_dir}: {exc}") from exc
    addon = AuditAddon(
        embedded.log,
        instance_id(cfg.gateway.instance_id),
        server_redact={name: srv.redact for name, srv in cfg.servers.items() if srv.redact},
        auth_failure_interval_s=cfg.gateway.auth_failure_interval_s,
        auth_failure_max_keys=cfg.gateway.auth_failure_max_keys,
    )
    replicas: ReplicaFold | None = None
    try:
        app = build_app(
            cfg, addons=[addon], clock=clock, admin=embedded.answer if cfg.gateway.admin_token else None
        )
        addon.policies = app[POLICIES_KEY]
        proxy = app[PROXY_KEY]
        t0 = time.perf_counter()
        folded, end = await rebuild_limiters_to(
            embedded.log, proxy.limiters, longest_window_s(app[POLICIES_KEY]), clock()
        )
        log.info(
            "rate-limit counters rebuilt from the log: %d charges in %.3f s", folded, time.perf_counter() - t0
        )
        if cfg.eventlog.backend == "kafka":
            # replicas on one topic share limits: fold the others' calls as they arrive
            replicas = ReplicaFold(embedded.log, proxy.limiters, addon.instance, clock)
            replicas.start(end)
            if cfg.gateway.admin_token:
                app.add_get("/admin/replicas", replicas_handler(replicas, cfg.gateway.admin_token))
        server = HttpServer(app, cfg.gateway.host, cfg.gateway.port)
        try:
            await server.start()
        except OSError as exc:
            raise StartupError(f"cannot serve on {cfg.gateway.listen}: {exc.strerror or exc}") from exc
        if stop is None:  # standalone: SIGINT/SIGTERM stop it (tests pass their own event)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(RuntimeError):  # a loop outside the main thread
                    loop.add_signal_handler(sig, stop.set)
        log.info(
            "ready on http://%s:%d (event log %s, durability %s, store %s, consumers %s)",
            cfg.gateway.host,
            cfg.gateway.port,
            cfg.data_dir / "events.db" if cfg.eventlog.backend == "embedded" else embedded.log,
            cfg.eventlog.durability,
            cfg.store.clickhouse,
            "in this process" if embedded._tasks else "none here (ledgergate consume)",
        )
        if ready is not None:
            r = ready(f"http://{cfg.gateway.host}:{cfg.gateway.port}")
            if r is not None:
                await r
        await stop.wait()
        log.info("stopping")
        await server.close()
    finally:
        if replicas is not None:
            await replicas.close()
        with contextlib.suppress(Exception):
            await addon.close()
        await embedded.close()
