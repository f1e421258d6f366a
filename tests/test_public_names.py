"""Public names that no other test exercised: the error hierarchy (``SoniqError`` is
what the CLI and callers catch), ``WorkerConfig`` and its refusals, every
``JobContext`` field as a running job sees it, ``current_job()`` outside a job,
``retention=None``, and the options ``@eq.job`` checks when it decorates."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from typing import Any

import attrs
import psycopg
import pytest

import soniq
from soniq import (
    Backoff,
    ConfigurationError,
    JobContext,
    JobDefinition,
    JobDefinitionError,
    JobStatus,
    Soniq,
    SoniqError,
    UnknownJobError,
    WorkerConfig,
    current_job,
)
from tests.conftest import async_wait_until

pytestmark = pytest.mark.timeout(60)


# -- the errors ---------------------------------------------------------------------------


def test_every_public_name_is_importable_and_every_error_is_a_soniq_error() -> None:
    for name in soniq.__all__:
        assert hasattr(soniq, name), name
    errors = [getattr(soniq, n) for n in soniq.__all__ if n.endswith(("Error", "Timeout"))]
    errors.append(soniq.DatabaseUnavailable)
    assert len(errors) >= 11
    assert all(issubclass(e, SoniqError) for e in errors)
    # ... and each is also the builtin error a caller would catch without knowing Soniq.
    assert issubclass(soniq.SerializationError, ValueError)
    assert issubclass(soniq.ConfigurationError, ValueError)
    assert issubclass(soniq.JobArgumentsError, TypeError)
    assert issubclass(soniq.JobDefinitionError, TypeError)
    assert issubclass(soniq.UnknownJobError, LookupError)
    assert issubclass(soniq.JobTimeout, TimeoutError)
    assert issubclass(soniq.DatabaseUnavailable, ConnectionError)


# -- WorkerConfig -------------------------------------------------------------------------


#: The defaults the documentation states (settings added later are not held here).
DOCUMENTED_DEFAULTS = {
    "queues": None,
    "concurrency": 10,
    "burst": False,
    "poll_interval": 1.0,
    "listen": True,
    "heartbeat_interval": 2.0,
    "stale_after": 30.0,
    "shutdown_timeout": 30.0,
    "retention": 7 * 24 * 3600.0,
    "summary_interval": 60.0,
}


def test_worker_config_defaults_and_conversions() -> None:
    config = WorkerConfig()
    defaults = attrs.asdict(config)
    assert {name: defaults[name] for name in DOCUMENTED_DEFAULTS} == DOCUMENTED_DEFAULTS
    assert WorkerConfig(queues="mail,,reports").queues == ("mail", "reports")
    assert WorkerConfig(queues=["mail"]).queues == ("mail",)
    assert WorkerConfig(retention=None).retention is None
    assert WorkerConfig(retention=0).retention == 0
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.concurrency = 5  # type: ignore[misc]


BAD_SETTINGS = [
    ({"concurrency": 0}, "concurrency must be a positive number"),
    ({"concurrency": -3}, "concurrency must be a positive number"),
    ({"concurrency": 2.5}, "concurrency must be an int"),
    ({"concurrency": True}, "concurrency must be a positive number"),
    ({"concurrency": "10"}, "concurrency must be a positive number"),
    ({"poll_interval": 0}, "poll_interval must be a positive number"),
    ({"poll_interval": -1}, "poll_interval must be a positive number"),
    ({"poll_interval": "1"}, "poll_interval must be a positive number"),
    ({"heartbeat_interval": 0}, "heartbeat_interval must be a positive number"),
    ({"shutdown_timeout": -0.5}, "shutdown_timeout must be a positive number"),
    ({"summary_interval": 0}, "summary_interval must be a positive number"),
    ({"stale_after": 1, "heartbeat_interval": 1}, "stale_after must exceed two heartbeat"),
    ({"stale_after": 4, "heartbeat_interval": 2}, "stale_after must exceed two heartbeat"),
    ({"retention": -5}, "retention must be seconds >= 0"),
    ({"queues": []}, "^queues"),
    ({"queues": ""}, "^queues"),
    ({"queues": ["mail", ""]}, "^queues"),
    ({"queues": [1]}, "^queues"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_SETTINGS)
def test_bad_worker_settings_are_named(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        WorkerConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), BAD_SETTINGS[::3])
async def test_run_worker_refuses_them_before_doing_anything(
    kwargs: dict[str, Any], match: str
) -> None:
    eq = Soniq("memory://")
    with pytest.raises(ConfigurationError, match=match):
        await eq.run_worker(**kwargs)
    with pytest.raises(ConfigurationError, match=match):
        await asyncio.to_thread(lambda: eq.sync.run_worker(**kwargs))
    with pytest.raises(TypeError, match="no_such_setting"):
        await eq.run_worker(no_such_setting=1)


def test_nan_durations_are_refused() -> None:
    accepted = []
    for field in ("poll_interval", "heartbeat_interval", "stale_after", "shutdown_timeout"):
        try:
            WorkerConfig(**{field: math.nan})
        except ConfigurationError:
            continue
        accepted.append(field)
    assert accepted == []


def test_a_retention_of_the_wrong_type_is_named() -> None:
    with pytest.raises(ConfigurationError, match="retention"):
        WorkerConfig(retention="1 week")  # type: ignore[arg-type]


# -- JobContext and current_job() ------------------------------------------------------


def fields(ctx: JobContext) -> dict[str, Any]:
    return {
        "id": ctx.id,
        "name": ctx.name,
        "queue": ctx.queue,
        "attempt": ctx.attempt,
        "max_retries": ctx.max_retries,
        "timeout": ctx.timeout,
        "worker_id": ctx.worker_id,
        "claims": ctx.claims,
        "cancelled": ctx.cancelled,
    }


async def test_a_running_job_sees_its_context(any_eq: Soniq) -> None:
    eq = any_eq
    seen: dict[str, dict[str, Any]] = {}

    @eq.job(name="ctx.async_job", queue="ctx", max_retries=3, timeout=5)
    async def async_job() -> None:
        ctx = current_job()
        assert isinstance(ctx, JobContext)
        seen["async"] = fields(ctx)

    @eq.job(name="ctx.sync_job")
    def sync_job() -> None:
        seen["sync"] = fields(current_job())  # in the job's thread

    async_id = await eq.enqueue(async_job)
    sync_id = await eq.enqueue(sync_job, queue="other", max_retries=1, timeout=2.5)
    await eq.run_worker(burst=True)
    worker_id = seen["async"]["worker_id"]
    assert isinstance(worker_id, str) and worker_id
    assert seen == {
        "async": {
            "id": async_id,
            "name": "ctx.async_job",
            "queue": "ctx",
            "attempt": 1,
            "max_retries": 3,
            "timeout": 5.0,
            "worker_id": worker_id,
            "claims": 1,
            "cancelled": False,
        },
        "sync": {  # the enqueue's options win over the decorator's
            "id": sync_id,
            "name": "ctx.sync_job",
            "queue": "other",
            "attempt": 1,
            "max_retries": 1,
            "timeout": 2.5,
            "worker_id": worker_id,
            "claims": 1,
            "cancelled": False,
        },
    }
    job = await eq.get_job(async_id)
    assert job is not None and job.worker_id == worker_id
    # The context belongs to the job: none leaks into the code that ran the worker.
    with pytest.raises(LookupError, match="only available inside a running job"):
        current_job()


def test_current_job_outside_a_job_is_a_lookup_error_that_says_so() -> None:
    with pytest.raises(LookupError, match=r"soniq.current_job\(\) is only available inside"):
        current_job()


def test_cancelled_is_a_flag_the_worker_sets() -> None:
    ctx = JobContext(
        id=1, name="n", queue="q", attempt=1, max_retries=0, timeout=None, worker_id="w"
    )
    assert ctx.cancelled is False and ctx.claims == 1
    ctx.request_cancel()
    assert ctx.cancelled is True


# -- retention=None ---------------------------------------------------------------------


@pytest.mark.parametrize("eq", ["asyncpg"], indirect=True)
async def test_retention_none_keeps_finished_jobs_that_a_retention_would_prune(
    eq: Soniq, pg: psycopg.Connection, schema: str
) -> None:
    """The heartbeat prunes finished jobs older than ``retention``; with None it
    never does. The control: the same old jobs are pruned under a retention."""

    @eq.job
    async def quick() -> None: ...

    jobs = f'"{schema}".soniq_jobs'

    async def finished_a_month_ago() -> list[int]:
        ids = await eq.enqueue_many(quick, [{}, {}, {}])
        await eq.run_worker(burst=True, retention=None)
        pg.execute(f"UPDATE {jobs} SET finished_at = now() - interval '30 days'")
        assert [(await eq.get_job(i)).status for i in ids] == [JobStatus.DONE] * 3
        return ids

    def remaining(ids: list[int]) -> int:
        row = pg.execute(f"SELECT count(*) FROM {jobs} WHERE id = ANY(%s)", (ids,)).fetchone()
        return row[0] if row else -1

    def beats() -> Any:
        row = pg.execute(f'SELECT max(heartbeat_at) FROM "{schema}".soniq_workers').fetchone()
        return row[0] if row else None

    beat = {"heartbeat_interval": 0.05, "stale_after": 5}

    # retention=None: a worker beats several times (each beat would prune) and the
    # month-old jobs stay.
    kept = await finished_a_month_ago()
    worker = asyncio.create_task(eq.run_worker(retention=None, **beat))
    try:
        seen: set[dt.datetime] = set()

        async def beaten_three_times() -> bool:
            value = await asyncio.to_thread(beats)
            if value is not None:
                seen.add(value)
            return len(seen) >= 3

        await async_wait_until(beaten_three_times, 30, "three heartbeats")
        assert await asyncio.to_thread(remaining, kept) == 3
    finally:
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker

    # The control: under a retention of a day the same jobs go at the first beat.
    worker = asyncio.create_task(eq.run_worker(retention=86400, **beat))
    try:

        async def pruned() -> bool:
            return await asyncio.to_thread(remaining, kept) == 0

        await async_wait_until(pruned, 30, "the month-old jobs to be pruned")
    finally:
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker


# -- @eq.job checks its options when it decorates -------------------------------------


def a_job(n: int = 0) -> None: ...


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"queue": ""}, TypeError, "queue must be a non-empty str"),
        ({"queue": 5}, TypeError, "queue must be a non-empty str"),
        ({"queue": "a\x00b"}, ValueError, "queue must not contain a NUL"),
        ({"queue": "q" * 10_000}, ValueError, "queue is 10,000 characters"),
        ({"name": ""}, TypeError, "job name must be a non-empty str"),
        ({"name": "n" * 10_000}, ValueError, "job name is 10,000 characters"),
        ({"max_retries": -1}, ValueError, "max_retries must be an int >= 0"),
        ({"max_retries": True}, ValueError, "max_retries must be an int >= 0"),
        ({"max_retries": 1.5}, ValueError, "max_retries must be an int >= 0"),
        ({"max_retries": 2**31}, ValueError, "max_retries must be at most"),
        ({"priority": "1"}, TypeError, "priority must be an int"),
        ({"priority": True}, TypeError, "priority must be an int"),
        ({"priority": 2**31}, ValueError, "priority must be between"),
        ({"timeout": 0}, ValueError, "timeout must be a positive number"),
        ({"timeout": -1}, ValueError, "timeout must be a positive number"),
        ({"timeout": math.nan}, ValueError, "timeout must be a positive number"),
        ({"timeout": math.inf}, ValueError, "^timeout must be"),
        ({"timeout": "5"}, TypeError, "timeout must be seconds"),
        ({"backoff": 5}, JobDefinitionError, "backoff must be a soniq.Backoff"),
    ],
)
async def test_bad_job_options_are_refused_at_decoration(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    eq = Soniq("memory://")
    with pytest.raises(error, match=match):
        eq.job(**options)(a_job)
    with pytest.raises(UnknownJobError):  # nothing was registered
        await eq.enqueue(a_job)


def positional_only(n: int, /) -> None: ...


def star_args(*numbers: int) -> None: ...


@pytest.mark.parametrize(
    ("func", "match"),
    [
        (positional_only, "parameter 'n' is positional-only"),
        (star_args, "parameter 'numbers' is \\*args"),
    ],
)
def test_parameters_a_keyword_call_cannot_fill_are_refused(func: Any, match: str) -> None:
    with pytest.raises(JobDefinitionError, match=match):
        Soniq("memory://").job(func)


@pytest.mark.parametrize(
    "option",
    ["connection", "queue", "priority", "run_at", "delay", "max_retries", "dedupe_key", "timeout"],
)
def test_parameters_named_like_an_enqueue_option_are_refused(option: str) -> None:
    namespace: dict[str, Any] = {}
    exec(f"def job({option}=None): pass", namespace)
    namespace["job"].__module__ = __name__
    with pytest.raises(JobDefinitionError, match=f"parameter '{option}' collides with"):
        Soniq("memory://").job(namespace["job"])


def test_good_options_make_the_definition() -> None:
    eq = Soniq("memory://")
    backoff = Backoff(base=2, jitter=0)
    eq.job(name="jobs.a", queue="mail", max_retries=0, priority=-5, timeout=1, backoff=backoff)(
        a_job
    )
    definition = eq.registry.get("jobs.a")
    assert isinstance(definition, JobDefinition)
    assert (definition.func, definition.queue, definition.max_retries) == (a_job, "mail", 0)
    assert (definition.priority, definition.timeout, definition.backoff) == (-5, 1.0, backoff)
    assert (definition.is_async, definition.accepted, definition.required) == (
        False,
        frozenset({"n"}),
        frozenset(),
    )
