"""Run the ClickHouse engine shipped in the pinned ``chdb-core`` wheel as a real HTTP server.

For tests (and demos) that need a ClickHouse *server* reachable by clickhouse-connect
without Docker: chDB's one-shot API ``chdb._chdb.query(sql, fmt, path=DATA)`` runs the
real ``clickhouse-local`` LocalServer (ClickHouse 26.x), and ``SYSTEM START LISTEN HTTP``
opens ClickHouse's own HTTP handler there. The listeners live while that query runs,
so its last statement blocks (one sleeping row per second) until this process is told
to stop. Port, listen host and data path come from a ``config.xml`` in the working
directory, which is why the process ``chdir``s into ``DATA/conf`` before starting.

Private, version-specific API: pinned to ``chdb-core==26.9.0``. User ``default`` stays
passwordless on loopback (the engine logs itself in with it).

Usage:  python -m tests.support.clickhouse_server --data DIR --http-port PORT [--host 127.0.0.1]
Ready:  ``GET http://HOST:PORT/ping`` answers ``Ok.``
Stop:   SIGTERM / SIGINT (the blocking statement is killed through the HTTP port, the
        listeners close and the data dir is released); SIGKILL is safe for the data too.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import urllib.request
from pathlib import Path

BLOCK_MARK = "ledgergate_chsrv_block_forever"


def write_config(conf_dir: Path, data_dir: Path, host: str, http_port: int, log_level: str) -> None:
    conf_dir.mkdir(parents=True, exist_ok=True)
    xml = f"""<clickhouse>
    <path>{data_dir}/</path>
    <listen_host>{host}</listen_host>
    <http_port>{http_port}</http_port>
    <logger>
        <level>{log_level}</level>
        <log>{data_dir}/server.log</log>
        <console>0</console>
    </logger>
</clickhouse>
"""
    (conf_dir / "config.xml").write_text(xml)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--log-level", default="warning")
    a = ap.parse_args(argv)

    data_dir = a.data.resolve()
    conf_dir = data_dir / "conf"
    data_dir.mkdir(parents=True, exist_ok=True)
    write_config(conf_dir, data_dir, a.host, a.http_port, a.log_level)

    # Import before chdir: chdb's import-time self-test must not pick up our config.xml.
    from chdb import _chdb

    os.chdir(conf_dir)  # clickhouse-local loads ./config.xml when given no --config-file

    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)
        # Cancel the blocking statement through our own HTTP port: LocalServer then
        # returns, closes the listeners and releases the data dir.
        kill = f"KILL QUERY WHERE query LIKE '%{BLOCK_MARK}%' AND query NOT LIKE '%KILL QUERY%' ASYNC"
        try:
            req = urllib.request.Request(f"http://{a.host}:{a.http_port}/", data=kill.encode())
            with urllib.request.urlopen(req, timeout=5) as resp:
                resp.read()
        except Exception:
            os._exit(1)
        threading.Timer(15, lambda: os._exit(2)).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    sql = (
        "SYSTEM START LISTEN HTTP; "
        f"SELECT sum(sleepEachRow(1)) AS {BLOCK_MARK} FROM system.numbers "
        "SETTINGS max_block_size = 1, max_execution_time = 0"
    )
    result: list[object] = [None]

    def run() -> None:
        result[0] = _chdb.query(sql, "TabSeparated", path=str(data_dir))

    engine = threading.Thread(target=run, name="clickhouse-engine", daemon=True)
    engine.start()
    while engine.is_alive():
        engine.join(0.5)  # keep the main thread free to handle signals
    if not stopping:  # the engine returned by itself: start-up failed (details on stderr)
        r = result[0]
        detail = r.error_message() if r is not None and hasattr(r, "error_message") else ""
        print(f"clickhouse_server: engine exited unexpectedly {detail}", file=sys.stderr, flush=True)
        os._exit(1)
    print("clickhouse_server: stopped", file=sys.stderr, flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
