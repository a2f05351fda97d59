"""`ledgergate audit ...` and `ledgergate replay` as real subprocesses.

With no gateway running the CLI opens the data dir's log and chDB store itself: the test
writes the audit scenario into a real SQLite event log and the CLI's own consumers fold it.
With a gateway answering at the config's listen address the CLI must ask its admin API
instead (a stand-in gateway serves /healthz and the real admin routes in this process).
The test process never opens the chDB store of the data dir the subprocesses use.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.web import Response, json_response

from consumers.store.base import StoreError
from eventlog.sqlite import SqliteEventLog
from gateway.admin import add_admin_routes
from gateway.config import load_config
from gateway.edge import App, HttpServer, Request
from schemas import events as E
from tests.support.audit_contract import QUOTED_AGENT, RULE_LIMIT, at, scenario
from tests.support.gateway import SEED_POLICY, write_config

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "cli-admin-token"


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LEDGERGATE_")}


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledgergate", *map(str, args)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


async def acli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The CLI run without blocking this event loop (when it serves a stand-in gateway)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ledgergate",
        *map(str, args),
        cwd=ROOT,
        env=env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode())


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def iso(seconds: float) -> str:
    """How every output format prints a DateTime64(3): RFC 3339 UTC, milliseconds, Z."""
    return at(seconds).isoformat(timespec="milliseconds").replace("+00:00", "Z")


cell = iso  # table, csv and json print timestamps the same way


def config(directory: Path, **gateway: Any) -> Path:
    return write_config(
        directory,
        servers={"whatsapp": {"url": "http://127.0.0.1:9/mcp"}},
        policies={"whatsapp": SEED_POLICY},
        grants={"g-alice": "alice-key"},
        gateway=gateway or None,
    )


@pytest.fixture(scope="module")
async def populated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config whose data dir holds the scenario in its event log (not yet in ClickHouse)."""
    directory = tmp_path_factory.mktemp("cli")
    cfg_path = config(directory, admin_token=TOKEN)  # nothing listens there: the CLI goes local
    log = SqliteEventLog(load_config(cfg_path).data_dir / "events.db", durability="strict")
    await log.open()
    try:
        await log.append([E.encode(e) for e in scenario()])
    finally:
        await log.close()
    return cfg_path


def test_who_json_folds_the_log_and_answers(populated: Path) -> None:
    out = ok(cli("audit", "who", "--tool", "open_session", "-c", populated, "--format", "json"))
    assert orjson.loads(out) == [
        {"agent": "agent-a", "grant": "g-alice", "allowed": 4, "refused": 0, "first": iso(0),
         "last": iso(86400 * 3)},
        {"agent": "agent-b", "grant": "g-bob", "allowed": 1, "refused": 2, "first": iso(20), "last": iso(70)},
        {"agent": QUOTED_AGENT, "grant": "g-q'uote", "allowed": 0, "refused": 1, "first": iso(130),
         "last": iso(130)},
    ]  # fmt: skip
    out = ok(
        cli("audit", "who", "--tool", "open_session", "--server", "whatsapp", "--since", iso(5),
            "--until", iso(75), "--decision", "rate_limited", "--config", populated, "--format", "json")
    )  # fmt: skip
    assert orjson.loads(out) == [
        {"agent": "agent-b", "grant": "g-bob", "allowed": 0, "refused": 2, "first": iso(30), "last": iso(70)}
    ]


def test_who_table_and_csv(populated: Path) -> None:
    out = ok(cli("audit", "who", "--tool", "open_session", "-c", populated))
    for text in ("agent", "allowed", "refused", "agent-a", "g-bob", cell(86400 * 3), "(3 rows)"):
        assert text in out, text
    out = ok(cli("audit", "who", "--tool", "open_session", "-c", populated, "--format", "csv"))
    rows = list(csv.reader(io.StringIO(out)))
    assert rows == [
        ["agent", "grant", "allowed", "refused", "first", "last"],
        ["agent-a", "g-alice", "4", "0", cell(0), cell(86400 * 3)],
        ["agent-b", "g-bob", "1", "2", cell(20), cell(70)],
        [QUOTED_AGENT, "g-q'uote", "0", "1", cell(130), cell(130)],
    ]


def test_calls_and_denials(populated: Path) -> None:
    out = ok(cli("audit", "calls", "-c", populated, "--limit", "2", "--format", "json"))
    assert [r["call_id"] for r in orjson.loads(out)] == ["call-011", "call-010"]
    out = ok(cli("audit", "calls", "--tool", "send_message", "-c", populated, "--format", "json"))
    (row,) = orjson.loads(out)
    assert row["ts"] == iso(80) and row["decision"] == "allow" and row["rule"] == ""
    assert (row["outcome"], row["upstream_ms"]) == ("ok", 6000.0)
    assert orjson.loads(row["arguments"]) == {"phone_number": "+100", "content": "[REDACTED]"}
    out = ok(cli("audit", "denials", "-c", populated, "--format", "csv", "--since", iso(60)))
    assert list(csv.reader(io.StringIO(out))) == [
        ["agent", "tool", "rule", "count", "first", "last", "remote", "reason"],
        ["agent-b", "delete_chat", "/default", "1", cell(90), cell(90), "", ""],
        ["agent-b", "open_session", RULE_LIMIT, "1", cell(70), cell(70), "", ""],
        [QUOTED_AGENT, "open_session", "/default", "1", cell(130), cell(130), "", ""],
    ]
    out = ok(cli("audit", "denials", "-c", populated, "--since", "1h"))  # the scenario is in 2025
    assert "(0 rows)" in out


def test_sql_with_params(populated: Path) -> None:
    text = (
        "SELECT agent, decision, count() AS n FROM audit_calls FINAL "
        "WHERE agent = {a:String} OR `grant` = {g:String} GROUP BY agent, decision ORDER BY agent, decision"
    )
    out = ok(
        cli("audit", "sql", text, "--param", f"a={QUOTED_AGENT}", "-p", "g=g-bob=x", "-c", populated,
            "--format", "json")
    )  # fmt: skip
    assert orjson.loads(out) == [{"agent": QUOTED_AGENT, "decision": "deny", "n": 1}]
    out = ok(cli("audit", "sql", text, "--param", f"a={QUOTED_AGENT}", "-p", "g=g-bob", "-c", populated,
                 "--format", "csv"))  # fmt: skip
    assert list(csv.reader(io.StringIO(out)))[1:] == [
        ["agent-b", "allow", "1"],
        ["agent-b", "deny", "1"],
        ["agent-b", "rate_limited", "2"],
        [QUOTED_AGENT, "deny", "1"],
    ]


def test_exit_codes(populated: Path, tmp_path: Path) -> None:
    for args, needle in [
        (("audit", "sql", "DROP TABLE audit_calls"), "read-only"),
        (("audit", "sql", "SELECT 1; DROP TABLE audit_calls"), "read-only"),
        (("audit", "sql", "SELECT * FROM no_such_table"), "no_such_table"),
        (("audit", "sql", "SELECT {x:UInt8}"), "x"),
        (("audit", "sql", "SELECT 1", "--param", "no-equals"), "name=value"),
        (("audit", "sql", "SELECT {a:String}", "-p", "a=1", "-p", "a=2"), "more than once"),
        (("audit", "who", "--since", "1d"), "--tool"),
        (("audit", "who", "--tool", "x", "--since", "last tuesday"), "last tuesday"),
        (("audit", "calls", "--limit", "0"), "--limit"),
        (("audit", "calls", "--format", "xml"), "--format"),
        (("audit", "calls", "--decision", "maybe"), "--decision"),
        (("replay", "--from", "-1"), "--from"),
    ]:
        result = cli(*args, "-c", populated)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert needle in result.stderr, (args, result.stderr)
    # the read-only refusals changed nothing
    out = ok(
        cli("audit", "sql", "SELECT count() AS n FROM audit_calls FINAL", "-c", populated, "--format", "csv")
    )
    assert out.splitlines() == ["n", "11"]
    # config errors
    result = cli("audit", "denials", "-c", tmp_path / "missing.toml")
    assert result.returncode == 2 and "missing.toml" in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[gateway]\nlisten = 'nowhere'\n")
    result = cli("audit", "denials", "-c", broken)
    assert result.returncode == 2 and "gateway.listen" in result.stderr
    # a store that cannot be opened: the data dir is a file
    (tmp_path / "not-a-dir").write_text("")
    bad = config(tmp_path / "bad", data_dir=str(tmp_path / "not-a-dir"))
    result = cli("audit", "denials", "-c", bad)
    assert result.returncode == 3, result.stderr
    assert "not-a-dir" in result.stderr and "Traceback" not in result.stderr


def test_replay_rebuilds_and_changes_no_answer(populated: Path) -> None:
    before = ok(cli("audit", "calls", "-c", populated, "--format", "json", "--limit", "1000"))
    result = cli("replay", "--from", "0", "-c", populated)
    out = ok(result)
    # the log holds the scenario and the admin.query events of the local questions asked so far
    m = re.search(r"replayed log offsets 0\.\.(\d+): (\d+) records into the audit tables, (\d+) into", out)
    assert m is not None, out
    n = int(m[1])
    assert int(m[2]) == int(m[3]) == n and n > len(scenario())
    counts = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert counts["audit_calls"] == "11" and counts["audit_outcomes"] == "10"
    assert counts["audit_sessions"] == "2" and counts["audit_policy_loads"] == "1"
    assert "counters" in result.stderr  # the progress bar (on stderr)
    out = ok(cli("replay", "--from", "5", "-c", populated))
    assert f"{n - 5} records into the audit tables" in out
    assert ok(cli("audit", "calls", "-c", populated, "--format", "json", "--limit", "1000")) == before


# ---------------------------------------------------------------- a gateway is running


@contextlib.asynccontextmanager
async def stand_in_gateway(cfg_path: Path, token: str | None, answer: Any) -> AsyncIterator[None]:
    """/healthz like the gateway's, plus the real admin routes, at the config's listen address."""
    cfg = load_config(cfg_path)
    app = App()

    async def healthz(req: Request) -> Response:
        return json_response({"ok": True})

    app.add_get("/healthz", healthz)
    if token:
        add_admin_routes(app, token, answer)
    async with HttpServer(app, cfg.gateway.host, cfg.gateway.port):
        yield


async def test_cli_asks_the_running_gateway(tmp_path: Path) -> None:
    asked: list[tuple[str, dict[str, Any]]] = []

    async def answer(question: str, params: dict[str, Any]) -> Any:
        asked.append((question, params))
        if "DROP" in params.get("sql", ""):
            raise PermissionError("read-only query refused: the statement is DROP")
        return ["agent", "n", "last"], [
            ("agent-a", 3, datetime.fromisoformat(iso(10))),
            (QUOTED_AGENT, 1, None),
        ]

    cfg_path = config(tmp_path, admin_token=TOKEN)
    async with stand_in_gateway(cfg_path, TOKEN, answer):
        out = ok(await acli("audit", "who", "--tool", "open_session", "--since", "7d", "-c", cfg_path,
                            "--format", "csv"))  # fmt: skip
        assert list(csv.reader(io.StringIO(out))) == [
            ["agent", "n", "last"],
            ["agent-a", "3", cell(10)],  # the ISO string of the API is a datetime again
            [QUOTED_AGENT, "1", ""],
        ]
        assert asked == [("who", {"tool": "open_session", "since": "7d"})]
        out = ok(
            await acli("audit", "sql", "SELECT {a:String}", "-p", "a=b'c", "-c", cfg_path, "--format", "json")
        )
        assert orjson.loads(out)[0] == {"agent": "agent-a", "n": 3, "last": iso(10)}
        assert asked[-1] == ("sql", {"sql": "SELECT {a:String}", "params": {"a": "b'c"}})
        ok(await acli("audit", "calls", "--agent", "a", "--limit", "5", "-c", cfg_path))
        assert asked[-1] == ("calls", {"agent": "a", "limit": "5"})
        result = await acli("audit", "sql", "DROP TABLE audit_calls", "-c", cfg_path)
        assert result.returncode == 2 and "read-only" in result.stderr
        result = await acli("audit", "denials", "--until", "boom", "-c", cfg_path)
        assert result.returncode == 2  # argparse: not a duration nor a datetime
        # replay refuses while a gateway holds the store
        result = await acli("replay", "-c", cfg_path)
        assert result.returncode == 2 and "stop it" in result.stderr
        # a wrong token
        wrong = config(tmp_path / "wrong", admin_token="nope", listen=load_config(cfg_path).gateway.listen)
        result = await acli("audit", "denials", "-c", wrong)
        assert result.returncode == 2 and "admin token" in result.stderr
        # a config without admin token must not open the store the gateway holds
        no_token = config(tmp_path / "none", listen=load_config(cfg_path).gateway.listen)
        result = await acli("audit", "denials", "-c", no_token)
        assert result.returncode == 2 and "admin_token" in result.stderr
        assert not (tmp_path / "none" / "data").exists()


async def test_gateway_store_failure_is_exit_3(tmp_path: Path) -> None:
    async def answer(question: str, params: dict[str, Any]) -> Any:
        raise StoreError("Code: 210. DB::Exception: Connection refused (NETWORK_ERROR)")

    cfg_path = config(tmp_path, admin_token=TOKEN)
    async with stand_in_gateway(cfg_path, TOKEN, answer):
        result = await acli("audit", "denials", "-c", cfg_path)
    assert result.returncode == 3 and "Connection refused" in result.stderr
    # and a gateway without the admin API (started without a token) is exit 3 as well
    async with stand_in_gateway(cfg_path, None, answer):
        result = await acli("audit", "denials", "-c", cfg_path)
    assert result.returncode == 3 and "admin API" in result.stderr


def test_a_data_dir_held_by_another_process_is_a_clear_exit_3(tmp_path: Path) -> None:
    from ledgergate.embedded import lock_data_dir

    cfg_path = config(tmp_path / "held")
    data_dir = load_config(cfg_path).data_dir
    data_dir.mkdir(parents=True)
    held = lock_data_dir(data_dir)  # as a gateway started with --listen elsewhere would
    try:
        result = cli("audit", "denials", "-c", cfg_path)
    finally:
        held.close()
    assert result.returncode == 3, result.stderr
    assert f"in use by ledgergate pid {os.getpid()}" in result.stderr
    assert ok(cli("audit", "denials", "-c", cfg_path, "--format", "csv")).splitlines()[0].startswith("agent")


# ---------------------------------------------------------------- the projections never freeze


async def scenario_dir(directory: Path) -> tuple[Path, SqliteEventLog]:
    cfg_path = config(directory)
    log = SqliteEventLog(load_config(cfg_path).data_dir / "events.db", durability="strict")
    await log.open()
    await log.append([E.encode(e) for e in scenario()])
    return cfg_path, log


async def test_replay_from_past_the_end_is_refused(tmp_path: Path) -> None:
    cfg_path, log = await scenario_dir(tmp_path)
    await log.close()
    n = len(scenario())
    result = await acli("replay", "--from", "999999", "-c", cfg_path)
    assert result.returncode == 2, result.stdout
    assert f"--from 999999 is past the end of the event log, which holds {n} records" in result.stderr
    log = SqliteEventLog(load_config(cfg_path).data_dir / "events.db")
    await log.open()
    try:  # nothing was committed: the consumers still start where they were
        assert [await log.committed(c) for c in ("audit", "counters")] == [0, 0]
    finally:
        await log.close()
    ok(await acli("replay", "--from", str(n), "-c", cfg_path))  # the end itself is fine (nothing to do)


async def test_an_offset_past_the_end_is_reported_and_repaired_at_open(tmp_path: Path) -> None:
    """As an older `replay --from 999999` left it: both consumers committed past the end."""
    cfg_path, log = await scenario_dir(tmp_path)
    try:
        for name in ("audit", "counters"):
            await log.commit(name, 999_999)
    finally:
        await log.close()
    result = await acli("audit", "who", "--tool", "open_session", "-c", cfg_path, "--format", "json")
    assert result.returncode == 0, result.stderr
    for name in ("audit", "counters"):
        assert f"consumer {name}: committed offset 999999 is past the end of the event log" in result.stderr
    rows = orjson.loads(result.stdout)
    assert sum(r["allowed"] + r["refused"] for r in rows) == 8  # every open_session of the scenario


async def test_an_answer_says_how_far_behind_the_log_it_is(tmp_path: Path) -> None:
    """Consumers that cannot keep up (here: stopped) -> the answer carries the lag."""
    import time

    from ledgergate.embedded import Embedded

    cfg = load_config(config(tmp_path))
    embedded = await Embedded.open(cfg, run_consumers=True)
    try:
        answer = await embedded.answer("who", {"tool": "open_session"})
        assert answer.lag is None  # caught up
        for t in embedded._tasks:  # the consumers stop folding
            t.cancel()
        await asyncio.gather(*embedded._tasks, return_exceptions=True)
        old = [e.model_copy(update={"ts": int(time.time() * 1000) - 5000}) for e in scenario()[:3]]
        await embedded.log.append([E.encode(e) for e in old])
        embedded.sync_timeout_s = 0.2  # how long it waits for them, not an assertion
        answer = await embedded.answer("who", {"tool": "open_session"})
        assert answer.lag is not None and answer.lag.events == 3 and answer.lag.seconds >= 5
    finally:
        await embedded.close()


async def test_the_cli_prints_the_lag_note(tmp_path: Path) -> None:
    from consumers.forensics import Lag, LaggedAnswer

    async def answer(question: str, params: dict[str, Any]) -> Any:
        return LaggedAnswer(["agent", "n"], [("agent-a", 3)], Lag(7, 12.5))

    cfg_path = config(tmp_path, admin_token=TOKEN)
    async with stand_in_gateway(cfg_path, TOKEN, answer):
        table = ok(await acli("audit", "who", "--tool", "x", "-c", cfg_path))
        as_json = await acli("audit", "who", "--tool", "x", "-c", cfg_path, "--format", "json")
    note = "note: the audit tables are 7 events (12.5 s) behind the log"
    assert note in table.splitlines()[-1]
    assert orjson.loads(as_json.stdout) == [{"agent": "agent-a", "n": 3}]  # json keeps its shape
    assert note in as_json.stderr
