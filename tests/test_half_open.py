"""Half-open connections: the server's bytes stop arriving and nothing closes (a peer
whose NAT mapping expired, a link that silently drops one direction). A worker must
not wait on such a connection forever: its statements are bounded by
``command_timeout`` (the connection is then abandoned and opened again), its heartbeat
by a watchdog that aborts the call in flight.

The links go silent through the reliability tests' :class:`FaultProxy`, a real TCP
relay to the test server: after ``silence()`` the server's answers on the connections
open at that moment are dropped (what the client sends still reaches the server),
nothing is closed, and connections opened afterwards pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest

from soniq import ConfigurationError, JobStatus, Soniq, WorkerConfig
from soniq.cli import main
from soniq.drivers.postgres_maintenance import PostgresMaintenance
from tests.conftest import async_wait_until, status_of
from tests.reliability.proxy import FaultProxy

COMMAND_TIMEOUT = 1.0
WORKER = {
    "concurrency": 2,
    "poll_interval": 0.2,
    "heartbeat_interval": 0.5,
    "stale_after": 6.0,
    "command_timeout": COMMAND_TIMEOUT,
    "shutdown_timeout": 2.0,
}


@pytest.fixture
def relay(database_url: str) -> Iterator[FaultProxy]:
    """A proxy to the test server whose open connections ``silence()`` half-opens."""
    with FaultProxy.to(database_url) as made:
        yield made


@pytest.fixture
async def direct(database_url: str, schema: str) -> AsyncIterator[Soniq]:
    """A Soniq straight to the server, to enqueue and look while the relay is silent."""
    app = Soniq(database_url, schema=schema)
    await app.ensure_initialized()
    yield app
    await app.close()


@contextlib.asynccontextmanager
async def running_worker(app: Soniq, **settings: Any) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(app.run_worker(**{**WORKER, **settings}))
    try:
        yield task
    finally:
        task.cancel()
        # Shutdown is bounded too: every statement of it has command_timeout.
        done, _ = await asyncio.wait([task], timeout=20)
        assert done, "the worker did not stop within 20 s"
        with contextlib.suppress(asyncio.CancelledError):
            task.result()


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_worker_whose_connections_go_silent_recovers(
    driver: str,
    relay: FaultProxy,
    direct: Soniq,
    database_url: str,
    schema: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every connection of the worker (claims, outcomes, pool, heartbeat, LISTEN) goes
    half-open while it polls: its claim gets no answer, the connection is abandoned
    after command_timeout, and the worker claims, runs and records later jobs on new
    connections, each job once."""
    caplog.set_level(logging.INFO, logger="soniq")
    app = Soniq(relay.through(database_url), driver=driver, schema=schema, connect_timeout=2)
    runs: list[int] = []

    for eq in (app, direct):

        @eq.job(name="half_open.record")
        async def record(n: int) -> int:
            runs.append(n)
            return n

    async with running_worker(app):
        first = await direct.enqueue("half_open.record", n=1)
        await async_wait_until(
            lambda: _is(status_of(direct, first), JobStatus.DONE), 20, "the first job done"
        )
        silenced = relay.silence()
        started = time.monotonic()
        assert silenced >= 3, silenced  # two claim lanes, the completer, the heartbeat...
        later = [await direct.enqueue("half_open.record", n=n) for n in (2, 3, 4)]
        for job_id in later:
            await async_wait_until(
                lambda job_id=job_id: _is(status_of(direct, job_id), JobStatus.DONE),
                40,
                f"job {job_id} done after the link went silent",
            )
        recovered = time.monotonic() - started
        print(f"\n{driver}: later jobs done {recovered:.1f}s after the link went silent")
        assert messages(caplog, f"no answer within command_timeout={COMMAND_TIMEOUT:g}s")
        assert not messages(caplog, "declared dead")
    assert sorted(runs) == [1, 2, 3, 4]  # each once: the lost claim was put back
    for job_id in later:
        job = await direct.get_job(job_id)
        assert job is not None and job.attempts == 1, job
    await app.close()


async def _is(value: Any, wanted: Any) -> bool:
    return bool(await value == wanted)


@pytest.mark.timeout(60)
async def test_a_heartbeat_whose_connection_goes_silent_reconnects(
    relay: FaultProxy,
    direct: Soniq,
    database_url: str,
    schema: str,
    pg: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only the heartbeat's connection goes half-open (it runs through the relay; the
    rest of the worker does not): the watchdog aborts the call in flight after
    command_timeout, the heartbeat reconnects and beats again before stale_after, so
    the worker is not declared dead and its running job is not rescued."""
    caplog.set_level(logging.INFO, logger="soniq")
    backend: Any = direct.backend
    monkeypatch.setattr(
        backend,
        "maintenance",
        lambda: PostgresMaintenance(relay.through(database_url), schema, backend.target),
    )
    release = asyncio.Event()

    @direct.job(name="half_open.hold")
    async def hold() -> str:
        await release.wait()
        return "released"

    async with running_worker(direct):
        job_id = await direct.enqueue(hold)
        await async_wait_until(
            lambda: _is(status_of(direct, job_id), JobStatus.RUNNING), 20, "the job to run"
        )
        await async_wait_until(relay.connections, 20, "the heartbeat's connection")
        assert relay.silence() == 1
        started = time.monotonic()
        await async_wait_until(
            lambda: messages(caplog, "heartbeat: no answer within command_timeout"),
            COMMAND_TIMEOUT + 10,
            "the watchdog to abort the silent call",
        )
        aborted = time.monotonic() - started
        # The silent call's UPDATE reached the server (only its answer was lost): a
        # beat counts from the abort on.
        aborted_at = pg.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        await async_wait_until(
            lambda: pg.execute(
                f'SELECT count(*) FROM "{schema}".soniq_workers WHERE heartbeat_at > %s',
                (aborted_at,),
            ).fetchone()[0],  # type: ignore[index]
            10,
            "a heartbeat on a new connection",
        )
        beating = time.monotonic() - started
        print(f"\nheartbeat: aborted after {aborted:.1f}s, beating again after {beating:.1f}s")
        assert beating < WORKER["stale_after"]
        assert messages(caplog, "heartbeat connection restored")
        assert relay.connections() == 1  # the new connection, through the relay too
        assert not messages(caplog, "declared dead")
        assert not messages(caplog, "rescued")
        assert await status_of(direct, job_id) == JobStatus.RUNNING
        release.set()
        await async_wait_until(
            lambda: _is(status_of(direct, job_id), JobStatus.DONE), 20, "the job done"
        )
    job = await direct.get_job(job_id)
    assert job is not None and job.attempts == 1 and job.result == "released", job


# -- the setting ------------------------------------------------------------------------


def test_command_timeout_defaults_and_checks() -> None:
    """10 s by default, a third of stale_after when that is shorter; positive and
    below stale_after, or a ConfigurationError naming it."""
    assert WorkerConfig().command_timeout == 10.0
    assert WorkerConfig(stale_after=3, heartbeat_interval=0.5).command_timeout == 1.0
    assert WorkerConfig(command_timeout=0.25).command_timeout == 0.25
    for bad in (0, -1, "2", True, 30.0, 45):
        with pytest.raises(ConfigurationError, match="command_timeout"):
            WorkerConfig(command_timeout=bad)


def test_the_cli_passes_command_timeout(
    worker_app: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--command-timeout`` reaches the worker's settings (absent, the default holds);
    a value the worker refuses is a one-line exit 1."""
    seen: list[dict[str, Any]] = []

    async def record(self: Soniq, **settings: Any) -> None:
        seen.append(settings)

    original = Soniq.run_worker
    monkeypatch.setattr(Soniq, "run_worker", record)
    assert main(["worker", "tests.worker_app:eq", "--command-timeout", "2.5"]) == 0
    assert main(["worker", "tests.worker_app:eq"]) == 0
    assert seen[0]["command_timeout"] == 2.5 and "command_timeout" not in seen[1]
    monkeypatch.setattr(Soniq, "run_worker", original)
    code = main(["worker", "tests.worker_app:eq", "--stale-after", "5", "--command-timeout", "5"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("soniq worker: command_timeout must be below stale_after"), err
