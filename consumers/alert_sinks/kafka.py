"""The Kafka sink: each alert one message on a topic (``type = "kafka"``).

Topic ``topic`` (default ``ledgergate.alerts``), created if missing with ONE partition (alerts
are few; one partition keeps them in firing order for whoever reads them) and ``replication``.
Brokers: the sink's ``bootstrap``, else ``[eventlog] bootstrap`` (``kafka_bootstrap`` in this
package's ``__init__`` decides; the event log itself may be embedded).

Message: key = ``alert_id``, value = the alert document exactly as the webhook's json format
sends it, header ``Idempotency-Key: <alert_id>``. Producer: acks=all, NO idempotence and NO
transactions (like eventlog/kafka.py: the test broker, tansu, lacks InitProducerId), so
delivery is at-least-once and a repeat is recognisable by its key. An ack within
``timeout_s`` accepts; anything else (no broker, no ack in time, a broker error) raises a
retryable ``DeliveryError`` and the consumer's ``SinkWorker`` backs off and tries again.

Nothing connects before the first alert: a broker that is down at start-up only delays the
alerts (they wait in the sink's queue), it does not stop the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from consumers.alert_sinks.base import DeliveryError, Sink, alert_json
from schemas.alerts import AlertSink

log = logging.getLogger("ledgergate.alerts")


class KafkaSink(Sink):
    retries = True

    def __init__(self, spec: AlertSink, bootstrap: str, *, client_id: str = "ledgergate-alerts") -> None:
        self.key = spec.key
        self.topic = spec.topic
        self.bootstrap = bootstrap
        self.replication = spec.replication
        self.timeout_s = spec.timeout_s
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._topic_ok = False
        self.sent = 0  # messages acked by the broker

    def __repr__(self) -> str:
        return f"KafkaSink({self.bootstrap!r}, topic={self.topic!r})"

    async def _ensure_topic(self) -> None:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            request_timeout_ms=int(self.timeout_s * 1000),
        )
        try:
            await admin.start()
            if self.topic not in await admin.list_topics():
                with contextlib.suppress(TopicAlreadyExistsError):  # another gateway was first
                    await admin.create_topics([NewTopic(self.topic, 1, self.replication)])
        finally:
            with contextlib.suppress(Exception):  # also after a failed start
                await admin.close()
        self._topic_ok = True

    async def _ensure_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                client_id=self.client_id,
                acks="all",
                enable_idempotence=False,  # not supported by tansu; repeats carry the alert_id key
                request_timeout_ms=int(self.timeout_s * 1000),
            )
            try:
                await producer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await producer.stop()
                raise
            self._producer = producer
        return self._producer

    async def _send(self, alert: dict[str, Any]) -> None:
        aid = str(alert["alert_id"]).encode()
        if not self._topic_ok:
            await self._ensure_topic()
        producer = await self._ensure_producer()
        await producer.send_and_wait(
            self.topic, value=alert_json(alert), key=aid, headers=[("Idempotency-Key", aid)]
        )

    async def send(self, alert: dict[str, Any]) -> int | None:
        try:
            # aiokafka bounds each request by request_timeout_ms; this bounds the whole try
            # (admin, producer start, metadata, ack). A send cut here may still be delivered
            # later by the producer: a repeat with the same key, which at-least-once allows.
            await asyncio.wait_for(self._send(alert), 2 * self.timeout_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            # the broker may have lost the topic (restarted without storage): check it next try
            self._topic_ok = False
            raise DeliveryError(
                f"kafka {self.bootstrap} topic {self.topic}: {type(exc).__name__}: {exc}"
            ) from None
        self.sent += 1
        return None

    async def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                await asyncio.wait_for(producer.stop(), self.timeout_s + 1)
            except (TimeoutError, KafkaError) as exc:
                log.warning("alerts: %r: producer stop: %s", self, exc)
