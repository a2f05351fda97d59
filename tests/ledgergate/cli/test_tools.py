"""`ledgergate tools`: the live inventory of every upstream (a real subprocess of the CLI that
starts the real upstreams: whatsapp-mcp-server and tests/support/recording_stdio.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

from tests.support.gateway import SEED_POLICY, write_config
from tests.support.hostile import recording_stdio_server
from tests.support.upstreams import StdioCommand

ROOT = Path(__file__).resolve().parents[3]
RISKY = {
    "version": "1",
    "default": "allow",
    "risk": {"delete": {"action": "approve"}},
    "tools": {"echo": {"limits": [{"counter": "e", "window": "minute", "max": 5, "scope": "agent"}]}},
}


def test_tools_inventory_from_live_upstreams(tmp_path: Path, whatsapp_command: StdioCommand) -> None:
    cfg = write_config(
        tmp_path,
        servers={
            "whatsapp": {"command": whatsapp_command.argv, "env": whatsapp_command.env},
            "rec": recording_stdio_server(tmp_path / "record.log"),
        },
        policies={"whatsapp": SEED_POLICY, "rec": RISKY},
        grants={"alice": "key-alice-0123456789"},
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "ledgergate", "tools", "-c", str(cfg), "--format", "json"],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr.decode()
    doc = orjson.loads(run.stdout)
    wa = {r["tool"]: r for r in doc["whatsapp"]["tools"]}
    assert wa["open_session"]["rule"] == "/tools/open_session"
    assert wa["open_session"]["action"] == "allow"
    assert wa["open_session"]["limits"] == [
        {
            "counter": "open_session_rate",
            "max": 10,
            "window": "minute",
            "scope": "grant",
            "rule": "/tools/open_session/limits/0",
        }
    ]
    assert (wa["send_message"]["rule"], wa["send_message"]["action"]) == ("/default", "deny")
    assert (wa["send_message"]["risk_class"], wa["get_chats"]["risk_class"]) == ("write", "read")
    rec = {r["tool"]: r for r in doc["rec"]["tools"]}
    # a delete tool gets its risk class's default (approve); a listed tool its own rule
    assert (rec["delete_everything"]["risk_class"], rec["delete_everything"]["risk_level"]) == (
        "delete",
        "high",
    )
    assert rec["delete_everything"]["action"] == "approve"
    assert rec["delete_everything"]["rule"].startswith("/risk/delete")
    assert rec["echo"]["rule"] == "/tools/echo" and rec["echo"]["limits"][0]["counter"] == "e"
    assert (rec["pid"]["rule"], rec["pid"]["action"]) == ("/default", "allow")
    table = subprocess.run(
        [sys.executable, "-m", "ledgergate", "tools", "-c", str(cfg), "--server", "rec"],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert table.returncode == 0
    assert "delete_everything" in table.stdout.decode() and "delete high" in table.stdout.decode()
