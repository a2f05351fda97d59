"""Alert sinks, one module each. ``build_sink`` maps ``[[alerts.sinks]] type`` to its class.

Adding a sink is one module with a ``Sink`` subclass and one line in ``SINKS`` (a factory of
the sink's spec and the ``[eventlog]`` section, which the kafka sink takes its brokers from)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from consumers.alert_sinks.base import DeliveryError, Sink
from consumers.alert_sinks.kafka import KafkaSink
from consumers.alert_sinks.stdout import StdoutSink
from consumers.alert_sinks.webhook import WebhookSink
from schemas.alerts import AlertSink

__all__ = ["SINKS", "DeliveryError", "Sink", "build_sink", "kafka_bootstrap", "sink_problem"]


def kafka_bootstrap(spec: AlertSink, eventlog: Any = None) -> str | None:
    """The brokers of a kafka sink: its own ``bootstrap``, else ``[eventlog] bootstrap`` when
    that means something (backend = "kafka", or the key set explicitly: a Kafka sink beside
    the embedded log); None when no broker is known (the section's built-in default
    127.0.0.1:9092 is not taken as the user's word)."""
    if spec.bootstrap:
        return spec.bootstrap.strip()
    if eventlog is not None and (eventlog.backend == "kafka" or "bootstrap" in eventlog.model_fields_set):
        return str(eventlog.bootstrap)
    return None


def _kafka(spec: AlertSink, eventlog: Any) -> Sink:
    bootstrap = kafka_bootstrap(spec, eventlog)
    if bootstrap is None:  # sink_problem said so first
        raise ValueError("the kafka sink has no bootstrap")
    return KafkaSink(spec, bootstrap)


SINKS: dict[str, Callable[[AlertSink, Any], Sink]] = {
    "webhook": lambda spec, _eventlog: WebhookSink(spec),
    "stdout": lambda spec, _eventlog: StdoutSink(spec),
    "kafka": _kafka,
}


def sink_problem(spec: AlertSink, eventlog: Any = None) -> str | None:
    """Why this sink cannot run with this config (None if it can). ``eventlog``: the config's
    ``[eventlog]`` section (``gateway.config.EventlogSection``)."""
    if spec.type not in SINKS:
        return f"the {spec.type} sink is not available in this version (sinks: {', '.join(SINKS)})"
    if spec.type == "kafka" and kafka_bootstrap(spec, eventlog) is None:
        return (
            'the kafka sink does not know a broker: set bootstrap = "HOST:PORT" on the sink, '
            '[eventlog] bootstrap, or [eventlog] backend = "kafka"'
        )
    return None


def build_sink(spec: AlertSink, eventlog: Any = None) -> Sink:
    """The sink of one ``[[alerts.sinks]]`` entry; ValueError says why it cannot be built."""
    problem = sink_problem(spec, eventlog)
    if problem:
        raise ValueError(problem)
    return SINKS[spec.type](spec, eventlog)
