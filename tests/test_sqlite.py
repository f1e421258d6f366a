"""What only the SQLite backend has: its file (the default one, URLs), its connection
settings, its schema and indexes, an event loop it must not block, real worker
processes sharing one file, and a SIGKILLed worker's job rescued by another process.

The API and worker semantics shared with every backend are in test_api.py and
test_behaviour.py. Waits poll a condition with a deadline; none sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from soniq import ConfigurationError, JobStatus, SchemaNotReadyError, Soniq
from soniq.core import outcomes
from soniq.core.jobs import JobSpec
from soniq.core.sql import sqlite as sq
from soniq.drivers import sqlite as driver
from soniq.drivers.sqlite import backends as sqlite_backends
from soniq.drivers.sqlite import connection as sqlite_connection
from soniq.drivers.sqlite import writes as sqlite_writes
from soniq.worker import runtime
from tests.conftest import async_wait_until, wait_until
from tests.sqlite_app import read_log

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def eq(tmp_path: Path) -> AsyncIterator[Soniq]:
    app = Soniq(f"sqlite:///{tmp_path}/jobs.db")
    await app.ensure_initialized()
    yield app
    await app.close()


def db_path(eq: Soniq) -> str:
    return str(eq.backend.path)  # type: ignore[attr-defined]


def wait_for_child(pid: int, timeout: float) -> int:
    """A forked child's exit code; SIGKILLed and failed if it runs past ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the child hung")


# -- the file --------------------------------------------------------------------


async def test_no_url_means_soniq_db_in_the_working_directory_and_logs_its_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("SONIQ_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="soniq")
    eq = Soniq()
    expected = os.path.join(os.getcwd(), "soniq.db")
    assert eq.backend.name == "sqlite"
    assert [r for r in caplog.records if r.name == "soniq" and expected in r.getMessage()]
    assert all(r.levelno == logging.INFO for r in caplog.records if expected in r.getMessage())
    # The path is fixed when Soniq is made: a later chdir cannot split the database.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    try:
        await eq.ensure_initialized()
        job_id = await eq.enqueue("some.job", x=1)
        assert eq.sync.get_job(job_id) is not None
    finally:
        await eq.close()
    assert (tmp_path / "soniq.db").is_file()
    assert not (elsewhere / "soniq.db").exists()


def test_soniq_database_url_wins_over_the_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SONIQ_DATABASE_URL", f"sqlite:///{tmp_path}/from-env.db")
    eq = Soniq()
    try:
        eq.sync.ensure_initialized()
    finally:
        eq.sync.close()
    assert (tmp_path / "from-env.db").is_file()
    assert not (tmp_path / "soniq.db").exists()


def test_relative_and_absolute_urls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    absolute = f"sqlite:///{tmp_path}/abs.db"
    assert absolute.startswith("sqlite:////")
    for url, made in [
        ("sqlite:///sub/rel.db", tmp_path / "sub" / "rel.db"),
        (absolute, tmp_path / "abs.db"),
    ]:
        eq = Soniq(url)
        assert eq.backend.path == str(made)  # type: ignore[attr-defined]
        try:
            eq.sync.ensure_initialized()
            eq.sync.enqueue("some.job")
        finally:
            eq.sync.close()
        assert made.is_file()


async def test_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    eq = Soniq(f"sqlite:///{tmp_path}/no/such/dir/jobs.db")
    try:
        with pytest.raises(ConfigurationError, match=r"no/such/dir/jobs\.db"):
            await eq.ensure_initialized()
        with pytest.raises(ConfigurationError, match="directory"):
            eq.sync.ensure_initialized()
        # A write fails as clearly (it goes through the backend's write queue).
        with pytest.raises(ConfigurationError, match="directory"):
            await asyncio.wait_for(eq.enqueue("some.job", n=1), 10)
        for n in (1, 2):  # the second proves the first failure left the line
            with pytest.raises(ConfigurationError, match="directory"):
                eq.sync.enqueue("some.job", n=n)
    finally:
        await eq.close()


def test_connections_use_wal_busy_timeout_and_full_sync(tmp_path: Path) -> None:
    eq = Soniq(f"sqlite:///{tmp_path}/jobs.db")
    try:
        eq.sync.ensure_initialized()
    finally:
        eq.sync.close()
    with sqlite3.connect(tmp_path / "jobs.db") as raw:  # WAL is a property of the file
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn = driver.connect(str(tmp_path / "jobs.db"))
    try:
        assert conn.isolation_level is None
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == driver.BUSY_TIMEOUT_MS
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        conn.close()


def test_a_new_database_gets_small_pages_and_an_existing_one_keeps_its_own(
    tmp_path: Path,
) -> None:
    # Small pages: each commit writes (and fsyncs) the pages it changed, whole.
    for name, mode, size in (("rollback.db", "delete", 8192), ("wal.db", "wal", 2048)):
        with contextlib.closing(sqlite3.connect(tmp_path / name)) as raw:  # another program's
            raw.execute(f"PRAGMA page_size = {size}")
            raw.execute(f"PRAGMA journal_mode = {mode}")
            raw.execute("CREATE TABLE theirs (x)")
    (tmp_path / "empty.db").touch()  # a file with no database in it yet
    expected = {"new.db": driver.PAGE_SIZE, "empty.db": driver.PAGE_SIZE}
    expected |= {"rollback.db": 8192, "wal.db": 2048}
    for name, size in expected.items():
        eq = Soniq(f"sqlite:///{tmp_path}/{name}")
        try:
            eq.sync.ensure_initialized()
            job_id = eq.sync.enqueue("some.job", n=1)
            assert eq.sync.get_job(job_id) is not None
        finally:
            eq.sync.close()
        with contextlib.closing(sqlite3.connect(tmp_path / name)) as raw:
            assert raw.execute("PRAGMA page_size").fetchone()[0] == size, name
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert driver.PAGE_SIZE == 1024


@pytest.mark.parametrize(
    ("query", "level"), [("", 2), ("?synchronous=normal", 1), ("?synchronous=FULL", 2)]
)
async def test_the_url_chooses_the_synchronous_level_of_every_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, query: str, level: int
) -> None:
    levels: list[int] = []
    real_connect = driver.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(*args, **kwargs)
        levels.append(conn.execute("PRAGMA synchronous").fetchone()[0])
        return conn

    monkeypatch.setattr(sqlite_connection, "connect", connect)
    eq = Soniq(f"sqlite:///{tmp_path}/jobs.db{query}")
    try:
        await eq.ensure_initialized()
        await eq.enqueue("some.job", n=1)
        eq.sync.enqueue("some.job", n=2)
        eq.backend.maintenance().close()
    finally:
        await eq.close()
    assert len(levels) == 3 and set(levels) == {level}


@pytest.mark.parametrize("query", ["?synchronous=off", "?sync=normal", "?synchronous="])
def test_an_unknown_sqlite_option_is_a_clear_error(tmp_path: Path, query: str) -> None:
    with pytest.raises(ConfigurationError, match=r"\?synchronous=normal"):
        Soniq(f"sqlite:///{tmp_path}/jobs.db{query}")


def test_an_enqueue_of_one_job_is_one_statement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements = traced_connections(monkeypatch)
    eq = Soniq(f"sqlite:///{tmp_path}/jobs.db")
    try:
        eq.sync.ensure_initialized()
        statements.clear()
        first = eq.sync.enqueue("some.job", n=1)
        assert [s.split()[0] for s in statements] == ["INSERT"]
        statements.clear()
        # A dedupe key reads before it writes: that needs the write lock up front.
        eq.sync.enqueue("some.job", n=2, dedupe_key="k")
        assert [s.split()[0] for s in statements] == ["BEGIN", "SELECT", "INSERT", "COMMIT"]
        ids = eq.sync.enqueue_many("some.job", [{"n": 3}, {"n": 4}])
        assert ids == [first + 2, first + 3]
    finally:
        eq.sync.close()


def _failing_write() -> sq.Operation[None]:
    """A write that fails (IntegrityError: NOT NULL columns left out)."""

    def steps() -> sq.Steps[None]:
        yield sq.Step("INSERT INTO soniq_workers (id) VALUES ('no columns')")

    return sq.Operation(steps(), immediate=True)


def traced_connections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The statements every connection the driver opens from now on runs."""
    statements: list[str] = []
    real_connect = driver.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(*args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(sqlite_connection, "connect", connect)
    return statements


@contextlib.asynccontextmanager
async def thread_held_by_a_lock(
    eq: Soniq,
) -> AsyncIterator[tuple[list[str], asyncio.Task[int], sqlite3.Connection]]:
    """The backend's thread kept busy: its first enqueue (``n=0``) waits for the write
    lock another connection holds, until ``locker.execute("COMMIT")``. Yields the
    statements the backend's connection ran, that enqueue's task, and the locker."""
    backend: driver.SqliteBackend = eq.backend  # type: ignore[assignment]
    statements: list[str] = []
    await backend._call(lambda conn: conn.set_trace_callback(statements.append))
    locker = sqlite3.connect(db_path(eq), isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        first = asyncio.create_task(eq.enqueue("some.job", n=0))

        async def started() -> bool:
            return bool(statements)

        await async_wait_until(started, 5, "the first insert to start")
        yield statements, first, locker
    finally:
        locker.close()


async def test_writes_that_queue_up_commit_once_and_a_failing_one_fails_alone(
    eq: Soniq,
) -> None:
    backend: driver.SqliteBackend = eq.backend  # type: ignore[assignment]
    async with thread_held_by_a_lock(eq) as (statements, first, locker):
        later = [asyncio.create_task(eq.enqueue("some.job", n=n)) for n in range(1, 6)]
        failing: asyncio.Future[None] = asyncio.wrap_future(backend._write(_failing_write))

        async def queued() -> bool:
            return len(backend._thread().writes) == 6

        await async_wait_until(queued, 5, "six queued writes")
        statements.clear()
        locker.execute("COMMIT")
        ids = [await first] + [await task for task in later]
        with pytest.raises(sqlite3.IntegrityError):
            await failing
    assert len(set(ids)) == 6
    for n, job_id in enumerate(ids):
        job = await eq.get_job(job_id)
        assert job is not None and job.args == {"n": n}
    assert statements.count("BEGIN IMMEDIATE") == 1
    assert statements.count("COMMIT") == 1
    assert statements.count("SAVEPOINT soniq_write") == 6


def test_writes_failed_together_each_get_their_own_copy_of_the_error() -> None:
    """Callers in several threads raise what they are given, and raising rewrites an
    exception's traceback: each gets its own copy, with where it was first raised."""

    def raise_locked() -> None:
        raise sqlite3.OperationalError("database is locked")

    writes = [sqlite_writes.Write(_failing_write, None, linger=False) for _ in range(3)]
    try:
        raise_locked()
    except sqlite3.OperationalError as exc:
        sqlite_writes._fail_unsettled(writes, exc)
        original = exc
    errors = [w.future.exception(timeout=0) for w in writes]
    assert len({id(e) for e in errors}) == 3 and original not in errors
    for error in errors:
        assert type(error) is sqlite3.OperationalError and error.args == original.args
        assert error.__traceback__ is not None
        assert error.__traceback__.tb_frame.f_code is original.__traceback__.tb_frame.f_code


def _broken_write_loop(conn: sqlite3.Connection, writes: Any) -> None:
    """Stands in for run_together when it fails before settling anything (a bug)."""
    raise RuntimeError("boom")


async def test_a_write_that_fails_unexpectedly_reaches_its_caller(
    eq: Soniq, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the thread's write loop itself ever raise (a bug), the waiting caller
    gets the error instead of waiting forever, and the next write works."""

    monkeypatch.setattr(sqlite_writes, "run_together", _broken_write_loop)
    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(eq.enqueue("some.job"), 10)
    monkeypatch.undo()
    job_id = await asyncio.wait_for(eq.enqueue("some.job"), 10)
    assert await eq.get_job(job_id) is not None


def test_a_caller_cancelling_while_the_write_loop_fails_keeps_the_others_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure path must not trip over a write whose caller cancels it meanwhile."""

    class CancelledOnLook(Future[Any]):
        def done(self) -> bool:
            finished = super().done()
            if not finished:
                self.cancel()  # the caller's task is cancelled at this very moment
            return finished

    monkeypatch.setattr(sqlite_writes, "run_together", _broken_write_loop)
    thread = sqlite_writes.WriteThread(driver.SqliteFile(str(tmp_path / "jobs.db"), "NORMAL"))
    first = sqlite_writes.Write(lambda: sq.get_job(1), None, False)
    first.future = CancelledOnLook()
    second = sqlite_writes.Write(lambda: sq.get_job(1), None, False)
    thread.writes = [first, second]
    thread._run_writes()
    assert first.future.cancelled()
    with pytest.raises(RuntimeError, match="boom"):
        second.future.result(timeout=0)
    thread.close().result(timeout=10)


@contextlib.contextmanager
def sync_leader_held_by_a_lock(
    tmp_path: Path, threads: int
) -> Iterator[tuple[Soniq, Any, ThreadPoolExecutor, Future[int], sqlite3.Connection]]:
    """``eq.sync``'s first enqueue (``n=0``), on a pool thread, leads its turn and
    waits for the write lock that another connection holds, until
    ``locker.execute("COMMIT")``. Yields eq, its write turns, the pool (``threads``
    threads), that enqueue's future and the locker."""
    eq = Soniq(f"sqlite:///{tmp_path}/jobs.db")
    eq.sync.ensure_initialized()
    turns = eq.sync.backend._turns  # type: ignore[attr-defined]
    locker = sqlite3.connect(str(tmp_path / "jobs.db"), isolation_level=None)
    pool = ThreadPoolExecutor(threads)
    try:
        locker.execute("BEGIN IMMEDIATE")
        first = pool.submit(eq.sync.enqueue, "some.job", n=0)
        writer = eq.sync.backend._writer  # type: ignore[attr-defined]
        # Its turn taken and its write begun (the connection open and in use), not only
        # the turn: close() in between would find the connection idle and close it. (The
        # writer counts as busy just before it opens its connection.)
        wait_until(
            lambda: (
                turns._in_flight and not turns._line and writer._busy and writer.conn is not None
            ),
            10,
            "enqueue 0 to lead",
        )
        yield eq, turns, pool, first, locker
    finally:
        locker.close()
        pool.shutdown()
        eq.sync.close()


def queue_enqueues(eq: Soniq, turns: Any, pool: ThreadPoolExecutor, ns: range) -> list[Future[int]]:
    """Enqueue ``n`` for each of ``ns`` on the pool, each once the one before waits in
    line behind the leader (so they are in line in that order)."""
    queued = []
    for n in ns:
        queued.append(pool.submit(eq.sync.enqueue, "some.job", n=n))
        waiting = len(queued)
        wait_until(lambda k=waiting: len(turns._line) == k, 10, f"enqueue {n} in line")
    return queued


def test_sync_writes_of_threads_commit_in_turns_in_order_and_a_failing_one_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads writing through ``eq.sync`` wait in line, not in SQLite's busy handler
    (which sleeps up to 100 ms at a time and lets later writers overtake): while the
    leader waits for the lock, the writes behind it queue, then commit together in one
    transaction, in the order they came; a failing one fails alone."""
    statements = traced_connections(monkeypatch)
    with sync_leader_held_by_a_lock(tmp_path, 6) as (eq, turns, pool, first, locker):
        later = queue_enqueues(eq, turns, pool, range(1, 5))
        failing: Future[None] = pool.submit(eq.sync.backend._commit, _failing_write)  # type: ignore[attr-defined]
        wait_until(lambda: len(turns._line) == 5, 10, "five writes in line")
        statements.clear()
        locker.execute("COMMIT")
        ids = [f.result(timeout=20) for f in [first, *later]]
        with pytest.raises(sqlite3.IntegrityError):
            failing.result(timeout=20)
        assert not turns._line
        # The leader alone (its one INSERT had started), then the five behind it.
        assert statements.count("BEGIN IMMEDIATE") == 1
        assert statements.count("COMMIT") == 1
        assert statements.count("SAVEPOINT soniq_write") == 5
        assert ids == sorted(ids) and len(set(ids)) == 5
        for n, job_id in enumerate(ids):
            job = eq.sync.get_job(job_id)
            assert job is not None and job.args == {"n": n}


def test_a_sync_line_longer_than_a_group_commits_in_several_turns_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader whose own write is beyond the group it took commits that group, then
    waits its turn again: every write is committed once, in the order they came."""
    monkeypatch.setattr(sqlite_writes, "MAX_GROUP", 2)
    statements = traced_connections(monkeypatch)
    with sync_leader_held_by_a_lock(tmp_path, 7) as (eq, turns, pool, first, locker):
        later = queue_enqueues(eq, turns, pool, range(1, 7))
        statements.clear()
        locker.execute("COMMIT")
        ids = [f.result(timeout=20) for f in [first, *later]]
    assert ids == sorted(ids) and len(set(ids)) == 7
    assert statements.count("BEGIN IMMEDIATE") == 3  # 1-2, 3-4, 5-6
    assert statements.count("SAVEPOINT soniq_write") == 6


class Interrupted(BaseException):
    """Stands in for KeyboardInterrupt or a signal handler's SystemExit."""


def test_a_sync_leader_interrupted_tells_its_group_and_the_line_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread committing a group is interrupted: it raises the interruption, the
    others hear that their outcome is unknown (not the interruption itself), and the
    next writer is not held up."""
    real_run_together = sqlite_writes.run_together

    def interrupted_when_grouped(conn: sqlite3.Connection, writes: Any) -> None:
        if len(writes) > 1:
            raise Interrupted
        real_run_together(conn, writes)

    monkeypatch.setattr(sqlite_writes, "run_together", interrupted_when_grouped)
    with sync_leader_held_by_a_lock(tmp_path, 3) as (eq, turns, pool, first, locker):
        grouped = queue_enqueues(eq, turns, pool, range(1, 3))
        locker.execute("COMMIT")
        assert first.result(timeout=20) > 0
        errors = [f.exception(timeout=20) for f in grouped]
        assert sorted(type(e).__name__ for e in errors) == ["Interrupted", "RuntimeError"]
        assert "may or may not have been committed" in str(
            next(e for e in errors if isinstance(e, RuntimeError))
        )
        assert not turns._in_flight
        assert eq.sync.enqueue("some.job", n=3) > 0


def test_a_sync_writer_interrupted_in_line_leaves_it_and_the_line_goes_on(
    tmp_path: Path,
) -> None:
    """A signal handler's exception (KeyboardInterrupt, SystemExit) in a thread that
    waits in line: its write is dropped, not committed behind its caller's back, and
    the writers after it are not held up."""

    class Alarm(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Alarm

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with sync_leader_held_by_a_lock(tmp_path, 1) as (eq, turns, _, first, locker):
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(Alarm):
                eq.sync.enqueue("some.job", n=1)  # waits behind enqueue 0
            assert not turns._line
            locker.execute("COMMIT")
            assert first.result(timeout=20) > 0
            eq.sync.enqueue("some.job", n=2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with contextlib.closing(sqlite3.connect(str(tmp_path / "jobs.db"))) as conn:
        rows = conn.execute("SELECT args FROM soniq_jobs ORDER BY id").fetchall()
    assert rows == [('{"n":0}',), ('{"n":2}',)]


def test_sync_writes_share_one_connection_that_close_ends_and_a_later_write_reopens(
    tmp_path: Path,
) -> None:
    """``eq.sync``'s writes commit on the line's one connection (no pool checkout per
    write); ``close()`` closes it, and the next write opens a new one."""
    eq = Soniq(f"sqlite:///{tmp_path}/jobs.db")
    eq.sync.ensure_initialized()
    writer = eq.sync.backend._writer  # type: ignore[attr-defined]
    first = eq.sync.enqueue("some.job", n=0)
    conn = writer.conn
    assert conn is not None
    assert eq.sync.enqueue("some.job", n=1) == first + 1
    assert eq.sync.cancel_job(first) is True
    assert writer.conn is conn
    eq.sync.close()
    assert writer.conn is None
    with pytest.raises(sqlite3.ProgrammingError):
        conn.execute("SELECT 1")  # closed, not only forgotten
    assert eq.sync.enqueue("some.job", n=2) == first + 2
    assert writer.conn is not None and writer.conn is not conn
    eq.sync.close()


def test_closing_while_a_sync_write_waits_closes_its_connection_when_it_ends(
    tmp_path: Path,
) -> None:
    """``close()`` during a turn does not pull the connection from under the writer:
    the write commits, then the connection is closed."""
    with sync_leader_held_by_a_lock(tmp_path, 1) as (eq, _, _, first, locker):
        writer = eq.sync.backend._writer  # type: ignore[attr-defined]
        conn = writer.conn
        eq.sync.close()
        assert writer.conn is conn  # in use
        locker.execute("COMMIT")
        job_id = first.result(timeout=20)
        wait_until(lambda: writer.conn is None, 10, "the connection to close")
        job = eq.sync.get_job(job_id)
        assert job is not None and job.args == {"n": 0}


def test_a_sync_write_in_a_forked_child_does_not_wait_behind_the_parents_line(
    tmp_path: Path,
) -> None:
    """A fork copies the line of writes, not the threads in it: the child starts a
    line of its own. (The parent's turn is taken here as another thread's would be,
    without a thread: forking while a thread is inside SQLite can leave the child a
    locked SQLite mutex, whatever Soniq does.)"""
    eq = Soniq(f"sqlite:///{tmp_path}/jobs.db")
    eq.sync.ensure_initialized()
    turns = eq.sync.backend._turns  # type: ignore[attr-defined]
    turns._in_flight = 1  # another thread of the parent is writing
    try:
        pid = os.fork()
        if pid == 0:  # the child: nobody here will ever take that write's turn
            code = 1
            try:
                job_id = eq.sync.enqueue("some.job", n=1)
                code = 0 if eq.sync.get_job(job_id) is not None else 2
            finally:
                os._exit(code)
        assert wait_for_child(pid, 30) == 0
    finally:
        turns._in_flight = 0
        eq.sync.close()
    with contextlib.closing(sqlite3.connect(str(tmp_path / "jobs.db"))) as conn:
        assert conn.execute("SELECT args FROM soniq_jobs").fetchall() == [('{"n":1}',)]


async def test_writes_queued_before_close_still_run_and_later_ones_reopen(eq: Soniq) -> None:
    backend: driver.SqliteBackend = eq.backend  # type: ignore[assignment]
    async with thread_held_by_a_lock(eq) as (_, busy, locker):
        thread = backend._thread()
        queued = asyncio.create_task(eq.enqueue("some.job", n=1))  # behind it
        await async_wait_until(lambda: len(thread.writes) == 1, 5, "enqueue 1 to queue")
        closing = asyncio.create_task(eq.close())
        await async_wait_until(lambda: thread.closing, 5, "close to begin")
        after = asyncio.create_task(eq.enqueue("some.job", n=2))  # on a new thread
        locker.execute("COMMIT")
        ids = await asyncio.wait_for(asyncio.gather(busy, queued, after), 20)
        await asyncio.wait_for(closing, 20)
    for n, job_id in enumerate(ids):
        job = await eq.get_job(job_id)
        assert job is not None and job.args == {"n": n}


async def test_completions_wait_briefly_for_the_next_claim_and_commit_with_it(
    eq: Soniq, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend: driver.SqliteBackend = eq.backend  # type: ignore[assignment]
    monkeypatch.setattr(sqlite_writes, "LINGER", 5.0)  # a slow machine still groups them
    await eq.enqueue_many("some.job", [{"n": n} for n in range(4)])
    claimed = await backend.claim_jobs(2, "w", None)
    statements: list[str] = []
    await backend._call(lambda conn: conn.set_trace_callback(statements.append))
    done = [outcomes.succeeded(c.id, c.attempts, None) for c in claimed]
    finish = asyncio.create_task(backend.finish_jobs(done, "w", keep=True))
    thread = backend._thread()
    await async_wait_until(lambda: thread.writes, 5, "the completions to queue (and linger)")
    more = await backend.claim_jobs(2, "w", None)
    await finish
    assert len(more) == 2
    assert statements.count("COMMIT") == 1
    # Alone, completions are written all the same, at most LINGER later.
    monkeypatch.setattr(sqlite_writes, "LINGER", 0.002)
    done = [outcomes.succeeded(c.id, c.attempts, None) for c in more]
    await asyncio.wait_for(backend.finish_jobs(done, "w", keep=True), 5)
    for c in claimed + more:
        job = await eq.get_job(c.id)
        assert job is not None and job.status == JobStatus.DONE


async def test_a_claim_waits_for_running_jobs_to_free_their_slots_too(
    eq: Soniq, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each claim is a commit here, so with jobs running a claim waits (CLAIM_GATHER)
    for the other slots: one claim of 2, not two claims of 1."""
    backend: driver.SqliteBackend = eq.backend  # type: ignore[assignment]
    monkeypatch.setattr(runtime, "CLAIM_GATHER", 30.0)  # longer than this test
    limits: list[int] = []
    real_claim = backend.claim_jobs

    async def claim_jobs(
        limit: int, worker_id: str, queues: Any, names: Any, claim_limits: Any = None
    ) -> Any:
        limits.append(limit)
        return await real_claim(limit, worker_id, queues, names, claim_limits)

    monkeypatch.setattr(backend, "claim_jobs", claim_jobs)
    slow_may_end = asyncio.Event()

    @eq.job(name="quick")
    async def quick() -> None: ...

    @eq.job(name="slow")
    async def slow() -> None:
        await slow_may_end.wait()

    quick_id = await eq.enqueue("quick")
    await eq.enqueue("slow")
    later = await eq.enqueue_many("quick", [{}, {}])
    worker = asyncio.create_task(eq.run_worker(concurrency=2, poll_interval=60))
    try:

        async def quick_done() -> bool:
            job = await eq.get_job(quick_id)
            return job is not None and job.status == JobStatus.DONE

        await async_wait_until(quick_done, 10, "the quick job to finish")
        assert limits == [2]  # one slot is free, but the claim waits for the other
        slow_may_end.set()

        async def all_done() -> bool:
            jobs = [await eq.get_job(i) for i in later]
            return all(j is not None and j.status == JobStatus.DONE for j in jobs)

        await async_wait_until(all_done, 10, "the later jobs to finish")
        assert limits[:2] == [2, 2]
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker


async def test_connection_argument_raises_value_error(eq: Soniq) -> None:
    @eq.job(name="job")
    def job(n: int) -> None: ...

    class SomeConnection:
        pass

    with pytest.raises(ValueError, match="sqlite backend"):
        await eq.enqueue(job, connection=SomeConnection(), n=1)
    with pytest.raises(ValueError, match="sqlite backend"):
        await eq.enqueue_many(job, [{"n": 1}], connection=SomeConnection())
    with pytest.raises(ValueError, match="sqlite backend"):
        eq.sync.enqueue(job, connection=SomeConnection(), n=1)
    with pytest.raises(ValueError, match="sqlite backend"):
        eq.sync.enqueue_many(job, [{"n": 1}], connection=SomeConnection())
    assert await eq.get_job(1) is None  # nothing was written


async def test_there_is_no_pool_to_lend(eq: Soniq) -> None:
    with pytest.raises(ConfigurationError, match="sqlite backend has no connection pool"):
        eq.backend.acquire()
    with pytest.raises(ConfigurationError, match="sqlite backend has no connection pool"):
        eq.sync.backend.acquire()


# -- schema ------------------------------------------------------------------------


async def test_schema_is_versioned_and_checked(tmp_path: Path) -> None:
    eq = Soniq(f"sqlite:///{tmp_path}/jobs.db")
    try:
        with pytest.raises(SchemaNotReadyError, match="soniq migrate"):
            await eq.ensure_initialized(migrate=False)
        with pytest.raises(SchemaNotReadyError, match="soniq migrate"):
            await eq.enqueue("some.job")
        with pytest.raises(SchemaNotReadyError, match="soniq migrate"):
            eq.sync.enqueue("some.job")
        assert await eq.backend.migrate(apply=True) == sq.LATEST_VERSION
        assert await eq.backend.migrate(apply=True) == sq.LATEST_VERSION  # idempotent
        assert eq.sync.backend.migrate(apply=False) == sq.LATEST_VERSION
    finally:
        await eq.close()
    with sqlite3.connect(tmp_path / "jobs.db") as raw:
        versions = raw.execute("SELECT version, name FROM soniq_migrations").fetchall()
        names = {row[0] for row in raw.execute("SELECT name FROM sqlite_master")}
        raw.execute("INSERT INTO soniq_migrations VALUES (99, 'future', 0)")
    assert versions == [(m.version, m.name) for m in sq.MIGRATIONS]
    assert {
        "soniq_jobs",
        "soniq_workers",
        "soniq_jobs_claim_idx",
        "soniq_jobs_claim_queue_idx",
        "soniq_jobs_dedupe_idx",
        "soniq_jobs_running_idx",
        "soniq_jobs_finished_idx",
    } <= names
    newer = Soniq(f"sqlite:///{tmp_path}/jobs.db")
    try:
        with pytest.raises(SchemaNotReadyError, match="upgrade the soniq package"):
            newer.sync.ensure_initialized()
    finally:
        newer.sync.close()


@pytest.mark.slow
def test_processes_migrating_one_new_file_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/jobs.db"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "soniq", "migrate", "--database-url", url],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(8)
    ]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 8, outputs
    with sqlite3.connect(tmp_path / "jobs.db") as raw:
        versions = raw.execute("SELECT version FROM soniq_migrations").fetchall()
    assert versions == [(m.version,) for m in sq.MIGRATIONS]


# Jobs as (queue, priority, seconds from now to run_at); claims as (limit, queues).
_job = st.tuples(st.sampled_from("abcd"), st.integers(-2, 2), st.sampled_from([-5, -1, 0, 60]))
_queues = st.none() | st.lists(st.sampled_from("abcde"), max_size=5)


@settings(max_examples=150, deadline=None)
@given(jobs=st.lists(_job, max_size=30), claims=st.lists(st.tuples(st.integers(1, 6), _queues)))
def test_claims_of_any_queues_follow_claim_order(
    jobs: list[tuple[str, int, int]], claims: list[tuple[int, list[str] | None]]
) -> None:
    """Claims of no, one, several (named twice, or not existing) or all queues take the
    due jobs of those queues by priority DESC, run_at, id; none twice, none not due."""
    now = 1_000_000.0
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        driver.run(conn, sq.migrate(now))
        queued = []
        for queue, priority, offset in jobs:
            spec = JobSpec("some.job", queue, ({},), priority=priority, delay=offset)
            [job_id] = driver.run(conn, sq.insert_jobs(spec, now)).ids
            queued.append((queue, priority, now + offset, job_id))
        for limit, queues in claims:
            due = sorted(
                (j for j in queued if j[2] <= now and (queues is None or j[0] in queues)),
                key=lambda j: (-j[1], j[2], j[3]),
            )
            claimed = driver.run(conn, sq.claim_jobs(limit, "w", queues, now))
            assert [c.id for c in claimed] == [j[3] for j in due[:limit]]
            taken = {c.id for c in claimed}
            queued = [j for j in queued if j[3] not in taken]
    finally:
        conn.close()


def explain(conn: sqlite3.Connection, op: sq.Operation[Any], skip: int = 0) -> str:
    """The query plan of the (``skip``+1)-th statement of an operation."""
    steps = op.steps
    step = next(steps)
    for _ in range(skip):
        step = steps.send(sq.Result([(0,)], 0))
    steps.close()
    params = step.params[0] if step.many else step.params
    rows = conn.execute(f"EXPLAIN QUERY PLAN {step.sql}", params).fetchall()
    return "\n".join(str(row[-1]) for row in rows)


async def test_hot_statements_use_their_indexes(eq: Soniq) -> None:
    """Plans as a user's file has them: no ANALYZE statistics, finished history beside
    the queued jobs of several queues."""
    for queue in ("a", "b", "c", "d"):
        await eq.enqueue_many("some.job", [{"n": n} for n in range(500)], queue=queue)
    claimed = await eq.backend.claim_jobs(1000, "w", None)
    done = [outcomes.succeeded(c.id, c.attempts, None) for c in claimed]
    await eq.backend.finish_jobs(done, "w", keep=True)
    await eq.backend.claim_jobs(10, "w", None)
    now = time.time()
    conn = driver.connect(db_path(eq))
    try:
        # The claim reads queued rows in claim order and stops at its LIMIT: no sort.
        plan = explain(conn, sq.claim_jobs(10, "w", None, now))
        assert "soniq_jobs_claim_idx" in plan and "TEMP B-TREE" not in plan, plan
        plan = explain(conn, sq.claim_jobs(10, "w", ["b"], now))
        assert "soniq_jobs_claim_queue_idx" in plan and "TEMP B-TREE" not in plan, plan
        plan = explain(conn, sq.claim_jobs(10, "w", ["b", "c"], now))
        assert "soniq_jobs_claim_queue_idx" in plan, plan
        # A worker's claim names the jobs it knows: a filter on the same index order.
        plan = explain(conn, sq.claim_jobs(10, "w", None, now, ["some.job", "x"]))
        assert "soniq_jobs_claim_idx" in plan and "TEMP B-TREE" not in plan, plan
        plan = explain(conn, sq.claim_jobs(10, "w", ["b"], now, ["some.job"]))
        assert "soniq_jobs_claim_queue_idx" in plan and "TEMP B-TREE" not in plan, plan
        plan = explain(conn, sq.prune_finished(60, 100, now))
        assert "soniq_jobs_finished_idx" in plan, plan
        plan = explain(conn, sq.cancel_requests("w"))
        assert "soniq_jobs_running_idx" in plan, plan
        plan = explain(conn, sq.reconcile("w", []))
        assert "soniq_jobs_running_idx" in plan, plan
        plan = explain(conn, sq.rescue_stale(30, now), skip=1)
        assert "soniq_jobs_running_idx" in plan, plan
        spec = JobSpec("some.job", "default", ({},), dedupe_key="k")
        plan = explain(conn, sq.insert_jobs(spec, now))
        assert "soniq_jobs_dedupe_idx" in plan, plan
        plan = explain(conn, sq.retry_jobs([1], now), skip=1)  # is its dedupe key free?
        assert "soniq_jobs_dedupe_idx" in plan, plan
    finally:
        conn.close()


# -- the event loop ----------------------------------------------------------------


async def test_a_locked_database_does_not_block_the_loop(eq: Soniq) -> None:
    """Another process holds the write lock: the enqueue waits for it on the backend's
    thread (busy timeout) while the loop goes on: this coroutine runs, and sees the
    insert started and not finished."""
    async with thread_held_by_a_lock(eq) as (statements, enqueue, locker):
        assert statements and not enqueue.done()
        for _ in range(3):  # other tasks get their turns, too
            await asyncio.sleep(0)
        assert not enqueue.done()
        locker.execute("COMMIT")
        job_id = await asyncio.wait_for(enqueue, 10)
    assert (await eq.get_job(job_id)) is not None


async def test_a_big_enqueue_many_does_not_block_the_loop(eq: Soniq) -> None:
    """Serialising the batch happens on the loop; the SQLite work does not. The
    backend's thread is held at the write's first statement until the loop has seen
    it there: were that work on the loop, the loop could not see it before it ended."""
    backend: driver.SqliteBackend = eq.backend  # type: ignore[assignment]
    reached, go_on = threading.Event(), threading.Event()

    def hold_the_first_statement(statement: str) -> None:
        if not reached.is_set():
            reached.set()
            go_on.wait(30)

    await backend._call(lambda conn: conn.set_trace_callback(hold_the_first_statement))
    enqueue = asyncio.create_task(eq.enqueue_many("some.job", [{"n": n} for n in range(100_000)]))
    try:
        await async_wait_until(reached.is_set, 30, "the insert to start on the thread")
        assert not enqueue.done()
    finally:
        go_on.set()
    ids = await asyncio.wait_for(enqueue, 60)
    assert len(ids) == 100_000 and ids == list(range(ids[0], ids[0] + 100_000))


async def test_a_cancelled_claim_puts_its_jobs_back(eq: Soniq) -> None:
    job_id = await eq.enqueue("some.job", x=1)
    backend: driver.SqliteBackend = eq.backend  # type: ignore[assignment]
    statements: list[str] = []
    await backend._call(lambda conn: conn.set_trace_callback(statements.append))
    locker = sqlite3.connect(db_path(eq), isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        claim = asyncio.create_task(backend.claim_jobs(5, "gone", None))
        # The claim has begun on the backend's thread and waits there for the lock.
        await async_wait_until(lambda: "BEGIN IMMEDIATE" in statements, 5, "the claim to start")
        claim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await claim
        locker.execute("COMMIT")  # the claim now runs on its thread, then is undone
    finally:
        locker.close()

    async def put_back() -> bool:
        job = await eq.get_job(job_id)
        assert job is not None
        return job.started_at is not None and job.status == JobStatus.QUEUED

    await async_wait_until(put_back, 10, "the claimed job to be put back")
    job = await eq.get_job(job_id)
    assert job is not None and (job.attempts, job.worker_id) == (0, None)


async def test_an_enqueue_in_this_process_wakes_the_worker_at_once(eq: Soniq) -> None:
    """With no NOTIFY, listen() hears this process's enqueues (from any thread); the
    30 s poll interval shows the wake-up did the work."""
    done: list[int] = []

    @eq.job(name="wake")
    async def wake(n: int) -> None:
        done.append(n)

    key = sqlite_connection._key(db_path(eq))

    async def listening() -> bool:
        return bool(sqlite_backends._listeners.get(key))

    async def ran() -> bool:
        return done == [1]

    worker = asyncio.create_task(eq.run_worker(poll_interval=30))
    try:
        await async_wait_until(listening, 10, "the worker to listen")
        # From another thread, through the sync twin: the same file, another backend.
        await asyncio.to_thread(eq.sync.enqueue, wake, n=1)
        await async_wait_until(ran, 5, "the job to run")
    finally:
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker


def test_a_backend_made_before_fork_works_in_the_child(tmp_path: Path) -> None:
    eq = Soniq(f"sqlite:///{tmp_path}/jobs.db")
    eq.sync.ensure_initialized()
    first = eq.sync.enqueue("some.job")

    async def use() -> int:
        return await eq.enqueue("some.job")

    asyncio.run(use())  # the async backend's thread and connection exist now
    pid = os.fork()
    if pid == 0:  # the child: new thread, new connections; exits without pytest
        code = 1
        try:
            job_id = asyncio.run(use())
            code = 0 if eq.sync.get_job(job_id) is not None else 2
        finally:
            os._exit(code)
    assert wait_for_child(pid, 30) == 0
    assert eq.sync.get_job(first) is not None  # the parent's connections still work
    asyncio.run(use())
    asyncio.run(eq.close())
    eq.sync.close()


# -- worker processes --------------------------------------------------------------


@pytest.fixture
def app_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Where ``tests.sqlite_app`` keeps its database and run log, migrated."""
    env = os.environ.copy()
    env.pop("SONIQ_DATABASE_URL", None)
    env["SONIQ_SQLITE_APP_DB"] = str(tmp_path / "jobs.db")
    env["SONIQ_SQLITE_APP_LOG"] = str(tmp_path / "runs.log")
    setup = Soniq(f"sqlite:///{env['SONIQ_SQLITE_APP_DB']}")
    setup.sync.ensure_initialized()
    setup.sync.close()
    yield env


class Workers:
    """Worker processes of ``tests.sqlite_app``, each logging to a file of its own."""

    def __init__(self, env: dict[str, str], tmp_path: Path) -> None:
        self.env, self.tmp_path = env, tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        out = open(self.tmp_path / f"worker-{len(self.procs)}.out", "wb")  # noqa: SIM115
        with out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "soniq", "worker", "tests.sqlite_app:eq", *args],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        index = self.procs.index(proc)
        return (self.tmp_path / f"worker-{index}.out").read_text(errors="replace")

    def wait(self, proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker did not exit:\n{self.output(proc)}") from None

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(app_env: dict[str, str], tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(app_env, tmp_path)
    yield pool
    pool.kill_all()


def statuses(db: str) -> collections.Counter[str]:
    with sqlite3.connect(db) as raw:
        return collections.Counter(r[0] for r in raw.execute("SELECT status FROM soniq_jobs"))


@pytest.mark.slow
def test_worker_processes_drain_a_file_and_no_job_runs_twice(
    app_env: dict[str, str], workers: Workers
) -> None:
    db, log = app_env["SONIQ_SQLITE_APP_DB"], app_env["SONIQ_SQLITE_APP_LOG"]
    eq = Soniq(f"sqlite:///{db}")
    try:
        ids = eq.sync.enqueue_many("tests.sqlite_app.record", [{"pause": 0.01}] * 300)
        ids += eq.sync.enqueue_many("tests.sqlite_app.record_sync", [{"pause": 0.01}] * 100)
        ids += eq.sync.enqueue_many("tests.sqlite_app.record", [{}] * 400, priority=-1)
    finally:
        eq.sync.close()
    procs = [
        workers.start("--burst", "--concurrency", "4", "--poll-interval", "0.05") for _ in range(4)
    ]
    for proc in procs:
        assert workers.wait(proc) == 0, workers.output(proc)
    runs = read_log(log)
    per_job = collections.Counter(job_id for job_id, _, _, _ in runs)
    assert per_job == {job_id: 1 for job_id in ids}
    assert {attempt for _, attempt, _, _ in runs} == {1}
    assert len({pid for _, _, pid, _ in runs}) >= 2  # the work was shared
    assert statuses(db) == {"done": 800}


@pytest.mark.slow
def test_a_sigkilled_workers_job_is_rescued_by_another_process(
    app_env: dict[str, str], workers: Workers
) -> None:
    db, log = app_env["SONIQ_SQLITE_APP_DB"], app_env["SONIQ_SQLITE_APP_LOG"]
    fast = ("--stale-after", "2", "--heartbeat-interval", "0.3", "--poll-interval", "0.05")
    eq = Soniq(f"sqlite:///{db}")
    try:
        job_id = eq.sync.enqueue("tests.sqlite_app.slow_first_attempt", seconds=600)
        first = workers.start(*fast)
        wait_until(lambda: read_log(log), 30, "the first worker to start the job")
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
        job = eq.sync.get_job(job_id)
        assert job is not None and job.status == JobStatus.RUNNING  # nobody put it back

        second = workers.start(*fast)

        def finished() -> bool:
            job = eq.sync.get_job(job_id)
            return job is not None and job.status == JobStatus.DONE

        wait_until(finished, 30, "another worker to rescue and finish the job")
        job = eq.sync.get_job(job_id)
        assert job is not None and job.attempts == 2
        assert job.last_error is not None and "WorkerLost" in job.last_error
        second.send_signal(signal.SIGTERM)
        assert workers.wait(second, 30) == 0, workers.output(second)
    finally:
        eq.sync.close()
    assert read_log(log) == [
        (job_id, 1, first.pid, "started"),
        (job_id, 2, second.pid, "started"),
        (job_id, 2, second.pid, "finished"),
    ]


def test_queue_stats_and_stats_read_the_indexes_of_their_rows(tmp_path: Path) -> None:
    """As on PostgreSQL (tests/test_migrations.py): no scan of the job table, so done
    history costs queue_stats and stats nothing."""
    url = f"sqlite:///{tmp_path / 'plans.db'}"
    eq = Soniq(url)
    eq.sync.ensure_initialized()
    eq.sync.close()
    conn = sqlite3.connect(tmp_path / "plans.db")
    try:
        for op in (sq.queue_stats(0.0), sq.stats(1e9, 15, None), sq.stats(1e9, 60, "q")):
            step = next(op.steps)
            plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {step.sql}", step.params)]
            scans = [line for line in plan if line.startswith("SCAN soniq_jobs")]
            assert all(" USING " in line for line in scans), plan
            assert any("INDEX" in line for line in plan), plan
    finally:
        conn.close()


def test_a_file_of_schema_8_keeps_its_jobs_and_ids_through_the_predicates_migration(
    tmp_path: Path,
) -> None:
    """Migration 9 rebuilds the job table (a CHECK cannot be changed in place): every
    row comes through as it was, ids go on after the highest ever given (a deleted
    last job's id is not reused), and the rules the CHECK and the unique dedupe index
    keep still hold."""
    path = tmp_path / "jobs.db"
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        raw.execute(sq._BOOTSTRAP)
        for migration in sq.MIGRATIONS[:8]:
            for statement in migration.statements:
                raw.execute(statement)
            raw.execute(
                "INSERT INTO soniq_migrations VALUES (?, ?, 0)", (migration.version, migration.name)
            )
        for n, status in enumerate(["queued", "running", "done", "failed", "waiting", "queued"]):
            raw.execute(
                "INSERT INTO soniq_jobs (name, queue, args, status, run_at, created_at, "
                "dedupe_key, finished_at, parents, headers) "
                "VALUES (?, 'q', ?, ?, ?, 1.0, ?, ?, ?, ?)",
                (
                    "some.job",
                    f'{{"n": {n}}}',
                    status,
                    100.0 + n,
                    f"key-{n}" if n < 2 else None,
                    5.0 if status in ("done", "failed") else None,
                    "[1]" if status == "waiting" else None,
                    '{"h": "v"}' if n == 3 else None,
                ),
            )
        raw.execute("DELETE FROM soniq_jobs WHERE id = 6")  # the last id given
        before = raw.execute("SELECT * FROM soniq_jobs ORDER BY id").fetchall()
    finally:
        raw.close()

    eq = Soniq(f"sqlite:///{path}")
    try:
        eq.sync.ensure_initialized()
        new_id = eq.sync.enqueue("some.job", dedupe_key="key-0")  # held by job 1
        assert new_id == 1
        assert eq.sync.enqueue("some.job") == 7
    finally:
        eq.sync.close()
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        assert raw.execute("SELECT max(version) FROM soniq_migrations").fetchone() == (9,)
        assert raw.execute("SELECT * FROM soniq_jobs WHERE id < 7 ORDER BY id").fetchall() == before
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            raw.execute("UPDATE soniq_jobs SET status = 'lost' WHERE id = 1")
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            raw.execute("UPDATE soniq_jobs SET dedupe_key = 'key-0' WHERE id = 2")
        raw.execute("UPDATE soniq_jobs SET dedupe_key = 'key-0' WHERE id = 3")  # done: free
        schema = " ".join(
            row[0] for row in raw.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL")
        )
        assert "soniq_jobs_v" not in schema
        assert " IN (" not in schema  # no IN list left to build per INSERT
    finally:
        raw.close()
