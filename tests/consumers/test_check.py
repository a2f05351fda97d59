"""Projections check themselves against the log (issue 17 item 2), with real damaged files.

A gateway serves 10 calls and stops; the test damages the embedded store on disk the way
crashes and full disks do (a truncated part file, a deleted table definition, a 0-byte table
definition), restarts the gateway, and checks: it starts (policy enforced: the 11th call of
the hour is refused), says what it found, rebuilds the table from the log in the background,
and the forensic answer is whole again. An in-process test pauses a rebuild to check that
answers say "rebuilding: N %" meanwhile, never silently partial.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from gateway.admin import answer_json
from gateway.config import load_config
from ledgergate.embedded import Embedded
from tests.ledgergate.test_audit_e2e import RECORDER, cli, client
from tests.ledgergate.test_log_faults import KEYS, policy
from tests.support.gateway import start_gateway_process, write_config
from tests.support.procs import stop_process

ADMIN = "admin-token-0123456789"


def table_dir(data: Path, table: str) -> Path:
    return (data / "clickhouse" / "data" / "default" / table).resolve()


def metadata_file(data: Path, table: str) -> Path:
    hits = list((data / "clickhouse" / "store").glob(f"*/*/{table}.sql"))
    assert len(hits) == 1, hits
    return hits[0]


def damage(data: Path, how: str) -> str:
    if how == "truncated part":
        parts = [p for p in table_dir(data, "audit_calls").iterdir() if p.is_dir() and p.name != "detached"]
        assert parts, "no part to damage"
        for part in parts:  # every part: each holds some of the calls
            for f in part.iterdir():
                if f.name.startswith("data.") or f.suffix == ".bin":
                    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return "audit_calls"
    if how == "deleted definition":
        metadata_file(data, "audit_calls").unlink()
        return "audit_calls"
    if how == "0-byte definition":
        metadata_file(data, "audit_calls").write_bytes(b"")
        return "audit_calls"
    raise AssertionError(how)


async def serve_ten_calls(tmp_path: Path) -> tuple[Path, Path]:
    record = tmp_path / "received.txt"
    record.touch()
    path = write_config(
        tmp_path,
        servers={"rec": {"command": [sys.executable, str(RECORDER)], "env": {"RECORD_FILE": str(record)}}},
        policies={"rec": policy(10, "hour")},
        grants=KEYS,
        gateway={"admin_token": ADMIN},
    )
    gw, base = start_gateway_process(path, tmp_path / "gateway-1.log")
    try:
        async with client(base, "rec", KEYS["alice"]) as c:
            for i in range(10):
                assert not (await c.call_tool("open_session", {"n": f"a{i}"})).is_error
                if i == 4:  # two inserts, two parts
                    await cli(path, "audit", "who", "--tool", "open_session", "--format", "json")
        who = await cli(path, "audit", "who", "--tool", "open_session", "--format", "json")
        assert [(r["allowed"], r["refused"]) for r in who] == [(10, 0)]
    finally:
        assert stop_process(gw, grace=30) == 0
    return path, record


@pytest.mark.parametrize("how", ["truncated part", "deleted definition", "0-byte definition"])
async def test_a_damaged_table_is_found_and_rebuilt_while_policy_holds(tmp_path: Path, how: str) -> None:
    path, record = await serve_ten_calls(tmp_path)
    table = damage(tmp_path / "data", how)
    gw, base = start_gateway_process(path, tmp_path / "gateway-2.log")  # starts: no exit 3
    try:
        async with client(base, "rec", KEYS["alice"]) as c:  # policy enforced at once
            r = await c.call_tool("open_session", {"n": "after"})
        assert r.is_error and r.structured_content["rule"] == "/tools/open_session/limits/0"
        for _ in range(300):  # poll: the rebuild runs in the background
            who = await cli(path, "audit", "who", "--tool", "open_session", "--format", "json")
            if [(w["allowed"], w["refused"]) for w in who] == [(10, 1)]:
                break
            await asyncio.sleep(0.2)
        assert [(w["allowed"], w["refused"]) for w in who] == [(10, 1)]
    finally:
        stop_process(gw, grace=30)
    out = (tmp_path / "gateway-2.log").read_text()
    assert f"projection check: {table} holds" in out, out[-3000:]
    assert "projection rebuilt from the log" in out
    assert record.read_text().split() == [f"a{i}" for i in range(10)]  # the refused call never ran


async def test_answers_say_rebuilding_while_it_runs(tmp_path: Path) -> None:
    path, _ = await serve_ten_calls(tmp_path)
    damage(tmp_path / "data", "deleted definition")
    embedded = await Embedded.open(load_config(path), run_consumers=False)
    try:
        release = asyncio.Event()
        replay = embedded.audit.replay

        async def paused_replay(*args, **kwargs):  # timing only: hold the rebuild until checked
            await release.wait()
            return await replay(*args, **kwargs)

        embedded.audit.replay = paused_replay  # type: ignore[method-assign]
        found = await embedded.checker.check()  # background rebuild
        # every request is a call.decided (initialize too): at least the 10 tool calls
        assert (
            list(found) == ["audit_calls"] and found["audit_calls"][0] == 0 and found["audit_calls"][1] >= 10
        )
        embedded._checked = True
        answer = await embedded.answer("who", {"tool": "open_session"})
        rb = answer.rebuilding
        assert rb is not None and rb.tables == ["audit_calls"] and rb.percent == 0
        assert rb.note().startswith("note: rebuilding: 0 % (the tables audit_calls")
        assert b'"rebuilding":{"tables":["audit_calls"],"percent":0}' in answer_json(
            *answer, None, rb.as_json()
        )
        release.set()
        for _ in range(300):
            if embedded.checker.rebuilding() is None:
                break
            await asyncio.sleep(0.05)
        answer = await embedded.answer("who", {"tool": "open_session"})
        assert answer.rebuilding is None
        assert [(r[2], r[3]) for r in answer[1]] == [(10, 0)]
    finally:
        await embedded.close()
