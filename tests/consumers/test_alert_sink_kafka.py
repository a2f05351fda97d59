"""The Kafka alert sink (consumers/alert_sinks/kafka.py) on a real tansu broker.

End to end like tests/consumers/test_alerts.py: serve() with the real whatsapp-mcp-server over
stdio, the official MCP SDK as the agent, the embedded event log, and a ``type = "kafka"``
sink; the topic is read back with a plain aiokafka consumer (manual assignment, the end taken
from ``highwater()``: tansu answers end_offsets() wrongly, shared/TESTING.md).

The first test owns the default topic ``ledgergate.alerts`` on the session broker; the
outage test runs its own broker (started only after the first alert failed).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from consumers.alert_sinks import build_sink, kafka_bootstrap, sink_problem
from consumers.alert_sinks.kafka import KafkaSink
from gateway.config import EventlogSection
from schemas.alerts import AlertSink
from tests.consumers.test_alerts import EVERY_REFUSAL, config, log_rows, sdk_client, serving, until
from tests.support.gateway import FakeClock
from tests.support.kafka import Tansu, kafka_broker, unique_topic
from tests.support.upstreams import StdioCommand

__all__ = ["kafka_broker"]  # the session fixture, used by name

ROOT = Path(__file__).resolve().parents[2]
FAST_RETRY = "retry_initial_s = 0.05\nretry_max_s = 0.2\n"


def test_where_a_kafka_sink_finds_its_brokers() -> None:
    spec = AlertSink(type="kafka")
    assert spec.topic == "ledgergate.alerts" and spec.key == "kafka:ledgergate.alerts"
    embedded = EventlogSection()  # its bootstrap is only the built-in default: not the user's word
    assert kafka_bootstrap(spec, embedded) is None and kafka_bootstrap(spec) is None
    assert "does not know a broker" in (sink_problem(spec, embedded) or "")
    with pytest.raises(ValueError, match="does not know a broker"):
        build_sink(spec, embedded)
    on_kafka = EventlogSection(backend="kafka", bootstrap="k1:9092,k2:9092")
    beside = EventlogSection(bootstrap="k3:9092")  # set explicitly beside the embedded log
    assert kafka_bootstrap(spec, on_kafka) == "k1:9092,k2:9092"
    assert kafka_bootstrap(spec, beside) == "k3:9092"
    own = AlertSink(type="kafka", bootstrap="k9:9092", topic="sec.alerts")
    assert kafka_bootstrap(own, on_kafka) == "k9:9092" and sink_problem(own) is None
    sink = build_sink(own, embedded)
    assert isinstance(sink, KafkaSink) and (sink.bootstrap, sink.topic) == ("k9:9092", "sec.alerts")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"type": "kafka", "format": "slack"}, 'format = "json" only'),
        ({"type": "kafka", "topic": "no spaces"}, "not a Kafka topic name"),
        ({"type": "kafka", "bootstrap": " "}, "at least one Kafka broker"),
        ({"type": "stdout", "bootstrap": "k:9092"}, "bootstrap is for kafka sinks"),
        ({"type": "webhook", "url": "http://h/x", "topic": "t"}, "topic is for kafka sinks"),
    ],
)
def test_kafka_sink_fields_are_validated(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AlertSink(**fields)


async def topic_messages(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[Any]:
    """Every message of partition 0 of ``topic``, up to its highwater."""
    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        out: list[Any] = []
        deadline = asyncio.get_running_loop().time() + timeout_s  # a bound, not a timing
        while asyncio.get_running_loop().time() < deadline:
            got = await consumer.getmany(tp, timeout_ms=200)
            out += got.get(tp, [])
            hw = consumer.highwater(tp)
            if hw is not None and await consumer.position(tp) >= hw:
                return out
        raise AssertionError(f"could not read {topic} to its highwater")
    finally:
        await consumer.stop()


def alert_events(cfg: Any) -> list[dict[str, Any]]:
    return log_rows(cfg)[2]


def the_message(messages: list[Any], fired: dict[str, Any]) -> None:
    """Exactly one message, and it is the alert document (the alert.fired event) keyed by its id."""
    assert len(messages) == 1, [m.value for m in messages]
    (msg,) = messages
    assert msg.key == fired["alert_id"].encode()
    assert dict(msg.headers) == {"Idempotency-Key": fired["alert_id"].encode()}
    assert orjson.loads(msg.value) == fired


async def test_a_refusal_is_one_message_on_ledgergate_alerts(
    tmp_path: Path, whatsapp_command: StdioCommand, kafka_broker: Tansu
) -> None:
    # the embedded log, and the sink's brokers from [eventlog] bootstrap (no bootstrap of its own)
    extra = (
        f'[eventlog]\nbootstrap = "{kafka_broker.bootstrap}"\n\n'
        + EVERY_REFUSAL
        + '\n[[alerts.sinks]]\ntype = "kafka"\n'
        + FAST_RETRY
    )
    cfg = config(tmp_path, whatsapp_command, extra)
    assert cfg.eventlog.backend == "embedded"
    async with serving(cfg, FakeClock()) as base:
        async with sdk_client(base) as c:
            assert (await c.call_tool("get_chats", {})).is_error  # refused by the seed policy
        events = await until(
            lambda: (ev := alert_events(cfg)) and any(e["kind"] == "alert.delivered" for e in ev) and ev,
            "alert.delivered on the log",
        )
    fired, delivered = events
    assert fired["kind"] == "alert.fired" and fired["sinks"] == ["kafka:ledgergate.alerts"]
    assert fired["rule"] == "every-refusal" and fired["examples"][0]["tool"] == "get_chats"
    assert delivered["kind"] == "alert.delivered" and delivered["sink"] == "kafka:ledgergate.alerts"
    assert delivered["alert_id"] == fired["alert_id"] and delivered["attempts"] == 1
    the_message(await topic_messages(kafka_broker.bootstrap, "ledgergate.alerts"), fired)


async def test_a_broker_down_at_first_gets_the_alert_once_it_is_up(
    tmp_path: Path, whatsapp_command: StdioCommand
) -> None:
    broker = Tansu(tmp_path / "broker")  # its port is chosen, nothing listens yet
    topic = unique_topic("alerts")
    extra = (
        EVERY_REFUSAL
        + f'\n[[alerts.sinks]]\ntype = "kafka"\nbootstrap = "{broker.bootstrap}"\ntopic = "{topic}"\n'
        + FAST_RETRY
        + "max_attempts = 1000\n"
    )
    cfg = config(tmp_path, whatsapp_command, extra)
    try:
        async with serving(cfg, FakeClock()) as base:
            async with sdk_client(base) as c:
                assert (await c.call_tool("get_chats", {})).is_error
            await until(
                lambda: sum(e["kind"] == "alert.failed" for e in alert_events(cfg)) >= 2,
                "two failed tries while the broker is down",
            )
            await broker.start()  # the topic does not exist yet either: the sink creates it
            events = await until(
                lambda: (ev := alert_events(cfg)) and any(e["kind"] == "alert.delivered" for e in ev) and ev,
                "alert.delivered once the broker is up",
            )
        fired, *failed, delivered = events
        assert fired["kind"] == "alert.fired" and len(failed) >= 2
        assert all(e["kind"] == "alert.failed" and e["final"] is False for e in failed)
        assert [e["attempts"] for e in failed] == list(range(1, len(failed) + 1))
        assert all(topic in e["error"] for e in failed)
        assert delivered["kind"] == "alert.delivered" and delivered["attempts"] == len(failed) + 1
        assert {e["alert_id"] for e in events} == {fired["alert_id"]}
        the_message(await topic_messages(broker.bootstrap, topic), fired)
    finally:
        broker.stop()


def check(cfg: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERGATE_")}
    env["LEDGERGATE_GATEWAY_LISTEN"] = "127.0.0.1:0"
    return subprocess.run(
        [sys.executable, "-m", "ledgergate.cli.main", "check", str(cfg)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_says_which_broker_a_kafka_sink_uses_or_that_none_is_known(
    tmp_path: Path, kafka_broker: Tansu
) -> None:
    (tmp_path / "policy.json").write_text('{"version":"1","default":"deny"}')
    head = '[servers.a]\nurl = "http://127.0.0.1:3001/mcp"\npolicy = "policy.json"\n\n' + EVERY_REFUSAL
    cfg = tmp_path / "ledgergate.toml"
    # no broker anywhere (the embedded log, no bootstrap), and one that does not answer
    cfg.write_text(
        head + '\n[[alerts.sinks]]\ntype = "kafka"\n'
        '\n[[alerts.sinks]]\ntype = "kafka"\nname = "down"\nbootstrap = "127.0.0.1:1"\n'
    )
    result = check(cfg)
    assert result.returncode == 2, result.stdout
    assert "alerts.sinks[0].bootstrap: the kafka sink does not know a broker" in result.stderr
    assert "alerts.sinks[1].bootstrap: no Kafka broker answers at 127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr
    # [eventlog] bootstrap set beside the embedded log: the sink uses it, check says so
    cfg.write_text(
        f'[eventlog]\nbootstrap = "{kafka_broker.bootstrap}"\n\n'
        + head
        + '\n[[alerts.sinks]]\ntype = "kafka"\n'
    )
    result = check(cfg)
    assert result.returncode == 0, result.stderr
    assert (
        f"alerts.sinks[0] (kafka:ledgergate.alerts): topic ledgergate.alerts on {kafka_broker.bootstrap} "
        "([eventlog] bootstrap)"
    ) in result.stdout
