"""`ledgergate check`: everything `run` would refuse, every error at once, as a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
POLICY = '{"version":"1","default":"deny"}'


def check(*args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERGATE_")}
    full.setdefault("LEDGERGATE_GATEWAY_LISTEN", "127.0.0.1:0")  # 8080 may be taken here
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "ledgergate.cli.main", "check", *map(str, args)],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )


def write(tmp_path: Path, toml: str) -> Path:
    (tmp_path / "policy.json").write_text(POLICY)
    exe = tmp_path / "bin" / "server"
    exe.parent.mkdir(exist_ok=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    cfg = tmp_path / "ledgergate.toml"
    cfg.write_text(toml)
    return cfg


GOOD = """
[servers.a]
command = ["./bin/server"]
policy = "policy.json"

[servers.b]
url = "http://127.0.0.1:3001/mcp"
policy = "policy.json"
"""


def test_a_good_config_passes_in_both_forms(tmp_path: Path) -> None:
    cfg = write(tmp_path, GOOD)
    for args in ((cfg,), ("-c", cfg), ("--config", cfg)):
        result = check(*args)
        assert result.returncode == 0, (args, result.stderr)
        assert result.stdout.endswith(f"{cfg}: ok\n")


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "not-exec").write_text("")
    cfg = write(
        tmp_path,
        """
[gateway]
lisen = "127.0.0.1:1"

[eventlog]
backend = "kafka"
bootstrap = "127.0.0.1:1"

[store]
clickhouse = "clickhouse://x"

[servers.missing]
command = ["./bin/nope"]
policy = "policy.json"

[servers.noexec]
command = ["./bin/not-exec"]
policy = "policy.json"

[servers.nopath]
command = ["no-such-program-on-the-path-ledgergate"]
policy = "policy.json"

[servers.badurl]
url = "http://host:notaport/mcp"
policy = "policy.json"

[servers.nopolicy]
url = "http://127.0.0.1:1/mcp"
policy = "gone.json"
""",
    )
    result = check("-c", cfg)
    assert result.returncode == 2
    err = result.stderr
    expected = [
        "gateway.lisen: unknown key (did you mean listen?)",
        "eventlog.bootstrap: no Kafka broker answers at 127.0.0.1:1",
        'store.clickhouse: must be "embedded"',
        f"servers.missing.command: cannot start the server: {tmp_path / 'bin' / 'nope'} does not exist",
        f"servers.noexec.command: cannot start the server: {tmp_path / 'bin' / 'not-exec'} is not executable",
        "servers.nopath.command: cannot start the server: 'no-such-program-on-the-path-ledgergate' is not on "
        "the PATH",
        "servers.badurl.url: not a valid URL",
        f"servers.nopolicy.policy: no such file: {tmp_path / 'gone.json'}",
    ]
    for text in expected:
        assert text in err, (text, err)
    assert f"{cfg}: {len(expected)} errors" in err, err
    assert "Traceback" not in err


def test_unknown_keys_get_the_nearest_valid_one(tmp_path: Path) -> None:
    cfg = write(tmp_path, GOOD.replace('policy = "policy.json"\n', 'polcy = "policy.json"\n', 1))
    result = check(cfg)
    assert result.returncode == 2
    assert "servers.a.polcy: unknown key (did you mean policy?)" in result.stderr
    assert "servers.a.policy: Field required" in result.stderr


def test_an_error_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    cfg = write(tmp_path, GOOD)
    result = check(cfg, LEDGERGATE_GATEWAY_LISTEN="nowhere", LEDGERGATE_EVENTLOG_DURABILTY="strict")
    assert result.returncode == 2
    assert (
        "environment variable LEDGERGATE_GATEWAY_LISTEN (gateway.listen): must be HOST:PORT" in result.stderr
    )
    assert (
        "environment variable LEDGERGATE_EVENTLOG_DURABILTY (eventlog.durabilty): unknown key of [eventlog] "
        "(did you mean LEDGERGATE_EVENTLOG_DURABILITY?)"
    ) in result.stderr
    assert f"{cfg}: gateway.listen" not in result.stderr  # not blamed on the file
    result = check(cfg, LEDGERGATE_EVENTLOG_BACKEND="nosuch")
    assert "environment variable LEDGERGATE_EVENTLOG_BACKEND (eventlog.backend): " in result.stderr


def test_the_listen_address_is_tried(tmp_path: Path) -> None:
    cfg = write(tmp_path, GOOD)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = check(cfg, LEDGERGATE_GATEWAY_LISTEN=f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert f"127.0.0.1:{port} is in use by another process" in result.stderr
    result = check(cfg, LEDGERGATE_GATEWAY_LISTEN="192.0.2.1:8080")  # TEST-NET-1: not this machine's
    assert result.returncode == 2 and "192.0.2.1 is not an address of this machine" in result.stderr


def test_run_refuses_what_check_reports(tmp_path: Path) -> None:
    cfg = write(tmp_path, GOOD + '\n[eventlog]\nbackend = "kafka"\nbootstrap = "127.0.0.1:1"\n')
    full = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERGATE_")}
    result = subprocess.run(
        [sys.executable, "-m", "ledgergate.cli.main", "run", "-c", str(cfg)],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "eventlog.bootstrap: no Kafka broker answers at 127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr
