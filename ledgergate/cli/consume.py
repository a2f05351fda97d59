"""`ledgergate consume audit|counters|alerts`: one consumer as its own process.

Part of the CLI composition root. Each process is a member of the Kafka consumer group
``ledgergate.<kind>`` on the decisions topic (``eventlog.kafka.KafkaGroupReader``): start
several of one kind and they share the partitions; one that dies has its partitions moved
to the others. A batch's offsets are committed only after its write to ClickHouse
succeeded (at-least-once; the writes are idempotent: ReplacingMergeTree / uniqExact
states keyed by event_id), so a SIGKILL loses nothing and doubles nothing in the answers.
While ClickHouse is down the write is retried with backoff (``consumers.runner.supervise``)
and nothing is committed; the lag grows in the Kafka topic and drains when it is back.

SIGTERM / SIGINT: the batch in hand is written and committed, then the process leaves the
group (its partitions move at once) and exits 0. Every ``--status-interval-s`` a status
line on stderr gives records consumed, events written and the lag (from each assigned
partition's highwater, never ListOffsets for the end).

The config (``-c``) is optional: without it the defaults and the LEDGERGATE_* environment
variables apply ([eventlog] topic, partitions, replication; [store] clickhouse, user,
password); ``--kafka`` and ``--clickhouse`` override the config.

Exit codes: 0 stopped by a signal; 2 bad arguments or config, or the consumer is not in
this build; 3 the store's data dir is held by another process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, cast

from gateway.config import Config, ConfigError, config_errors, load_config
from ledgergate.cli.audit import _positive

log = logging.getLogger("ledgergate")

KINDS = ("audit", "counters", "alerts")


class ConsumeError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {v}")
    return v


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "consume",
        help="run one consumer (audit, counters or alerts) as its own process in a Kafka consumer group",
    )
    p.add_argument("kind", choices=KINDS, help="which consumer")
    p.add_argument(
        "--kafka", metavar="HOST:PORT", help="Kafka bootstrap servers (default: [eventlog] bootstrap)"
    )
    p.add_argument(
        "--clickhouse",
        metavar="URL",
        help="ClickHouse server, e.g. http://127.0.0.1:8123 (default: [store] clickhouse); user and "
        "password from CLICKHOUSE_USER / CLICKHOUSE_PASSWORD or LEDGERGATE_STORE_USER / _PASSWORD",
    )
    p.add_argument("--config", "-c", help="the gateway's config file (optional: topic, store, credentials)")
    p.add_argument("--topic", help="the decisions topic (default: [eventlog] topic)")
    p.add_argument("--batch", type=_positive, default=10_000, help="records per write at most (10000)")
    p.add_argument(
        "--linger-s",
        type=_seconds,
        default=1.0,
        help="after a small batch, wait this long for more before the next write (1.0)",
    )
    p.add_argument(
        "--status-interval-s", type=_seconds, default=10.0, help="a status line every N s on stderr (10)"
    )
    p.set_defaults(fn=cmd_consume)


def load(path: str | None) -> Config:
    """The config file, or (none given) the defaults with the LEDGERGATE_* environment applied."""
    try:
        if path:
            return load_config(path)
        cfg, errors = config_errors({}, Path.cwd() / "ledgergate.toml")
    except ConfigError as exc:
        raise ConsumeError(2, str(exc)) from None
    errors = [e for e in errors if e.key != "servers"]  # a consumer serves nothing
    if errors or cfg is None:
        raise ConsumeError(2, str(errors[0]) if errors else "invalid configuration")
    return cfg


def consumer_class(kind: str) -> type[Any]:
    if kind == "audit":
        from consumers.audit import AuditConsumer

        return AuditConsumer
    if kind == "counters":
        from consumers.counters import CountersConsumer

        return CountersConsumer
    if kind == "alerts":
        import importlib

        try:
            alerts = importlib.import_module("consumers.alerts")
        except ModuleNotFoundError as exc:
            if exc.name != "consumers.alerts":
                raise
            raise ConsumeError(
                2,
                "the alerts consumer is not part of this build (no consumers/alerts.py); "
                "run audit or counters",
            ) from None
        cls = getattr(alerts, "AlertsConsumer", None)
        if cls is None:
            raise ConsumeError(2, "consumers/alerts.py has no AlertsConsumer class; this build cannot run it")
        return cast(type[Any], cls)
    raise ConsumeError(2, f"unknown consumer {kind!r}; one of {', '.join(KINDS)}")


async def _retry(what: str, fn: Any, stop: asyncio.Event) -> Any:
    """``await fn()`` until it succeeds or `stop` is set (then None); backoff up to 5 s."""
    delay = 0.25
    while not stop.is_set():
        try:
            return await fn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s: %s; retrying in %.1f s", what, exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 5.0)
    return None


async def consume(
    cfg: Config,
    kind: str,
    *,
    bootstrap: str,
    batch: int = 10_000,
    linger_s: float = 1.0,
    status_interval_s: float = 10.0,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the `kind` consumer in its group until `stop` (default: SIGTERM / SIGINT)."""
    from consumers.runner import supervise
    from consumers.store import open_store
    from eventlog.kafka import KafkaGroupReader
    from ledgergate.embedded import DataDirBusy, lock_data_dir, query_limits

    cls = consumer_class(kind)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(RuntimeError):
                loop.add_signal_handler(sig, stop.set)
    spec = (cfg.store.clickhouse or "embedded").strip()
    lock = None
    if spec == "embedded":  # chDB in data_dir: one process at a time
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = lock_data_dir(cfg.data_dir)
        except DataDirBusy as exc:
            raise ConsumeError(3, str(exc)) from None
    ev = cfg.eventlog
    reader = KafkaGroupReader(bootstrap, ev.topic, kind, partitions=ev.partitions, replication=ev.replication)
    user, password = cfg.store.credentials()
    store = None
    task: asyncio.Task[None] | None = None
    try:
        store = await _retry(
            f"consume {kind}: ClickHouse {spec}",
            lambda: open_store(spec, cfg.data_dir, query_limits(cfg), user=user, password=password),
            stop,
        )
        if store is None:
            return

        async def join() -> bool:
            await reader.open()
            return True

        if not await _retry(f"consume {kind}: Kafka {bootstrap}", join, stop):
            return
        consumer = cls(reader, store, kind, batch=batch)
        consumer.linger_s = linger_s
        log.info(
            "consume %s: group %s on topic %s at %s -> %s", kind, reader.group, ev.topic, bootstrap, store
        )
        task = asyncio.create_task(supervise(consumer), name=f"consume-{kind}")
        stopped = asyncio.ensure_future(stop.wait())
        t_next = time.monotonic() + status_interval_s
        try:
            while not stop.is_set() and not task.done():
                wait = max(0.05, t_next - time.monotonic()) if status_interval_s > 0 else None
                await asyncio.wait({task, stopped}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if status_interval_s > 0 and time.monotonic() >= t_next:
                    t_next = time.monotonic() + status_interval_s
                    _status(kind, consumer, reader)
        finally:
            stopped.cancel()
        if task.done():
            task.result()  # supervise returns only when the log ends: surface why
        # graceful: let the batch in hand be written and committed, then leave the group
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader._idle.wait(), 30)
        _status(kind, consumer, reader)
        log.info("consume %s: stopping", kind)
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await reader.close()
        if store is not None:
            await store.close()
        if lock is not None:
            lock.close()


def _status(kind: str, consumer: Any, reader: Any) -> None:
    log.info(
        "consume %s: %d records consumed, %d events written, lag %d, partitions %s",
        kind,
        consumer.processed,
        consumer.inserted,
        reader.lag(),
        reader.assigned,
    )


def cmd_consume(args: argparse.Namespace) -> int:
    try:
        cfg = load(args.config)
        if args.clickhouse:
            cfg.store.clickhouse = args.clickhouse
        if args.topic:
            cfg.eventlog.topic = args.topic
        bootstrap = args.kafka or (cfg.eventlog.bootstrap if cfg.eventlog.backend == "kafka" else None)
        if not bootstrap:
            raise ConsumeError(
                2, 'give --kafka HOST:PORT (or a config with [eventlog] backend = "kafka" and bootstrap)'
            )
        consumer_class(args.kind)  # fail before connecting when the consumer is not here
        asyncio.run(
            consume(
                cfg,
                args.kind,
                bootstrap=bootstrap,
                batch=args.batch,
                linger_s=args.linger_s,
                status_interval_s=args.status_interval_s,
            )
        )
    except ConsumeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        pass
    return 0
