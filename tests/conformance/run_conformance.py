"""Run the official MCP conformance suite's server scenarios against a Streamable HTTP endpoint.

A Python port of the shared run.sh: the suite (@modelcontextprotocol/conformance, pinned in
tests/conformance/suite/package.json) is run once per scenario; a scenario passes when none of its
checks is FAILURE (WARNING/INFO do not fail it, the suite's own rule) and fails when it runs past
the timeout or leaves no checks.json. The suite and node >= 22 (it crashes on node 20) come from
`scripts/install-upstreams.sh --test` under .upstreams/; when missing they are installed by it.

Module:  run_scenarios(url, outdir, scenarios=None, timeout_s=90) -> {scenario: (passed, detail)}
CLI:     python tests/conformance/run_conformance.py URL [OUTDIR] [-s SCENARIO ...] [--all]
                [--timeout S] [--jobs N]
         prints one PASS/FAIL line per scenario and 'N/M scenarios passed'; exit 0 iff all passed.
Env:     CONFORMANCE_JOBS (parallel scenarios, default 2), CONFORMANCE_TIMEOUT (seconds, default 90),
         CONFORMANCE_SUITE=all (include the pending scenarios), CONFORMANCE_SCENARIOS="a b c".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
UPSTREAMS_DIR = REPO_ROOT / ".upstreams"  # where scripts/install-upstreams.sh installs
SUITE_DIR = UPSTREAMS_DIR / "conformance-suite"
SUITE_PKG = "@modelcontextprotocol/conformance"
SUITE_CLI = SUITE_DIR / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
NODE22 = UPSTREAMS_DIR / "node22" / "node_modules" / ".bin" / "node"
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-upstreams.sh"

# 0.1.16's pending list: `list --server` shows them, the suite's default (active) set excludes them.
PENDING = frozenset({"json-schema-2020-12", "server-sse-polling"})
# The active server scenarios of 0.1.16, in the suite's order: what the conformance upstream passes
# directly (30/30), so what a transparent gateway in front of it must pass too.
EXPECTED_ACTIVE = (
    "server-initialize", "logging-set-level", "ping", "completion-complete", "tools-list",
    "tools-call-simple-text", "tools-call-image", "tools-call-audio", "tools-call-embedded-resource",
    "tools-call-mixed-content", "tools-call-with-logging", "tools-call-error", "tools-call-with-progress",
    "tools-call-sampling", "tools-call-elicitation", "elicitation-sep1034-defaults",
    "server-sse-multiple-streams", "elicitation-sep1330-enums", "resources-list", "resources-read-text",
    "resources-read-binary", "resources-templates-read", "resources-subscribe", "resources-unsubscribe",
    "prompts-list", "prompts-get-simple", "prompts-get-with-args", "prompts-get-embedded-resource",
    "prompts-get-with-image", "dns-rebinding-protection",
)  # fmt: skip
DEFAULT_TIMEOUT_S = 90.0
DEFAULT_JOBS = 2

_install_lock = threading.Lock()

Result = dict[str, tuple[bool, str]]


def pinned_suite_version() -> str:
    pkg = json.loads((REPO_ROOT / "tests" / "conformance" / "suite" / "package.json").read_text())
    return pkg["dependencies"][SUITE_PKG]


def _node_major(node: str | os.PathLike[str]) -> int:
    try:
        out = subprocess.run(
            [os.fspath(node), "-p", "process.versions.node.split('.')[0]"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return int(out.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0


def _suite_installed() -> bool:
    try:
        meta = json.loads((SUITE_CLI.parents[1] / "package.json").read_text())
    except (OSError, ValueError):
        return False
    return SUITE_CLI.exists() and meta.get("version") == pinned_suite_version()


def _install() -> None:
    """Run the project's install script (idempotent; a no-op when everything is there)."""
    proc = subprocess.run(
        ["bash", str(INSTALL_SCRIPT), "--test"], capture_output=True, text=True, timeout=1800, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{INSTALL_SCRIPT} --test failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )


def find_node22() -> str:
    """A node >= 22 for the suite: the one on PATH when new enough, else .upstreams/node22.

    Runs the install script when neither is there.
    """
    system = shutil.which("node")
    if system and _node_major(system) >= 22:
        return system
    with _install_lock:
        if not (NODE22.exists() and _node_major(NODE22) >= 22):
            _install()
    if not (NODE22.exists() and _node_major(NODE22) >= 22):
        raise RuntimeError(f"no node >= 22 at {NODE22} after running {INSTALL_SCRIPT} --test")
    return str(NODE22)


def suite_cli() -> str:
    """Path of the suite's CLI (dist/index.js), installing the pinned suite if missing."""
    with _install_lock:
        if not _suite_installed():
            _install()
    if not _suite_installed():
        raise RuntimeError(f"{SUITE_PKG}@{pinned_suite_version()} missing at {SUITE_CLI} after install")
    return str(SUITE_CLI)


def list_scenarios(
    include_pending: bool = False, node: str | None = None, cli: str | None = None
) -> list[str]:
    """Server scenarios from the suite's `list --server` ("  - name [versions]"), pending ones excluded."""
    node = node or find_node22()
    cli = cli or suite_cli()
    out = subprocess.run(
        [node, cli, "list", "--server"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    names = re.findall(r"^  - (\S+)", out, flags=re.MULTILINE)
    if not names:
        raise RuntimeError(f"could not list conformance scenarios; `list --server` printed:\n{out}")
    return [n for n in names if include_pending or n not in PENDING]


def judge(scenario_dir: Path, rc: int | None, timed_out: bool) -> tuple[bool, str]:
    """Verdict from the first checks.json under scenario_dir (run.sh's rule)."""
    found = sorted(p for p in scenario_dir.glob("*/checks.json"))
    if not found:
        return False, "timed out" if timed_out else f"no results (exit {rc})"
    try:
        checks = json.loads(found[0].read_text())
    except (OSError, ValueError) as e:
        return False, f"unreadable {found[0]}: {e}"
    bad = [c for c in checks if c.get("status") == "FAILURE"]
    if bad:
        why = "; ".join(f"{c.get('id')}: {c.get('errorMessage') or c.get('description')}" for c in bad)
        return False, re.sub(r"\s+", " ", why)[:300]
    warnings = sum(1 for c in checks if c.get("status") == "WARNING")
    detail = f"{len(checks)} checks" + (f", {warnings} warnings" if warnings else "")
    if timed_out:
        # run.sh's stated rule: running past the timeout fails the scenario, even when the
        # checks written before it was killed all passed.
        return False, f"timed out ({detail} written, none failed)"
    return True, detail


def run_scenario(
    url: str, scenario: str, outdir: Path, timeout_s: float, node: str, cli: str
) -> tuple[bool, str, float]:
    """Run one scenario with the suite's CLI; return (passed, detail, seconds)."""
    d = outdir / scenario.replace("/", "_")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    t0 = time.monotonic()
    timed_out = False
    with open(d / "stdout.txt", "wb") as log:
        proc = subprocess.Popen(
            [node, cli, "server", "--url", url, "--scenario", scenario, "-o", str(d)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = 124
        finally:
            if proc.poll() is None:
                _kill_group(proc)
    passed, detail = judge(d, rc, timed_out)
    return passed, detail, time.monotonic() - t0


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=3)
            return
        except subprocess.TimeoutExpired:
            continue


def run_scenarios(
    url: str,
    outdir: str | os.PathLike[str],
    scenarios: Iterable[str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    jobs: int | None = None,
    include_pending: bool = False,
    on_result: Callable[[str, bool, str, float], None] | None = None,
) -> Result:
    """Run conformance scenarios against `url`; return {scenario: (passed, detail)} in suite order.

    scenarios=None runs the active set (all listed by the suite minus PENDING; include_pending adds
    them). `jobs` scenarios run at once (default CONFORMANCE_JOBS or 2); each has `timeout_s` seconds.
    Results (checks.json, stdout.txt) land under outdir/<scenario>/. on_result(name, passed, detail,
    seconds) is called as each scenario finishes.
    """
    node = find_node22()
    cli = suite_cli()
    names = list(scenarios) if scenarios is not None else list_scenarios(include_pending, node, cli)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    n_jobs = max(1, jobs if jobs is not None else int(os.environ.get("CONFORMANCE_JOBS", DEFAULT_JOBS)))
    results: Result = {}

    def one(name: str) -> None:
        passed, detail, secs = run_scenario(url, name, out, timeout_s, node, cli)
        results[name] = (passed, detail)
        if on_result is not None:
            on_result(name, passed, detail, secs)

    if n_jobs == 1:
        for name in names:
            one(name)
    else:
        with ThreadPoolExecutor(max_workers=n_jobs, thread_name_prefix="conformance") as pool:
            for f in [pool.submit(one, name) for name in names]:
                f.result()
    return {name: results[name] for name in names}


def summary(results: Result) -> str:
    lines = [
        f"{'PASS' if ok else 'FAIL'} {name}" + ("" if ok else f"  ({detail})")
        for name, (ok, detail) in results.items()
    ]
    passed = sum(1 for ok, _ in results.values() if ok)
    lines.append(f"{passed}/{len(results)} scenarios passed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="Streamable HTTP MCP endpoint, e.g. http://127.0.0.1:3000/mcp")
    ap.add_argument("outdir", nargs="?", help="where results go (default: a new temp dir)")
    ap.add_argument("-s", "--scenario", action="append", help="run just this scenario (repeatable)")
    ap.add_argument("--all", action="store_true", help="include the pending scenarios")
    ap.add_argument(
        "--timeout", type=float, default=float(os.environ.get("CONFORMANCE_TIMEOUT", DEFAULT_TIMEOUT_S))
    )
    ap.add_argument(
        "--jobs", type=int, default=None, help="scenarios at once (default CONFORMANCE_JOBS or 2)"
    )
    args = ap.parse_args(argv)
    scenarios = args.scenario or (os.environ.get("CONFORMANCE_SCENARIOS") or "").split() or None
    outdir = args.outdir or tempfile.mkdtemp(prefix="conformance-")
    include_pending = args.all or os.environ.get("CONFORMANCE_SUITE") == "all"

    def show(name: str, ok: bool, detail: str, secs: float) -> None:
        print(
            f"{'PASS' if ok else 'FAIL'} {name}" + ("" if ok else f"  ({detail})") + f"  [{secs:.1f}s]",
            flush=True,
        )

    t0 = time.monotonic()
    results = run_scenarios(
        args.url,
        outdir,
        scenarios,
        args.timeout,
        jobs=args.jobs,
        include_pending=include_pending,
        on_result=show,
    )
    passed = sum(1 for ok, _ in results.values() if ok)
    print(f"{passed}/{len(results)} scenarios passed  [{time.monotonic() - t0:.1f}s]")
    print(f"results: {outdir}", file=sys.stderr)
    return 0 if results and passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
