"""The ``[[alerts.rules]]`` and ``[[alerts.sinks]]`` sections of the config (pydantic).

```toml
[[alerts.rules]]
name = "hammering"
on = "refusal"                 # refusal | limit | auth_failure | approval_pending
threshold = 5                  # 5 matching events ...
window = "1m"                  # ... within a minute ...
group_by = ["agent", "tool"]   # ... by one agent on one tool -> ONE aggregated alert
throttle = "10m"               # at most one alert per group per 10 minutes, then a summary

[[alerts.sinks]]
type = "webhook"               # webhook | stdout | kafka
url = "https://hooks.example/ledgergate"
secret_env = "LEDGERGATE_ALERT_SECRET"
format = "json"                # json | slack

[[alerts.sinks]]
type = "kafka"
topic = "ledgergate.alerts"    # created if missing
bootstrap = "kafka-1:9092"     # default: [eventlog] bootstrap
```

Without rules there are no alerts. Durations are ``<number><unit>`` with unit s, m, h or d.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RuleOn = Literal["refusal", "limit", "auth_failure", "approval_pending"]
SinkType = Literal["webhook", "stdout", "kafka"]
GroupField = Literal["agent", "grant", "tool", "server", "rule", "decision", "remote", "reason"]

# which decisions each `on` matches (call.decided); auth_failure matches auth.failed events,
# approval_pending matches approval.requested events (a call held for a human)
REFUSALS = frozenset({"deny", "rate_limited", "invalid_arguments"})
ON_DECISIONS: dict[str, frozenset[str]] = {
    "refusal": REFUSALS,
    "limit": frozenset({"rate_limited"}),
    "approval_pending": frozenset(),
}

# Kafka's own rule for topic names (legal characters, at most 249 of them)
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | int | float) -> float:
    """``"1m"`` -> 60.0 seconds; a bare number is seconds."""
    if isinstance(text, bool):
        raise ValueError("a duration is a string like 30s, 1m, 10m, 1h")
    if isinstance(text, int | float):
        value = float(text)
    else:
        m = _DURATION.match(text)
        if m is None:
            raise ValueError(f"not a duration: {text!r} (use 30s, 1m, 10m, 1h, 1d)")
        value = float(m.group(1)) * _UNIT_S[m.group(2)]
    if value <= 0:
        raise ValueError("a duration must be > 0")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AlertRule(_Model):
    name: str = Field(min_length=1)
    on: RuleOn
    threshold: int = Field(
        1, ge=1, description="matching events (auth_failure: failures) that fire one alert"
    )
    window: str = Field("1m", description="the threshold counts events within this long")
    group_by: list[GroupField] = Field(default_factory=list, description="one alert per distinct value")
    throttle: str | None = Field(None, description="at most one alert per group this often, then a summary")

    @field_validator("window", "throttle")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration(v)
        return v

    @field_validator("group_by")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("group_by names a field twice")
        return v

    @property
    def window_s(self) -> float:
        return parse_duration(self.window)

    @property
    def throttle_s(self) -> float | None:
        return parse_duration(self.throttle) if self.throttle else None


class AlertSink(_Model):
    type: SinkType
    name: str | None = Field(None, description="unique name (default: the type, or type + url)")
    url: str | None = None
    secret_env: str | None = Field(None, description="env var holding the HMAC-SHA256 key (webhook)")
    format: Literal["json", "slack"] = "json"
    topic: str = Field("ledgergate.alerts", description="kafka: the topic (created if missing)")
    bootstrap: str | None = Field(
        None, description="kafka: HOST:PORT[,HOST:PORT...] (default: [eventlog] bootstrap)"
    )
    replication: int = Field(1, ge=1, description="kafka: replication factor if ledgergate creates the topic")
    timeout_s: float = Field(
        5.0, gt=0, description="webhook: one POST, connect to last byte; kafka: one send until acked"
    )
    max_attempts: int = Field(12, ge=1, description="webhook, kafka: tries per alert before alert.failed")
    retry_initial_s: float = Field(
        0.5, gt=0, description="webhook, kafka: first backoff (doubles, with jitter)"
    )
    retry_max_s: float = Field(60.0, gt=0, description="webhook, kafka: longest backoff")
    queue_size: int = Field(1000, ge=1, description="alerts waiting for this sink; beyond, the oldest fails")

    @model_validator(mode="after")
    def _fields_of_type(self) -> AlertSink:
        if self.type == "webhook":
            if not self.url:
                raise ValueError('a webhook sink needs url = "https://..."')
            if not self.url.startswith(("http://", "https://")):
                raise ValueError("url must start with http:// or https://")
        elif self.url is not None:
            raise ValueError(f"url is for webhook sinks, not {self.type}")
        if self.secret_env is not None and self.type != "webhook":
            raise ValueError("secret_env is for webhook sinks")
        if self.type == "kafka":
            if self.format != "json":
                raise ValueError('a kafka sink sends the alert document as JSON: format = "json" only')
            if not _TOPIC.match(self.topic):
                raise ValueError(f"topic {self.topic!r} is not a Kafka topic name ([A-Za-z0-9._-], 1-249)")
            if self.bootstrap is not None and not self.bootstrap.strip():
                raise ValueError("bootstrap needs HOST:PORT of at least one Kafka broker")
        else:
            if self.bootstrap is not None:
                raise ValueError(f"bootstrap is for kafka sinks, not {self.type}")
            for name in ("topic", "replication"):
                if name in self.model_fields_set:
                    raise ValueError(f"{name} is for kafka sinks, not {self.type}")
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_max_s must be >= retry_initial_s")
        return self

    @property
    def key(self) -> str:
        """The sink's identity in alert.delivered / alert.failed events (stable across restarts)."""
        if self.name:
            return self.name
        if self.type == "webhook":
            return f"webhook:{self.url}"
        if self.type == "kafka":
            return f"kafka:{self.topic}"
        return self.type


class AlertsSection(_Model):
    rules: list[AlertRule] = Field(default_factory=list)
    sinks: list[AlertSink] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> AlertsSection:
        names = [r.name for r in self.rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rule names must be unique: {', '.join(dup)}")
        keys = [s.key for s in self.sinks]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"two sinks with the same identity (give each a name): {', '.join(dup)}")
        return self
