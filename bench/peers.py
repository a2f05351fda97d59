"""The peers of the benchmark, installed from PyPI into their own venvs under .bench/.

- mcp-proxy 0.13.0: exposes a stdio MCP server over Streamable HTTP at /mcp. The bench
  upstream runs behind it in its stdio mode (`bench/upstream.py --stdio`, the same
  answers as the HTTP upstream), one child for all sessions. Started with
  `--log-level WARNING` (its default INFO logs every request).
- IBM ContextForge (mcp-contextforge-gateway 1.1.0, needs Python >= 3.12): the recipe
  of TESTING.md: init_secrets, env (PLATFORM_ADMIN_EMAIL, sqlite DATABASE_URL,
  SSRF_ALLOW_LOCALHOST=true, RATE_LIMITING_ENABLED=false), a JWT from
  create_jwt_token, the bench's HTTP upstream registered with POST /gateways, a
  virtual server with its tools (POST /servers), clients on /servers/<id>/mcp.
  Default settings, and USE_STATEFUL_SESSIONS=true as a second peer.

Installs are idempotent (a stamp file per venv) and bounded by timeouts; a failing
install raises PeerUnavailable with the reason, and the bench goes on without it.

    python bench/peers.py install        # install both (what run_all.py does first)
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / ".bench"
MCP_PROXY = "mcp-proxy==0.13.0"
CONTEXTFORGE = "mcp-contextforge-gateway==1.1.0"
INSTALL_TIMEOUT_S = 900


class PeerUnavailable(Exception):
    pass


@dataclass
class Peer:
    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path
    auth: str | None = None
    tool: str = "open_session"
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group we started (start_new_session), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGCONT)  # in case run_all.py froze it
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def find_python312() -> str | None:
    """A Python >= 3.12 interpreter: on PATH, or pyenv's."""
    for name in ("python3.13", "python3.12"):
        p = shutil.which(name)
        if p and _works(p):
            return p
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for cand in sorted(glob.glob(str(pyenv / "3.1[2-9]*/bin/python")), reverse=True):
        if _works(cand):
            return cand
    return None


def _works(python: str) -> bool:
    try:
        r = subprocess.run(
            [python, "-c", "import sys, venv; sys.exit(sys.version_info < (3, 12))"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def ensure_venv(name: str, python: str, requirement: str) -> Path:
    """.bench/<name> with `requirement` installed; returns its bin dir. Idempotent (stamp file)."""
    venv = BENCH_DIR / name
    stamp = venv / f".installed-{requirement.replace('==', '-')}"
    if stamp.exists():
        return venv / "bin"
    venv.parent.mkdir(parents=True, exist_ok=True)
    log_path = venv.parent / f"{name}-install.log"
    print(f"  installing {requirement} into {venv} (log {log_path}) ...", flush=True)
    with open(log_path, "ab") as log:
        try:
            if not (venv / "bin" / "python").exists():
                subprocess.run(
                    [python, "-m", "venv", str(venv)], stdout=log, stderr=log, timeout=120, check=True
                )
            subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", requirement],
                stdout=log,
                stderr=log,
                timeout=INSTALL_TIMEOUT_S,
                check=True,
            )
        except subprocess.TimeoutExpired:
            raise PeerUnavailable(f"installing {requirement} timed out; see {log_path}") from None
        except subprocess.CalledProcessError as e:
            raise PeerUnavailable(f"installing {requirement} failed ({e}); see {log_path}") from None
    stamp.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return venv / "bin"


def install_mcp_proxy() -> Path:
    return ensure_venv("mcp-proxy", sys.executable, MCP_PROXY)


def install_contextforge() -> Path:
    python = find_python312()
    if python is None:
        raise PeerUnavailable(
            "ContextForge needs Python >= 3.12 and none was found (python3.12/3.13 on PATH or "
            "~/.pyenv/versions/3.12*): skipped"
        )
    return ensure_venv("contextforge", python, CONTEXTFORGE)


# ---- running them ---------------------------------------------------------------------------


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log_path: Path, headers=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerUnavailable(f"exited with {proc.returncode} while starting; see {log_path}")
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise PeerUnavailable(f"{url} did not answer within {timeout:.0f} s; see {log_path}")


def http_json(method: str, url: str, token: str, body: object | None = None, timeout: float = 60) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raise PeerUnavailable(f"{method} {url}: HTTP {e.code}: {e.read()[:500]!r}") from None


def start_mcp_proxy(bin_dir: Path, port: int, workdir: Path) -> Peer:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "mcp-proxy.log"
    upstream = [sys.executable, str(ROOT / "bench" / "upstream.py"), "--stdio"]
    cmd = [str(bin_dir / "mcp-proxy"), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--log-level", "WARNING", "--", *upstream]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/status", 60, proc, log_path)
    except PeerUnavailable:
        stop_process(proc)
        raise
    return Peer("mcp-proxy", f"http://127.0.0.1:{port}/mcp", proc, log_path, notes=[" ".join(cmd)])


def _read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, _, v = line.partition("=")
            env[k.strip()] = v.strip().strip('"').strip("'")
    return env


def start_contextforge(bin_dir: Path, port: int, upstream_url: str, workdir: Path, stateful: bool) -> Peer:
    name = "contextforge-stateful" if stateful else "contextforge"
    workdir.mkdir(parents=True, exist_ok=True)
    for f in ("mcp.db", "mcp.db-wal", "mcp.db-shm"):  # a fresh registry each bench run
        (workdir / f).unlink(missing_ok=True)
    log_path = workdir / "contextforge.log"
    py = str(bin_dir / "python")
    secrets = workdir / ".env.secrets"
    if not secrets.exists():
        subprocess.run(
            [py, "-m", "mcpgateway.scripts.init_secrets"],
            cwd=workdir,
            capture_output=True,
            timeout=120,
            check=True,
        )
    env = dict(os.environ)
    env.update(_read_env(secrets))
    env.update(
        PLATFORM_ADMIN_EMAIL="admin@example.com",
        DATABASE_URL="sqlite:///./mcp.db",
        SSRF_ALLOW_LOCALHOST="true",
        RATE_LIMITING_ENABLED="false",
    )
    if stateful:
        env["USE_STATEFUL_SESSIONS"] = "true"
    cmd = [str(bin_dir / "mcpgateway"), "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health", 180, proc, log_path)
        r = subprocess.run(
            [
                py,
                "-m",
                "mcpgateway.utils.create_jwt_token",
                "--username",
                "admin@example.com",
                "--exp",
                "10080",
                "--secret",
                env["JWT_SECRET_KEY"],
            ],
            cwd=workdir,
            env=env,
            capture_output=True,
            timeout=120,
            check=True,
        )
        token = r.stdout.decode().strip().splitlines()[-1].strip()
        http_json(
            "POST",
            f"{base}/gateways",
            token,
            {"name": "up", "url": upstream_url, "transport": "STREAMABLEHTTP"},
        )
        tools = http_json("GET", f"{base}/tools", token)
        if isinstance(tools, dict):  # paginated shapes
            tools = tools.get("items") or tools.get("tools") or tools.get("data") or []
        assert isinstance(tools, list)
        ids, tool_name = [], None
        for t in tools:
            ids.append(t["id"])
            original = t.get("originalName") or t.get("original_name") or t.get("name")
            if original == "open_session" or t.get("name", "").replace("-", "_").endswith("open_session"):
                tool_name = t.get("name")
        if tool_name is None:
            raise PeerUnavailable(f"no open_session tool among {[t.get('name') for t in tools]}")
        server = http_json(
            "POST", f"{base}/servers", token, {"server": {"name": "bench", "associated_tools": ids}}
        )
        assert isinstance(server, dict)
        sid = server["id"]
    except BaseException:
        stop_process(proc)
        raise
    notes = [" ".join(cmd), f"tool name {tool_name!r}", f"server {sid}"]
    return Peer(name, f"{base}/servers/{sid}/mcp", proc, log_path, auth=token, tool=tool_name, notes=notes)


if __name__ == "__main__":
    if sys.argv[1:] == ["install"]:
        for fn in (install_mcp_proxy, install_contextforge):
            try:
                print(fn.__name__, "->", fn())
            except PeerUnavailable as e:
                print(fn.__name__, "-> unavailable:", e)
    else:
        print(__doc__)
