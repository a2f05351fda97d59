"""The stdout sink: one JSON line per alert (``type = "stdout"``)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from consumers.alert_sinks.base import Sink, alert_json, slack_json
from schemas.alerts import AlertSink


class StdoutSink(Sink):
    def __init__(self, spec: AlertSink, out: TextIO | None = None) -> None:
        self.key = spec.key
        self.format = spec.format
        self.out = out

    async def send(self, alert: dict[str, Any]) -> int | None:
        out = self.out or sys.stdout
        body = slack_json(alert) if self.format == "slack" else alert_json(alert)
        out.write(body.decode() + "\n")
        out.flush()
        return None
