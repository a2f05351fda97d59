"""Prometheus metrics: a cheap addon on the call path, everything else read at scrape time.

Per call, ``MetricsAddon.completed`` bumps a few plain-int counters and two histograms in
dicts (no prometheus_client objects, no locks: the event loop is the only writer). The
``GatewayCollector`` turns them into metric families when ``GET /metrics`` is scraped,
together with what other objects already count (the event log's ``AppendStats``, the
sessions, the open connections, the stdio children, the consumers' lag, the alerts), so
the hot path pays nothing for those.

Cardinality is bounded: no per-session or per-argument label; ``tool`` is the tool name
only when the server's policy names it (else ``other``), ``method`` one of the MCP methods
(else ``other``), ``rule`` a JSON Pointer into a policy file or a gateway rule.
"""

from __future__ import annotations

import bisect
import hmac
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from gateway.audit.hooks import Addon

if TYPE_CHECKING:
    from aiohttp.web import Response

    from gateway.edge import Request
    from gateway.mcp.flow import CallFlow
    from gateway.mcp.sessions import Session

PREFIX = "ledgergate"
# seconds: from 100 µs (the gateway's own work) to a minute (a slow tool)
LATENCY_BOUNDS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
METHODS = frozenset(
    {
        "initialize",
        "ping",
        "tools/call",
        "tools/list",
        "resources/list",
        "resources/read",
        "resources/templates/list",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
    }
)
OTHER = "other"

LagFn = Callable[[], Awaitable[dict[str, tuple[int, float]]]]


class Hist:
    """A fixed-bucket histogram: non-cumulative counts (last slot is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


def histogram_family(
    name: str,
    doc: str,
    labels: Sequence[str],
    series: Iterable[tuple[Sequence[str], Sequence[float], Sequence[int], float]],
) -> HistogramMetricFamily:
    """A Prometheus histogram from (label values, bounds, non-cumulative counts, sum)."""
    fam = HistogramMetricFamily(name, doc, labels=list(labels))
    for values, bounds, counts, total in series:
        acc = 0
        buckets: list[tuple[str, float]] = []
        for bound, n in zip([*map(str, bounds), "+Inf"], counts, strict=True):
            acc += n
            buckets.append((bound, acc))
        fam.add_metric(list(values), buckets, total)
    return fam


class MetricsAddon(Addon):
    """Counts each call's outcome and latencies; counts policy loads and auth failures."""

    def __init__(self) -> None:
        # (server, method, tool, decision, outcome) -> calls
        self.calls: dict[tuple[str, str, str, str, str], int] = {}
        # (server, decision, rule) -> refusals
        self.refusals: dict[tuple[str, str, str], int] = {}
        self.upstream: dict[str, Hist] = {}  # server -> upstream latency (s)
        self.added: dict[str, Hist] = {}  # server -> gateway time excluding the upstream (s)
        self.reloads: dict[tuple[str, str], int] = {}  # (server, ok|failed) -> loads
        self.auth_failures: dict[str, int] = {}  # reason -> failures
        self.sessions_opened: dict[str, int] = {}  # server -> sessions
        self.tools: Callable[[str], Iterable[str]] | None = None  # server -> tools its policy names
        self._named: dict[str, frozenset[str]] = {}

    def bind_policies(self, policies: Any) -> None:
        """Label tools by the names the live policies give (PolicySet: ``[server].tools``)."""
        self.tools = lambda server: policies[server].tools
        self._named = {}

    def _tool(self, server: str, tool: str | None) -> str:
        if tool is None:
            return ""
        named = self._named.get(server)
        if named is None or tool not in named:
            # policies reload: refresh the server's names once when a new name shows up
            if self.tools is not None:
                try:
                    named = self._named[server] = frozenset(self.tools(server))
                except KeyError:
                    named = frozenset()
            if named is None or tool not in named:
                return OTHER
        return tool

    def completed(self, flow: CallFlow) -> None:
        server = flow.server
        d = flow.decision
        decision = d.action if d is not None else "none"
        method = flow.method if flow.method in METHODS else OTHER
        key = (server, method, self._tool(server, flow.tool), decision, flow.outcome or "none")
        self.calls[key] = self.calls.get(key, 0) + 1
        if d is not None and not d.allowed:
            rk = (server, decision, d.rule or "")
            self.refusals[rk] = self.refusals.get(rk, 0) + 1
        total = time.perf_counter() - flow.started
        up = flow.upstream_ms
        if up is not None:
            h = self.upstream.get(server)
            if h is None:
                h = self.upstream[server] = Hist()
            up_s = up / 1000.0
            h.observe(up_s)
            total -= up_s
        h = self.added.get(server)
        if h is None:
            h = self.added[server] = Hist()
        h.observe(max(0.0, total))

    def session_opened(self, session: Session) -> None:
        self.sessions_opened[session.server] = self.sessions_opened.get(session.server, 0) + 1

    def policy_loaded(self, server: str, path: str, version: str | None, error: str | None) -> None:
        k = (server, "failed" if error else "ok")
        self.reloads[k] = self.reloads.get(k, 0) + 1
        self._named.pop(server, None)

    def auth_failed(self, remote: str | None, server: str, reason: str) -> None:
        self.auth_failures[reason] = self.auth_failures.get(reason, 0) + 1


class GatewayCollector(Collector):
    """Builds every family at scrape time from the addon's counters and the live objects."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Any]:
        m = self.m
        a = m.addon
        p = f"{PREFIX}_"
        fam = CounterMetricFamily(
            p + "calls",
            "MCP requests by server, method, tool (named by the policy, else other), decision and outcome",
            labels=["server", "method", "tool", "decision", "outcome"],
        )
        for k, n in a.calls.items():
            fam.add_metric(list(k), n)
        yield fam
        fam = CounterMetricFamily(
            p + "refusals",
            "Refused requests by server, decision and rule",
            labels=["server", "decision", "rule"],
        )
        for k, n in a.refusals.items():
            fam.add_metric(list(k), n)
        yield fam
        yield histogram_family(
            p + "upstream_latency_seconds",
            "Time from handing a request to the upstream to its answer",
            ["server"],
            [((s,), h.bounds, h.counts, h.sum) for s, h in a.upstream.items()],
        )
        yield histogram_family(
            p + "added_latency_seconds",
            "Gateway time of a request excluding the upstream (decision, audit log append, relay)",
            ["server"],
            [((s,), h.bounds, h.counts, h.sum) for s, h in a.added.items()],
        )
        fam = CounterMetricFamily(
            p + "policy_loads", "Policy loads and reloads by server and result", labels=["server", "result"]
        )
        for k, n in a.reloads.items():
            fam.add_metric(list(k), n)
        yield fam
        fam = CounterMetricFamily(
            p + "auth_failures", "Requests refused for their credentials", labels=["reason"]
        )
        for k, n in a.auth_failures.items():
            fam.add_metric([k], n)
        yield fam
        fam = CounterMetricFamily(p + "sessions_opened", "MCP sessions opened", labels=["server"])
        for k, n in a.sessions_opened.items():
            fam.add_metric([k], n)
        yield fam
        yield from self._live()
        yield from self._eventlog()
        yield from self._lag()
        yield from self._alerts()

    def _live(self) -> Iterator[Any]:
        m = self.m
        p = f"{PREFIX}_"
        proxy = m.proxy
        if proxy is not None:
            fam = GaugeMetricFamily(p + "sessions", "Open MCP sessions", labels=["server"])
            per: dict[str, int] = dict.fromkeys(proxy.upstreams, 0)
            for s in proxy.sessions:
                per[s.server] = per.get(s.server, 0) + 1
            for server, n in per.items():
                fam.add_metric([server], n)
            yield fam
            yield GaugeMetricFamily(
                p + "inflight_requests", "POSTs being handled", value=sum(proxy.inflight.values())
            )
            children = GaugeMetricFamily(
                p + "stdio_children", "Running stdio upstream children", labels=["server"]
            )
            restarts = CounterMetricFamily(
                p + "stdio_child_restarts", "stdio upstream children restarted after dying", labels=["server"]
            )
            any_stdio = False
            for name, up in proxy.upstreams.items():
                procs = getattr(up, "processes", None)
                if not isinstance(procs, dict):
                    continue
                any_stdio = True
                alive = sum(1 for pr in procs.values() if getattr(pr, "alive", False))
                # `restarts` counts spawns: the first start of each child is not a restart
                again = sum(max(0, int(getattr(pr, "spawns", 0)) - 1) for pr in procs.values())
                children.add_metric([name], alive)
                restarts.add_metric([name], again)
            if any_stdio:
                yield children
                yield restarts
        if m.servers:
            fam = GaugeMetricFamily(p + "connections", "Open connections", labels=["listener"])
            for label, srv in m.servers.items():
                fam.add_metric([label], srv.open_connections)
            yield fam

    def _eventlog(self) -> Iterator[Any]:
        spool = getattr(self.m.eventlog, "spool_stats", None)
        if spool is not None:  # the Kafka log: decisions waiting in the local spool
            st = spool()
            p = f"{PREFIX}_eventlog_spool_"
            g = GaugeMetricFamily(p + "records", "Decisions in the local spool, not yet acked by Kafka")
            g.add_metric([], st["depth"])
            yield g
            g = GaugeMetricFamily(p + "age_seconds", "Age of the oldest decision in the local spool")
            g.add_metric([], st["age_s"])
            yield g
            g = GaugeMetricFamily(p + "active", "1 while appends go to the spool (broker down or slow)")
            g.add_metric([], 1 if st["spooling"] else 0)
            yield g
        stats = getattr(self.m.eventlog, "stats", None)
        if stats is None:
            return
        from eventlog.sqlite import APPEND_SECONDS_BOUNDS, BATCH_RECORDS_BOUNDS

        p = f"{PREFIX}_eventlog_"
        yield histogram_family(
            p + "append_seconds",
            "Event log group commit: from a batch's first record queued to its commit (append latency)",
            [],
            [((), APPEND_SECONDS_BOUNDS, stats.wait_buckets, stats.wait_s)],
        )
        yield histogram_family(
            p + "commit_seconds",
            "Event log group commit: one transaction (write + fsync)",
            [],
            [((), APPEND_SECONDS_BOUNDS, stats.commit_buckets, stats.commit_s)],
        )
        yield histogram_family(
            p + "batch_records",
            "Event log group commit: records per transaction",
            [],
            [((), BATCH_RECORDS_BOUNDS, stats.batch_buckets, float(stats.records))],
        )
        yield CounterMetricFamily(
            p + "commit_failures", "Event log commits that failed", value=stats.failures
        )

    def _lag(self) -> Iterator[Any]:
        lag = self.m.last_lag
        if lag is None:
            return
        events = GaugeMetricFamily(
            f"{PREFIX}_consumer_lag_events",
            "Events appended but not yet folded by the consumer",
            labels=["consumer"],
        )
        seconds = GaugeMetricFamily(
            f"{PREFIX}_consumer_lag_seconds",
            "Age of the oldest event the consumer has not folded (0 when caught up)",
            labels=["consumer"],
        )
        for name, (n, s) in lag.items():
            events.add_metric([name], n)
            seconds.add_metric([name], s)
        yield events
        yield seconds

    def _alerts(self) -> Iterator[Any]:
        """Alerts fired / delivered, when the alerts consumer exists (absent otherwise)."""
        src = self.m.alerts
        if src is None:
            return
        for what in ("fired", "delivered"):
            value = getattr(src, what, None)
            if value is None:
                continue
            fam = CounterMetricFamily(f"{PREFIX}_alerts_{what}", f"Alerts {what}", labels=["rule"])
            if isinstance(value, dict):
                for rule, n in value.items():
                    fam.add_metric([str(rule)], n)
            else:
                fam.add_metric([""], value)
            yield fam


class Metrics:
    """The /metrics endpoint's state: the addon (put it in the addon chain) and the live
    objects read at scrape time (set by the composition root once they exist)."""

    def __init__(self) -> None:
        self.addon = MetricsAddon()
        self.proxy: Any = None  # gateway.proxy.Proxy
        self.servers: dict[str, Any] = {}  # listener label -> HttpServer (open_connections)
        self.eventlog: Any = None  # an EventLog; its ``stats`` (AppendStats) if it has them
        self.lag: LagFn | None = None  # consumer -> (events, seconds) behind the log
        self.alerts: Any = None  # the alerts consumer (``fired`` / ``delivered``), when present
        self.last_lag: dict[str, tuple[int, float]] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(self))
        try:
            from prometheus_client import ProcessCollector

            ProcessCollector(registry=self.registry)
        except Exception:  # no /proc: no process_* families
            pass

    async def render(self) -> bytes:
        """The text exposition; the async sources (consumer lag) are read first."""
        if self.lag is not None:
            try:
                self.last_lag = await self.lag()
            except Exception:  # a scrape never fails for a source: the family is left out
                self.last_lag = None
        return generate_latest(self.registry)

    def handler(self, token: str | None) -> Callable[[Request], Awaitable[Response]]:
        """GET /metrics; with ``token`` it needs ``Authorization: Bearer <token>``."""
        from aiohttp.web import Response

        expected = f"Bearer {token}".encode() if token else None

        async def metrics(req: Request) -> Response:
            if expected is not None:
                given = req.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
                if not hmac.compare_digest(given, expected):
                    return Response(
                        status=401,
                        text='{"error": "unauthorized", "message": "missing or wrong admin token"}',
                        content_type="application/json",
                        headers={"WWW-Authenticate": 'Bearer realm="ledgergate-admin"'},
                    )
            body = await self.render()
            return Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        return metrics
