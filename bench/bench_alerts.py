"""Alert age at delivery: a refused decision on the log -> the alert accepted by a local webhook.

The real pieces of embedded mode: SqliteEventLog (strict durability), AlertsConsumer with an
``every-refusal`` rule, the webhook sink (HMAC-signed POST) to an aiohttp receiver on
loopback. Refused ``call.decided`` events are appended at a steady rate; the age of each alert
is what the consumer records in alert.delivered (``age_ms``: the decision's ts -> the 2xx).
Prints p50 / p99 / max; no assertions (target from issue 14: p99 <= 1 s on a healthy webhook).

    .venv/bin/python bench/bench_alerts.py [--events N] [--interval-ms MS]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web

from consumers.alert_sinks import build_sink
from consumers.alerts import AlertsConsumer
from eventlog.sqlite import SqliteEventLog
from schemas.alerts import AlertRule, AlertSink
from schemas.events import CallDecided, encode


async def main(n: int, interval_s: float) -> None:
    got = 0
    done = asyncio.Event()

    async def hook(req: web.Request) -> web.Response:
        nonlocal got
        await req.read()
        got += 1
        if got >= n:
            done.set()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    os.environ["BENCH_ALERT_SECRET"] = "bench-secret"
    spec = AlertSink(type="webhook", url=f"http://127.0.0.1:{port}/hook", secret_env="BENCH_ALERT_SECRET")
    with tempfile.TemporaryDirectory() as d:
        log = SqliteEventLog(Path(d) / "events.db", "strict")
        await log.open()
        consumer = AlertsConsumer(
            log, [AlertRule(name="every-refusal", on="refusal")], [(spec, build_sink(spec))]
        )
        task = asyncio.create_task(consumer.run())
        t0 = time.perf_counter()
        for i in range(n):
            ev = CallDecided(
                call_id=f"c{i}",
                server="wa",
                method="tools/call",
                tool="send_message",
                grant="g",
                agent="a",
                arguments={"content": "[REDACTED]"},
                decision="deny",
                rule="/default",
                reason="not allowed",
            )
            await log.append([encode(ev)])
            await asyncio.sleep(interval_s)
        await asyncio.wait_for(done.wait(), 120)
        while len(consumer.ages_ms) < n:  # noqa: ASYNC110 - alert.delivered is appended after the 2xx
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - t0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await log.close()
    await runner.cleanup()
    ages = sorted(consumer.ages_ms)
    q = statistics.quantiles(ages, n=100)
    print(f"alerts delivered: {len(ages)} in {elapsed:.1f} s (one refusal every {interval_s * 1000:.0f} ms)")
    print(
        "alert age at delivery (decision -> webhook 2xx): "
        f"p50 {q[49]:.1f} ms  p99 {q[98]:.1f} ms  max {ages[-1]:.1f} ms"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=500)
    ap.add_argument("--interval-ms", type=float, default=5.0)
    a = ap.parse_args()
    asyncio.run(main(a.events, a.interval_ms / 1000))
