"""Wake-ups: one NOTIFY per enqueue call, fused into its statement, none for jobs
that are not due, delivered on commit only."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import psycopg
import pytest

from soniq import Soniq


@pytest.fixture
def listener(database_url: str, schema: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(f"soniq:{schema}")))
        yield conn


def received(listener: psycopg.Connection, wait: float = 0.5) -> list[str]:
    """Notifications that arrive within ``wait`` seconds (bounded, never hangs)."""
    return [n.payload for n in listener.notifies(timeout=wait, stop_after=10)]


@pytest.mark.timeout(30)
async def test_one_notification_per_call(eq: Soniq, listener: psycopg.Connection) -> None:
    @eq.job(queue="mail")
    async def send(n: int) -> None: ...

    await eq.enqueue_many(send, [{"n": n} for n in range(200)])
    assert received(listener) == ["mail"]
    await eq.enqueue(send, n=1, queue="other")
    assert received(listener) == ["other"]


@pytest.mark.timeout(30)
async def test_no_notification_for_future_jobs(eq: Soniq, listener: psycopg.Connection) -> None:
    @eq.job
    async def later() -> None: ...

    await eq.enqueue(later, delay=60)
    await eq.enqueue(later, run_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    await eq.enqueue_many(later, [{}, {}], delay=dt.timedelta(minutes=1))
    assert received(listener, wait=0.3) == []


@pytest.mark.timeout(30)
async def test_dedupe_hit_wakes_nobody(eq: Soniq, listener: psycopg.Connection) -> None:
    @eq.job
    async def once() -> None: ...

    await eq.enqueue(once, dedupe_key="k")
    assert received(listener) == ["default"]
    await eq.enqueue(once, dedupe_key="k")
    assert received(listener, wait=0.3) == []


@pytest.mark.timeout(30)
def test_notification_waits_for_commit(
    sync_eq: Soniq, listener: psycopg.Connection, database_url: str
) -> None:
    @sync_eq.job
    def job() -> None: ...

    with psycopg.connect(database_url) as conn:
        sync_eq.sync.enqueue(job, connection=conn)
        assert received(listener, wait=0.3) == []  # in flight: nobody woken yet
        conn.commit()
        assert received(listener) == ["default"]
        sync_eq.sync.enqueue(job, connection=conn)
        conn.rollback()
        assert received(listener, wait=0.3) == []
