"""Wake-ups: one NOTIFY per enqueue call, fused into its statement, none for jobs
that are not due, delivered on commit only."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator

import psycopg
import pytest

from soniq import Soniq

MARK = "mark"


@pytest.fixture
def channel(schema: str) -> str:
    return f"soniq:{schema}"


@pytest.fixture
def listener(database_url: str, channel: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
        yield conn


@pytest.fixture
def received(
    listener: psycopg.Connection, pg: psycopg.Connection, channel: str
) -> Callable[[], list[str]]:
    """What the listener received so far, up to a mark sent now from another session.

    Notifications are delivered in commit order, so whatever an enqueue committed
    before sent arrives before the mark: once the mark is in, nothing else can
    still be on its way, and "nothing arrived" is proven without waiting and hoping.
    """

    def until_the_mark() -> list[str]:
        pg.execute("SELECT pg_notify(%s, %s)", (channel, MARK))
        payloads = []
        for note in listener.notifies(timeout=10):
            payloads.append(note.payload)
            if note.payload == MARK:
                break
        return payloads

    return until_the_mark


@pytest.mark.timeout(30)
async def test_one_notification_per_call(eq: Soniq, received: Callable[[], list[str]]) -> None:
    @eq.job(queue="mail")
    async def send(n: int) -> None: ...

    await eq.enqueue_many(send, [{"n": n} for n in range(200)])
    assert received() == ["mail", MARK]
    await eq.enqueue(send, n=1, queue="other")
    assert received() == ["other", MARK]


@pytest.mark.timeout(30)
async def test_no_notification_for_future_jobs(
    eq: Soniq, received: Callable[[], list[str]]
) -> None:
    @eq.job
    async def later() -> None: ...

    await eq.enqueue(later, delay=60)
    await eq.enqueue(later, run_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    await eq.enqueue_many(later, [{}, {}], delay=dt.timedelta(minutes=1))
    assert received() == [MARK]


@pytest.mark.timeout(30)
async def test_dedupe_hit_wakes_nobody(eq: Soniq, received: Callable[[], list[str]]) -> None:
    @eq.job
    async def once() -> None: ...

    await eq.enqueue(once, dedupe_key="k")
    assert received() == ["default", MARK]
    await eq.enqueue(once, dedupe_key="k")
    assert received() == [MARK]


@pytest.mark.timeout(30)
def test_notification_waits_for_commit(
    sync_eq: Soniq, received: Callable[[], list[str]], database_url: str
) -> None:
    @sync_eq.job
    def job() -> None: ...

    with psycopg.connect(database_url) as conn:
        sync_eq.sync.enqueue(job, connection=conn)
        assert received() == [MARK]  # in flight: nobody woken yet
        conn.commit()
        assert received() == ["default", MARK]
        sync_eq.sync.enqueue(job, connection=conn)
        conn.rollback()
        assert received() == [MARK]
