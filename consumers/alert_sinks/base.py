"""What every alert sink implements: ``send`` one alert document, or raise ``DeliveryError``.

Retries, backoff, the bounded queue and the alert.delivered / alert.failed events are the
consumer's job (consumers/alerts.py ``SinkWorker``), the same for every sink."""

from __future__ import annotations

import abc
from typing import Any

import orjson


class DeliveryError(Exception):
    """The sink did not accept the alert. ``retry``: worth trying again (timeouts, 5xx, 429);
    ``retry_after_s``: the receiver asked for this wait (Retry-After)."""

    def __init__(
        self,
        message: str,
        *,
        retry: bool = True,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retry = retry
        self.status = status
        self.retry_after_s = retry_after_s


class Sink(abc.ABC):
    """One destination of alerts. ``key`` names it in alert.delivered / alert.failed events."""

    key: str = ""
    retries: bool = False  # False: send() either accepts or fails for good (stdout)

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections (called once the consumer runs)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release them."""

    @abc.abstractmethod
    async def send(self, alert: dict[str, Any]) -> int | None:
        """Deliver one alert document; return the receiver's status if it has one."""


def alert_json(alert: dict[str, Any]) -> bytes:
    """The alert document as the json format sends it (the alert.fired event's fields)."""
    return orjson.dumps(alert)


def slack_json(alert: dict[str, Any]) -> bytes:
    """A Slack / Mattermost incoming-webhook payload: ``{"text": ...}`` (mrkdwn)."""
    lines = [f":rotating_light: *{alert.get('text') or alert.get('rule')}*"]
    for ex in alert.get("examples", [])[:3]:
        who = ex.get("agent") or ex.get("remote") or "?"
        what = ex.get("tool") or ex.get("method") or ex.get("server") or ""
        why = ex.get("reason") or ex.get("decision") or ""
        rule = f" [{ex['rule']}]" if ex.get("rule") else ""
        lines.append(f"• {who} → {what}: {why}{rule}")
    if alert.get("evidence"):
        lines.append(f"Evidence: `{alert['evidence']}`")
    lines.append(f"alert_id `{alert.get('alert_id')}`")
    return orjson.dumps({"text": "\n".join(lines)})
