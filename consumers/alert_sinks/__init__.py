"""Alert sinks, one module each. ``build_sink`` maps ``[[alerts.sinks]] type`` to its class.

Adding a sink (the Kafka one, topic ``ledgergate.alerts``, once ``eventlog/kafka`` exists) is
one module with a ``Sink`` subclass and one line in ``SINKS``."""

from __future__ import annotations

from collections.abc import Callable

from consumers.alert_sinks.base import DeliveryError, Sink
from consumers.alert_sinks.stdout import StdoutSink
from consumers.alert_sinks.webhook import WebhookSink
from schemas.alerts import AlertSink

__all__ = ["SINKS", "DeliveryError", "Sink", "build_sink", "sink_problem"]

SINKS: dict[str, Callable[[AlertSink], Sink]] = {"webhook": WebhookSink, "stdout": StdoutSink}


def sink_problem(spec: AlertSink, eventlog_backend: str) -> str | None:
    """Why this sink cannot run with this config (None if it can)."""
    if spec.type == "kafka" and eventlog_backend != "kafka":
        return 'the kafka sink needs [eventlog] backend = "kafka" (it writes to that cluster)'
    if spec.type not in SINKS:
        return f"the {spec.type} sink is not available in this version (sinks: {', '.join(SINKS)})"
    return None


def build_sink(spec: AlertSink, eventlog_backend: str = "embedded") -> Sink:
    """The sink of one ``[[alerts.sinks]]`` entry; ValueError says why it cannot be built."""
    problem = sink_problem(spec, eventlog_backend)
    if problem:
        raise ValueError(problem)
    return SINKS[spec.type](spec)
