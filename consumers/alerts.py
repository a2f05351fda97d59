"""The alerts consumer: refusals, limit hits and failed logins on the log -> alerts -> sinks.

One more consumer of the decision log, with its own committed position (``alerts``). It
reads ``call.decided`` and ``auth.failed`` events, runs them through the ``[[alerts.rules]]``
(``RuleEngine``: pure, windows and throttles on the events' own timestamps, so a replay
rebuilds the same state and the same alert ids), and for each alert:

1. appends an ``alert.fired`` event to the log (the alert document is that event), then
2. hands it to every sink's ``SinkWorker`` (a bounded queue, retries with exponential
   backoff and jitter), which appends ``alert.delivered`` or ``alert.failed`` per sink.

Position: the committed offset never moves past the event that triggered an alert that is
not settled (delivered, or given up on, by every sink it was meant for), nor past events
that were read but not yet looked at. A dead webhook therefore never blocks the proxy (the
log takes events regardless) nor the other sinks (each has its own worker and queue); it
only keeps this consumer's committed position where it is.

Restart (even kill -9): the engine state is rebuilt by re-reading the log from a horizon
before the committed position (state only, nothing is sent), and the ``alert.*`` events in
that range say which alerts fired and which sinks settled them. An alert whose id already
fired is never fired again; one that some sink had not settled is handed to that sink again
with the same ``alert_id`` (its ``Idempotency-Key``), so a crash between a delivery and its
record repeats at most that one delivery, recognisably.

``follow_events`` is the live view (``GET /admin/events?follow=1``, ``ledgergate alerts
tail``, ``ledgergate audit calls --follow``): decided events and alerts from the log as they
are appended, filtered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import shlex
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from consumers.alert_sinks import DeliveryError, Sink, build_sink
from consumers.audit import event_kind
from consumers.runner import LogConsumer
from eventlog.base import EventLog, Record
from schemas.alerts import ON_DECISIONS, AlertRule, AlertSink
from schemas.events import ALERT_KINDS, AlertDelivered, AlertFailed, AlertFired, encode

log = logging.getLogger("ledgergate.alerts")

MAX_EXAMPLES = 5
MAX_GROUPS = 10_000  # per rule: state stays bounded whatever varies (addresses of failed logins)
MAX_SEEN = 100_000  # alert ids remembered for dedupe while running

_EXAMPLE_FIELDS = (
    "event_id",
    "approval_id",
    "ts",
    "agent",
    "grant",
    "server",
    "tool",
    "method",
    "decision",
    "rule",
    "reason",
    "arguments",
    "remote",
    "count",
)


def rfc3339_ms(ms: int) -> str:
    dt = datetime.fromtimestamp(ms / 1000, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def alert_id(rule: str, group: dict[str, str], first_event_id: str) -> str:
    """Derived from the rule, the group and the first event id: the same alert on every replay."""
    raw = orjson.dumps([rule, sorted(group.items()), first_event_id])
    return "al_" + hashlib.sha256(raw).hexdigest()[:32]


def _duration_text(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{int(seconds // n)}{unit}"
    return f"{seconds:g}s"


# ---------------------------------------------------------------- the rules (pure)


@dataclass(slots=True)
class _Hit:
    ts: int
    weight: int
    offset: int
    example: dict[str, Any]


@dataclass(slots=True)
class _Group:
    hits: deque[_Hit] = field(default_factory=deque)
    total: int = 0
    throttle_until: int | None = None
    suppressed: list[_Hit] = field(default_factory=list)  # the first MAX_EXAMPLES
    sup_count: int = 0
    sup_last: _Hit | None = None


@dataclass(slots=True)
class Alert:
    """An alert the engine produced: its document (the alert.fired fields, no envelope) and
    the log offset the consumer's position must not pass until every sink settled it."""

    doc: dict[str, Any]
    offset: int

    @property
    def id(self) -> str:
        return str(self.doc["alert_id"])


class CompiledRule:
    def __init__(self, rule: AlertRule) -> None:
        self.rule = rule
        self.name = rule.name
        self.on = rule.on
        self.threshold = rule.threshold
        self.window_ms = int(rule.window_s * 1000)
        self.throttle_ms = int(rule.throttle_s * 1000) if rule.throttle_s else None
        self.group_by = tuple(rule.group_by)
        self.decisions = ON_DECISIONS.get(rule.on, frozenset())
        self.groups: dict[tuple[str, ...], _Group] = {}

    def weight(self, ev: dict[str, Any]) -> int:
        """How many matching events ``ev`` stands for (0: it does not match)."""
        kind = ev.get("kind")
        if self.on == "auth_failure":
            return max(1, int(ev.get("count") or 1)) if kind == "auth.failed" else 0
        if self.on == "approval_pending":  # a held call: announced as it starts waiting
            return 1 if kind == "approval.requested" else 0
        return 1 if kind == "call.decided" and ev.get("decision") in self.decisions else 0

    def key(self, ev: dict[str, Any]) -> tuple[str, ...]:
        return tuple("" if ev.get(f) is None else str(ev.get(f)) for f in self.group_by)


class RuleEngine:
    """The rules over a stream of events. ``feed`` an event, get the alerts it completes;
    ``tick(now_ms)`` ends throttles whose time is up (their summaries). Windows and throttles
    run on the events' ``ts``; only ``tick`` takes the clock (injected by the caller)."""

    def __init__(self, rules: Iterable[AlertRule], *, config_path: str | None = None) -> None:
        self.rules = [CompiledRule(r) for r in rules]
        self.config_path = config_path

    def feed(self, ev: dict[str, Any], offset: int) -> list[Alert]:
        out: list[Alert] = []
        ts = int(ev.get("ts") or 0)
        for rule in self.rules:
            w = rule.weight(ev)
            if not w:
                continue
            key = rule.key(ev)
            g = rule.groups.get(key)
            if g is None:
                if len(rule.groups) >= MAX_GROUPS:
                    rule.groups.pop(next(iter(rule.groups)))  # the oldest group
                g = rule.groups[key] = _Group()
            hit = _Hit(ts, w, offset, {k: ev[k] for k in _EXAMPLE_FIELDS if ev.get(k) is not None})
            if g.throttle_until is not None and ts >= g.throttle_until:
                out += self._end_throttle(rule, key, g)
            if g.throttle_until is not None:  # throttled: count it for the summary
                g.sup_count += w
                g.sup_last = hit
                if len(g.suppressed) < MAX_EXAMPLES:
                    g.suppressed.append(hit)
                continue
            g.hits.append(hit)
            g.total += w
            while g.hits and g.hits[0].ts <= ts - rule.window_ms:
                g.total -= g.hits.popleft().weight
            if g.total >= rule.threshold:
                hits = list(g.hits)
                out.append(self._alert(rule, key, hits, hits[-1], g.total, summary=False))
                g.hits.clear()
                g.total = 0
                if rule.throttle_ms:
                    g.throttle_until = ts + rule.throttle_ms
        return out

    def tick(self, now_ms: int) -> list[Alert]:
        out: list[Alert] = []
        for rule in self.rules:
            for key, g in list(rule.groups.items()):
                if g.throttle_until is not None and now_ms >= g.throttle_until:
                    out += self._end_throttle(rule, key, g)
                if g.throttle_until is None and not g.hits:
                    del rule.groups[key]  # nothing left to remember
        return out

    def _end_throttle(self, rule: CompiledRule, key: tuple[str, ...], g: _Group) -> list[Alert]:
        """The throttle is over: a summary of what it suppressed (then a new throttle, so
        there is still at most one alert per group per throttle), or nothing."""
        assert g.throttle_until is not None and rule.throttle_ms is not None
        if not g.sup_count:
            g.throttle_until = None
            return []
        assert g.sup_last is not None
        alert = self._alert(rule, key, g.suppressed, g.sup_last, g.sup_count, summary=True)
        g.throttle_until += rule.throttle_ms
        g.suppressed, g.sup_count, g.sup_last = [], 0, None
        return [alert]

    def _alert(
        self,
        rule: CompiledRule,
        key: tuple[str, ...],
        hits: list[_Hit],
        last: _Hit,
        count: int,
        *,
        summary: bool,
    ) -> Alert:
        first = hits[0]
        group = dict(zip(rule.group_by, key, strict=True))
        first_id = str(first.example.get("event_id", ""))
        what = {"refusal": "refusals", "limit": "rate-limit refusals", "auth_failure": "failed logins"}.get(
            rule.on, "approvals pending"
        )
        where = " ".join(f"{k}={v or '-'}" for k, v in group.items())
        if summary:
            text = (
                f"{rule.name}: {count} more {what}{' by ' + where if where else ''} suppressed "
                f"by the {_duration_text(rule.throttle_ms / 1000)} throttle"  # type: ignore[operator]
            )
        elif count == 1 and rule.on == "approval_pending":
            ex = first.example
            aid = ex.get("approval_id", "?")
            text = (
                f"{rule.name}: {ex.get('agent', '?')} waits for approval {aid} to call {ex.get('tool', '?')} "
                f"on {ex.get('server', '?')}: `ledgergate approvals approve {aid}` or `... deny {aid}`"
            )
        elif count == 1 and rule.on != "auth_failure":
            ex = first.example
            text = (
                f"{rule.name}: {ex.get('agent', '?')} was refused {ex.get('tool') or ex.get('method', '?')} "
                f"on {ex.get('server', '?')}: {ex.get('reason') or ex.get('decision', '')}"
            )
        else:
            text = (
                f"{rule.name}: {count} {what}{' by ' + where if where else ''} within "
                f"{_duration_text(rule.window_ms / 1000)}"
            )
        doc = {
            "alert_id": alert_id(rule.name, group, first_id),
            "rule": rule.name,
            "on": rule.on,
            "group": group,
            "count": count,
            "threshold": rule.threshold,
            "window_s": rule.window_ms / 1000,
            "throttle_s": rule.throttle_ms / 1000 if rule.throttle_ms else None,
            "first_event_id": first_id,
            "last_event_id": str(last.example.get("event_id", "")),
            "first_ts": first.ts,
            "last_ts": last.ts,
            "summary": summary,
            "suppressed": count if summary else 0,
            "examples": [h.example for h in hits[:MAX_EXAMPLES]],
            "evidence": self.evidence(rule, {**_common(hits), **group}, first.ts, last.ts),
            "text": text,
        }
        return Alert(doc, last.offset)

    def evidence(self, rule: CompiledRule, group: dict[str, str], first_ts: int, last_ts: int) -> str:
        """A ready-made `ledgergate audit ...` command line that shows the alert's events."""
        argv = ["ledgergate", "audit"]
        if rule.on == "auth_failure":
            argv.append("denials")
        else:
            argv.append("calls")
            for name in ("agent", "grant", "tool", "server", "decision"):
                if group.get(name):
                    argv += [f"--{name}", group[name]]
            if rule.on == "limit" and "decision" not in group:
                argv += ["--decision", "rate_limited"]
        argv += ["--since", rfc3339_ms(first_ts), "--until", rfc3339_ms(last_ts + 1)]
        if self.config_path:
            argv += ["-c", self.config_path]
        return shlex.join(argv)


def _common(hits: list[_Hit]) -> dict[str, str]:
    """The agent / grant / tool / server every one of ``hits`` shares (narrows the evidence)."""
    out = {}
    for name in ("agent", "grant", "tool", "server"):
        values = {h.example.get(name) for h in hits}
        if len(values) == 1 and (v := values.pop()):
            out[name] = str(v)
    return out


# ---------------------------------------------------------------- delivery


@dataclass(slots=True)
class _Job:
    doc: dict[str, Any]
    attempts: int = 0


Report = Callable[["SinkWorker", _Job, int | None, DeliveryError | None, bool], Any]


class SinkWorker:
    """One sink's bounded queue and its delivery loop: in order, retrying the head with
    exponential backoff and full jitter (``retry_initial_s`` doubling up to ``retry_max_s``,
    a receiver's Retry-After honoured up to that), at most ``max_attempts`` tries. A full
    queue fails its oldest waiting alert (alert.failed, final) rather than grow or block."""

    def __init__(self, spec: AlertSink, sink: Sink, report: Report) -> None:
        self.spec = spec
        self.sink = sink
        self.key = spec.key
        self.report = report
        self.queue: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._busy: _Job | None = None
        self.delivered = 0
        self.failed = 0

    def __len__(self) -> int:
        return len(self.queue)

    def put(self, doc: dict[str, Any]) -> _Job | None:
        """Queue an alert; returns the job it pushed out when the queue was full."""
        dropped = None
        if len(self.queue) >= self.spec.queue_size:
            i = 1 if self.queue and self.queue[0] is self._busy else 0
            if i < len(self.queue):
                dropped = self.queue[i]
                del self.queue[i]
        self.queue.append(_Job(doc))
        self._wake.set()
        return dropped

    def backoff(self, attempts: int, retry_after_s: float | None = None) -> float:
        base = min(self.spec.retry_max_s, self.spec.retry_initial_s * 2 ** (attempts - 1))
        delay = random.uniform(base / 2, base)  # jitter: receivers coming back are not stampeded
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.spec.retry_max_s))
        return delay

    async def run(self) -> None:
        await self.sink.start()
        try:
            while True:
                while not self.queue:
                    self._wake.clear()
                    await self._wake.wait()
                job = self._busy = self.queue[0]
                job.attempts += 1
                try:
                    status = await self.sink.send(job.doc)
                except DeliveryError as exc:
                    final = not (exc.retry and self.sink.retries) or job.attempts >= self.spec.max_attempts
                    if final:
                        self._pop(job)
                        self.failed += 1
                    await self._report(job, exc.status, exc, final)
                    if not final:
                        await asyncio.sleep(self.backoff(job.attempts, exc.retry_after_s))
                    continue
                except Exception as exc:  # a sink bug must not kill the worker: fail this alert
                    log.exception("alerts: sink %s failed on alert %s", self.key, job.doc.get("alert_id"))
                    self._pop(job)
                    self.failed += 1
                    await self._report(
                        job, None, DeliveryError(f"{type(exc).__name__}: {exc}", retry=False), True
                    )
                    continue
                self._pop(job)
                self.delivered += 1
                await self._report(job, status, None, True)
        finally:
            self._busy = None
            await self.sink.close()

    def _pop(self, job: _Job) -> None:
        if self.queue and self.queue[0] is job:
            self.queue.popleft()
        self._busy = None

    async def _report(self, job: _Job, status: int | None, error: DeliveryError | None, final: bool) -> None:
        try:
            await self.report(self, job, status, error, final)
        except Exception as exc:  # the delivery stands; a restart may repeat it (same alert_id)
            log.error(
                "alerts: cannot record the delivery of %s to %s: %s", job.doc.get("alert_id"), self.key, exc
            )


# ---------------------------------------------------------------- the consumer


@dataclass(slots=True)
class _Pending:
    offset: int
    sinks: set[str]


class AlertsConsumer(LogConsumer):
    """See the module doc. ``clock`` (UTC seconds) only ends throttles (``tick``)."""

    kinds = frozenset({"call.decided", "auth.failed", "approval.requested"})

    def __init__(
        self,
        log: EventLog,
        rules: list[AlertRule],
        sinks: list[tuple[AlertSink, Sink]],
        *,
        name: str = "alerts",
        clock: Callable[[], float] = time.time,
        instance: str = "",
        config_path: str | None = None,
        tick_s: float = 1.0,
        batch: int = 10_000,
    ) -> None:
        super().__init__(log, None, name, batch=batch)  # type: ignore[arg-type]  # no store
        self.rules = rules
        self.sink_specs = sinks
        self.clock = clock
        self.instance = instance
        self.config_path = config_path
        self.tick_s = tick_s
        self.engine = RuleEngine(rules, config_path=config_path)
        self.workers: list[SinkWorker] = []
        self.fired = 0  # alerts fired by this instance
        self.deduped = 0  # alerts the engine produced again that had already fired
        self.ages_ms: list[float] = []  # alert age at delivery (last event -> sink accepted)
        self.committed_at = 0
        self._seen: dict[str, None] = {}
        self._pending: dict[str, _Pending] = {}
        self._read_to = 0
        self._fire_lock = asyncio.Lock()

    def __repr__(self) -> str:
        sinks = [s.key for s, _ in self.sink_specs]
        return f"AlertsConsumer(rules={[r.name for r in self.rules]}, sinks={sinks})"

    # ---- start-up: rebuild state and find what is not settled

    def horizon_ms(self) -> int:
        """How far before the committed position the rules' state can reach back."""
        longest = max((r.window_s + (r.throttle_s or 0) for r in self.rules), default=0)
        return int(2 * longest * 1000) + 60_000

    async def _start(self) -> None:
        self.engine = RuleEngine(self.rules, config_path=self.config_path)
        self._seen.clear()
        self._pending.clear()
        end = await self.log.end_offset()
        committed = await self.log.committed(self.name)
        if committed > end:  # see Embedded.repair_offsets: past the end would freeze alerts
            log.warning(
                "alerts: committed offset %d is past the end of the log (%d); reset to 0", committed, end
            )
            committed = 0
            await self.log.commit(self.name, 0)
        warm = 0
        if committed > 0:
            last = await self.log.read(committed - 1, 1)
            ts = int(orjson.loads(last[0].payload).get("ts") or 0) if last else 0
            warm = min(committed, await self.log.first_offset_since(ts - self.horizon_ms()))
        fired: dict[str, tuple[int, dict[str, Any]]] = {}
        settled: dict[str, set[str]] = {}
        offset = warm
        while offset < end:
            records = await self.log.read(offset, min(self.batch, end - offset))
            if not records:
                break
            for rec in records:
                kind = event_kind(rec.payload)
                if kind in ALERT_KINDS:
                    ev = self._decode(rec)
                    if ev is None:
                        continue
                    aid = str(ev.get("alert_id"))
                    if kind == "alert.fired":
                        fired.setdefault(aid, (rec.offset, ev))
                    elif kind == "alert.delivered" or ev.get("final"):
                        settled.setdefault(aid, set()).add(str(ev.get("sink")))
                elif rec.offset < committed and kind in self.kinds:
                    ev = self._decode(rec)
                    if ev is not None:
                        self.engine.feed(ev, rec.offset)  # state only: these alerts were handled
            offset = records[-1].offset + 1
        for aid in fired:
            self._remember(aid)
        self.workers = [SinkWorker(spec, sink, self._delivery) for spec, sink in self.sink_specs]
        by_key = {w.key: w for w in self.workers}
        again = 0
        for aid, (at, ev) in fired.items():
            meant = [k for k in ev.get("sinks") or by_key if k in by_key]
            todo = {k for k in meant if k not in settled.get(aid, set())}
            if todo:
                self._pending[aid] = _Pending(at, todo)
                for k in todo:
                    by_key[k].put(ev)
                again += 1
        self.committed_at = committed
        self._read_to = committed
        self.position = committed
        if again:
            log.info(
                "alerts: %d alert(s) fired before the restart go to their sinks again (same alert_id)", again
            )

    def _decode(self, rec: Record) -> dict[str, Any] | None:
        try:
            ev = orjson.loads(rec.payload)
        except orjson.JSONDecodeError:
            self.skipped += 1
            return None
        return ev if isinstance(ev, dict) else None

    def _remember(self, aid: str) -> None:
        self._seen[aid] = None
        if len(self._seen) > MAX_SEEN:
            self._seen.pop(next(iter(self._seen)))

    # ---- the loop

    async def run(self) -> None:
        await self._start()
        tasks = [asyncio.create_task(w.run(), name=f"alert-sink-{w.key}") for w in self.workers]
        tasks.append(asyncio.create_task(self._ticker(), name="alerts-tick"))
        self._advanced.set()
        try:
            async for records in self.log.tail(self._read_to, self.batch):
                for task in tasks:  # a worker or the ticker that died takes the consumer down
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                for rec in records:
                    if event_kind(rec.payload) not in self.kinds:
                        continue
                    ev = self._decode(rec)
                    if ev is None:
                        continue
                    for alert in self.engine.feed(ev, rec.offset):
                        await self._fire(alert)
                self._read_to = records[-1].offset + 1
                self.processed += len(records)
                await self._commit()
                self.position = self._read_to
                self._advanced.set()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            await self.tick()

    async def tick(self) -> None:
        """End the throttles whose time is up by the clock (their summaries fire), commit."""
        for alert in self.engine.tick(int(self.clock() * 1000)):
            await self._fire(alert)
        await self._commit()

    async def _fire(self, alert: Alert) -> None:
        async with self._fire_lock:
            if alert.id in self._seen:
                self.deduped += 1
                return
            keys = [w.key for w in self.workers]
            event = AlertFired(gateway=self.instance, sinks=keys, **alert.doc)
            payload = encode(event)
            doc = orjson.loads(payload)
            await self.log.append([payload])
            self._remember(alert.id)
            self.fired += 1
            if self.workers:
                self._pending[alert.id] = _Pending(alert.offset, set(keys))
            for w in self.workers:
                dropped = w.put(doc)
                if dropped is not None:
                    w.failed += 1
                    err = DeliveryError(f"retry queue full ({w.spec.queue_size} alerts)", retry=False)
                    log.error(
                        "alerts: sink %s: %s; alert %s given up", w.key, err, dropped.doc.get("alert_id")
                    )
                    await self._delivery(w, dropped, None, err, True)

    async def _delivery(
        self, worker: SinkWorker, job: _Job, status: int | None, error: DeliveryError | None, final: bool
    ) -> None:
        doc = job.doc
        age_ms = max(0.0, time.time() * 1000 - float(doc.get("last_ts") or 0))
        common = {
            "gateway": self.instance,
            "alert_id": doc["alert_id"],
            "rule": doc["rule"],
            "sink": worker.key,
        }
        if error is None:
            self.ages_ms.append(age_ms)
            if len(self.ages_ms) > 100_000:
                del self.ages_ms[:50_000]
            ev: Any = AlertDelivered(attempts=job.attempts, status=status, age_ms=round(age_ms, 3), **common)
        else:
            if final:
                log.error(
                    "alerts: sink %s gave up on %s after %d tries: %s",
                    worker.key,
                    doc["alert_id"],
                    job.attempts,
                    error,
                )
            else:
                log.warning("alerts: sink %s: %s (try %d); retrying", worker.key, error, job.attempts)
            ev = AlertFailed(
                attempts=job.attempts,
                status=error.status,
                error=str(error),
                final=final,
                age_ms=round(age_ms, 3),
                **common,
            )
        await self.log.append([encode(ev)])
        if final:
            p = self._pending.get(str(doc["alert_id"]))
            if p is not None:
                p.sinks.discard(worker.key)
                if not p.sinks:
                    del self._pending[str(doc["alert_id"])]

    async def _commit(self) -> None:
        """Move the committed position up to what was read, but never past an unsettled alert."""
        target = self._read_to
        if self._pending:
            target = min(target, min(p.offset for p in self._pending.values()))
        if target > self.committed_at:
            await self.log.commit(self.name, target)
            self.committed_at = target

    @property
    def unsettled(self) -> int:
        return len(self._pending)


def build_alerts(
    cfg: Any, eventlog: EventLog, *, clock: Callable[[], float] = time.time, instance: str = ""
) -> AlertsConsumer | None:
    """The alerts consumer of a config (None without rules: no rules, no alerts).
    ValueError when a sink cannot be built (a missing secret_env variable, a kafka sink that
    knows no broker)."""
    if not cfg.alerts.rules:
        return None
    sinks = [(spec, build_sink(spec, cfg.eventlog)) for spec in cfg.alerts.sinks]
    if not sinks:
        log.warning("alerts: rules but no [[alerts.sinks]]: alerts go to the log (alert.fired) only")
    return AlertsConsumer(
        eventlog, cfg.alerts.rules, sinks, clock=clock, instance=instance, config_path=str(cfg.source)
    )


# ---------------------------------------------------------------- the live view

LIVE_KINDS = {"call": ("call.decided",), "alert": ALERT_KINDS, "auth": ("auth.failed",)}
LIVE_FILTERS = ("tool", "server", "agent", "grant", "decision", "rule")
LIVE_PARAMS = ("follow", "kind", "from", "limit", *LIVE_FILTERS)


@dataclass(slots=True)
class LiveQuery:
    kinds: frozenset[str]
    filters: dict[str, str]
    follow: bool
    start: int | None
    limit: int

    @classmethod
    def parse(cls, params: dict[str, str]) -> LiveQuery:
        """From query-string values; ValueError names what is wrong."""
        unknown = sorted(set(params) - set(LIVE_PARAMS))
        if unknown:
            raise ValueError(f"unknown parameter {unknown[0]!r}; known: {', '.join(LIVE_PARAMS)}")
        kinds: set[str] = set()
        for k in (params.get("kind") or "call,alert").split(","):
            if k.strip() not in LIVE_KINDS:
                raise ValueError(f"kind must be a comma list of {', '.join(LIVE_KINDS)}, not {k!r}")
            kinds.update(LIVE_KINDS[k.strip()])
        follow = params.get("follow", "0") not in ("0", "", "false", "no")
        start = None
        if params.get("from") not in (None, ""):
            try:
                start = int(params["from"])
            except ValueError:
                raise ValueError(f"from must be a log offset, not {params['from']!r}") from None
            if start < 0:
                raise ValueError("from must be >= 0")
        try:
            limit = int(params.get("limit") or 1000)
        except ValueError:
            raise ValueError(f"limit must be an integer, not {params['limit']!r}") from None
        if limit <= 0:
            raise ValueError("limit must be > 0")
        filters = {k: params[k] for k in LIVE_FILTERS if params.get(k)}
        return cls(frozenset(kinds), filters, follow, start, limit)

    def matches(self, ev: dict[str, Any]) -> bool:
        for name, want in self.filters.items():
            if name == "decision" and want == "refused":
                if ev.get("kind") == "call.decided" and ev.get("decision") in ("allow", "pending_approval"):
                    return False
                continue
            if name == "rule" and ev.get("kind", "").startswith("alert."):
                if ev.get("rule") != want:
                    return False
                continue
            if ev.get("kind") == "call.decided" and ev.get(name) != want:
                return False
            if ev.get("kind") == "alert.fired" and name in ev.get("group", {}) and ev["group"][name] != want:
                return False
        return True


async def follow_events(
    eventlog: EventLog, query: LiveQuery, closing: asyncio.Event | None = None
) -> AsyncIterator[tuple[int, str, bytes]]:
    """(offset, kind, payload) of the matching events: from ``query.start`` (default: the
    end of the log when following, else the last ``limit`` records), to the end of the log,
    then (``follow``) as they are appended, until ``closing`` is set."""
    end = await eventlog.end_offset()
    start = query.start if query.start is not None else (end if query.follow else max(0, end - query.limit))
    sent = 0
    tail = eventlog.tail(start, 1000)
    stop = asyncio.ensure_future(closing.wait()) if closing is not None else None
    try:
        while True:
            if not query.follow and start >= end:
                return
            nxt = asyncio.ensure_future(anext(tail))
            waiting = {nxt} if stop is None else {nxt, stop}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                with contextlib.suppress(BaseException):
                    await nxt
                return
            try:
                records = nxt.result()
            except StopAsyncIteration:
                return
            for rec in records:
                if not query.follow and rec.offset >= end:
                    return
                start = rec.offset + 1
                kind = event_kind(rec.payload)
                if kind not in query.kinds:
                    continue
                try:
                    ev = orjson.loads(rec.payload)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(ev, dict) or not query.matches(ev):
                    continue
                yield rec.offset, kind or "", rec.payload
                sent += 1
                if not query.follow and sent >= query.limit:
                    return
    finally:
        if stop is not None:
            stop.cancel()
        with contextlib.suppress(Exception):
            await tail.aclose()  # type: ignore[attr-defined]
