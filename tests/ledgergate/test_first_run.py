"""The first run, as a new user does it (README "Quick start"), as real subprocesses.

A gateway runs `make run`'s command, `python -m ledgergate run --config CONFIG`, on a copy of
the shipped examples/ledgergate.toml where only the listen address and the data dir point
into the test's temp dir (and the upstream command is absolute, as the copy lives elsewhere);
the real whatsapp-mcp-server stdio upstream under .upstreams/. No admin token anywhere: not in
the config, not in the environment. Then the README's client, and `ledgergate audit
who|calls|denials -c CONFIG` in "a second terminal" (another subprocess), which reaches the
running gateway over its admin socket (data_dir/admin.sock) with no configuration.
"""

from __future__ import annotations

import csv
import http.client
import io
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from datetime import datetime
from importlib.metadata import requires
from pathlib import Path

import orjson
import pytest

from tests.support.procs import free_port, start_process, stop_process, wait_http

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "examples/ledgergate.toml"
WHATSAPP = ROOT / ".upstreams" / "whatsapp" / "bin" / "whatsapp-mcp"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERGATE_") and k != "COLUMNS"}
    env.update(extra)
    return env


def ledgergate(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledgergate.cli.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_version() -> None:
    result = ledgergate("--version", env=clean_env())
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"ledgergate \S+\n", result.stdout), result.stdout


def test_make_run_installs_what_the_example_client_imports() -> None:
    """`make run` installs the `example` extra, which holds the SDK examples/client.py imports."""
    plan = subprocess.run(
        ["make", "-n", "-B", "run"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    pip = [line for line in plan.splitlines() if "pip install" in line and "-e" in line]
    assert pip and "example" in pip[0], plan
    # the upstreams step of `make run` builds only what the example serves
    assert re.search(r"install-upstreams\.sh\s*$", plan, re.M), plan
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("mcp") for req in extras["example"])
    imports = set(re.findall(r"^(?:import|from) (\w+)", (ROOT / "examples/client.py").read_text(), re.M))
    third_party = imports - set(sys.stdlib_module_names)
    assert third_party == {"mcp", "httpx2"}, third_party
    assert any(r.startswith("httpx2") for r in requires("mcp") or []), "mcp brings httpx2"


def test_install_upstreams_without_arguments_builds_only_the_whatsapp_venv(tmp_path: Path) -> None:
    """A copy of the script in a fake checkout whose whatsapp venv is already installed: with no
    argument it is done without npm (NPM=false would fail any npm step)."""
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "install-upstreams.sh"
    shutil.copy(ROOT / "scripts" / "install-upstreams.sh", script)
    wa = tmp_path / ".upstreams" / "whatsapp"
    (wa / "bin").mkdir(parents=True)
    (wa / "bin" / "whatsapp-mcp").write_text("#!/bin/sh\n")
    (wa / "bin" / "whatsapp-mcp").chmod(0o755)
    pins = re.search(r'^WHATSAPP_PINS="([^"]+)"', script.read_text(), re.M)
    assert pins is not None
    (wa / ".ledgergate-stamp").write_text(pins.group(1) + "\n")
    env = clean_env(NPM="false", PATH="/usr/bin:/bin")
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "whatsapp: up to date" in result.stdout and "everything" not in result.stdout.split("done")[0]
    assert not (tmp_path / ".upstreams" / "everything").exists()
    result = subprocess.run(
        ["bash", str(script), "--everything"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "everything" in result.stdout + result.stderr  # it tried npm


def test_install_upstreams_names_only_files_that_exist() -> None:
    text = (ROOT / "scripts" / "install-upstreams.sh").read_text()
    named = set(re.findall(r"\b((?:tests|scripts|examples|schemas)/[\w./-]+\w|[A-Z][A-Z]+\.md)\b", text))
    assert named, "the script names some repo files"
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert missing == [], f"install-upstreams.sh points to files that do not exist: {missing}"


def test_the_example_config_redacts_content_as_the_readme_shows() -> None:
    doc = tomllib.loads((ROOT / EXAMPLE).read_text())
    assert doc["servers"]["whatsapp"]["redact"] == ["content"]
    assert 'redact = ["content"]' in (ROOT / "README.md").read_text()


# ---------------------------------------------------------------- a gateway serving the example


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (the gateway's admin socket)."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=60)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(self.path)


def over_socket(path: Path, method: str, target: str) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(str(path))
    try:
        conn.request(method, target)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def example_copy(work: Path, port: int) -> Path:
    """examples/ledgergate.toml and its policy in ``work``, only listen and data_dir changed
    (and the upstream command absolute: paths are relative to the config's folder)."""
    text = (ROOT / EXAMPLE).read_text()
    assert "admin_token =" not in text.replace("# admin_token", ""), "the example has no admin token"
    replaced = {
        'listen = "127.0.0.1:8080"': f'listen = "127.0.0.1:{port}"',
        'data_dir = "../.ledgergate"': f'data_dir = "{work / "data"}"',
        '"../.upstreams/': f'"{ROOT / ".upstreams"}/',
    }
    for old, new in replaced.items():
        assert old in text, old
        text = text.replace(old, new)
    (work / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "policy.json", work / "examples" / "policy.json")
    cfg = work / "examples" / "ledgergate.toml"
    cfg.write_text(text)
    return cfg


class Example:
    def __init__(self, env: dict[str, str], base: str, config: Path, data: Path, stale_ino: int) -> None:
        self.env, self.base, self.config, self.data, self.stale_ino = env, base, config, data, stale_ino


@pytest.fixture(scope="module")
def example_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Example]:
    """`make run`'s command on a copy of the example config (terminal 1), and the env of
    terminal 2. The data dir starts with a stale admin socket, as a killed gateway leaves it."""
    if not WHATSAPP.exists():
        pytest.fail(f"{WHATSAPP} is missing: run scripts/install-upstreams.sh")
    work = tmp_path_factory.mktemp("first-run")
    port = free_port()
    config = example_copy(work, port)
    data = work / "data"
    data.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(data / "admin.sock"))  # closed without unlink: the file stays, nobody listens
    stale_ino = (data / "admin.sock").stat().st_ino
    env = clean_env()  # no LEDGERGATE_* at all: no admin token, nothing to configure
    handle = start_process(
        [sys.executable, "-m", "ledgergate", "run", "--config", str(config)],
        env=env,
        log_path=work / "gateway.log",
        cwd=ROOT,
        inherit_env=False,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=90, handle=handle)
        yield Example(env, f"http://127.0.0.1:{port}", config, data, stale_ino)
    finally:
        stop_process(handle, grace=30)
        log = (work / "gateway.log").read_text()
        assert "Traceback" not in log, log


def wait_for_a_fresh_minute(margin_s: float = 20.0) -> None:
    """Return when at least ``margin_s`` remain in the current UTC minute (the seed policy's
    window is the UTC minute), polling the clock: 12 calls then fall in one minute."""
    while 60.0 - time.time() % 60.0 < margin_s:
        time.sleep(0.1)


def test_quick_start(example_gateway: Example) -> None:
    env, base, cfg = example_gateway.env, example_gateway.base, str(example_gateway.config)
    assert not any(k.startswith("LEDGERGATE_") for k in env)
    # terminal 2: the README's client, started early enough in a minute for the 10/2 split
    wait_for_a_fresh_minute()
    client = subprocess.run(
        [sys.executable, "examples/client.py", f"{base}/mcp/whatsapp"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert client.returncode == 0, client.stderr
    sessions = [line for line in client.stdout.splitlines() if line.startswith("open_session #")]
    assert len(sessions) == 12, client.stdout
    assert sum("REFUSED" in line for line in sessions) == 2, client.stdout

    # audit who, as the README prints it: the demo agent, 10 allowed and 2 refused
    table = ledgergate("audit", "who", "--tool", "open_session", "-c", cfg, env=env)
    assert table.returncode == 0, table.stderr
    assert "(1 row)" in table.stdout
    (line,) = [ln for ln in table.stdout.splitlines() if ln.startswith("demo-agent")]
    assert line.split()[:4] == ["demo-agent", "demo", "10", "2"], table.stdout
    result = ledgergate("audit", "who", "--tool", "open_session", "-c", cfg, "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    (row,) = orjson.loads(result.stdout)
    assert (row["agent"], row["grant"], row["allowed"], row["refused"]) == ("demo-agent", "demo", 10, 2)
    first, last = (datetime.fromisoformat(row[k]) for k in ("first", "last"))
    assert first.replace(second=0, microsecond=0) == last.replace(second=0, microsecond=0)

    # audit calls: 12 open_session + send_message (its content redacted), newest first
    result = ledgergate("audit", "calls", "-c", cfg, "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    calls = orjson.loads(result.stdout)
    assert calls[0]["tool"] == "send_message"
    assert sum(c["tool"] == "open_session" for c in calls) == 12
    send = calls[0]
    assert send["decision"] == "deny" and orjson.loads(send["arguments"])["content"] == "[REDACTED]"

    # audit denials: the rate limit and the default deny
    result = ledgergate("audit", "denials", "-c", cfg, "--format", "csv", env=env)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    by_tool = {r["tool"]: r for r in rows}
    assert by_tool["send_message"]["rule"] == "/default" and by_tool["send_message"]["count"] == "1"
    assert by_tool["open_session"]["rule"] == "/tools/open_session/limits/0"
    assert by_tool["open_session"]["count"] == "2"

    # every question went over the admin socket, and the gateway audited it as such
    result = ledgergate(
        "audit",
        "sql",
        "SELECT question, caller, count() AS n, min(remote) AS remote FROM audit_admin "
        "WHERE kind = 'admin.query' GROUP BY question, caller ORDER BY question",
        "-c",
        cfg,
        "--format",
        "json",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    asked = {(r["question"], r["caller"]): r for r in orjson.loads(result.stdout)}
    assert set(asked) == {("who", "socket"), ("calls", "socket"), ("denials", "socket")}, asked
    assert asked[("who", "socket")]["n"] == 2
    assert re.fullmatch(rf"uid {os.getuid()} pid \d+", asked[("who", "socket")]["remote"])


def test_the_admin_socket_is_owner_only_named_in_the_lock_and_replaced_the_stale_one(
    example_gateway: Example,
) -> None:
    sock = example_gateway.data / "admin.sock"
    st = sock.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    assert st.st_ino != example_gateway.stale_ino  # the stale file of a killed gateway was replaced
    lock = (example_gateway.data / "lock").read_text().splitlines()
    assert re.fullmatch(r"ledgergate pid \d+", lock[0]) and lock[1] == f"admin_socket {sock}", lock
    # it serves the admin routes without a token, and never the agents' MCP routes
    status, body = over_socket(sock, "GET", "/admin/health")
    assert status == 200 and orjson.loads(body)["servers"] == ["whatsapp"]
    status, _ = over_socket(sock, "POST", "/mcp/whatsapp")
    assert status == 404
    # and the TCP listener has no admin API at all (no admin_token configured)
    status, _ = over_socket_tcp(example_gateway.base, "GET", "/admin/audit/denials")
    assert status == 404


def over_socket_tcp(base: str, method: str, target: str) -> tuple[int, bytes]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, target)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_calls_fit_the_terminal_and_wide_shows_every_column(example_gateway: Example) -> None:
    env, cfg = example_gateway.env, str(example_gateway.config)
    narrow = ledgergate("audit", "calls", "-c", cfg, env={**env, "COLUMNS": "100"})
    assert narrow.returncode == 0, narrow.stderr
    lines = narrow.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100, "\n".join(lines)
    header = lines[0].split()
    assert header == ["ts", "call", "tool", "agent", "result", "ms", "arguments"], lines[0]
    full = orjson.loads(ledgergate("audit", "calls", "-c", cfg, "--format", "json", env=env).stdout)
    call_id = full[0]["call_id"]
    assert len(call_id) == 36 and call_id not in narrow.stdout and call_id[-8:] in narrow.stdout
    wide = ledgergate("audit", "calls", "--wide", "-c", cfg, env={**env, "COLUMNS": "400"})
    assert wide.returncode == 0, wide.stderr
    assert call_id in wide.stdout and "session" in wide.stdout and "rule" in wide.stdout


def test_timestamps_are_one_format_in_table_json_and_csv(example_gateway: Example) -> None:
    env, cfg = example_gateway.env, str(example_gateway.config)
    args = ("audit", "who", "--tool", "open_session", "-c", cfg)
    (row,) = orjson.loads(ledgergate(*args, "--format", "json", env=env).stdout)
    (csv_row,) = list(csv.DictReader(io.StringIO(ledgergate(*args, "--format", "csv", env=env).stdout)))
    table = ledgergate(*args, env={**env, "COLUMNS": "200"}).stdout
    for key in ("first", "last"):
        assert RFC3339.match(row[key]), row[key]
        assert csv_row[key] == row[key]
        assert row[key] in table


def test_unknown_server_is_an_error_listing_the_known_ones(example_gateway: Example) -> None:
    env, cfg = example_gateway.env, str(example_gateway.config)
    result = ledgergate("audit", "who", "--tool", "open_session", "--server", "nosuch", "-c", cfg, env=env)
    assert result.returncode == 2, result.stdout
    assert "unknown server 'nosuch'" in result.stderr and "whatsapp" in result.stderr


def test_policy_reload_answers_200_when_every_policy_loaded(example_gateway: Example) -> None:
    status, body = over_socket(example_gateway.data / "admin.sock", "POST", "/admin/policies/reload")
    assert status == 200 and orjson.loads(body) == {"whatsapp": None}


def test_a_second_run_names_the_gateway_holding_the_data_dir(example_gateway: Example) -> None:
    env, cfg = example_gateway.env, str(example_gateway.config)
    second = ledgergate("run", "-c", cfg, "--listen", f"127.0.0.1:{free_port()}", env=env)
    assert second.returncode == 3, second.stderr
    m = re.search(
        r"in use by ledgergate pid (\d+) \(another gateway holds it\): stop it with `kill (\d+)`",
        second.stderr,
    )
    assert m is not None and m.group(1) == m.group(2), second.stderr
    assert "Traceback" not in second.stderr


def test_a_missing_stdio_command_is_an_error_line_at_start_up(tmp_path: Path) -> None:
    (tmp_path / "policy.json").write_text((ROOT / "examples" / "policy.json").read_text())
    port = free_port()
    cfg = tmp_path / "ledgergate.toml"
    cfg.write_text(
        f'[gateway]\nlisten = "127.0.0.1:{port}"\n\n'
        '[servers.whatsapp]\ncommand = ["./not-installed/whatsapp-mcp"]\npolicy = "policy.json"\n\n'
        '[grants.demo]\nkey = "k"\n'
    )
    handle = start_process(
        [sys.executable, "-m", "ledgergate.cli.main", "run", "-c", str(cfg)],
        env=clean_env(),
        log_path=tmp_path / "gateway.log",
        cwd=ROOT,
        inherit_env=False,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=90, handle=handle)  # it serves on
    finally:
        stop_process(handle)
    log = (tmp_path / "gateway.log").read_text()
    line = next((ln for ln in log.splitlines() if " ERROR " in ln and "server whatsapp" in ln), None)
    assert line is not None, log
    assert str(tmp_path / "not-installed" / "whatsapp-mcp") in line and "does not exist" in line
