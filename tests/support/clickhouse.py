"""pytest fixtures: a real ClickHouse server for the clickhouse-connect store.

``clickhouse_url`` (session scope): ``$LEDGERGATE_TEST_CLICKHOUSE_URL`` if set (an
existing server, e.g. the compose one), else a server started from the chdb-core wheel
by ``tests/support/clickhouse_server.py`` on a free loopback port with its data in a
temp dir; ready when ``GET /ping`` answers (polled, no fixed sleeps); SIGTERM at the end.

``clickhouse_db_url``: a fresh database on that server per test (dropped afterwards),
so tests never see each other's rows.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ENV_URL = "LEDGERGATE_TEST_CLICKHOUSE_URL"
LAUNCHER = Path(__file__).with_name("clickhouse_server.py")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split(url: str) -> tuple[str, dict[str, str]]:
    """Base URL without credentials, and ClickHouse auth headers for them."""
    u = urlsplit(url)
    headers = {}
    if u.username:
        headers = {"X-ClickHouse-User": unquote(u.username), "X-ClickHouse-Key": unquote(u.password or "")}
    netloc = u.hostname or "127.0.0.1"
    if u.port:
        netloc += f":{u.port}"
    return f"{u.scheme}://{netloc}", headers


def _ping(url: str) -> bool:
    try:
        with urllib.request.urlopen(_split(url)[0] + "/ping", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def _http(url: str, sql: str) -> None:
    base, headers = _split(url)
    req = urllib.request.Request(base + "/", data=sql.encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        resp.read()


def start_server(
    data_dir: Path, timeout_s: float = 60.0, port: int | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A server on `port` (default: a free one; give the old one to restart on the same data)."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir / "launcher.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, str(LAUNCHER), "--data", str(data_dir), "--http-port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _ping(url):
            return proc, url
        if proc.poll() is not None:
            break
        time.sleep(0.05)  # poll interval, not a readiness guess
    stop_server(proc)
    text = (data_dir / "launcher.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"ClickHouse server did not become ready at {url}:\n{text}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def clickhouse_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get(ENV_URL)
    if external:
        yield external.rstrip("/")
        return
    proc, url = start_server(tmp_path_factory.mktemp("clickhouse-server"))
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture
def clickhouse_db_url(clickhouse_url: str) -> Iterator[str]:
    """URL of a fresh, empty database on the test server (dropped after the test)."""
    name = f"lg_test_{uuid.uuid4().hex[:12]}"
    _http(clickhouse_url, f"CREATE DATABASE {name}")
    try:
        yield f"{clickhouse_url}/{name}"
    finally:
        _http(clickhouse_url, f"DROP DATABASE IF EXISTS {name} SYNC")
