"""Middleware (``@eq.middleware``, soniq/middleware.py): around runs and enqueues, on
every backend; the headers they add travel with the job on every insert path (single,
many, group commit, graphs, dedupe replace, a caller's connection, the sync twin) and
come back from the claim and ``get_job``."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

import soniq
import soniq.testing
from soniq import EnqueueContext, JobStatus, RunContext, Soniq
from tests.conftest import BACKENDS, async_wait_until, migrated_soniq

pytestmark = pytest.mark.timeout(60)

BURST = {"burst": True, "burst_wait": 0, "concurrency": 4}


def tagging(eq: Soniq, headers: dict[str, str]) -> list[EnqueueContext]:
    """An enqueue middleware adding ``headers``; the contexts it saw."""
    seen: list[EnqueueContext] = []

    @eq.middleware(on="enqueue")
    @contextlib.contextmanager
    def tag(ctx: EnqueueContext) -> Iterator[None]:
        ctx.headers.update(headers)
        seen.append(ctx)
        yield

    return seen


def recording(eq: Soniq) -> list[tuple[int, str, dict[str, str], str | None]]:
    """A run middleware recording (id, name, headers, outcome) of each run."""
    runs: list[tuple[int, str, dict[str, str], str | None]] = []

    @eq.middleware
    @contextlib.contextmanager
    def record(ctx: RunContext) -> Iterator[None]:
        try:
            yield
        finally:
            runs.append((ctx.id, ctx.name, dict(ctx.headers), ctx.outcome))

    return runs


# -- headers, on every insert path ------------------------------------------------


async def test_headers_travel_with_every_kind_of_enqueue(any_eq: Soniq) -> None:
    eq = any_eq

    @eq.job(name="mw.add")
    async def add(n: int) -> int:
        return n + 1

    plain = await eq.enqueue(add, n=0)  # before any middleware: no headers
    seen = tagging(eq, {"traceparent": "00-abc-def-01", "tenant": "ü"})
    runs = recording(eq)
    one = await eq.enqueue(add, n=1)
    many = await eq.enqueue_many(add, [{"n": 2}, {"n": 3}])
    group = await eq.enqueue_group([(add, {"n": 4}), (add, {"n": 5})], then=(add, {"n": 6}))
    chain = await eq.enqueue_chain([(add, {"n": 7}), (add, {"n": 8})])
    child = await eq.enqueue(add, depends_on=[one], n=9)
    keyed = await eq.enqueue(add, dedupe_key="k", n=10)
    replaced = await eq.enqueue(add, dedupe_key="k", dedupe="replace", n=11)
    assert replaced == keyed
    ids = [one, *many, *group, *chain, child, keyed]
    expected = {"traceparent": "00-abc-def-01", "tenant": "ü"}
    for job_id in ids:
        job = await eq.get_job(job_id)
        assert job is not None and job.headers == expected, job_id
    assert (await eq.get_job(plain)).headers == {}  # type: ignore[union-attr]
    assert [c.operation for c in seen] == [
        "enqueue",
        "enqueue_many",
        "enqueue_group",
        "enqueue_chain",
        "enqueue",
        "enqueue",
        "enqueue",
    ]
    assert [j.name for j in seen[1].jobs] == ["mw.add", "mw.add"]
    assert [j.args for j in seen[1].jobs] == [{"n": 2}, {"n": 3}]
    assert seen[1].ids == many and seen[2].ids == group
    assert seen[1].counts == (("default", "mw.add", 2),) and seen[1].queue == "default"
    assert sum(n for *_, n in seen[2].counts) == len(seen[2].jobs) == 3
    assert not any(c.transactional for c in seen)

    await eq.run_worker(**BURST)
    by_id = {job_id: headers for job_id, _, headers, _ in runs}
    assert set(ids) <= set(by_id)
    assert all(by_id[i] == expected for i in ids)
    assert by_id[plain] == {}
    assert {outcome for *_, outcome in runs} == {"done"}


async def test_limited_claims_return_the_headers_too(any_eq: Soniq) -> None:
    """The claim of jobs under limits is a statement of its own (and so is a claim in
    a queue with stored limits)."""

    @any_eq.job(name="mw.limited", concurrency=1)
    async def limited(n: int) -> None: ...

    @any_eq.job(name="mw.in_limited_queue", queue="slow")
    async def in_limited_queue(n: int) -> None: ...

    await any_eq.set_queue_limits("slow", concurrency=2)
    tagging(any_eq, {"k": "v"})
    runs = recording(any_eq)
    ids = [await any_eq.enqueue(limited, n=n) for n in range(3)]
    ids += [await any_eq.enqueue(in_limited_queue, n=n) for n in range(3)]
    await any_eq.run_worker(**BURST)
    assert sorted(i for i, *_ in runs) == sorted(ids)
    assert all(headers == {"k": "v"} and outcome == "done" for *_, headers, outcome in runs)


async def test_group_commit_keeps_each_callers_headers(eq: Soniq) -> None:
    """Concurrent enqueues merged into one statement (soniq.drivers.insert_lines):
    each row gets the headers of its own call."""
    calls = 0

    @eq.middleware(on="enqueue")
    @contextlib.contextmanager
    def number(ctx: EnqueueContext) -> Iterator[None]:
        nonlocal calls
        calls += 1
        ctx.headers["n"] = str(ctx.jobs[0].args["n"])
        yield

    ids = await asyncio.gather(*(eq.enqueue("mw.any", n=n) for n in range(200)))
    line = eq.backend.insert_line()  # type: ignore[attr-defined]
    assert sum(size * count for size, count in line.batches.items() if size > 1) > 0
    for n, job_id in enumerate(ids):
        job = await eq.get_job(job_id)
        assert job is not None and job.headers == {"n": str(n)} and job.args == {"n": n}
    assert calls == 200


async def test_headers_on_a_callers_connection(database_url: str, schema: str, eq: Soniq) -> None:
    seen = tagging(eq, {"request": "r1"})
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            a = await eq.enqueue("mw.any", connection=conn, n=1)
            b = await eq.enqueue_many("mw.any", [{"n": 2}], connection=conn)
    finally:
        await conn.close()
    async with await psycopg.AsyncConnection.connect(database_url) as aconn:
        c = await eq.enqueue_chain([("mw.any", {"n": 3})], connection=aconn)
    assert all(ctx.transactional for ctx in seen)
    for job_id in (a, *b, *c):
        job = await eq.get_job(job_id)
        assert job is not None and job.headers == {"request": "r1"}


def test_sync_twin_enqueues_run_sync_middleware(sync_eq: Soniq, database_url: str) -> None:
    tagging(sync_eq, {"from": "sync"})
    job_id = sync_eq.sync.enqueue("mw.any", n=1)
    many = sync_eq.sync.enqueue_many("mw.any", [{"n": 2}, {"n": 3}])
    with psycopg.connect(database_url) as conn:
        on_conn = sync_eq.sync.enqueue("mw.any", connection=conn, n=4)
    group = sync_eq.sync.enqueue_group([("mw.any", {"n": 5})])
    for i in (job_id, *many, on_conn, *group):
        job = sync_eq.sync.get_job(i)
        assert job is not None and job.headers == {"from": "sync"}


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_sync_twin_on_the_embedded_backends(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    from tests.conftest import new_soniq

    eq = new_soniq(kind, request, tmp_path)
    try:
        eq.sync.ensure_initialized()
        tagging(eq, {"from": "sync"})
        ids = [eq.sync.enqueue("mw.any", n=1), *eq.sync.enqueue_many("mw.any", [{"n": 2}])]
        for i in ids:
            job = eq.sync.get_job(i)
            assert job is not None and job.headers == {"from": "sync"}
    finally:
        eq.sync.close()


def test_an_async_enqueue_middleware_is_refused_by_the_sync_twin(sync_eq: Soniq) -> None:
    @sync_eq.middleware(on="enqueue")
    @contextlib.asynccontextmanager
    async def tag(ctx: EnqueueContext) -> AsyncIterator[None]:
        yield

    with pytest.raises(TypeError, match=r"eq\.sync's enqueues need a sync one"):
        sync_eq.sync.enqueue("mw.any", n=1)
    assert sync_eq.sync.list_jobs() == []


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({"n": 1}, TypeError),
        ({1: "x"}, TypeError),
        ({"k": "a\x00b"}, ValueError),
        ({"k": "x" * 9000}, ValueError),
    ],
)
async def test_bad_headers_are_refused_before_any_insert(
    any_eq: Soniq, headers: dict[Any, Any], error: type[Exception]
) -> None:
    @any_eq.middleware(on="enqueue")
    @contextlib.contextmanager
    def bad(ctx: EnqueueContext) -> Iterator[None]:
        ctx.headers.update(headers)
        yield

    with pytest.raises(error, match=r"EnqueueContext\.headers"):
        await any_eq.enqueue("mw.any", n=1)
    assert await any_eq.list_jobs() == []


async def test_an_enqueue_middleware_sees_the_inserts_error(any_eq: Soniq) -> None:
    errors: list[BaseException | None] = []

    @any_eq.middleware(on="enqueue")
    @contextlib.contextmanager
    def watch(ctx: EnqueueContext) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            errors.append(exc)
            raise
        errors.append(None)

    await any_eq.enqueue("mw.any", n=1)
    with pytest.raises(soniq.JobNotFound):
        await any_eq.enqueue("mw.any", depends_on=[10**9], n=2)
    assert errors[0] is None and isinstance(errors[1], soniq.JobNotFound)


# -- runs ------------------------------------------------------------------------


async def test_run_middleware_order_outcomes_and_errors(any_eq: Soniq) -> None:
    eq = any_eq
    events: list[str] = []

    @eq.job(name="mw.ok")
    async def ok() -> str:
        events.append("body")
        return "fine"

    @eq.job(name="mw.boom", max_retries=0)
    async def boom() -> None:
        raise RuntimeError("boom")

    @eq.job(name="mw.again", max_retries=3)
    def again() -> None:
        raise ValueError("later")

    @eq.job(name="mw.snooze")
    async def snooze() -> None:
        raise soniq.Snooze(3600)

    @eq.middleware
    @contextlib.contextmanager
    def outer(ctx: RunContext) -> Iterator[None]:
        events.append(f"outer in {ctx.name}")
        try:
            yield
        except BaseException as exc:
            events.append(f"outer saw {type(exc).__name__} {ctx.outcome}")
            raise
        events.append(f"outer out {ctx.outcome}")

    @eq.middleware
    @contextlib.asynccontextmanager
    async def inner(ctx: RunContext) -> AsyncIterator[None]:
        events.append("inner in")
        yield
        events.append("inner out")

    ids = {}
    for job in (ok, boom, again, snooze):
        ids[job.__name__] = await eq.enqueue(job)
        await eq.run_worker(**BURST)
    assert events[:5] == ["outer in mw.ok", "inner in", "body", "inner out", "outer out done"]
    assert "outer saw RuntimeError failed" in events
    assert "outer saw ValueError retried" in events
    assert "outer saw Snooze snoozed" in events
    boom_job = await eq.get_job(ids["boom"])
    assert boom_job is not None and boom_job.status is JobStatus.FAILED
    assert boom_job.last_error == "RuntimeError: boom"
    assert (await eq.get_job(ids["ok"])).result == "fine"  # type: ignore[union-attr]


async def test_a_middleware_cannot_swallow_a_failure(any_eq: Soniq) -> None:
    @any_eq.job(name="mw.fails", max_retries=0)
    async def fails() -> None:
        raise RuntimeError("real failure")

    @any_eq.middleware
    @contextlib.contextmanager
    def swallow(ctx: RunContext) -> Iterator[None]:
        with contextlib.suppress(BaseException):
            yield

    job_id = await any_eq.enqueue(fails)
    await any_eq.run_worker(**BURST)
    job = await any_eq.get_job(job_id)
    assert job is not None and job.status is JobStatus.FAILED
    assert job.last_error == "RuntimeError: real failure"


async def test_a_middleware_that_raises_fails_the_run(any_eq: Soniq) -> None:
    ran: list[int] = []

    @any_eq.job(name="mw.body", max_retries=0)
    async def body(n: int) -> None:
        ran.append(n)

    @any_eq.middleware
    @contextlib.contextmanager
    def refuse(ctx: RunContext) -> Iterator[None]:
        if ctx.job.id % 2:  # odd ids: refused before the body
            raise PermissionError("not now")
        yield
        raise LookupError("after the body")  # even ids: the exit fails the run

    first = await any_eq.enqueue(body, n=1)
    second = await any_eq.enqueue(body, n=2)
    await any_eq.run_worker(**BURST)
    jobs = {i: await any_eq.get_job(i) for i in (first, second)}
    errors = {i % 2: j.last_error for i, j in jobs.items() if j is not None}
    assert errors == {1: "PermissionError: not now", 0: "LookupError: after the body"}
    assert all(j is not None and j.status is JobStatus.FAILED for j in jobs.values())
    assert len(ran) == 1  # only the even one's body ran


async def test_sync_middleware_runs_in_a_sync_jobs_thread(any_eq: Soniq) -> None:
    threads: dict[str, int] = {}
    local = threading.local()

    @any_eq.job(name="mw.threaded")
    def threaded() -> str:
        threads["body"] = threading.get_ident()
        return str(local.value)

    @any_eq.middleware
    @contextlib.contextmanager
    def sync_mw(ctx: RunContext) -> Iterator[None]:
        threads["sync"] = threading.get_ident()
        local.value = f"set for {ctx.id}"
        yield

    @any_eq.middleware
    @contextlib.asynccontextmanager
    async def async_mw(ctx: RunContext) -> AsyncIterator[None]:
        threads["async"] = threading.get_ident()
        assert not ctx.is_async
        yield

    job_id = await any_eq.enqueue(threaded)
    await any_eq.run_worker(**BURST)
    job = await any_eq.get_job(job_id)
    assert job is not None and job.result == f"set for {job_id}"
    assert threads["sync"] == threads["body"] != threading.get_ident()
    assert threads["async"] == threading.get_ident()  # on the worker's loop


@pytest.mark.skipif(sys.version_info < (3, 11), reason="a task's context= is 3.11+")
async def test_an_async_middleware_around_a_sync_job_resets_what_it_set(any_eq: Soniq) -> None:
    """Its enter and exit run on the loop in one context, as around an async job: a
    context variable set on enter can be reset on exit (OpenTelemetry's attach and
    detach do this), by the worker and by drain."""
    var: contextvars.ContextVar[str | None] = contextvars.ContextVar("mw_var", default=None)
    seen: list[str | None] = []

    @any_eq.job(name="mw.plain_sync", max_retries=0)
    def plain_sync() -> str:
        return "ok"

    @any_eq.middleware
    @contextlib.asynccontextmanager
    async def scoped(ctx: RunContext) -> AsyncIterator[None]:
        token = var.set(f"run {ctx.id}")
        try:
            yield
        finally:
            seen.append(var.get())
            var.reset(token)

    by_worker = await any_eq.enqueue(plain_sync)
    await any_eq.run_worker(**BURST)
    by_drain = await any_eq.enqueue(plain_sync)
    await soniq.testing.drain(any_eq)
    for job_id in (by_worker, by_drain):
        job = await any_eq.get_job(job_id)
        assert job is not None and job.status is JobStatus.DONE, job and job.last_error
    assert seen == [f"run {by_worker}", f"run {by_drain}"]


async def test_a_timed_out_job_tells_its_middleware(any_eq: Soniq) -> None:
    outcomes: list[str | None] = []
    release = asyncio.Event()

    @any_eq.job(name="mw.slow", timeout=0.2, max_retries=0)
    async def slow() -> None:
        await release.wait()

    @any_eq.middleware
    @contextlib.contextmanager
    def watch(ctx: RunContext) -> Iterator[None]:
        try:
            yield
        finally:
            outcomes.append(ctx.outcome)

    job_id = await any_eq.enqueue(slow)
    await any_eq.run_worker(**BURST)
    job = await any_eq.get_job(job_id)
    assert job is not None and job.status is JobStatus.FAILED
    assert outcomes == ["failed"]


async def test_drain_tells_middleware_of_a_timeout_as_the_worker_does(any_eq: Soniq) -> None:
    """A sync job past its timeout, and an async one that swallows its cancellation
    and returns: the worker records them failed before they end, so their middleware
    see "failed"; drain must tell them the same."""

    @any_eq.job(name="mw.slow_sync", timeout=0.2, max_retries=0)
    def slow_sync() -> None:
        time.sleep(0.5)

    @any_eq.job(name="mw.swallows", timeout=0.2, max_retries=0)
    async def swallows() -> str:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(5)
        return "returned anyway"

    runs = recording(any_eq)
    ids = [await any_eq.enqueue(slow_sync), await any_eq.enqueue(swallows)]
    await soniq.testing.drain(any_eq)
    for job_id in ids:
        job = await any_eq.get_job(job_id)
        assert job is not None and job.status is JobStatus.FAILED
        assert job.last_error is not None and "JobTimeout" in job.last_error
    # (drain leaves a timed-out sync job's thread behind, as the worker does: its
    # middleware exit when the body returns)
    await async_wait_until(lambda: len(runs) == 2, 10, "both runs' middleware exited")
    assert [outcome for *_, outcome in runs] == ["failed", "failed"]


@pytest.mark.parametrize("kind", BACKENDS)
async def test_no_middleware_takes_the_plain_path(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    """Without middleware a run has none to enter (the single ``if``) and nothing is
    stored in the headers column."""
    from soniq.worker.execute import JobRun

    made: list[JobRun] = []
    original = JobRun.of.__func__  # type: ignore[attr-defined]

    def spy(cls: type[JobRun], *args: Any, **kwargs: Any) -> JobRun:
        run = original(cls, *args, **kwargs)
        made.append(run)
        return run

    async with migrated_soniq(kind, request, tmp_path) as eq:

        @eq.job(name="mw.plain")
        async def plain() -> None: ...

        job_id = await eq.enqueue(plain)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(JobRun, "of", classmethod(spy))
            await eq.run_worker(**BURST)
        assert [r.middleware for r in made] == [()]
        assert made[0].loop is None and made[0].headers is None
        assert (await eq.get_job(job_id)).headers == {}  # type: ignore[union-attr]


def test_headers_column_stays_null_without_middleware(
    sync_eq: Soniq, pg: psycopg.Connection, schema: str
) -> None:
    job_id = sync_eq.sync.enqueue("mw.any", n=1)
    row = pg.execute(f'SELECT headers FROM "{schema}".soniq_jobs WHERE id = %s', (job_id,))
    assert row.fetchone() == (None,)


def test_importing_soniq_loads_neither_prometheus_nor_opentelemetry() -> None:
    probe = (
        "import sys, soniq, soniq.testing, soniq.middleware\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(loaded & {'prometheus_client', 'opentelemetry'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_middleware_registration_is_checked() -> None:
    eq = Soniq("memory://")
    with pytest.raises(TypeError, match="must be callable"):
        eq.middleware(42)  # type: ignore[type-var]
    with pytest.raises(ValueError, match="'run' or 'enqueue'"):
        eq.middleware(on="claim")(lambda ctx: contextlib.nullcontext())  # type: ignore[call-overload]


async def test_testing_drain_runs_the_run_middleware(any_eq: Soniq) -> None:
    """soniq.testing.drain runs a job as a worker does: inside its middleware."""
    from soniq.testing import drain

    runs = recording(any_eq)
    tagging(any_eq, {"tenant": "acme"})

    @any_eq.job(name="mw.drained", max_retries=0)
    def drained(n: int) -> int:
        return n

    job_id = await any_eq.enqueue(drained, n=3)
    await drain(any_eq)
    assert runs == [(job_id, "mw.drained", {"tenant": "acme"}, "done")]


def test_a_blocking_drain_runs_sync_middleware_without_a_loop(tmp_path: Path) -> None:
    """drain(eq.sync) runs sync jobs with no event loop: sync middleware still wrap
    them (an async one cannot, and says so)."""
    from soniq.testing import drain

    eq = Soniq(f"sqlite:///{tmp_path / 'drain.db'}")
    eq.sync.ensure_initialized()
    runs = recording(eq)

    @eq.job(name="mw.blocking")
    def blocking() -> str:
        return "ok"

    job_id = eq.sync.enqueue(blocking)
    drain(eq.sync)
    assert runs == [(job_id, "mw.blocking", {}, "done")]
    eq.sync.close()


def test_a_blocking_drain_tells_middleware_of_a_sync_jobs_timeout(tmp_path: Path) -> None:
    """drain(eq.sync) records a sync job past its timeout at the deadline, as the
    worker does, so its middleware see "failed" when the body returns."""
    from soniq.testing import drain

    eq = Soniq(f"sqlite:///{tmp_path / 'drain.db'}")
    eq.sync.ensure_initialized()
    runs = recording(eq)

    @eq.job(name="mw.overdue", timeout=0.2, max_retries=0)
    def overdue() -> None:
        time.sleep(0.5)

    job_id = eq.sync.enqueue(overdue)
    drain(eq.sync)
    assert runs == [(job_id, "mw.overdue", {}, "failed")]
    job = eq.sync.get_job(job_id)
    assert job is not None and job.last_error is not None and "JobTimeout" in job.last_error
    eq.sync.close()


def test_a_blocking_drain_names_an_async_middleware_it_cannot_run(tmp_path: Path) -> None:
    from soniq.testing import drain

    eq = Soniq(f"sqlite:///{tmp_path / 'drain.db'}")
    eq.sync.ensure_initialized()

    @eq.middleware
    @contextlib.asynccontextmanager
    async def tracing(ctx: RunContext) -> AsyncIterator[None]:
        yield

    @eq.job(name="mw.blocking_async_mw", max_retries=0)
    def blocking() -> str:
        return "ok"

    job_id = eq.sync.enqueue(blocking)
    drain(eq.sync)
    job = eq.sync.get_job(job_id)
    assert job is not None and job.status is JobStatus.FAILED
    assert "use `await drain(eq)`, or make the middleware sync" in (job.last_error or "")
    eq.sync.close()
