"""Helpers to run real processes in tests: free ports, readiness polling, start and stop by PID.

Every process gets its own session (process group), its stdout+stderr in a log file, and is
stopped with SIGTERM to its group, then SIGKILL after a grace period. Readiness is always polled
(TCP connect or HTTP probe), never a fixed sleep; a process that exits while being waited for
fails the wait at once with the tail of its log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ProcHandle",
    "free_port",
    "log_tail",
    "start_process",
    "stop_process",
    "wait_http",
    "wait_tcp",
]


@dataclass
class ProcHandle:
    """A started process: its Popen, argv and log file."""

    proc: subprocess.Popen[bytes]
    argv: list[str]
    log_path: Path
    _log_file: object = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(handle: ProcHandle | None, n: int = 40) -> str:
    """The last `n` lines of a process's log, for error messages."""
    if handle is None:
        return ""
    try:
        lines = handle.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {handle.log_path})"
    return "\n".join(lines[-n:])


def _check_alive(handle: ProcHandle | None, what: str) -> None:
    if handle is not None and handle.proc.poll() is not None:
        raise RuntimeError(
            f"{what}: process {handle.pid} ({handle.argv[0]}) exited with {handle.proc.returncode} "
            f"before it was ready; log {handle.log_path}:\n{log_tail(handle)}"
        )


def wait_tcp(host: str, port: int, timeout: float = 30.0, handle: ProcHandle | None = None) -> None:
    """Poll until a TCP connect to host:port succeeds; raise TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        _check_alive(handle, f"wait_tcp {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                msg = f"nothing listens on {host}:{port} after {timeout:.0f}s ({e})"
                if handle is not None:
                    msg += f"; log {handle.log_path}:\n{log_tail(handle)}"
                raise TimeoutError(msg) from None
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def wait_http(url: str, timeout: float = 30.0, handle: ProcHandle | None = None) -> int:
    """Poll `url` with GET until the server answers with any HTTP status; return that status.

    Any status (even 4xx/5xx: an MCP endpoint answers a bare GET with 400/405/406) means the
    HTTP server is up; connection errors and timeouts are retried until `timeout` s.
    """
    deadline = time.monotonic() + timeout
    delay = 0.02
    last: Exception | None = None
    while True:
        _check_alive(handle, f"wait_http {url}")
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError) as e:
            last = e
        if time.monotonic() >= deadline:
            msg = f"no HTTP answer from {url} after {timeout:.0f}s ({last})"
            if handle is not None:
                msg += f"; log {handle.log_path}:\n{log_tail(handle)}"
            raise TimeoutError(msg)
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def start_process(
    argv: Sequence[str | os.PathLike[str]],
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike[str] = "proc.log",
    *,
    cwd: str | os.PathLike[str] | None = None,
    inherit_env: bool = True,
) -> ProcHandle:
    """Start `argv` in its own process group, stdout+stderr appended to `log_path`.

    `env` is merged over os.environ (unless inherit_env=False). stdin is /dev/null.
    Stop it with stop_process(handle).
    """
    args = [os.fspath(a) for a in argv]
    full_env = dict(os.environ) if inherit_env else {}
    if env:
        full_env.update(env)
    log = Path(log_path)
    log.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log, "ab")  # closed by stop_process
    try:
        proc = subprocess.Popen(
            args,
            env=full_env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except BaseException:
        log_file.close()
        raise
    return ProcHandle(proc=proc, argv=args, log_path=log, _log_file=log_file)


def stop_process(handle: ProcHandle | None, grace: float = 5.0) -> int | None:
    """SIGTERM the process (and its group), wait up to `grace` s, then SIGKILL. Returns the exit code."""
    if handle is None:
        return None
    proc = handle.proc
    try:
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=grace)
        # Children left in the group (e.g. a shell's) go too; the leader's pid is its pgid.
        _signal_group(proc.pid, signal.SIGKILL)
    finally:
        log_file = handle._log_file
        if log_file is not None:
            with contextlib.suppress(Exception):
                log_file.close()  # type: ignore[attr-defined]
    return proc.returncode


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
