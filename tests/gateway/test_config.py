"""The TOML config: validated, errors name the file, the key path and the reason; `ledgergate check`."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config

SEED = '{"version":"1","default":"deny","tools":{"open_session":{"limits":[{"counter":"open_session_rate","window":"minute","max":10,"scope":"grant"}]}}}'  # noqa: E501


def write(tmp_path: Path, toml: str, policy: str = SEED) -> Path:
    (tmp_path / "policy.json").write_text(policy)
    p = tmp_path / "ledgergate.toml"
    p.write_text(toml)
    return p


MINIMAL = """
[servers.whatsapp]
command = ["./bin/whatsapp-mcp"]
policy = "policy.json"

[grants.alice]
key = "k1"
"""


def test_minimal_config_gets_defaults_and_resolves_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), environ={})
    assert cfg.gateway.listen == "127.0.0.1:8080"
    assert cfg.gateway.max_body_bytes == 1 << 20
    assert cfg.eventlog.durability == "strict"
    assert cfg.policy_path("whatsapp") == tmp_path / "policy.json"
    assert cfg.command("whatsapp") == [str(tmp_path / "bin" / "whatsapp-mcp")]
    assert cfg.servers["whatsapp"].transport == "stdio"
    assert cfg.grants["alice"].digest == hashlib.sha256(b"k1").hexdigest()
    assert cfg.data_dir == tmp_path / ".ledgergate"


def test_environment_overrides(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, MINIMAL),
        environ={
            "LEDGERGATE_GATEWAY_LISTEN": "0.0.0.0:9000",
            "LEDGERGATE_EVENTLOG_DURABILITY": "batched",
            "LEDGERGATE_GATEWAY_ALLOWED_HOSTS": '["gw.example.com"]',
        },
    )
    assert cfg.gateway.port == 9000
    assert cfg.eventlog.durability == "batched"
    assert cfg.gateway.allowed_hosts == ["gw.example.com"]


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        (
            MINIMAL.replace('policy = "policy.json"', 'policy = "missing.json"'),
            "servers.whatsapp.policy",
            "no such file",
        ),
        (
            MINIMAL.replace('command = ["./bin/whatsapp-mcp"]', 'url = "http://x/mcp"\ncommand = ["a"]'),
            "servers.whatsapp",
            "exactly one of url",
        ),
        (
            MINIMAL.replace('command = ["./bin/whatsapp-mcp"]', 'url = "ftp://x/mcp"'),
            "servers.whatsapp",
            "url must start with http",
        ),
        (MINIMAL + '\n[gateway]\nlisten = "8080"\n', "gateway.listen", "HOST:PORT"),
        (MINIMAL + "\n[gateway]\nmax_body_bytes = -1\n", "gateway.max_body_bytes", "greater than 0"),
        (MINIMAL + "\n[gateway]\nlisen = 1\n", "gateway.lisen", "unknown key"),
        (MINIMAL.replace('key = "k1"', 'key_sha256 = "abc"'), "grants.alice", "64 hex"),
        (MINIMAL + '\n[grants.bob]\nkey = "k1"\n', "grants.bob", "same key as grants.alice"),
        (MINIMAL + '\n[eventlog]\ndurability = "sometimes"\n', "eventlog.durability", "strict"),
    ],
)
def test_errors_name_file_key_and_reason(tmp_path: Path, toml: str, key: str, reason: str) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert err.value.path == str(path)
    assert err.value.key == key
    assert reason in err.value.reason
    assert str(err.value).startswith(f"{path}: {key}: ")


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[servers.whatsapp\n")
    with pytest.raises(ConfigError, match="invalid TOML") as err:
        load_config(path, environ={})
    assert err.value.path == str(path)


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    # port 0: check probes the listen address, and 8080 may be taken on a shared machine
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERGATE_")}
    env["LEDGERGATE_GATEWAY_LISTEN"] = "127.0.0.1:0"
    return subprocess.run(
        [sys.executable, "-m", "ledgergate", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def fake_program(tmp_path: Path) -> None:
    """MINIMAL's stdio command, present and executable (check verifies it)."""
    exe = tmp_path / "bin" / "whatsapp-mcp"
    exe.parent.mkdir(exist_ok=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)


def test_check_command_ok_and_errors(tmp_path: Path) -> None:
    fake_program(tmp_path)
    ok = run_check(write(tmp_path, MINIMAL))
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout and "plain-text key" in ok.stdout
    bad_policy = run_check(
        write(
            tmp_path,
            MINIMAL,
            policy='{"version":"1","tools":{"x":{"limits":[{"counter":"c","window":"fortnight","max":1}]}}}',
        )
    )
    assert bad_policy.returncode == 2
    assert f"{tmp_path / 'policy.json'}: /tools/x/limits/0/window:" in bad_policy.stderr
    bad_cfg = run_check(write(tmp_path, MINIMAL + "\n[gateway]\nlisen = 1\n"))
    assert bad_cfg.returncode == 2
    assert "gateway.lisen: unknown key" in bad_cfg.stderr


def test_the_shipped_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "ledgergate.toml"
    cfg = load_config(example, environ={})
    assert set(cfg.servers) == {"whatsapp"}
    assert cfg.policy_path("whatsapp").read_text().strip() == SEED


def run_gateway(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledgergate", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_run_says_what_cannot_be_opened(tmp_path: Path) -> None:
    import socket

    (tmp_path / "a-file").write_text("")
    bad_dir = run_gateway(write(tmp_path, MINIMAL + '\n[gateway]\ndata_dir = "a-file"\n'))
    assert bad_dir.returncode == 3
    assert f"cannot open the event log and store in {tmp_path / 'a-file'}" in bad_dir.stderr
    assert "Traceback" not in bad_dir.stderr
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        busy = run_gateway(write(tmp_path, MINIMAL + f'\n[gateway]\nlisten = "127.0.0.1:{port}"\n'))
    assert busy.returncode == 3
    assert f"cannot serve on 127.0.0.1:{port}" in busy.stderr and "Traceback" not in busy.stderr
