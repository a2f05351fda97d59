"""The webhook sink: POST the alert (``type = "webhook"``).

Headers: ``Content-Type: application/json``, ``Idempotency-Key: <alert_id>`` (a repeat after a
crash carries the same key, so a receiver can drop it), and with ``secret_env`` set
``X-Ledgergate-Signature: sha256=<hex HMAC-SHA256 of the exact body>``. 2xx accepts; 408, 425,
429, 5xx, timeouts and connection errors are retried (a ``Retry-After`` is honoured); any other
status fails the alert for this sink at once (the receiver will not change its mind)."""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

import aiohttp

from consumers.alert_sinks.base import DeliveryError, Sink, alert_json, slack_json
from schemas.alerts import AlertSink

RETRYABLE = frozenset({408, 425, 429})


def signature(secret: bytes, body: bytes) -> str:
    """The X-Ledgergate-Signature header value of ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookSink(Sink):
    retries = True

    def __init__(self, spec: AlertSink, environ: dict[str, str] | None = None) -> None:
        assert spec.url is not None
        self.key = spec.key
        self.url = spec.url
        self.format = spec.format
        self.timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
        self.secret: bytes | None = None
        if spec.secret_env:
            env = os.environ if environ is None else environ
            value = env.get(spec.secret_env)
            if not value:
                raise ValueError(f"the environment variable {spec.secret_env} (secret_env) is not set")
            self.secret = value.encode()
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=self.timeout)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def send(self, alert: dict[str, Any]) -> int | None:
        await self.start()
        assert self._http is not None
        body = slack_json(alert) if self.format == "slack" else alert_json(alert)
        headers = {"Content-Type": "application/json", "Idempotency-Key": str(alert["alert_id"])}
        if self.secret is not None:
            headers["X-Ledgergate-Signature"] = signature(self.secret, body)
        try:
            async with self._http.post(self.url, data=body, headers=headers) as resp:
                await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except TimeoutError:
            raise DeliveryError(f"no answer within {self.timeout.total} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from None
        if 200 <= status < 300:
            return status
        after = float(retry_after) if retry_after and retry_after.isdigit() else None
        raise DeliveryError(
            f"HTTP {status}", retry=status in RETRYABLE or status >= 500, status=status, retry_after_s=after
        )
