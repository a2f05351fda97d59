"""The gateway's local admin socket (data_dir/admin.sock): the CLI asks a running gateway with
no configuration, the file's permissions are the credential.

- the socket itself (gateway.edge): owner-only from its first instant even under umask 0, a
  stale file replaced, a live server's socket or a regular file never replaced, removed at
  close only while it is still the one bound;
- the admin routes without a token on it, audited with caller "socket";
- a real gateway (`python -m ledgergate run`, subprocesses): killed with SIGKILL it leaves a
  stale socket, the CLI then answers from the store itself; started again it replaces the
  socket and the CLI asks it over the socket (`audit calls`, `audit denials`), a second user
  cannot connect; stopped with SIGTERM it removes the socket.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.web import Response

from gateway.admin import add_admin_routes
from gateway.audit.hooks import Addon, AdminRequest
from gateway.edge import App, HttpServer, bind_private_unix_socket
from tests.support.procs import free_port, start_process, stop_process, wait_http

ROOT = Path(__file__).resolve().parents[2]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LEDGERGATE_")}


def stale_socket(path: Path) -> int:
    """A socket file nobody listens on (what a killed gateway leaves); its inode."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
    return path.stat().st_ino


def connect_errno(path: Path) -> int:
    """0 when a connection to the Unix socket ``path`` is accepted, else the errno."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError as exc:
            return exc.errno or -1
    return 0


# ---------------------------------------------------------------- the socket


def test_the_socket_is_owner_only_from_the_start_even_under_umask_0(tmp_path: Path) -> None:
    """In a child process with umask 0 (bind() alone would make it 0777): the file at the
    path is 0600 as soon as it exists, and the private directory it was bound in is gone."""
    code = (
        "import os, stat, sys\n"
        "from gateway.edge import bind_private_unix_socket\n"
        "os.umask(0)\n"
        "s = bind_private_unix_socket(sys.argv[1])\n"
        "print(oct(stat.S_IMODE(os.lstat(sys.argv[1]).st_mode)))\n"
    )
    path = tmp_path / "admin.sock"
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        cwd=ROOT,
        env={**clean_env(), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "0o600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admin.sock"]  # no leftover private dir


def test_a_stale_socket_is_replaced_a_live_one_or_a_file_never(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    old = stale_socket(path)
    assert connect_errno(path) == errno.ECONNREFUSED
    sock = bind_private_unix_socket(path)
    try:
        sock.listen(1)
        assert path.stat().st_ino != old and connect_errno(path) == 0
        # a live server's socket is not taken over
        with pytest.raises(OSError) as info:
            bind_private_unix_socket(path)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        sock.close()
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    with pytest.raises(OSError) as info:
        bind_private_unix_socket(other)
    assert info.value.errno == errno.EEXIST and other.read_text() == "keep me"
    long = tmp_path / ("x" * 120)
    with pytest.raises(OSError) as info:
        bind_private_unix_socket(long)
    assert info.value.errno == errno.ENAMETOOLONG


async def test_close_removes_the_socket_only_while_it_is_its_own(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    stale_socket(path)

    async def hello(req: Any) -> Response:
        return Response(text="hi")

    app = App()
    app.add_get("/hello", hello)
    server = HttpServer(app, unix_path=path)
    await server.start()
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as http,
        http.get("http://localhost/hello") as resp,
    ):
        assert resp.status == 200 and await resp.text() == "hi"
    await server.close()
    assert not path.exists()

    # a newer server's socket at the same path stays when the older one closes
    first = HttpServer(App(), unix_path=path)
    await first.start()
    os.unlink(path)
    newer = stale_socket(path)
    await first.close()
    assert path.exists() and path.stat().st_ino == newer


class Recorder(Addon):
    def __init__(self) -> None:
        self.requests: list[AdminRequest] = []

    def admin_request(self, request: AdminRequest) -> None:
        self.requests.append(request)


async def test_admin_routes_on_the_socket_need_no_token_and_are_audited_as_socket(tmp_path: Path) -> None:
    async def answer(question: str, params: dict[str, Any]) -> Any:
        return ["agent", "n"], [("a", 1)]

    async def health(req: Any) -> Response:
        return Response(body=b'{"ok": true, "sessions": 0}', content_type="application/json")

    recorder = Recorder()
    app = App()
    add_admin_routes(app, None, answer, lambda: {"wa": None}, recorder, health=health)
    path = tmp_path / "admin.sock"
    async with (
        HttpServer(app, unix_path=path),
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as http,
    ):
        async with http.get("http://localhost/admin/audit/denials", params={"agent": "a"}) as resp:
            assert resp.status == 200 and (await resp.json())["rows"] == [["a", 1]]
        async with http.post("http://localhost/admin/policies/reload") as resp:
            assert resp.status == 200 and await resp.json() == {"wa": None}
        async with http.get("http://localhost/admin/health") as resp:
            assert resp.status == 200 and (await resp.json())["sessions"] == 0
    assert [(r.action, r.caller, r.status) for r in recorder.requests] == [
        ("denials", "socket", 200),
        ("reload", "socket", 200),
    ]
    assert re.fullmatch(rf"uid {os.getuid()} pid {os.getpid()}", recorder.requests[0].remote or "")
    # with a token the same health handler is behind it
    tcp = App()
    add_admin_routes(tcp, "t0ken", answer, health=health)
    async with HttpServer(tcp, "127.0.0.1", 0) as server, aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/admin/health") as resp:
            assert resp.status == 401
        async with http.get(f"{server.url}/admin/health", headers={"Authorization": "Bearer t0ken"}) as resp:
            assert resp.status == 200


# ---------------------------------------------------------------- a real gateway


def write_config(directory: Path, port: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.json").write_text((ROOT / "examples" / "policy.json").read_text())
    cfg = directory / "ledgergate.toml"
    cfg.write_text(
        f'[gateway]\nlisten = "127.0.0.1:{port}"\ndata_dir = "data"\n\n'
        '[servers.web]\nurl = "http://127.0.0.1:9/mcp"\npolicy = "policy.json"\n\n'
        '[grants.demo]\nkey = "k-0123456789"\n'
    )
    return cfg


def ledgergate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledgergate", *args],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def start_gateway(cfg: Path, port: int, log: Path) -> Any:
    handle = start_process(
        [sys.executable, "-m", "ledgergate", "run", "--config", str(cfg)],
        env=clean_env(),
        log_path=log,
        cwd=ROOT,
        inherit_env=False,
    )
    wait_http(f"http://127.0.0.1:{port}/healthz", timeout=90, handle=handle)
    return handle


def other_user_connects(path: Path) -> int:
    """In a forked child running as nobody (uid/gid 65534): the connect errno (0 = accepted)."""
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        code = 99
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = connect_errno(path)
        finally:
            os._exit(code if 0 <= code < 99 else 98)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def second_user_is_refused(sock: Path) -> None:
    """A hard link to ``sock`` in a directory anyone may enter (pytest's own temp dir is
    0700: it would refuse by itself), so only the socket's mode can refuse; a world-writable
    control socket there accepts that same user."""
    shared = Path(tempfile.mkdtemp(prefix="lg-shared-"))
    try:
        shared.chmod(0o755)
        for parent in shared.parents:
            if not parent.stat().st_mode & 0o001:
                pytest.skip(f"{parent} is not searchable by other users")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
            control.bind(str(shared / "control.sock"))
            os.chmod(shared / "control.sock", 0o666)
            control.listen(1)
            assert other_user_connects(shared / "control.sock") == 0
        try:
            os.link(sock, shared / "admin.sock")
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                pytest.skip("the data dir is on another file system than the temp dir")
            raise
        assert other_user_connects(shared / "admin.sock") == errno.EACCES
        assert connect_errno(shared / "admin.sock") == 0  # its owner gets in
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_killed_gateway_leaves_a_stale_socket_the_next_replaces_and_a_clean_stop_removes(
    tmp_path: Path,
) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "g", port)
    data = tmp_path / "g" / "data"
    sock = data / "admin.sock"
    first = start_gateway(cfg, port, tmp_path / "first.log")
    try:
        assert stat.S_ISSOCK(sock.lstat().st_mode)
        os.killpg(first.pid, signal.SIGKILL)  # no clean shutdown: the socket file stays
        first.proc.wait(timeout=30)
    finally:
        stop_process(first)
    stale = sock.stat().st_ino
    assert connect_errno(sock) == errno.ECONNREFUSED
    assert f"ledgergate pid {first.pid}" in (data / "lock").read_text()
    # no gateway: the CLI answers from the store itself (and the stale socket does not stop it)
    local = ledgergate("audit", "denials", "-c", str(cfg), "--format", "json")
    assert local.returncode == 0, local.stderr
    assert orjson.loads(local.stdout) == []

    second = start_gateway(cfg, port, tmp_path / "second.log")
    try:
        st = sock.lstat()
        assert st.st_ino != stale and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
        assert (data / "lock").read_text() == f"ledgergate pid {second.pid}\nadmin_socket {sock}\n"
        # the CLI asks it over the socket: no token in the config, none in the environment
        for question in ("calls", "denials"):
            result = ledgergate("audit", question, "-c", str(cfg), "--format", "json")
            assert result.returncode == 0, result.stderr
            assert orjson.loads(result.stdout) == []
        result = ledgergate(
            "audit",
            "sql",
            "SELECT question, caller, count() AS n FROM audit_admin "
            "GROUP BY question, caller ORDER BY question, caller",
            "-c",
            str(cfg),
            "--format",
            "json",
        )
        assert result.returncode == 0, result.stderr
        # the local question (caller local) went to the same log before this gateway started
        assert orjson.loads(result.stdout) == [
            {"question": "calls", "caller": "socket", "n": 1},
            {"question": "denials", "caller": "local", "n": 1},
            {"question": "denials", "caller": "socket", "n": 1},
        ]
        # a gateway holds the store: replay refuses, naming the socket it found
        replay = ledgergate("replay", "-c", str(cfg))
        assert replay.returncode == 2 and str(sock) in replay.stderr, replay.stderr
        if os.geteuid() == 0:
            second_user_is_refused(sock)
    finally:
        code = stop_process(second, grace=30)
    assert code == 0, (tmp_path / "second.log").read_text()
    assert not sock.exists()  # removed on a clean stop
    log = (tmp_path / "second.log").read_text()
    assert "Traceback" not in log and f"admin API for the CLI on {sock}" in log
