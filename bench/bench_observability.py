"""CPU per call of `ledgergate run` with observability off, metrics on, tracing on.

    .venv/bin/python bench/bench_observability.py [--duration 5] [--rounds 3] [-c 8]

Three configurations in front of bench/upstream.py, each a `ledgergate run` (embedded log,
durability strict, consumers; the same as run_all's ledgergate-strict):

  baseline  no admin token, no metrics_listen, no [telemetry]: no metrics addon, no
            OpenTelemetry import (today's figure)
  metrics   [gateway] metrics_listen set: the metrics addon counts every call (scraped
            once per round, as Prometheus would)
  tracing   metrics + [telemetry] otlp_endpoint, with the OTLP exporter replaced by an
            in-process no-op exporter behind the same BatchSpanProcessor: the cost of
            building and ending the spans, not of the network

bench/loadgen.py drives the load (-c connections, one MCP session each, tools/call in a loop)
and measures the gateway's process tree CPU (utime + stime from /proc) over the window.
Rounds are interleaved; medians printed. Prints, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402
from run_all import BENCH_KEY, PY, free_port, start_upstream, wait_http, write_ledgergate_config  # noqa: E402

MODES = ("baseline", "metrics", "tracing")

# `--serve CONFIG`: run the gateway with tracing exporting to a no-op exporter
SERVE = """
import sys
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
import gateway.observability.tracing as tracing

class Noop(SpanExporter):
    def export(self, spans):
        return SpanExportResult.SUCCESS

real = tracing.provider_for
tracing.provider_for = lambda telemetry, exporter=None: real(telemetry, Noop())
from ledgergate.cli.main import main  # the same path as `ledgergate run` (uvloop, logging)
sys.exit(main(["run", "--config", sys.argv[1]]))
"""


def start(mode: str, workdir: Path, upstream_url: str) -> tuple[subprocess.Popen, str, str | None]:
    extra = ""
    metrics_url = None
    if mode in ("metrics", "tracing"):
        mport = free_port()
        metrics_url = f"http://127.0.0.1:{mport}/metrics"
    cfg, port = write_ledgergate_config(workdir, upstream_url, "strict", extra)
    text = cfg.read_text()
    if metrics_url is not None:
        text = text.replace("[gateway]\n", f'[gateway]\nmetrics_listen = "127.0.0.1:{mport}"\n', 1)
    if mode == "tracing":
        text += '\n[telemetry]\notlp_endpoint = "http://127.0.0.1:9/v1/traces"\n'
    cfg.write_text(text)
    log = workdir / "ledgergate.log"
    argv = (
        [PY, "-c", SERVE, str(cfg)]
        if mode == "tracing"
        else [PY, "-m", "ledgergate", "run", "--config", str(cfg)]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERGATE_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=f, stderr=f, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
    return proc, f"http://127.0.0.1:{port}/mcp/bench", metrics_url


def load(url: str, pid: int, concurrency: int, duration: float) -> dict:
    out = subprocess.run(
        [
            PY,
            str(ROOT / "bench" / "loadgen.py"),
            "--url",
            url,
            "--auth",
            BENCH_KEY,
            "-c",
            str(concurrency),
            "-d",
            str(duration),
            "--watch",
            str(pid),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration * 10 + 120,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def micro(n: int = 20_000) -> dict[str, float]:
    """CPU per call of the hooks alone, in this process (no I/O, no noise from the machine):
    the metrics addon's completed(), and the tracing addon's decided() + completed() around a
    no-op inner addon, spans going to a no-op exporter through a BatchSpanProcessor."""
    import asyncio
    import time

    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from gateway.audit.hooks import Addon
    from gateway.auth import Grant
    from gateway.config import TelemetrySection
    from gateway.mcp.flow import CallFlow
    from gateway.observability.metrics import MetricsAddon
    from gateway.observability.tracing import TracingAddon, provider_for
    from gateway.policy.engine import Decision

    class Noop(SpanExporter):
        def export(self, spans):  # type: ignore[no-untyped-def]
            return SpanExportResult.SUCCESS

    grant = Grant(name="bench", agent="bench-agent", digest=b"")
    decision = Decision("allow", "/tools/open_session", None, (), None, ())

    def flow() -> CallFlow:
        f = CallFlow(
            "bench", "tools/call", 1, {"name": "open_session"}, grant, None, None, tool="open_session"
        )
        f.decision = decision
        f.forwarded_at = f.started
        f.finish("ok")
        return f

    flows = [flow() for _ in range(n)]
    m = MetricsAddon()
    t0 = time.process_time()
    for f in flows:
        m.completed(f)
    metrics_us = (time.process_time() - t0) / n * 1e6

    provider = provider_for(TelemetrySection(otlp_endpoint="http://127.0.0.1:9/v1/traces"), Noop())
    tracing = TracingAddon(Addon(), provider)

    async def traced() -> float:
        t0 = time.process_time()
        for f in flows:
            await tracing.decided(f)
            tracing.completed(f)
        return (time.process_time() - t0) / n * 1e6

    tracing_us = asyncio.run(traced())
    provider.shutdown()
    tracing.close()
    return {"metrics_completed_us": metrics_us, "tracing_decided_completed_us": tracing_us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("--micro-only", action="store_true", help="only the in-process hook costs")
    a = ap.parse_args()
    hooks = micro()
    print(
        f"hooks alone, in process: metrics completed() {hooks['metrics_completed_us']:.2f} us/call, "
        f"tracing decided()+completed() {hooks['tracing_decided_completed_us']:.2f} us/call "
        "(3 spans, no-op exporter)",
        flush=True,
    )
    if a.micro_only:
        return
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="lg-bench-obs-") as tmp:
        work = Path(tmp)
        upstream = start_upstream(work)
        try:
            for r in range(a.rounds):
                for mode in MODES:
                    proc, url, metrics_url = start(mode, work / f"{mode}-{r}", upstream.url)
                    try:
                        res = load(url, proc.pid, a.concurrency, a.duration)
                        if metrics_url is not None:  # one scrape, as Prometheus would
                            urllib.request.urlopen(metrics_url, timeout=10).read()
                    finally:
                        peers.stop_process(proc)
                    w = res["watched"][str(proc.pid)]
                    results[mode].append(
                        {
                            "calls_per_s": res.get("calls_per_s"),
                            "p50_ms": res.get("p50_ms"),
                            "tree_us_per_call": w["tree_us_per_call"],
                            "main_thread_us_per_call": w["main_thread_us_per_call"],
                        }
                    )
                    print(f"round {r + 1} {mode:9s} {json.dumps(results[mode][-1])}", flush=True)
        finally:
            upstream.stop()
    print(f"\nCPU per call of the gateway process tree (median of {a.rounds} rounds, -c {a.concurrency}):")
    base = statistics.median(x["tree_us_per_call"] for x in results["baseline"])
    for mode in MODES:
        tree = statistics.median(x["tree_us_per_call"] for x in results[mode])
        main_t = statistics.median(x["main_thread_us_per_call"] for x in results[mode])
        rate = statistics.median(x["calls_per_s"] or 0 for x in results[mode])
        print(
            f"  {mode:9s} {tree:8.1f} us/call (event loop thread {main_t:7.1f} us)  "
            f"{rate:8.0f} calls/s  {tree - base:+7.1f} us vs baseline"
        )


if __name__ == "__main__":
    main()
