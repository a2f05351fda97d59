"""The per-call budget: where a ledgergate call's CPU goes, stage by stage.

    .venv/bin/python bench/budget.py [--durability strict,batched] [-c 8] [--duration 6] [--json]

`make bench` (bench/run_all.py) runs it after the load rounds; it can run alone. For each
durability it starts the bench upstream and one `ledgergate run` (bench/run_all.py's
configurations: metrics on, tracing off), loads it with bench/loadgen.py at concurrency c, then
puts the gateway's loop thread alone on core 0 and everything else (the gateway's other
threads, the load generator, the upstream, the profilers) on the other cores, so a sample of
the loop thread is its own time, not time it spent preempted on a shared core. Meanwhile:

1. py-spy samples the Python stacks (`record --format raw --threads --gil --nonblocking`,
   499 Hz; --gil keeps only samples holding the GIL, so not the loop idle in epoll, which
   uvloop waits in without the GIL). The loop thread's stacks are sorted into stages (STAGES:
   the innermost frame that matches a stage decides; a stack with no frame above the event
   loop's `run` is the loop itself in C: uvloop reading sockets, running callbacks) and each
   stage's share of samples is turned into microseconds per call with the thread's CPU time
   from /proc over the same window: us/call = share x loop-thread CPU / calls (calls counted
   by the gateway's own /metrics).
2. When `perf` works, `perf record -t` samples the loop thread's CPU in the next window and
   splits it by where it ran: the CPython interpreter, the kernel, each native library
   (uvloop, the C HTTP parser, orjson...). This is what bounds the stage split: every stage
   is mostly bytecode in the interpreter.

The other threads are listed with their CPU per call from /proc (the log writer and reader
on SQLite, the chDB threads of the embedded consumers). Asserts nothing; prints tables and,
with --json, one BUDGETJSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procstat import thread_cpu_us

# (stage, substrings of a py-spy frame "function (path/file.py:line)"): the innermost frame
# of a stack that matches one decides its stage, in this order of precedence per frame
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("consumers (loop side)", ("consumers/",)),
    ("metrics + tracing", ("gateway/observability/",)),
    ("log append (loop side)", ("eventlog/",)),
    ("event build + audit hooks", ("schemas/events.py", "gateway/audit/")),
    ("decide", ("gateway/policy/engine.py",)),
    ("limiter charge", ("gateway/policy/limiter.py",)),
    ("policy lookups (risk, schemas, approvals)", ("gateway/policy/", "gateway/approvals_live.py")),
    ("auth", ("gateway/auth.py",)),
    ("JSON-RPC parse", ("gateway/mcp/jsonrpc.py",)),
    ("forward: upstream client", ("gateway/upstreams/", "gateway/http/")),
    (
        "relay back: answer write",
        (
            "aiohttp/web_response.py",
            "aiohttp/http_writer.py",
            "json_response (gateway/edge.py",
            "error_response",
        ),
    ),
    ("proxy bookkeeping", ("gateway/proxy.py", "gateway/mcp/")),
    ("edge: aiohttp server (request, dispatch)", ("aiohttp/", "gateway/edge.py", "multidict/", "yarl/")),
    ("asyncio glue", ("asyncio/",)),
)
LOOP_C = "event loop in C (uvloop: epoll, socket reads, callbacks)"
OTHER = "other Python"
# a stack whose innermost frame is one of these is the loop running C code
_LOOP_LEAVES = ("Runner.run (asyncio/runners.py", "run (uvloop/__init__.py", "run_until_complete")


def stage_of(frames: Sequence[str]) -> str:
    """The stage of one Python stack (outermost frame first)."""
    if frames and frames[-1].startswith(_LOOP_LEAVES):
        return LOOP_C
    for f in reversed(frames):
        for stage, subs in STAGES:
            if any(s in f for s in subs):
                return stage
    return OTHER


_THREAD = re.compile(r"^thread \((\d+)\): (.*)$")
_PROCESS = re.compile(r"^process \d+:")


@dataclass
class ThreadSamples:
    tid: int
    name: str
    stages: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def total(self) -> int:
        return sum(self.stages.values())


def parse_raw(lines: Iterable[str]) -> dict[int, ThreadSamples]:
    """py-spy `--format raw --threads` output -> samples per thread, sorted into stages."""
    out: dict[int, ThreadSamples] = {}
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if frames and _PROCESS.match(frames[0]):
            frames = frames[1:]
        m = _THREAD.match(frames[0]) if frames else None
        if m is None:
            continue
        tid, name = int(m.group(1)), m.group(2)
        t = out.get(tid)
        if t is None:
            t = out[tid] = ThreadSamples(tid, name)
        t.stages[stage_of(frames[1:])] += int(count)
    return out


def budget_rows(samples: ThreadSamples, cpu_us: float, calls: int) -> list[tuple[str, float, float]]:
    """(stage, share of the thread's samples, us/call) for one thread, largest first."""
    total = samples.total or 1
    per_call = cpu_us / max(calls, 1)
    return [(st, n / total, per_call * n / total) for st, n in samples.stages.most_common()]


# ---- perf: the loop thread's CPU by where it ran ----------------------------------------

_DSO_NAMES = (
    ("libpython", "CPython interpreter (bytecode, objects, dicts)"),
    ("[kernel", "kernel (syscalls: sockets, futex wake-ups, page faults)"),
    ("loop.cpython", "uvloop (C)"),
    ("_http_parser", "aiohttp's C HTTP parser"),
    ("httptools", "httptools"),
    ("orjson", "orjson"),
    ("multidict", "multidict (C)"),
    ("_chdb", "chDB"),
    ("sqlite", "SQLite"),
    ("libc.so", "libc (malloc, memcpy)"),
    ("libcrypto", "OpenSSL libcrypto (hashes)"),
)


def perf_split(pid: int, tid: int, seconds: float) -> list[tuple[str, float]] | str:
    """The loop thread's CPU samples by library, as (what, share); or why perf did not run."""
    perf = shutil.which("perf")
    if perf is None:
        return "perf is not installed"
    with tempfile.TemporaryDirectory(prefix="lg-perf-") as d:
        data = Path(d) / "perf.data"
        rec = subprocess.run(
            [perf, "record", "-q", "-F", "999", "-t", str(tid), "-o", str(data), "--", "sleep", str(seconds)],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        if rec.returncode != 0 or not data.exists():
            return f"perf record failed: {(rec.stderr or rec.stdout).strip()[-300:]}"
        rep = subprocess.run(
            [perf, "report", "-i", str(data), "--no-children", "--sort", "dso", "--stdio", "-q"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    shares: collections.Counter[str] = collections.Counter()
    for line in rep.stdout.splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[0].endswith("%"):
            continue
        pct = float(parts[0].rstrip("%"))
        dso = " ".join(parts[1:])
        what = next((label for key, label in _DSO_NAMES if key in dso), "other native code")
        shares[what] += pct / 100
    if not shares:
        return f"perf report gave no samples: {rep.stderr.strip()[-300:]}"
    return shares.most_common()


# ---- one profiled run ----------------------------------------------------------------------


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus`."""
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(t), cpus)
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        pass


def profile(durability: str, concurrency: int, duration: float, workdir: Path) -> dict:
    import run_all as ra  # the bench's own configurations (upstream, ledgergate config)

    spy = shutil.which("py-spy") or str(Path(ra.PY).parent / "py-spy")
    if not Path(spy).exists():
        return {"durability": durability, "error": "py-spy is not installed (pip install py-spy)"}
    ncpu = os.cpu_count() or 1
    gw_cpus, other_cpus = ({0}, set(range(1, ncpu))) if ncpu > 1 else ({0}, {0})
    wd = workdir / f"budget-{durability}"
    (wd / "up").mkdir(parents=True, exist_ok=True)
    (wd / "lg").mkdir(parents=True, exist_ok=True)
    upstream = ra.start_upstream(wd / "up")
    gw = None
    load = None
    try:
        gw = ra.start_ledgergate(f"ledgergate-{durability}", wd / "lg", upstream, durability)
        pid = gw.proc.pid
        _pin(upstream.proc.pid, other_cpus)
        pin_cmd = ["taskset", "-c", ",".join(map(str, sorted(other_cpus)))] if shutil.which("taskset") else []
        warm = 1.0
        total = warm + duration * 2 + 2  # py-spy window, then the perf window
        load = subprocess.Popen(
            [
                *pin_cmd,
                ra.PY,
                str(ra.ROOT / "bench" / "loadgen.py"),
                "--url",
                gw.url,
                "--auth",
                gw.auth or "",
                "-c",
                str(concurrency),
                "-d",
                str(total),
                "--warmup",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(warm)  # the load warms the gateway up; nothing is measured yet
        # the loop thread alone on core 0; the gateway's other threads (log writer and reader,
        # chDB), the load generator, the upstream and the profilers on the others (threads
        # started later inherit their creator's cores)
        _pin(pid, other_cpus)
        os.sched_setaffinity(pid, gw_cpus)
        raw = wd / "pyspy.txt"
        c0, cpu0, t0 = _calls(gw.metrics_url), thread_cpu_us(pid), time.perf_counter()
        spy_run = subprocess.run(
            [
                *pin_cmd,
                spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(duration)),
                "--rate",
                "499",
                "--format",
                "raw",
                "--threads",
                "--gil",  # only samples holding the GIL: not the loop idle in epoll (uvloop drops it)
                "--nonblocking",
                "-o",
                str(raw),
            ],
            capture_output=True,
            text=True,
            timeout=duration + 60,
        )
        c1, cpu1, t1 = _calls(gw.metrics_url), thread_cpu_us(pid), time.perf_counter()
        if spy_run.returncode != 0 or not raw.exists():
            return {"durability": durability, "error": f"py-spy failed: {spy_run.stderr.strip()[-400:]}"}
        perf = perf_split(pid, pid, duration)
        out, _ = load.communicate(timeout=total + 120)
        res = json.loads(out.strip().splitlines()[-1])
    finally:
        if load is not None and load.poll() is None:
            load.kill()
        if gw is not None:
            gw.stop()
        upstream.stop()
    calls = _window_calls(c0, c1, res, t1 - t0, total)
    threads = parse_raw(raw.read_text().splitlines())
    cpu = {k: cpu1.get(k, 0.0) - v for k, v in cpu0.items()}
    by_tid = {int(k.split(" ", 1)[0]): (k.split(" ", 1)[1], us) for k, us in cpu.items()}
    report: dict = {
        "durability": durability,
        "concurrency": concurrency,
        "window_s": round(t1 - t0, 2),
        "calls": calls,
        "calls_per_s": round(calls / (t1 - t0), 1),
        "process_cpu_us_per_call": round(sum(cpu.values()) / max(calls, 1), 1),
        "perf_loop_thread": perf if isinstance(perf, str) else [(w, round(s, 4)) for w, s in perf],
    }
    loop = threads.get(pid)
    if loop is not None:
        us = by_tid.get(pid, ("", 0.0))[1]
        report["loop_thread_cpu_us_per_call"] = round(us / max(calls, 1), 1)
        report["loop_thread_samples"] = loop.total
        report["stages"] = [(s, round(sh, 4), round(u, 1)) for s, sh, u in budget_rows(loop, us, calls)]
    # the other threads by name: CPU from /proc (with --gil their samples would only show the
    # moments they hold the GIL, not their time in SQLite or chDB)
    others: collections.Counter[str] = collections.Counter()
    for tid, (comm, us) in by_tid.items():
        if tid == pid or us <= 0:
            continue
        t = threads.get(tid)
        name = t.name if t is not None else comm
        if name == "python":
            name = "Python threads that never held the GIL here (chDB insert thread)"
        others[re.sub(r"[_\d]+$", "", name) or name] += us
    report["other_threads"] = [(n, round(us / max(calls, 1), 1)) for n, us in others.most_common()]
    return report


def _calls(metrics_url: str | None) -> int | None:
    """Calls the gateway has answered so far, from its /metrics."""
    import urllib.error
    import urllib.request

    if metrics_url is None:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    n = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith("ledgergate_calls_total{"):
            n += float(line.rsplit(" ", 1)[1])
            found = True
    return int(n) if found else None


def _window_calls(c0: int | None, c1: int | None, res: dict, window_s: float, total_s: float) -> int:
    if c0 is not None and c1 is not None and c1 > c0:
        return c1 - c0
    # no /metrics: the load generator's average rate over the window (steady load)
    return int(res["calls"] * window_s / max(res.get("duration_s", total_s), 1e-9))


# ---- printing ------------------------------------------------------------------------------


def print_report(r: dict) -> None:
    if "error" in r:
        print(f"budget {r['durability']}: {r['error']}")
        return
    print(
        f"\n### Per-call budget, {r['durability']}, c={r['concurrency']}: {r['calls_per_s']:,.0f} calls/s, "
        f"gateway process CPU {r['process_cpu_us_per_call']} us/call"
    )
    if "stages" not in r:
        print("no samples of the loop thread")
        return
    print(
        f"\nloop thread: {r['loop_thread_cpu_us_per_call']} us/call "
        f"({r['loop_thread_samples']} py-spy samples holding the GIL; the loop thread alone on core 0)"
    )
    print("| stage | share of samples | us/call |\n|---|---:|---:|")
    for st, sh, us in r["stages"]:
        if sh >= 0.005:
            print(f"| {st} | {100 * sh:.1f} % | {us:.1f} |")
    if r["other_threads"]:
        print(
            "\nother threads (CPU from /proc): "
            + "; ".join(f"{n} {us} us/call" for n, us in r["other_threads"])
        )
    perf = r["perf_loop_thread"]
    if isinstance(perf, str):
        print(f"\nperf: {perf}")
    else:
        print("\nloop thread CPU by where it ran (perf, the next window):")
        print("| where | share | us/call |\n|---|---:|---:|")
        for what, sh in perf:
            if sh >= 0.005:
                print(f"| {what} | {100 * sh:.1f} % | {sh * r['loop_thread_cpu_us_per_call']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--durability", default="strict,batched")
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("--duration", type=float, default=6.0, help="seconds of py-spy, then as many of perf")
    ap.add_argument("--json", action="store_true", help="print one BUDGETJSON line at the end")
    a = ap.parse_args()
    reports = []
    with tempfile.TemporaryDirectory(prefix="lg-budget-") as d:
        for dur in a.durability.split(","):
            r = profile(dur, a.concurrency, a.duration, Path(d))
            print_report(r)
            reports.append(r)
    if a.json:
        print("BUDGETJSON " + json.dumps(reports))


if __name__ == "__main__":
    main()
