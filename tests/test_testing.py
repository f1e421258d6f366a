"""soniq.testing: the helpers for users' test suites, on the memory, SQLite and
PostgreSQL backends, through ``eq`` (awaited) and ``eq.sync`` (blocking), and inside a test's
uncommitted transaction; plus every example of docs/testing.md, run with pytest."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import asyncpg
import psycopg
import pytest

from soniq import Backoff, JobStatus, JobTimeout, PermanentError, Snooze, Soniq, current_job
from soniq.testing import (
    DrainResult,
    FakeClock,
    assert_enqueued,
    assert_not_enqueued,
    clear_jobs,
    drain,
    enqueued_jobs,
    use_clock,
)
from tests.conftest import new_soniq

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(60)

SETUPS = ["memory", "memory-sync", "sqlite", "sqlite-sync", "asyncpg", "psycopg", "postgres-sync"]


class Harness:
    """One Soniq, used through ``eq`` or through ``eq.sync`` (in a thread, where no
    event loop runs, as in a blocking test)."""

    def __init__(self, eq: Soniq, colour: str) -> None:
        self.eq = eq
        self.colour = colour

    async def __call__(self, helper: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.colour == "sync":
            return await asyncio.to_thread(helper, self.eq.sync, *args, **kwargs)
        return await helper(self.eq, *args, **kwargs)

    async def enqueue(self, job: Any, **kwargs: Any) -> int:
        if self.colour == "sync":
            return await asyncio.to_thread(lambda: self.eq.sync.enqueue(job, **kwargs))
        return await self.eq.enqueue(job, **kwargs)


@pytest.fixture(params=SETUPS)
async def h(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    backend, _, colour = request.param.partition("-")
    eq = new_soniq("asyncpg" if backend == "postgres" else backend, request, tmp_path)
    await eq.ensure_initialized()
    yield Harness(eq, colour or "async")
    await eq.close()


def jobs_of(eq: Soniq) -> tuple[Any, Any, Any]:
    @eq.job(name="billing.send_invoice", queue="invoices")
    async def send_invoice(order_id: int, note: str = "") -> str:
        return f"invoice {order_id}"

    @eq.job(name="media.resize")
    def resize(path: str, sizes: list[int] | None = None) -> None: ...

    @eq.job(name="mail.notify", queue="mail")
    def notify(user_id: int, urgent: bool = False) -> None: ...

    return send_invoice, resize, notify


# -- listing and asserting ---------------------------------------------------------


async def test_enqueued_jobs_lists_queued_jobs_by_job_and_queue(h: Harness) -> None:
    send_invoice, resize, notify = jobs_of(h.eq)
    a = await h.enqueue(send_invoice, order_id=1)
    b = await h.enqueue(resize, path="x.png")
    c = await h.enqueue(send_invoice, order_id=2, delay=3600)  # scheduled: still queued
    d = await h.enqueue(send_invoice, order_id=3, queue="other")
    cancelled = await h.enqueue(notify, user_id=1)
    await h.eq.cancel_job(cancelled)
    assert [j.id for j in await h(enqueued_jobs)] == [a, b, c, d]
    assert [j.id for j in await h(enqueued_jobs, send_invoice)] == [a, c, d]
    assert [j.id for j in await h(enqueued_jobs, "billing.send_invoice")] == [a, c, d]
    assert [j.id for j in await h(enqueued_jobs, send_invoice, queue="invoices")] == [a, c]
    assert [j.id for j in await h(enqueued_jobs, queue="other")] == [d]
    assert await h(enqueued_jobs, notify) == []
    first = (await h(enqueued_jobs, resize))[0]
    assert (first.args, first.status, first.run_at.utcoffset()) == (
        {"path": "x.png"},
        JobStatus.QUEUED,
        dt.timedelta(0),
    )
    # Running and finished jobs are no longer "enqueued".
    await drain(h.eq)
    assert [j.id for j in await h(enqueued_jobs)] == [c]


async def test_assert_enqueued_matches_a_subset_of_arguments_and_options(h: Harness) -> None:
    send_invoice, resize, notify = jobs_of(h.eq)
    run_at = dt.datetime(2100, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone.utc)
    inv = await h.enqueue(send_invoice, order_id=1, note="hi", priority=5, dedupe_key="o1")
    await h.enqueue(send_invoice, order_id=2)
    res = await h.enqueue(resize, path="a.png", sizes=[1, 2], run_at=run_at, timeout=9)
    await h.enqueue(notify, user_id=7, urgent=True, max_retries=0)

    job = await h(assert_enqueued, send_invoice, order_id=1)
    assert (job.id, job.args) == (inv, {"order_id": 1, "note": "hi"})
    assert (await h(assert_enqueued, "billing.send_invoice", note="hi")).id == inv
    assert (await h(assert_enqueued, send_invoice, priority=5, dedupe_key="o1")).id == inv
    assert (await h(assert_enqueued, resize, sizes=(1, 2), run_at=run_at, timeout=9.0)).id == res
    assert (await h(assert_enqueued, path=mock.ANY, queue="default")).id == res
    assert (await h(assert_enqueued, notify, urgent=True, max_retries=0)).args["user_id"] == 7
    # JSON equality: True is not 1, and 1 is not "1".
    with pytest.raises(AssertionError):
        await h(assert_enqueued, notify, urgent=1)
    with pytest.raises(AssertionError):
        await h(assert_enqueued, send_invoice, order_id="1")
    with pytest.raises(AssertionError):
        await h(assert_enqueued, send_invoice, order_id=1, queue="mail")
    with pytest.raises(TypeError, match="delay is not stored"):
        await h(assert_enqueued, send_invoice, delay=5)


async def test_assert_enqueued_failures_list_what_is_queued(h: Harness) -> None:
    send_invoice, resize, _ = jobs_of(h.eq)
    with pytest.raises(AssertionError, match=r"Queued jobs \(0\):\n  \(none\)"):
        await h(assert_enqueued, send_invoice)
    one = await h.enqueue(send_invoice, order_id=1)
    two = await h.enqueue(send_invoice, order_id=2, priority=3)
    three = await h.enqueue(resize, path="a.png")

    with pytest.raises(AssertionError) as none:
        await h(assert_enqueued, send_invoice, order_id=9)
    message = str(none.value)
    assert "billing.send_invoice(order_id=9); found none. Queued jobs (3):" in message
    assert f"#{one} billing.send_invoice(order_id=1) queue='invoices'" in message
    assert f"#{two} billing.send_invoice(order_id=2) queue='invoices' priority=3" in message
    assert f"#{three} media.resize(path='a.png') queue='default'" in message

    with pytest.raises(AssertionError) as several:
        await h(assert_enqueued, send_invoice)
    message = str(several.value)
    assert "expected exactly one queued job: billing.send_invoice; found 2:" in message
    assert "media.resize" not in message


async def test_assert_not_enqueued(h: Harness) -> None:
    send_invoice, _, notify = jobs_of(h.eq)
    await h(assert_not_enqueued)  # nothing at all
    job_id = await h.enqueue(send_invoice, order_id=1)
    await h(assert_not_enqueued, notify)
    await h(assert_not_enqueued, send_invoice, order_id=2)
    await h(assert_not_enqueued, send_invoice, queue="mail")
    with pytest.raises(AssertionError, match=rf"found 1:\n  #{job_id} billing.send_invoice"):
        await h(assert_not_enqueued, send_invoice, order_id=1)
    with pytest.raises(AssertionError, match="expected no queued job: any job; found 1"):
        await h(assert_not_enqueued)


# -- drain ---------------------------------------------------------------------------


async def test_drain_runs_ready_jobs_and_counts_what_happened(h: Harness) -> None:
    ran: list[tuple[str, int, int]] = []

    # The parent is sync and enqueues with eq.sync: drain(eq.sync) runs async jobs on
    # a loop of its own, where eq's PostgreSQL pool would have to open anew.
    @h.eq.job(name="t.parent")
    def parent(n: int) -> int:
        ran.append(("parent", n, current_job().attempt))
        h.eq.sync.enqueue(child, n=n)  # drained too: it is due
        return n * 10

    @h.eq.job(name="t.child")
    async def child(n: int) -> None:
        ran.append(("child", n, current_job().attempt))

    @h.eq.job(name="t.broken", max_retries=0)
    def broken() -> None:
        raise RuntimeError("broken on purpose")

    @h.eq.job(name="t.refuses")
    async def refuses() -> None:
        raise PermanentError("no point")

    p1 = await h.enqueue(parent, n=1)
    await h.enqueue(parent, n=2, priority=1)  # higher priority: runs first
    b = await h.enqueue(broken)
    r = await h.enqueue(refuses)
    u = await h.enqueue("t.unknown", x=1)  # no job of this Soniq: never claimed
    later = await h.enqueue(parent, n=3, delay=3600)

    result = await h(drain)
    assert result == DrainResult(done=4, failed=2)
    assert result.ran == 6
    assert dict(result.errors) == {
        b: "RuntimeError: broken on purpose",
        r: "PermanentError: no point",
    }
    unknown = await h.eq.get_job(u)
    assert (unknown.status, unknown.attempts, unknown.worker_id) == (JobStatus.QUEUED, 0, None)
    assert ran == [("parent", 2, 1), ("parent", 1, 1), ("child", 2, 1), ("child", 1, 1)]
    job = await h.eq.get_job(p1)
    assert (job.status, job.result, job.attempts) == (JobStatus.DONE, 10, 1)
    assert job.worker_id is not None and job.worker_id.startswith("drain-")
    assert (await h.eq.get_job(later)).status == JobStatus.QUEUED
    assert await h(drain) == DrainResult()


async def test_drain_counts_snoozes_apart_and_leaves_them_to_their_delay(h: Harness) -> None:
    @h.eq.job(name="t.waits", max_retries=0)
    async def waits() -> None:
        if current_job().id not in seen:
            seen.add(current_job().id)
            raise Snooze(3600)

    seen: set[int] = set()
    job_id = await h.enqueue(waits)
    assert await h(drain, raise_errors=True) == DrainResult(snoozed=1)  # due in an hour
    job = await h.eq.get_job(job_id)
    assert (job.status, job.snoozes, job.attempts) == (JobStatus.QUEUED, 1, 0)
    # run_retries makes retries due at once, not snoozes (a job may snooze forever).
    assert await h(drain, run_retries=True) == DrainResult()


async def test_drain_options(h: Harness) -> None:
    @h.eq.job(name="t.flaky", max_retries=2, backoff=Backoff(base=3600, jitter=0))
    def flaky(n: int) -> None:
        raise ValueError(f"attempt {current_job().attempt}")

    @h.eq.job(name="t.again")
    def again(n: int) -> None:
        h.eq.sync.enqueue(again, n=n + 1)  # forever

    @h.eq.job(name="t.mail", queue="mail")
    async def mail() -> None: ...

    first = await h.enqueue(flaky, n=1)
    assert await h(drain, queue="default") == DrainResult(retried=1)
    job = await h.eq.get_job(first)
    assert (job.status, job.attempts) == (JobStatus.QUEUED, 1)
    assert job.last_error == "ValueError: attempt 1"
    assert job.run_at > dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=59)

    second = await h.enqueue(flaky, n=2)
    result = await h(drain, run_retries=True)
    assert result == DrainResult(retried=2, failed=1)
    assert [e for _, e in result.errors] == [f"ValueError: attempt {n}" for n in (1, 2, 3)]
    assert (await h.eq.get_job(second)).status == JobStatus.FAILED

    third = await h.enqueue(flaky, n=3)
    with pytest.raises(ValueError, match="attempt 1"):
        await h(drain, raise_errors=True)
    assert (await h.eq.get_job(third)).attempts == 1  # the run was recorded first

    await h.enqueue(again, n=0)
    assert await h(drain, max_jobs=5) == DrainResult(done=5)
    await h.enqueue(mail)
    assert await h(drain, queue=["mail"], max_jobs=10) == DrainResult(done=1)
    with pytest.raises(ValueError, match="max_jobs"):
        await h(drain, max_jobs=0)
    with pytest.raises(ValueError, match="queue"):
        await h(drain, queue=[])


async def test_drain_applies_timeouts(h: Harness) -> None:
    @h.eq.job(name="t.slow_async", timeout=0.1, max_retries=0)
    async def slow_async() -> None:
        await asyncio.sleep(30)

    @h.eq.job(name="t.slow_sync", timeout=0.1, max_retries=0)
    def slow_sync() -> None:
        time.sleep(0.3)

    ids = [await h.enqueue(slow_async), await h.enqueue(slow_sync)]
    # Without its timeout the async job would hold the drain for 30 s.
    result = await asyncio.wait_for(h(drain), 20)
    assert result == DrainResult(failed=2)
    for job_id in ids:
        error = (await h.eq.get_job(job_id)).last_error
        assert error == f"{JobTimeout.__qualname__}: job ran past its timeout of 0.1s"


# -- memory only ---------------------------------------------------------------------


async def test_drain_sync_runs_sync_jobs_on_the_calling_thread() -> None:
    eq = Soniq("memory://")
    threads: dict[str, int] = {}

    @eq.job(name="t.where")
    def where(tag: str) -> None:
        threads[tag] = threading.get_ident()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            threads[tag + "-no-loop"] = 1

    eq.sync.enqueue(where, tag="sync")

    def blocking_test() -> tuple[DrainResult, int]:
        return drain(eq.sync), threading.get_ident()

    result, test_thread = await asyncio.to_thread(blocking_test)
    assert result == DrainResult(done=1)
    assert threads["sync"] == test_thread and "sync-no-loop" in threads

    await eq.enqueue(where, tag="async")
    assert await drain(eq) == DrainResult(done=1)
    assert threads["async"] != threading.get_ident()  # a thread, as the worker does

    with pytest.raises(RuntimeError, match="await drain"):
        drain(eq.sync)


@pytest.mark.parametrize("queue", ["", [], ["ok", ""], "a,b", ["a,b"], 3])
def test_drain_refuses_what_enqueue_refuses_as_a_queue_name(queue: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="queue"):
        drain(Soniq("memory://").sync, queue=queue)


async def test_cancelling_a_drain_stops_it_and_puts_its_job_back() -> None:
    """The drain's own cancellation (a test's timeout) is not the job's failure: it
    propagates at once, and the job goes back to the queue, its attempt not counted."""
    eq = Soniq("memory://")
    started = asyncio.Event()

    @eq.job(name="t.forever")
    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    job_id = await eq.enqueue(forever)
    drained = asyncio.ensure_future(drain(eq))
    await asyncio.wait_for(started.wait(), 10)
    drained.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(drained, 10)
    job = await eq.get_job(job_id)
    assert job is not None and job.status == JobStatus.QUEUED and job.attempts == 0


async def test_fake_clock_makes_scheduled_jobs_and_retries_due() -> None:
    eq = Soniq("memory://")
    clock = FakeClock(dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc))
    use_clock(eq.sync, clock)  # the twin shares the store, so eq sees it too

    @eq.job(name="t.once", backoff=Backoff(base=60, jitter=0))
    def once() -> None:
        if current_job().attempt == 1:
            raise RuntimeError("first")

    job_id = await eq.enqueue(once, delay=dt.timedelta(hours=1))
    job = await eq.get_job(job_id)
    assert job.created_at == clock.now and job.run_at == clock.now + dt.timedelta(hours=1)
    assert await drain(eq) == DrainResult()
    clock.advance(3600)
    assert await drain(eq) == DrainResult(retried=1)
    assert (await eq.get_job(job_id)).run_at == clock.now + dt.timedelta(seconds=60)
    clock.advance(dt.timedelta(seconds=59))
    assert await drain(eq) == DrainResult()
    clock.advance(1)
    assert await drain(eq) == DrainResult(done=1)
    with pytest.raises(ValueError):
        clock.advance(-1)
    with pytest.raises(ValueError, match="aware"):
        FakeClock(dt.datetime(2030, 1, 1))


async def test_clear_jobs_empties_the_memory_store() -> None:
    eq = Soniq("memory://")

    @eq.job(name="t.noop")
    def noop() -> None: ...

    await eq.enqueue(noop, dedupe_key="k")
    eq.sync.enqueue(noop)
    clear_jobs(eq)
    assert await enqueued_jobs(eq) == []
    assert await eq.enqueue(noop, dedupe_key="k") == 1  # ids and keys start afresh


async def test_memory_refuses_connection_and_postgres_refuses_the_clock(
    database_url: str, schema: str
) -> None:
    eq = Soniq("memory://")
    with pytest.raises(ValueError, match="no caller's transaction"):
        await enqueued_jobs(eq, connection=object())
    with pytest.raises(ValueError, match="no caller's transaction"):
        assert_enqueued(eq.sync, "x", connection=object())
    pg = Soniq(database_url, schema=schema)
    with pytest.raises(TypeError, match="only memory://"):
        use_clock(pg, FakeClock())
    with pytest.raises(TypeError, match="only memory://"):
        clear_jobs(pg.sync)
    with pytest.raises(TypeError, match="expected a Soniq"):
        enqueued_jobs(object())  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="expected a Soniq"):
        drain(object())  # type: ignore[call-overload]


# -- PostgreSQL: inside the test's uncommitted transaction ---------------------------


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_asyncpg_transaction_is_visible_through_its_connection(
    database_url: str, schema: str, driver: str
) -> None:
    """Soniq on either async driver; the caller's connection is asyncpg (the psycopg
    Soniq runs the query with the asyncpg driver: the connection decides)."""
    eq = Soniq(database_url, driver=driver, schema=schema)
    send_invoice, _, _ = jobs_of(eq)
    await eq.ensure_initialized()
    conn = await asyncpg.connect(database_url)
    try:
        transaction = conn.transaction()
        await transaction.start()
        job_id = await eq.enqueue(send_invoice, connection=conn, order_id=7)
        job = await assert_enqueued(eq, send_invoice, order_id=7, connection=conn)
        assert job.id == job_id and job.run_at.utcoffset() == dt.timedelta(0)
        assert [j.id for j in await enqueued_jobs(eq, connection=conn)] == [job_id]
        await assert_not_enqueued(eq, send_invoice)  # Soniq's pool: not committed
        assert await drain(eq) == DrainResult()  # nor claimable
        await transaction.rollback()
        await assert_not_enqueued(eq, send_invoice, connection=conn)
    finally:
        await conn.close()
        await eq.close()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_psycopg_async_transaction_is_visible_through_its_connection(
    database_url: str, schema: str, driver: str
) -> None:
    eq = Soniq(database_url, driver=driver, schema=schema)
    _, resize, _ = jobs_of(eq)
    await eq.ensure_initialized()
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await eq.enqueue(resize, connection=conn, path="a.png")
        await eq.enqueue(resize, connection=conn, path="b.png")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        job = await assert_enqueued(eq, resize, path="b.png", connection=conn)
        assert job.args == {"path": "b.png"}
        assert len(await enqueued_jobs(eq, resize, connection=conn)) == 2
        assert await enqueued_jobs(eq) == []
        await conn.rollback()
        assert await enqueued_jobs(eq, connection=conn) == []
    await eq.close()


def test_psycopg_and_psycopg2_transactions_with_the_sync_twin(
    database_url: str, schema: str
) -> None:
    import psycopg2

    eq = Soniq(database_url, schema=schema)
    _, _, notify = jobs_of(eq)
    eq.sync.ensure_initialized()
    try:
        with psycopg.connect(database_url) as conn:
            job_id = eq.sync.enqueue(notify, connection=conn, user_id=1)
            assert assert_enqueued(eq.sync, notify, user_id=1, connection=conn).id == job_id
            assert_not_enqueued(eq.sync, notify)
            conn.rollback()
            assert enqueued_jobs(eq.sync, connection=conn) == []
        conn2 = psycopg2.connect(database_url)
        try:
            eq.sync.enqueue(notify, connection=conn2, user_id=2, urgent=True)
            job = assert_enqueued(eq.sync, "mail.notify", urgent=True, connection=conn2)
            assert job.args == {"user_id": 2, "urgent": True}
            assert enqueued_jobs(eq.sync) == []
            conn2.rollback()
            assert_not_enqueued(eq.sync, connection=conn2)
        finally:
            conn2.close()
    finally:
        eq.sync.close()


def test_django_atomic_block(django_connection: Any, schema: str, database_url: str) -> None:
    from django.db import transaction

    eq = Soniq(database_url, schema=schema)
    send_invoice, _, _ = jobs_of(eq)
    eq.sync.ensure_initialized()
    try:
        with transaction.atomic():
            eq.sync.enqueue(send_invoice, connection=django_connection, order_id=3)
            assert_enqueued(eq.sync, send_invoice, order_id=3, connection=django_connection)
            assert_not_enqueued(eq.sync, send_invoice)
            transaction.set_rollback(True)
        assert_not_enqueued(eq.sync, send_invoice, connection=django_connection)
    finally:
        eq.sync.close()


def test_drain_of_eq_sync_runs_jobs_inside_djangos_open_transaction(
    django_connection: Any, schema: str, database_url: str
) -> None:
    """What a Django ``TestCase`` does: the jobs run on the calling thread, inside
    its atomic block, and see what it wrote (the drain closes none of its
    connections, as the worker does around its jobs)."""
    from django.db import transaction

    eq = Soniq(database_url, schema=schema)
    seen: list[int] = []

    @eq.job(name="reads_django")
    def reads_django() -> None:
        with django_connection.cursor() as cur:
            cur.execute("SELECT count(*) FROM drain_probe")
            seen.append(cur.fetchone()[0])

    eq.sync.ensure_initialized()
    try:
        eq.sync.enqueue(reads_django)
        with transaction.atomic():
            with django_connection.cursor() as cur:
                cur.execute("CREATE TEMP TABLE drain_probe AS SELECT 1 AS x")
            assert drain(eq.sync, raise_errors=True) == DrainResult(done=1)
            assert seen == [1]
            transaction.set_rollback(True)
    finally:
        eq.sync.close()


# -- the documentation's examples ----------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "testing.md"
DOC_URL = '"postgresql://localhost/myapp_test"'


def doc_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(doc_examples())))
def test_docs_examples_pass_under_pytest(
    pytester: pytest.Pytester, request: pytest.FixtureRequest, index: int
) -> None:
    code = doc_examples()[index]
    if DOC_URL in code:
        url, schema = request.getfixturevalue("database_url"), request.getfixturevalue("schema")
        code = code.replace(DOC_URL, repr(url))
        code = code.replace("Soniq(DATABASE_URL)", f"Soniq(DATABASE_URL, schema={schema!r})")
    tests = len(re.findall(r"^(?:async )?def test_", code, re.M))
    assert tests, "each example is a test module"
    pytester.makepyfile(**{f"test_doc_example_{index}": code})
    result = pytester.runpytest(
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_mode=auto",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
    )
    result.assert_outcomes(passed=tests)


def test_a_timeout_is_recorded_once_however_often_it_is_asked() -> None:
    """drain asks a timed-out run for its outcome before cancelling the body (so that
    middleware see it) and again once the body has ended: the same outcome both
    times (one retry delay, not two draws of its jitter), and the timeout is the
    run's error again even if the abandoned body raised meanwhile."""
    from soniq.core.jobs import Claimed
    from soniq.worker.execute import JobRun

    eq = Soniq("memory://")

    @eq.job(max_retries=3)
    def slow() -> None: ...

    definition = eq.registry.get(slow.__module__ + "." + slow.__qualname__)
    assert definition is not None
    run = JobRun.of(definition, Claimed(1, definition.name, "default", {}, 1, 3, 0.5), "w1")
    first = run.timed_out()
    run.error = ValueError("the abandoned body raised")
    assert run.timed_out() is first and run.recorded is first
    assert isinstance(run.error, JobTimeout)
    assert first.retry_in is not None  # retried, after one back-off
