"""The embedded event log: one SQLite file (WAL mode) in the data dir.

Layout::

    records(offset INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, payload BLOB NOT NULL)
    consumer_offsets(name TEXT PRIMARY KEY, next_offset INTEGER NOT NULL)
    index records_ts on records(ts_ms)

Threads: all writes run in one dedicated writer thread that owns the write connection;
reads run in one reader thread with its own connection. The event loop never touches
SQLite. Bookkeeping (pending batch, in-flight batch, waiters) lives on the event loop
thread only, so it needs no locks; the threads receive whole batches and report back
with one ``call_soon_threadsafe`` per job or commit. The one exception: the writer's slot
for the next batch (``_Writer``), under a lock.

Group commit: ``append()`` adds its payloads to the pending batch; at the end of the loop
iteration it goes to the writer as one transaction (one INSERT statement per up to 256
records, one fsync). Strict: while a transaction is in flight, the next batch waits in
the writer's slot, later iterations' batches join it, and the writer takes it itself once
the in-flight one is done (no loop round trip). The writer assigns offsets inside the
transaction (``max(offset) + 1``), so offsets are dense and a failed transaction consumes
none.

Durability: both modes use ``PRAGMA synchronous=FULL`` (every commit fsyncs the WAL).
``strict``: ``append()`` returns the offset of its last record after the commit.
``batched``: ``append()`` returns at once with the offset its last record will get; a
timer commits the batch within ``flush_interval_ms``; ``flush()`` waits for everything
appended so far. If a batched commit fails, its records stay queued (in order, same
offsets) and are retried with backoff; meanwhile ``append()`` raises ``LogUnavailable``
and ``flush()`` raises the failure.

Callers must know:
- An instance is bound to the event loop that called ``open()``; use it from that loop.
- ``close()`` commits what is queued (or, batched, saves it to a rescue file that the next
  ``open()`` folds into the log), ends running ``tail()`` iterators, then stops the
  threads; appends after close() began raise ``LogUnavailable``.
- A cancelled strict ``append()`` may still be committed (like a lost ack).
- Several instances/processes may share the file (strict offsets stay dense: the writer
  assigns them inside the transaction); batched ``append()`` return values assume this
  instance is the only writer. ``tail()`` wakes at once on this instance's commits and
  polls every ``tail_poll_s`` (1 s) for other writers.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from itertools import chain, repeat
from pathlib import Path
from typing import Any

from eventlog.base import Durability, EventLog, LogUnavailable, Record

__all__ = ["SqliteEventLog"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    offset INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_ts ON records(ts_ms);
CREATE TABLE IF NOT EXISTS consumer_offsets (
    name TEXT PRIMARY KEY,
    next_offset INTEGER NOT NULL
);
"""
_LAST = "SELECT offset, ts_ms FROM records ORDER BY offset DESC LIMIT 1"
# Multi-row INSERTs: one sqlite3_step (and one GIL release) per statement instead of per row.
# A commit of up to 64 records is ONE statement of exactly its size; beyond, chunks of 256,
# 128 and 64 rows, then one statement for the rest. So at most 67 distinct statements (<= 768
# parameters: under SQLite's historical 999-parameter limit) stay in the connection's cache
# of prepared statements (128 by default), next to the few others.
_EXACT_MAX = 64
_CHUNKS = (256, 128, 64)
_INSERTS = {
    k: "INSERT INTO records(offset, ts_ms, payload) VALUES " + ",".join(["(?,?,?)"] * k)
    for k in (*_CHUNKS, *range(1, _EXACT_MAX + 1))
}
# rows shaped like Record (offset, payload, partition): tuple.__new__ makes them Records in C
_READ = "SELECT offset, payload, 0 FROM records WHERE offset >= ? ORDER BY offset LIMIT ?"
_SINCE = "SELECT offset FROM records WHERE ts_ms >= ? ORDER BY ts_ms, offset LIMIT 1"
_COMMIT = (
    "INSERT INTO consumer_offsets(name, next_offset) VALUES (?, ?) "
    "ON CONFLICT(name) DO UPDATE SET next_offset = excluded.next_offset"
)
_COMMITTED = "SELECT next_offset FROM consumer_offsets WHERE name = ?"
_TS_OF = "SELECT ts_ms FROM records WHERE offset = ?"
# the last record always stays: it is what keeps offsets going on after it (_LAST)
_DELETE_BEFORE = "DELETE FROM records WHERE offset < min(?, (SELECT max(offset) FROM records))"
# A commit of up to _ONE_MAX records (what concurrent callers share) is one statement that
# assigns its offsets and ts itself, run on its own: in autocommit mode it is its own
# transaction, so the whole commit (write lock, insert, commit, fsync) is one call into SQLite,
# one GIL release and re-acquisition by the writer instead of four (BEGIN IMMEDIATE, SELECT
# last, INSERT, COMMIT). The first row gets max(offset) + 1 (0 in an empty log), the others
# NULL, which SQLite turns into max(offset) + 1 as each row goes in; the last record is never
# deleted (_DELETE_BEFORE), so offsets stay dense. ts_ms: ?1 (now), never less than the last
# record's. Not beyond _ONE_MAX: the ts subquery runs once per row (~4 us each).
_ONE_MAX = 8
_TS = "max(?1, coalesce((SELECT ts_ms FROM records ORDER BY offset DESC LIMIT 1), 0))"
_ONE = {
    k: "INSERT INTO records(offset, ts_ms, payload) VALUES "
    + f"(coalesce((SELECT max(offset) FROM records), -1) + 1, {_TS}, ?2)"
    + "".join(f",(NULL, {_TS}, ?{i + 2})" for i in range(1, k))
    for k in range(1, _ONE_MAX + 1)
}

# batched mode: above this many queued records, append() waits for a flush (back-pressure).
_BATCHED_HIGH_WATER = 100_000
_RETRY_MIN_S = 0.05
_RETRY_MAX_S = 1.0

_NEW, _OPEN, _CLOSING, _CLOSED = range(4)
_RESERVE_BYTES = 1 << 20  # batched: room kept for the rescue file (~2,000 records of 500 bytes)


_new_record = partial(tuple.__new__, Record)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Worker:
    """One daemon thread running jobs in order; results go back to the loop thread."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], Any], Callable[[Any, BaseException | None], None]] | None
        ] = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, done = job
            try:
                result, exc = fn(), None
            except BaseException as e:  # reported to the loop, never lost
                result, exc = None, e
            try:
                self._loop.call_soon_threadsafe(done, result, exc)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def post(self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        """Run fn() in the thread; then done(result, exc) on the loop thread."""
        if self._stopped:
            raise sqlite3.OperationalError("connection closed")
        self._jobs.put((fn, done))

    async def call(self, fn: Callable[[], Any]) -> Any:
        fut = self._loop.create_future()

        def done(result: Any, exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(result)
            else:
                fut.set_exception(exc)

        self.post(fn, done)
        return await fut

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._jobs.put(None)

    @staticmethod
    def stop_all(*workers: _Worker) -> None:
        for w in workers:
            w.stop()


class _Writer(_Worker):
    """The writer thread: the _Worker's jobs, plus commits handed over without a round trip
    through the loop. An idle writer gets the batch with its wake-up (one queue put); while it
    commits, the next batch waits in one lock-protected slot (later hand-overs merge into it:
    one commit for all), and the writer takes it itself when its commit is done, so a busy
    writer costs the loop no wake-up. Each commit's result goes back with one
    ``call_soon_threadsafe``; results arrive in commit order."""

    def __init__(
        self,
        name: str,
        loop: asyncio.AbstractEventLoop,
        write: Callable[[list[bytes]], int],
        done: Callable[[_Batch, int | None, BaseException | None, float], None],
    ) -> None:
        self._lock = threading.Lock()
        self._slot: _Batch | None = None  # the next batch, not yet taken by the writer
        self._idle = True  # no batch queued or being committed; both fields under _lock
        # weak: the running thread must not keep a dropped log (and so itself) alive
        self._write = weakref.WeakMethod(write)  # type: ignore[arg-type]
        self._done = weakref.WeakMethod(done)  # type: ignore[arg-type]
        super().__init__(name, loop)

    def hand(self, b: _Batch) -> _Batch:
        """Loop thread: queue b's records for the writer. Returns the batch that carries them:
        b, or the batch already waiting in the slot (b merged into it: one commit for both)."""
        if self._stopped:
            raise sqlite3.OperationalError("connection closed")
        with self._lock:
            if not self._idle:
                h = self._slot
                if h is None:
                    self._slot = b
                    return b
                # not taken yet: b joins h's transaction, after h's records
                off = len(h.payloads)
                h.payloads.extend(b.payloads)
                h.waiters.extend([(f, i + off if i >= 0 else -1) for f, i in b.waiters])
                return h
            self._idle = False
        # in flight from here on, like a posted job: nothing merges into it
        self._jobs.put(b)  # type: ignore[arg-type]
        return b

    def _drain(self, b: _Batch) -> None:
        """Commit b, then every batch found in the slot, until it is empty."""
        lock, write, done, post = self._lock, self._write(), self._done(), self._loop.call_soon_threadsafe
        if write is None or done is None:  # the log was dropped: nobody waits
            return
        while True:
            t0 = time.perf_counter()
            try:
                base, exc = write(b.payloads), None
            except BaseException as e:  # reported to the loop, never lost
                base, exc = None, e
            try:
                post(done, b, base, exc, time.perf_counter() - t0)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
            with lock:
                b = self._slot  # type: ignore[assignment]
                if b is None:
                    self._idle = True
                    return
                self._slot = None

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if type(job) is _Batch:
                self._drain(job)
                job = None  # holds no batch (nor its futures) while idle
                continue
            fn, done = job
            try:
                result, exc = fn(), None
            except BaseException as e:  # reported to the loop, never lost
                result, exc = None, e
            try:
                self._loop.call_soon_threadsafe(done, result, exc)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
            job = fn = done = result = exc = None  # idle, it keeps nothing (nor the log) alive


def _insert(conn: sqlite3.Connection, base: int, ts: int, payloads: list[bytes]) -> None:
    i, n = 0, len(payloads)
    while n - i > _EXACT_MAX:
        k = next(c for c in _CHUNKS if n - i >= c)
        conn.execute(
            _INSERTS[k],
            tuple(chain.from_iterable(zip(range(base + i, base + i + k), repeat(ts), payloads[i : i + k]))),
        )
        i += k
    if i < n:  # the rest (all of a commit of up to 64 records) in one statement
        rest = payloads[i:] if i else payloads
        conn.execute(
            _INSERTS[n - i],
            tuple(chain.from_iterable(zip(range(base + i, base + n), repeat(ts), rest))),
        )


class _Batch:
    """Records that will be committed in one transaction, and who waits for it."""

    __slots__ = ("created", "first", "payloads", "urgent", "waiters")

    def __init__(self, first: int, urgent: bool) -> None:
        self.created = time.perf_counter()  # its first record's wait starts here (AppendStats)
        self.first = first  # batched mode: the offset promised to payloads[0]
        self.payloads: list[bytes] = []
        # (future, index of the caller's last record in payloads; -1 for flush waiters)
        self.waiters: list[tuple[asyncio.Future[int], int]] = []
        self.urgent = urgent  # commit as soon as the writer is free


# upper bounds of AppendStats' histograms (seconds; records per commit)
APPEND_SECONDS_BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_RECORDS_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class AppendStats:
    """Counters of the group commit, updated once per committed batch (never per record) and
    read by the metrics collector at scrape time: plain ints, so the hot path pays nothing
    beyond one perf_counter and a few additions per transaction.

    ``*_buckets[i]`` counts observations <= the i-th bound (not cumulative; the last slot
    is +Inf). ``wait`` is from the batch's first record queued to its commit (the longest
    append() latency of the batch); ``commit`` the transaction alone (write + fsync)."""

    __slots__ = (
        "batch_buckets",
        "batches",
        "commit_buckets",
        "commit_s",
        "failures",
        "records",
        "wait_buckets",
        "wait_s",
    )

    def __init__(self) -> None:
        self.batches = 0
        self.records = 0
        self.failures = 0
        self.commit_s = 0.0
        self.wait_s = 0.0
        self.commit_buckets = [0] * (len(APPEND_SECONDS_BOUNDS) + 1)
        self.wait_buckets = [0] * (len(APPEND_SECONDS_BOUNDS) + 1)
        self.batch_buckets = [0] * (len(BATCH_RECORDS_BOUNDS) + 1)

    def committed(self, records: int, wait_s: float, commit_s: float) -> None:
        self.batches += 1
        self.records += records
        self.wait_s += wait_s
        self.commit_s += commit_s
        self.wait_buckets[bisect.bisect_left(APPEND_SECONDS_BOUNDS, wait_s)] += 1
        self.commit_buckets[bisect.bisect_left(APPEND_SECONDS_BOUNDS, commit_s)] += 1
        self.batch_buckets[bisect.bisect_left(BATCH_RECORDS_BOUNDS, records)] += 1


class SqliteEventLog(EventLog):
    """Append-only log in one SQLite file. See the module docstring.

    Bound to the event loop that calls ``open()``; use it from that loop only.
    """

    def __init__(
        self,
        path: str | Path,
        durability: Durability = "strict",
        flush_interval_ms: float = 5.0,
        *,
        busy_timeout_ms: int = 5_000,
        tail_poll_s: float = 1.0,
    ) -> None:
        if durability not in ("strict", "batched"):
            raise ValueError(f"durability must be 'strict' or 'batched', not {durability!r}")
        if flush_interval_ms <= 0:
            raise ValueError("flush_interval_ms must be > 0")
        self.path = Path(path)
        self.durability = durability
        self.flush_interval_ms = float(flush_interval_ms)
        self.busy_timeout_ms = int(busy_timeout_ms)
        self.tail_poll_s = float(tail_poll_s)
        self._strict = durability == "strict"
        self._state = _NEW
        self._open_error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: _Writer | None = None
        self._reader: _Worker | None = None
        self._wconn: sqlite3.Connection | None = None  # writer thread only
        self._rconn: sqlite3.Connection | None = None  # reader thread only
        # loop-thread state
        self._pending: _Batch | None = None
        self._inflight: _Batch | None = None
        self._kick_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._assigned_end = 0  # batched: offset the next appended record gets
        self._error: LogUnavailable | None = None  # batched: last commit failed, retrying
        self._retry_s = _RETRY_MIN_S
        self._committed = asyncio.Event()  # replaced after each commit; tails wait on it
        self.stats = AppendStats()  # read by gateway.observability.metrics at scrape time

    def __repr__(self) -> str:
        return f"SqliteEventLog({str(self.path)!r}, durability={self.durability!r})"

    # ---- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        if self._state == _OPEN:
            return
        if self._state != _NEW:
            raise LogUnavailable(f"event log {self.path}: closed")
        self._loop = asyncio.get_running_loop()
        self._writer = _Writer(
            f"eventlog-writer:{self.path.name}", self._loop, self._w_write, self._on_commit
        )
        self._reader = _Worker(f"eventlog-reader:{self.path.name}", self._loop)
        # a log dropped without close() must not leave its two threads waiting forever
        weakref.finalize(self, _Worker.stop_all, self._writer, self._reader)
        try:
            end = await self._writer.call(self._w_open)
            rescued = await self._writer.call(self._w_fold_rescue)
            if rescued:
                end = await self._writer.call(self._w_end)
                log.warning(
                    "event log %s: folded %d records rescued at the last close into the log",
                    self.path,
                    rescued,
                )
            await self._writer.call(self._reserve)
            await self._reader.call(self._r_open)
        except (sqlite3.Error, OSError) as e:
            self._open_error = e
            await self._shutdown_threads()
            self._state = _CLOSED
            raise self._unavailable(e) from e
        self._assigned_end = end
        self._state = _OPEN

    async def close(self) -> None:
        """Commit what is queued, then release the threads and connections.

        Appends started after close() began raise LogUnavailable; running tails end.
        If the final commit fails (batched mode), the queued records (their calls were
        forwarded already) are appended and fsync'd to the rescue file next to the log
        (``events.db.rescue``; a reserved file is deleted first to make room on a full disk)
        and folded into the log by the next ``open()``. Only if that fails too are they lost
        and close() raises LogUnavailable.
        """
        if self._state in (_CLOSING, _CLOSED):
            return
        if self._state == _NEW:
            self._state = _CLOSED
            return
        self._state = _CLOSING
        err: LogUnavailable | None = None
        try:
            await self.flush()
        except LogUnavailable as e:
            err = e
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending is not None:  # only after a failed final flush
            queued, self._pending = self._pending, None
            self._fail_waiters(queued, err or LogUnavailable(f"event log {self.path}: closed"))
            # batched: these calls were forwarded already; their records must survive the close
            try:
                await asyncio.to_thread(self._rescue, queued.payloads)
            except OSError as e:
                log.error(
                    "event log %s: %d queued records lost at close (rescue file %s: %s)",
                    self.path,
                    len(queued.payloads),
                    self.rescue_path,
                    e,
                )
            else:
                log.error(
                    "event log %s: %d queued records could not be committed (%s); saved to %s, they "
                    "are folded into the log at the next start",
                    self.path,
                    len(queued.payloads),
                    err.__cause__ if err is not None and err.__cause__ is not None else err,
                    self.rescue_path,
                )
                err = None
        await self._shutdown_threads()
        self._state = _CLOSED
        self._wake_tails()
        if err is not None:
            raise err

    # ---- rescue file: batched records that could not reach the log at close -------------

    @property
    def rescue_path(self) -> Path:
        return self.path.with_name(self.path.name + ".rescue")

    @property
    def _reserve_path(self) -> Path:
        return self.path.with_name(self.path.name + ".reserve")

    def _reserve(self) -> None:
        """Batched: keep _RESERVE_BYTES allocated next to the log. When the disk is full at
        close, deleting it makes room for the rescue file."""
        if self._strict:
            return
        try:
            if self._reserve_path.stat().st_size >= _RESERVE_BYTES:
                return
        except FileNotFoundError:
            pass
        try:
            fd = os.open(self._reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, _RESERVE_BYTES)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:  # no room for it now: a rescue may still fit
            log.warning("event log %s: cannot reserve space for a rescue file: %s", self.path, e)
            self._reserve_path.unlink(missing_ok=True)

    def _rescue(self, payloads: list[bytes]) -> None:
        """Append the records (8-byte length + payload each) to the rescue file and fsync it."""
        self._reserve_path.unlink(missing_ok=True)  # frees room on a full disk
        data = b"".join(len(p).to_bytes(8, "big") + p for p in payloads)
        fd = os.open(self.rescue_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.rescue_path.parent)

    def _w_fold_rescue(self) -> int:
        """Writer thread, at open: append the rescue file's records to the log in one
        transaction, then delete it. A torn last record (crash while rescuing) is dropped."""
        try:
            data = self.rescue_path.read_bytes()
        except FileNotFoundError:
            return 0
        payloads: list[bytes] = []
        i = 0
        while i + 8 <= len(data):
            n = int.from_bytes(data[i : i + 8], "big")
            if i + 8 + n > len(data):
                break
            payloads.append(data[i + 8 : i + 8 + n])
            i += 8 + n
        if i != len(data):
            log.warning(
                "event log %s: rescue file has a torn last record (%d bytes); dropped",
                self.path,
                len(data) - i,
            )
        if payloads:
            self._w_write(payloads)  # synchronous=FULL: durable on return
        self.rescue_path.unlink()
        _fsync_dir(self.rescue_path.parent)
        return len(payloads)

    async def _shutdown_threads(self) -> None:
        for worker, fn in ((self._writer, self._w_close), (self._reader, self._r_close)):
            if worker is None:
                continue
            try:
                await worker.call(fn)
            except sqlite3.Error as e:  # pragma: no cover - close errors are not actionable
                log.warning("event log %s: close: %s", self.path, e)
            worker.stop()
        self._writer = self._reader = None

    # ---- thread-side functions (writer) ---------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout_ms / 1000)
        conn.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
        return conn

    def _w_open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch to WAL mode (journal_mode={mode})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA journal_size_limit=67108864")
            conn.executescript(_SCHEMA)
            row = conn.execute(_LAST).fetchone()
        except BaseException:
            conn.close()
            raise
        self._wconn = conn
        return 0 if row is None else row[0] + 1

    def _w_end(self) -> int:
        row = self._wconn.execute(_LAST).fetchone()  # type: ignore[union-attr]
        return 0 if row is None else row[0] + 1

    def _w_close(self) -> None:
        if self._wconn is not None:
            self._wconn.close()
            self._wconn = None

    def _w_write(self, payloads: list[bytes]) -> int:
        """Insert payloads at the end in one transaction; return the first offset."""
        conn = self._wconn
        if conn is None:
            raise sqlite3.OperationalError("connection closed")
        n = len(payloads)
        if n <= _ONE_MAX:  # one statement, its own transaction (a failure rolls it back)
            cur = conn.execute(_ONE[n], (time.time_ns() // 1_000_000, *payloads))
            return cur.lastrowid - n + 1  # type: ignore[operator]
        try:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(_LAST).fetchone()
            now = time.time_ns() // 1_000_000
            if row is None:
                base, ts = 0, now
            else:  # ts_ms never decreases along offsets, so first_offset_since is exact
                base, ts = row[0] + 1, max(now, row[1])
            _insert(conn, base, ts, payloads)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        return base

    def _w_commit_offset(self, consumer: str, offset: int) -> None:
        conn = self._wconn
        if conn is None:
            raise sqlite3.OperationalError("connection closed")
        conn.execute(_COMMIT, (consumer, offset))

    # ---- thread-side functions (reader) ---------------------------------------

    def _r_open(self) -> None:
        conn = self._connect()
        conn.execute("PRAGMA query_only=1")
        self._rconn = conn

    def _r_close(self) -> None:
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None

    def _rc(self) -> sqlite3.Connection:
        if self._rconn is None:
            raise sqlite3.OperationalError("connection closed")
        return self._rconn

    # ---- append / group commit (loop thread) ----------------------------------

    def _unavailable(self, exc: BaseException | str) -> LogUnavailable:
        return LogUnavailable(f"event log {self.path}: {exc}")

    def _check_open(self) -> None:
        if self._state != _OPEN:
            if self._open_error is not None:
                raise self._unavailable(self._open_error) from self._open_error
            raise self._unavailable("not open" if self._state == _NEW else "closed")

    async def append(self, payloads: Sequence[bytes]) -> int:
        self._check_open()
        n = len(payloads)
        if n == 0:  # nothing to write: the offset of the last record appended so far
            if self._strict:
                await self.flush()
                return await self.end_offset() - 1
            return self._assigned_end - 1
        if self._strict:
            return await self._enqueue(payloads)
        last = self._enqueue_batched(payloads)  # no future: the offset is known now
        if len(self._pending.payloads) >= _BATCHED_HIGH_WATER:  # type: ignore[union-attr]
            await self.flush()
        return last

    def append_nowait(self, payloads: Sequence[bytes]) -> asyncio.Future[int]:
        """append() in two halves: the records join the log's queue now, in call order, and
        the returned future resolves when append() would have returned (strict: after the
        commit; batched: at once). For callers that must keep several appends in order
        without awaiting each (the Kafka spool). No back-pressure in batched mode."""
        self._check_open()
        if not payloads:
            raise ValueError("append_nowait needs at least one payload")
        return self._enqueue(payloads)

    def _enqueue(self, payloads: Sequence[bytes]) -> asyncio.Future[int]:
        if not self._strict:
            fut: asyncio.Future[int] = self._loop.create_future()  # type: ignore[union-attr]
            fut.set_result(self._enqueue_batched(payloads))
            return fut
        for p in payloads:
            if type(p) is not bytes:
                raise TypeError(f"payloads must be bytes, not {type(p).__name__}")
        fut = self._loop.create_future()  # type: ignore[union-attr]
        b = self._pending
        if b is None:
            b = self._pending = _Batch(0, urgent=True)
            self._schedule_kick()  # hands it over even while a commit is in flight
        b.payloads.extend(payloads)
        b.waiters.append((fut, len(b.payloads) - 1))
        return fut

    def _enqueue_batched(self, payloads: Sequence[bytes]) -> int:
        """Batched: queue the records; the offset the last one will get."""
        for p in payloads:
            if type(p) is not bytes:
                raise TypeError(f"payloads must be bytes, not {type(p).__name__}")
        if self._error is not None:
            raise self._unavailable(self._error.__cause__ or self._error) from self._error
        b = self._pending
        if b is None:
            b = self._pending = _Batch(self._assigned_end, urgent=False)
            self._timer = self._loop.call_later(  # type: ignore[union-attr]
                self.flush_interval_ms / 1000, self._on_timer
            )
        b.payloads.extend(payloads)
        end = self._assigned_end = self._assigned_end + len(payloads)
        return end - 1

    def _schedule_kick(self) -> None:
        # call_soon, not a direct kick: every task woken in this loop iteration gets
        # to append first, so they all share the next transaction.
        if not self._kick_scheduled:
            self._kick_scheduled = True
            self._loop.call_soon(self._kick)  # type: ignore[union-attr]

    def _on_timer(self) -> None:
        self._timer = None
        if self._pending is not None:
            self._pending.urgent = True
            if self._inflight is None:
                self._kick()

    def _kick(self) -> None:
        self._kick_scheduled = False
        b = self._pending
        # strict: hand the batch over at once; the writer takes it when its commit in flight is
        # done (or merges it into the batch still waiting for it). batched: one batch at a time,
        # so a failed commit is requeued before anything after it can be written.
        if b is None or (self._inflight is not None and not self._strict):
            return
        if not b.payloads:
            if b.waiters:  # flush waiters only: nothing to commit
                self._pending = None
                for fut, _ in b.waiters:
                    if not fut.done():
                        fut.set_result(-1)
            return
        self._pending = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # the last batch handed over: flush() waits for it (commits report back in order)
        self._inflight = self._writer.hand(b)  # type: ignore[union-attr]

    def _on_commit(self, b: _Batch, base: int | None, exc: BaseException | None, commit_s: float) -> None:
        if b is self._inflight:
            self._inflight = None
        if exc is None:
            assert base is not None
            self.stats.committed(len(b.payloads), time.perf_counter() - b.created, commit_s)
            for fut, idx in b.waiters:
                if not fut.done():
                    fut.set_result(base + idx)
            if not self._strict:
                self._error = None
                self._retry_s = _RETRY_MIN_S
                if base != b.first:
                    log.warning(
                        "event log %s: another writer appended; offsets returned by batched "
                        "append() were off by %d",
                        self.path,
                        base - b.first,
                    )
                    self._assigned_end += base - b.first
            self._wake_tails()
        elif self._strict:
            self.stats.failures += 1
            self._fail_waiters(b, exc)
        else:
            self.stats.failures += 1
            self._requeue(b, exc)
        p = self._pending
        if p is not None and (p.urgent or p.waiters):
            self._schedule_kick()

    def _fail_waiters(self, b: _Batch, exc: BaseException) -> None:
        for fut, _ in b.waiters:
            if not fut.done():
                err = self._unavailable(exc)
                err.__cause__ = exc
                fut.set_exception(err)
        b.waiters.clear()

    def _requeue(self, b: _Batch, exc: BaseException) -> None:
        """Batched: a commit failed. Keep its records first in line, retry later."""
        self._error = self._unavailable(exc)
        self._error.__cause__ = exc
        log.warning("event log %s: commit failed, retrying in %.2fs: %s", self.path, self._retry_s, exc)
        self._fail_waiters(b, exc)
        p = self._pending
        if p is not None:
            b.payloads.extend(p.payloads)
            b.waiters.extend(p.waiters)
        b.urgent = False
        self._pending = b
        if self._timer is not None:
            self._timer.cancel()
        if self._state == _OPEN:
            self._timer = self._loop.call_later(self._retry_s, self._on_timer)  # type: ignore[union-attr]
            self._retry_s = min(self._retry_s * 2, _RETRY_MAX_S)
        else:
            self._timer = None

    async def flush(self) -> None:
        if self._state == _NEW:
            self._check_open()
        b = self._pending if self._pending is not None else self._inflight
        if b is None:
            return
        fut: asyncio.Future[int] = self._loop.create_future()  # type: ignore[union-attr]
        b.waiters.append((fut, -1))
        if b is self._pending:
            b.urgent = True
            if self._strict or self._inflight is None:
                self._schedule_kick()
        await fut

    def _wake_tails(self) -> None:
        ev, self._committed = self._committed, asyncio.Event()
        ev.set()

    # ---- reads ----------------------------------------------------------------

    async def _read_call(self, fn: Callable[[], Any]) -> Any:
        reader = self._reader
        if reader is None:
            self._check_open()
        try:
            return await reader.call(fn)  # type: ignore[union-attr]
        except sqlite3.Error as e:
            raise self._unavailable(e) from e

    async def read(self, offset: int, limit: int = 10_000) -> list[Record]:
        def q() -> list[Record]:
            rows = self._rc().execute(_READ, (offset, limit)).fetchall()
            return list(map(_new_record, rows))

        return await self._read_call(q)

    async def end_offset(self) -> int:
        def q() -> int:
            row = self._rc().execute(_LAST).fetchone()
            return 0 if row is None else row[0] + 1

        return await self._read_call(q)

    async def first_offset_since(self, ts_ms: int) -> int:
        def q() -> int:
            conn = self._rc()
            row = conn.execute(_SINCE, (ts_ms,)).fetchone()
            if row is not None:
                return row[0]
            last = conn.execute(_LAST).fetchone()
            return 0 if last is None else last[0] + 1

        return await self._read_call(q)

    async def committed(self, consumer: str) -> int:
        def q() -> int:
            row = self._rc().execute(_COMMITTED, (consumer,)).fetchone()
            return 0 if row is None else row[0]

        return await self._read_call(q)

    async def commit(self, consumer: str, offset: int) -> None:
        if offset < 0:
            raise ValueError(f"offset must be >= 0, not {offset}")
        if self._writer is None:  # usable while close() drains, like the reads
            self._check_open()
        try:
            await self._writer.call(lambda: self._w_commit_offset(consumer, offset))  # type: ignore[union-attr]
        except sqlite3.Error as e:
            raise self._unavailable(e) from e

    async def timestamp(self, offset: int) -> int | None:
        """The append time (ms) of the record at `offset`, None if there is none."""

        def q() -> int | None:
            row = self._rc().execute(_TS_OF, (offset,)).fetchone()
            return None if row is None else row[0]

        return await self._read_call(q)

    async def delete_before(self, offset: int) -> None:
        """Remove the records before `offset` (the Kafka spool drops what it drained).

        The last record is always kept, so offsets never restart: a consumer offset
        committed before stays valid."""
        if self._writer is None:
            self._check_open()

        def w() -> None:
            conn = self._wconn
            if conn is None:
                raise sqlite3.OperationalError("connection closed")
            conn.execute(_DELETE_BEFORE, (offset,))

        try:
            await self._writer.call(w)  # type: ignore[union-attr]
        except sqlite3.Error as e:
            raise self._unavailable(e) from e

    async def tail(self, offset: int, batch: int = 10_000) -> AsyncIterator[list[Record]]:
        """Endless batches from `offset`. Wakes on this instance's commits, and polls every
        `tail_poll_s` for commits by other instances or processes. Ends when the log closes."""
        while self._state in (_NEW, _OPEN, _CLOSING):
            ev = self._committed  # taken before reading: a commit after the read sets it
            try:
                records = await self.read(offset, batch)
            except LogUnavailable:
                if self._state in (_CLOSING, _CLOSED):
                    return
                raise
            if records:
                yield records
                offset = records[-1].offset + 1
                continue
            if self._state != _OPEN:
                return
            try:
                async with asyncio.timeout(self.tail_poll_s):
                    await ev.wait()
            except TimeoutError:
                pass
