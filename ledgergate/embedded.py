"""Embedded mode: one process holds the event log, the ClickHouse store and the consumers.

`Embedded` opens the log (SQLite WAL in data_dir, or Kafka) and the store (chDB in data_dir,
or a ClickHouse server) and runs the consumers as asyncio tasks; `serve()` puts the gateway
app, the admin socket and the optional metrics listener on top.
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
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
from aiohttp.web import Response

from consumers import forensics
from consumers.alerts import AlertsConsumer, LiveQuery, build_alerts, follow_events
from consumers.audit import AuditConsumer
from consumers.check import AUDIT_TABLES, COUNTER_TABLES, ProjectionCheck
from consumers.counters import CountersConsumer
from consumers.runner import supervise
from consumers.store import AuditStore, ReadOnlyError, StoreError, open_store
from consumers.store.base import QueryLimits
from eventlog import open_log
from eventlog.base import EventLog
from gateway.app import POLICIES_KEY, PROXY_KEY, UI_KEY, build_app
from gateway.audit.hooks import Addon
from gateway.audit.writer import AuditAddon, instance_id
from gateway.config import Config, stdio_command_problem
from gateway.edge import App, EdgeLimits, HttpServer, Request
from gateway.policy.engine import CounterKey
from gateway.policy.rebuild import ReplicaFold, longest_window_s, rebuild_limiters_to
from schemas.events import LogGap, encode

log = logging.getLogger("ledgergate")

QUESTIONS = ("who", "calls", "denials", "sql")
GAP_MARK = "(log.gap)"  # log_positions row of an accepted gap


class Embedded:
    """The embedded log + store + consumers of one data dir."""

    def __init__(self, cfg: Config, eventlog: EventLog, store: AuditStore) -> None:
        self.cfg = cfg
        self.log = eventlog
        self.store = store
        self.audit = AuditConsumer(eventlog, store)
        self.counters = CountersConsumer(eventlog, store)
        # the audit insert fills counters_minute too (009_counters_from_audit.sql): the running
        # counters consumer commits what audit stored instead of parsing the same payloads again
        self.counters.ride_on(self.audit)
        self._tasks: list[asyncio.Task[None]] = []
        self._lock: IO[str] | None = None
        self.checker = ProjectionCheck(
            eventlog, store, {self.audit: AUDIT_TABLES, self.counters: COUNTER_TABLES}
        )
        self._checked = False  # without running consumers (the CLI): checked once, before answering
        self.gap: LogGap | None = None  # the log went backwards (find_log_gap), not yet accepted
        self.alerts: AlertsConsumer | None = None
        self.closing = asyncio.Event()  # set at shutdown: live views (follow_events) end
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
            if len(await eventlog.partitions()) == 1:  # gap detection: offsets of one log (embedded)
                self.gap = await self.find_log_gap()
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
            if len(await eventlog.partitions()) == 1:  # counts per offset range: one-partition logs
                self._tasks.append(
                    asyncio.create_task(self.checker.run(cfg.store.check_interval_s), name="projection-check")
                )
        return self

    async def find_log_gap(self) -> LogGap | None:
        """Did the log go backwards? Compare its end with the consumers' committed offsets and
        with the highest offset the store saw since the last accepted gap (log_positions). A
        log that lost its tail (a WAL deleted after a crash) looks healthy on its own: the
        records are simply not there, and neither are their counter charges. Says so loudly."""
        end = await self.log.end_offset()
        committed = {c.name: await self.log.committed(c.name) for c in (self.audit, self.counters)}
        try:
            _, rows = await self.store.query(
                "SELECT max(next_offset) FROM log_positions WHERE consumer != {gap:String} AND ts_ms >= "
                "(SELECT max(ts_ms) FROM log_positions WHERE consumer = {gap:String})",
                {"gap": GAP_MARK},
            )
            store_end = int(rows[0][0] or 0) if rows else 0
        except StoreError as exc:  # a damaged store: the consumers' offsets still tell
            log.warning(
                "cannot read log_positions from the store (%s); the log end is checked against the "
                "consumers only",
                exc,
            )
            store_end = 0
        seen = max([store_end, *committed.values()])
        if seen <= end:
            return None
        log.error(
            "EVENT LOG WENT BACKWARDS: %s ends at offset %d, but the store saw %d and the consumers "
            "committed %s: %d records are missing (was a WAL file deleted or the file restored from "
            "an old copy?). Calls they recorded may have run; their counter charges are taken from "
            "the store too. Strict durability serves again only after `ledgergate run --accept-log-gap`.",
            self.log,
            end,
            store_end,
            committed,
            seen - end,
        )
        return LogGap(
            log_end=end,
            seen_end=seen,
            lost=seen - end,
            store_end=store_end,
            committed=committed,
            durability=self.cfg.eventlog.durability,
            accepted_by="batched" if self.cfg.eventlog.durability == "batched" else "flag",
        )

    async def accept_log_gap(self, counters_from_store: int) -> None:
        """Record the gap on the log (a log.gap event) and in the store (a '(log.gap)' row:
        positions seen before it no longer count, so the same gap is not reported again)."""
        gap = self.gap
        if gap is None:
            return
        gap = gap.model_copy(update={"counters_from_store": counters_from_store})
        await self.log.append([encode(gap)])
        await self.log.flush()
        await self.store.insert_json(
            "log_positions",
            [
                orjson.dumps(
                    {"consumer": GAP_MARK, "next_offset": gap.log_end, "ts_ms": time.time_ns() // 1_000_000}
                )
            ],
        )
        log.warning(
            "log gap of %d records accepted (%s): recorded as a log.gap event", gap.lost, gap.accepted_by
        )
        self.gap = None

    def start_alerts(self, clock: Callable[[], float] = time.time, instance: str = "") -> None:
        """Run the alerts consumer (consumers/alerts.py) when the config has rules; supervised
        like the others. ValueError when a sink cannot be built (e.g. its secret_env unset)."""
        self.alerts = build_alerts(self.cfg, self.log, clock=clock, instance=instance)
        if self.alerts is not None:
            self._tasks.append(asyncio.create_task(supervise(self.alerts), name="alerts-consumer"))

    async def events(self, params: dict[str, str]) -> AsyncIterator[tuple[int, str, bytes]]:
        """The live view of GET /admin/events: ValueError for bad parameters (before streaming).
        The start offset is fixed here, before the stream's headers go out: a client that has
        the headers sees every event appended after that."""
        query = LiveQuery.parse(params)
        if query.start is None:
            end = await self.log.end_offset()
            query.start = end if query.follow else max(0, end - query.limit)
        return follow_events(self.log, query, self.closing)

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
            if not self._checked and len(await self.log.partitions()) == 1:  # CLI on the store: rebuild first
                self._checked = True
                await self.checker.check(background=False)

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
        answer = forensics.LaggedAnswer(columns, rows, lag)
        answer.rebuilding = self.checker.rebuilding()  # never silently partial
        return answer

    async def consumer_lag(self) -> dict[str, tuple[int, float]]:
        """Per consumer: (events, seconds) behind the event log (for /metrics)."""
        now_ms = int(time.time() * 1000)
        out: dict[str, tuple[int, float]] = {}
        for consumer in (self.audit, self.counters):
            lag = await forensics.lag_behind(self.log, [consumer.name], now_ms)
            out[consumer.name] = (0, 0.0) if lag is None else (lag.events, lag.seconds)
        return out

    async def follow(self) -> AsyncIterator[list[bytes]]:
        """The event log's records from now on, batch by batch (the dashboard's live stream)."""
        tail = self.log.tail_position(await self.log.end_position())
        async with contextlib.aclosing(tail):  # type: ignore[type-var]
            async for batch in tail:
                yield [r.payload for r in batch]

    async def _known_server(self, server: str) -> None:
        """A --server filter that names no server is a typo, not an empty answer."""
        if server in self.cfg.servers:
            return
        # audit_auth_failures too: failed logins name the server of the URL they tried
        _, rows = await self.store.query(
            "SELECT server FROM (SELECT DISTINCT server FROM audit_calls"
            " UNION DISTINCT SELECT DISTINCT server FROM audit_auth_failures) ORDER BY server"
        )
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

    async def simulate(self, data: bytes, server: str, since: str | None = None) -> dict[str, Any]:
        """POST /admin/policies/simulate: the recorded calls through a candidate policy."""
        return await simulate_policy(self.log, self.cfg, data, server, since)

    async def close(self) -> None:
        await self.checker.close()
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


async def simulate_policy(
    eventlog: EventLog, cfg: Config, data: bytes, server: str, since: str | None = None
) -> dict[str, Any]:
    """Replay ``server``'s recorded calls (from ``since``: 7d, 1h, ISO) through the policy
    file ``data``. ValueError (PolicyError included) for a broken policy, an unknown server
    or a bad ``since``."""
    from gateway.policy.simulate import simulate_log
    from schemas.policy import parse_policy

    if server not in cfg.servers:
        known = ", ".join(sorted(cfg.servers)) or "none"
        raise ValueError(f"unknown server {server!r} (servers in {cfg.source.name}: {known})")
    policy = parse_policy(data, "candidate policy")
    since_ms = int(forensics.parse_since(since).timestamp() * 1000) if since else None
    await eventlog.flush()
    sim = await simulate_log(eventlog, policy, server, since_ms)
    return sim.as_json()


def query_limits(cfg: Config) -> QueryLimits:
    s = cfg.store
    return QueryLimits(s.query_timeout_s, s.query_max_rows, s.query_max_bytes, s.query_max_memory)


class DataDirBusy(RuntimeError):
    pass


class StartupError(RuntimeError):
    """The gateway cannot start: the message says what and where."""


ADMIN_SOCKET = "admin.sock"  # in data_dir: the admin API without a token, for the owner only
_SOCKET_LINE = re.compile(r"^admin_socket (.+)$", re.M)


def lock_data_dir(data_dir: Path) -> IO[str]:
    """One process owns an embedded store (chDB) at a time: take an exclusive lock on
    data_dir/lock or say clearly who holds it and how to stop it.

    The lock file says who holds it: ``ledgergate pid N``, then, once the gateway serves its
    local admin socket, ``admin_socket PATH`` (``note_admin_socket``)."""
    f = open(data_dir / "lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.readline().strip() or "another process"
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


def note_admin_socket(lock: IO[str], path: Path) -> None:
    """Name the admin socket in the lock file (held by this process), for the CLI."""
    lock.seek(0)
    lock.truncate()
    lock.write(f"ledgergate pid {os.getpid()}\nadmin_socket {path}\n")
    lock.flush()


def admin_socket(data_dir: Path) -> tuple[int | None, Path | None]:
    """(pid, socket path) of the live gateway named in data_dir/lock, when one is; the path is
    the one the lock names, else data_dir/admin.sock when that file exists (a gateway whose
    store is not embedded takes no lock). A stale file refuses connections: the caller tries."""
    pid = data_dir_holder(data_dir)
    path: Path | None = None
    if pid is not None:
        with contextlib.suppress(OSError):
            m = _SOCKET_LINE.search((data_dir / "lock").read_text())
            if m is not None:
                path = Path(m.group(1))
    if path is None and (data_dir / ADMIN_SOCKET).exists():
        path = data_dir / ADMIN_SOCKET
    return pid, path


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


async def start_admin_socket(cfg: Config, embedded: Embedded, app: App, addon: Addon) -> HttpServer | None:
    """Serve the admin API (forensics, reload, health detail; never the MCP routes) without a
    token on data_dir/admin.sock, mode 0600: the CLI of the same user asks the running gateway
    with no configuration; [gateway] admin_token stays for remote HTTP. Named in the lock file.
    A socket that cannot be served is an ERROR line, not a refusal to serve agents."""
    from gateway.admin import add_admin_routes, add_event_stream
    from gateway.proxy import health, health_doc

    proxy = app[PROXY_KEY]

    async def health_detail(req: Request) -> Response:
        return Response(body=orjson.dumps(health_doc(proxy)), content_type="application/json")

    local_app = App(EdgeLimits(max_body_bytes=max(cfg.gateway.max_body_bytes, 1 << 20)))
    local_app.add_get("/healthz", health)
    add_admin_routes(local_app, None, embedded.answer, app[POLICIES_KEY].reload, addon, health=health_detail)
    from gateway.admin import add_approval_routes

    add_approval_routes(local_app, None, proxy.approvals)
    add_event_stream(local_app, None, embedded.events, addon)
    path = cfg.data_dir.absolute() / ADMIN_SOCKET
    local = HttpServer(local_app, unix_path=path)
    try:
        await local.start()
    except OSError as exc:
        log.error(
            "cannot serve the local admin socket %s: %s; the CLI cannot ask this gateway without "
            "[gateway] admin_token",
            path,
            exc.strerror or exc,
        )
        return None
    if embedded._lock is not None:
        note_admin_socket(embedded._lock, path)
    log.info("admin API for the CLI on %s (owner only, no token)", path)
    return local


async def fold_store_counters(store: AuditStore, limiters: dict[str, Any], window_s: int, now: float) -> int:
    """Counters from the store: the charges of allowed calls in audit_calls whose windows are
    still open; each cell is raised to the store's count when that is larger (never lowered).
    After a log gap the log lost charges the store still holds. Returns the charges added."""
    if window_s <= 0:
        return 0
    _, rows = await store.query(
        "SELECT server, charges, count() AS n FROM audit_calls FINAL WHERE decision = 'allow' "
        "AND ts >= {since:DateTime64(3, 'UTC')} AND charges NOT IN ('', '[]') GROUP BY server, charges",
        {"since": datetime.fromtimestamp(now - window_s, UTC)},
    )
    totals: dict[tuple[str, CounterKey], int] = {}
    for server, raw, n in rows:
        for ch in orjson.loads(raw):
            key = CounterKey(ch["counter"], ch["scope"], ch["key"], ch["window_s"], ch["window_start"])
            if key.window_start + key.window_s > now:
                totals[(server, key)] = totals.get((server, key), 0) + int(n)
    added = 0
    for (server, key), n in totals.items():
        limiter = limiters.get(server)
        if limiter is None:
            continue
        have = limiter.view().get(key, 0)
        if n > have:
            limiter.add(key, n - have)
            added += n - have
    return added


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
    accept_log_gap: bool = False,
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
    if embedded.gap is not None and cfg.eventlog.durability == "strict" and not accept_log_gap:
        gap = embedded.gap
        await embedded.close()
        raise StartupError(
            f"the event log in {cfg.data_dir} went backwards: it ends at offset {gap.log_end} but "
            f"{gap.seen_end} were seen before ({gap.lost} records lost). Strict durability does not "
            "serve on a log with a hole until an operator acknowledges it: look at the log above, "
            "then start with `ledgergate run --accept-log-gap` (counters are then folded from the "
            "store too, so limits hold, and a log.gap event records the gap)"
        )
    addon = AuditAddon(
        embedded.log,
        instance_id(cfg.gateway.instance_id),
        server_redact={name: srv.redact for name, srv in cfg.servers.items() if srv.redact},
        auth_failure_interval_s=cfg.gateway.auth_failure_interval_s,
        auth_failure_max_keys=cfg.gateway.auth_failure_max_keys,
    )
    local: HttpServer | None = None
    from gateway.observability.metrics import Metrics

    # counted only when someone can read them: /metrics behind the admin token, or metrics_listen
    metrics = Metrics() if cfg.gateway.admin_token or cfg.gateway.metrics_listen else None
    if metrics is not None:
        metrics.eventlog = embedded.log
        metrics.lag = embedded.consumer_lag
        metrics.alerts = getattr(embedded, "alerts", None)  # the alerts consumer, once it exists
    hook: Any = addon
    provider: Any = None
    if cfg.telemetry.otlp_endpoint:  # only then is OpenTelemetry imported at all
        from gateway.observability.tracing import TracingAddon, provider_for

        provider = provider_for(cfg.telemetry)
        hook = TracingAddon(addon, provider)
    metrics_server: HttpServer | None = None
    replicas: ReplicaFold | None = None
    try:
        app = build_app(
            cfg,
            addons=[hook],
            clock=clock,
            admin=embedded.answer if cfg.gateway.admin_token else None,
            metrics=metrics,
            trace_incoming=provider is not None,
            ui_events=embedded.follow,
        )
        addon.policies = app[POLICIES_KEY]
        if cfg.gateway.admin_token:
            from gateway.admin import add_simulate_route

            add_simulate_route(app, cfg.gateway.admin_token, embedded.simulate)
        proxy = app[PROXY_KEY]
        spool_stats = getattr(embedded.log, "spool_stats", None)
        if spool_stats is not None:  # the Kafka log: its local spool's depth and age on /admin/health
            proxy.health_extras.append(lambda: {"spool": spool_stats()})
        start_live(cfg, embedded, app, addon, clock)
        t0 = time.perf_counter()
        folded, end = await rebuild_limiters_to(
            embedded.log, proxy.limiters, longest_window_s(app[POLICIES_KEY]), proxy.clock()
        )
        log.info(
            "rate-limit counters rebuilt from the log: %d charges in %.3f s", folded, time.perf_counter() - t0
        )
        if embedded.gap is not None:  # the log lost charges: the store may still hold them
            from_store = await fold_store_counters(
                embedded.store, proxy.limiters, longest_window_s(app[POLICIES_KEY]), proxy.clock()
            )
            log.warning("log gap: %d counter charges folded from the store on top of the log's", from_store)
            await embedded.accept_log_gap(from_store)
        if cfg.eventlog.backend == "kafka":
            # replicas on one topic share limits: fold the others' calls as they arrive
            replicas = ReplicaFold(embedded.log, proxy.limiters, addon.instance, proxy.clock)
            replicas.start(end)
            if cfg.gateway.admin_token:
                app.add_get("/admin/replicas", replicas_handler(replicas, cfg.gateway.admin_token))
        server = HttpServer(app, cfg.gateway.host, cfg.gateway.port)
        try:
            await server.start()
        except OSError as exc:
            raise StartupError(f"cannot serve on {cfg.gateway.listen}: {exc.strerror or exc}") from exc
        local = await start_admin_socket(cfg, embedded, app, addon)
        if metrics is not None:
            metrics.servers["gateway"] = server
        if metrics is not None and cfg.gateway.metrics_listen:
            metrics_app = App()
            metrics_app.add_get("/metrics", metrics.handler(None))
            host, _, port = cfg.gateway.metrics_listen.rpartition(":")
            metrics_server = HttpServer(metrics_app, host.strip("[]"), int(port))
            try:
                await metrics_server.start()
            except OSError as exc:
                await server.close()
                raise StartupError(
                    f"cannot serve metrics on {cfg.gateway.metrics_listen}: {exc.strerror or exc}"
                ) from exc
            log.info("metrics on http://%s:%d/metrics", metrics_server.host, metrics_server.port)
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
        embedded.closing.set()
        ui = app.get(UI_KEY)
        if ui is not None:
            ui.close()  # open dashboard streams end now, not after the graceful-shutdown timeout
        if local is not None:
            local, closing = None, local
            await closing.close()  # first: no question is asked of a store about to close
        if metrics_server is not None:
            await metrics_server.close()
        await server.close()
    finally:
        if local is not None:  # failed or cancelled before a clean stop: still remove the socket
            with contextlib.suppress(Exception):
                await local.close()
        if provider is not None:
            hook.close()
            with contextlib.suppress(Exception):  # flushes the last spans: blocking HTTP, off the loop
                await asyncio.to_thread(provider.shutdown)
        if replicas is not None:
            await replicas.close()
        with contextlib.suppress(Exception):
            await addon.close()
        await embedded.close()


def start_live(
    cfg: Config, embedded: Embedded, app: Any, addon: AuditAddon, clock: Callable[[], float]
) -> None:
    """Alerts and the live view: the alerts consumer, and GET /admin/events (admin token)."""
    from gateway.admin import add_event_stream

    try:
        embedded.start_alerts(clock, addon.instance)
    except ValueError as exc:
        raise StartupError(f"{cfg.source}: alerts: {exc}") from exc
    if cfg.gateway.admin_token:
        add_event_stream(app, cfg.gateway.admin_token, embedded.events, addon)
