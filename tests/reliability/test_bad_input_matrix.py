"""The bad-input matrix (issue 12, defect 3): every bad input, on every backend and
both faces, is refused in Python with its own error, and a caller's transaction that
saw the refusals is still alive: its business rows and one good job commit, and
nothing of the bad calls exists.

Faces: Soniq's own pool (asyncpg, psycopg async, the sync twin's psycopg pool); a
caller's open transaction on an asyncpg connection, a psycopg AsyncConnection and a
psycopg Connection (``eq.sync``); the SQLite file and the memory backend, each with
``await eq.enqueue`` and ``eq.sync.enqueue``. The other half of the matrix: each
documented maximum, reached, is stored and read back unchanged on every face.

Before the checks of :mod:`soniq.core.limits`, a long queue and a huge delay failed on
the server and killed the caller's transaction, and a deep argument raised a bare
RecursionError.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from soniq import Soniq
from soniq.core import limits
from soniq.core.errors import SerializationError
from soniq.core.jobs import Job
from tests.test_bad_input import nested, same

pytestmark = pytest.mark.timeout(60)

UTC = dt.timezone.utc
JOB = "matrix.record"
LONG = 10_000
WIDE = "\U0001f600"  # 4 bytes of UTF-8: the worst case for every byte limit


async def record(**kwargs: Any) -> None:
    """The job every face enqueues (it accepts any arguments)."""


@dataclass(frozen=True)
class Bad:
    """One bad input: the job (a name), its arguments, the options, the error."""

    name: str
    error: type[Exception]
    args: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    job: str = JOB
    batch_only: bool = False


def _cycle() -> list[Any]:
    value: list[Any] = []
    value.append(value)
    return value


_HALF = "x" * (limits.MAX_ARGS_JSON_CHARS // 2)

BAD = [
    Bad("long queue", ValueError, options={"queue": "q" * LONG}),
    Bad("NUL in queue", ValueError, options={"queue": "q\x00"}),
    Bad("surrogate in queue", ValueError, options={"queue": "q\ud800"}),
    Bad("comma in queue", ValueError, options={"queue": "a,b"}),
    Bad("long job name", ValueError, job="n" * LONG),
    Bad("long dedupe_key", ValueError, options={"dedupe_key": "k" * LONG}),
    Bad("huge delay", ValueError, options={"delay": 1e300}),
    Bad("huge timedelta", ValueError, options={"delay": dt.timedelta.max}),
    Bad("far run_at", ValueError, options={"run_at": dt.datetime(9999, 12, 31, tzinfo=UTC)}),
    Bad("early run_at", ValueError, options={"run_at": dt.datetime(1, 1, 1, tzinfo=UTC)}),
    Bad("naive run_at", ValueError, options={"run_at": dt.datetime(2030, 1, 1)}),
    Bad("huge timeout", ValueError, options={"timeout": 1e300}),
    Bad("priority out of range", ValueError, options={"priority": 2**40}),
    Bad("deep nesting", SerializationError, args={"tree": nested(LONG)}),
    Bad("value that contains itself", SerializationError, args={"loop": _cycle()}),
    Bad("oversized payload", SerializationError, args={"blob": "x" * 1_000_001}),
    Bad("lone surrogate", SerializationError, args={"note": "\ud800"}),
    Bad("surrogate in a key", SerializationError, args={"doc": {"\udfff": 1}}),
    Bad("huge int", SerializationError, args={"n": 10**5000}),
    Bad("NaN", SerializationError, args={"ratio": math.nan}),
    Bad("NUL", SerializationError, args={"note": "a\x00b"}),
    Bad("non-string key", SerializationError, args={"doc": {1: "x"}}),
    Bad("not JSON", SerializationError, args={"when": dt.date(2030, 1, 1)}),
    Bad(
        "oversized batch",
        SerializationError,
        args={"blob": _HALF},
        batch_only=True,
    ),
]


def _batch(bad: Bad) -> list[dict[str, Any]]:
    if bad.name == "oversized batch":
        return [bad.args] * (limits.MAX_BATCH_JSON_CHARS // len(_HALF) + 1)
    return [{"good": 1}, bad.args]


# Each documented maximum, reached: stored and read back unchanged on every face.
EDGE_ARGS: dict[str, Any] = {
    "tree": nested(limits.MAX_NESTING_DEPTH, leaf="leaf"),
    "int": 10**limits.MAX_INT_DIGITS - 1,
    "neg": -(10**limits.MAX_INT_DIGITS - 1),
    "floats": [1e16, -1.5e300, 1.7976931348623157e308, 5e-324, 0.1, 2.0**53 + 2],
    "text": f'caf\u00e9 \u2615 {WIDE} \x01\t\n"\\',
    WIDE: {"\u00e9": [None, True, False, 0, ""]},
}
EDGE_OPTIONS: list[dict[str, Any]] = [
    {"queue": WIDE * limits.MAX_QUEUE_LENGTH, "dedupe_key": WIDE * limits.MAX_DEDUPE_KEY_LENGTH},
    {"run_at": limits.MAX_RUN_AT, "timeout": limits.MAX_TIMEOUT_SECONDS},
    {"run_at": limits.MIN_RUN_AT},
    {"delay": limits.MAX_DELAY_SECONDS, "priority": 2**31 - 1, "max_retries": 2**31 - 1},
]
# {"blob":"..."} is 12 characters around the string: exactly the maximum
BIG_ARGS = {"blob": "y" * (limits.MAX_ARGS_JSON_CHARS - 11)}


@dataclass
class Face:
    """One way to enqueue. ``touch`` runs a statement in the caller's transaction (and
    raises if it is dead); ``commit`` ends it; ``stored`` reads the queued jobs back."""

    name: str
    eq: Soniq
    sync: bool
    connection: Any = None
    touch: Callable[[], Awaitable[None]] | None = None
    commit: Callable[[], Awaitable[None]] | None = None
    business_rows: Callable[[], int] | None = None
    touched: int = 0

    async def enqueue(self, job: str, args: dict[str, Any], options: dict[str, Any]) -> int:
        kwargs = {**options, **args}
        if self.connection is not None:
            kwargs["connection"] = self.connection
        if self.sync:
            return self.eq.sync.enqueue(job, **kwargs)
        return await self.eq.enqueue(job, **kwargs)

    async def enqueue_many(
        self, job: str, batch: list[dict[str, Any]], options: dict[str, Any]
    ) -> list[int]:
        kwargs = dict(options)
        if self.connection is not None:
            kwargs["connection"] = self.connection
        if self.sync:
            return self.eq.sync.enqueue_many(job, batch, **kwargs)
        return await self.eq.enqueue_many(job, batch, **kwargs)

    async def still_usable(self) -> None:
        if self.touch is not None:
            await self.touch()
            self.touched += 1

    async def finish(self) -> None:
        if self.commit is not None:
            await self.commit()

    async def stored(self) -> list[Job]:
        if self.sync:
            return self.eq.sync.backend.list_jobs(None, None)
        return await self.eq.backend.list_jobs(None, None)


FACES = [
    "asyncpg pool",
    "psycopg async pool",
    "psycopg sync pool",
    "asyncpg transaction",
    "psycopg async transaction",
    "psycopg sync transaction",
    "sqlite async",
    "sqlite sync",
    "memory async",
    "memory sync",
]


@pytest.fixture(params=FACES)
async def face(
    request: pytest.FixtureRequest, database_url: str, schema: str, tmp_path: Path
) -> AsyncIterator[Face]:
    kind: str = request.param
    if kind.startswith(("sqlite", "memory")):
        url = f"sqlite:///{tmp_path}/jobs.db" if kind.startswith("sqlite") else "memory://"
        app = Soniq(url)
        app.job(name=JOB)(record)
        sync = kind.endswith("sync")
        if sync:
            app.sync.ensure_initialized()
        else:
            await app.ensure_initialized()
        yield Face(kind, app, sync)
        await app.close()
        return
    driver = "psycopg" if kind.startswith("psycopg") else "asyncpg"
    app = Soniq(database_url, driver=driver, schema=schema)
    app.job(name=JOB)(record)
    await app.ensure_initialized()
    business = f'"{schema}".business'
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f"CREATE TABLE {business} (id serial PRIMARY KEY, note text)")
    sync = kind == "psycopg sync pool" or kind == "psycopg sync transaction"
    if kind.endswith("pool"):
        yield Face(kind, app, sync)
    elif kind == "asyncpg transaction":
        conn = await asyncpg.connect(database_url)
        tx = conn.transaction()
        await tx.start()
        # A far-east session time zone: times near the limits must still read back.
        await conn.execute("SET LOCAL TimeZone = 'Pacific/Kiritimati'")

        async def touch_asyncpg() -> None:
            await conn.execute(f"INSERT INTO {business} (note) VALUES ('after a refusal')")

        yield Face(
            kind, app, False, conn, touch_asyncpg, tx.commit, _counter(database_url, business)
        )
        await conn.close()
    elif kind == "psycopg async transaction":
        aconn = await psycopg.AsyncConnection.connect(database_url)
        await aconn.execute("SET LOCAL TimeZone = 'Etc/GMT+12'")  # opens the transaction

        async def touch_psycopg_async() -> None:
            await aconn.execute(f"INSERT INTO {business} (note) VALUES ('after a refusal')")

        yield Face(
            kind,
            app,
            False,
            aconn,
            touch_psycopg_async,
            aconn.commit,
            _counter(database_url, business),
        )
        await aconn.close()
    else:
        sconn = psycopg.connect(database_url)
        sconn.execute("SET LOCAL TimeZone = 'Pacific/Kiritimati'")  # opens the transaction

        async def touch_psycopg_sync() -> None:
            sconn.execute(f"INSERT INTO {business} (note) VALUES ('after a refusal')")

        async def commit_sync() -> None:
            sconn.commit()

        yield Face(
            kind,
            app,
            True,
            sconn,
            touch_psycopg_sync,
            commit_sync,
            _counter(database_url, business),
        )
        sconn.close()
    await app.close()


def _counter(url: str, table: str) -> Callable[[], int]:
    def count() -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            assert row is not None
            return int(row[0])

    return count


async def _refused(face: Face, bad: Bad, call: str) -> str | None:
    """None if ``bad`` is refused as it should be and the transaction lives on; else
    what went wrong."""
    where = f"{bad.name} ({call})"
    try:
        if call == "enqueue":
            await face.enqueue(bad.job, bad.args, bad.options)
        else:
            await face.enqueue_many(bad.job, _batch(bad), bad.options)
    except bad.error:
        pass
    except Exception as exc:  # a server or driver error: the input reached the SQL
        return f"{where}: expected {bad.error.__name__}, got {exc!r:.200}"
    else:
        return f"{where}: accepted"
    try:
        await face.still_usable()
    except Exception as exc:
        return f"{where}: the caller's transaction is dead after the refusal: {exc!r:.200}"
    return None


async def test_bad_input_is_refused_and_the_transaction_lives(face: Face) -> None:
    problems = []
    for bad in BAD:
        for call in ("enqueue", "enqueue_many"):
            if bad.batch_only and call == "enqueue":
                continue
            problem = await _refused(face, bad, call)
            if problem is not None:
                problems.append(problem)
                if face.touch is not None:  # the transaction may be dead: stop here
                    break
        if problems and face.touch is not None:
            break
    assert not problems, f"{face.name}:\n" + "\n".join(problems)
    good = await face.enqueue(JOB, {"n": 1}, {})
    await face.still_usable()
    await face.finish()
    jobs = await face.stored()
    assert [(job.id, job.name, job.args) for job in jobs] == [(good, JOB, {"n": 1})]
    if face.business_rows is not None:
        calls = sum(1 if bad.batch_only else 2 for bad in BAD)
        assert face.business_rows() == face.touched == calls + 1


async def test_each_maximum_is_stored_and_read_back(face: Face) -> None:
    ids = {}
    for index, options in enumerate(EDGE_OPTIONS):
        ids[index] = await face.enqueue(JOB, EDGE_ARGS, options)
    named = await face.enqueue("n" * limits.MAX_JOB_NAME_LENGTH, {"x": 1}, {})
    big = await face.enqueue(JOB, BIG_ARGS, {})
    many = await face.enqueue_many(JOB, [EDGE_ARGS, {"x": 2}], {"queue": WIDE * 200})
    await face.still_usable()
    await face.finish()
    jobs = {job.id: job for job in await face.stored()}
    assert set(jobs) == {*ids.values(), named, big, *many}
    for index, options in enumerate(EDGE_OPTIONS):
        job = jobs[ids[index]]
        floats = job.args["floats"]
        assert all(type(v) is float for v in floats), (face.name, "floats came back", floats)
        assert same(EDGE_ARGS, dict(job.args)), face.name
        for option in ("queue", "dedupe_key", "run_at", "priority", "max_retries", "timeout"):
            if option in options:
                assert getattr(job, option) == options[option], (face.name, option)
        if "delay" in options:
            years = (job.run_at - dt.datetime.now(UTC)).days / 365.25
            assert 99.9 < years <= 100, face.name
    assert jobs[named].name == "n" * 200
    assert jobs[big].args == BIG_ARGS
    assert same(EDGE_ARGS, dict(jobs[many[0]].args)) and jobs[many[1]].queue == WIDE * 200


def test_the_matrix_is_complete() -> None:
    """Every face of the brief and the inputs it names are in the matrix."""
    names = {bad.name for bad in BAD}
    for needed in (
        "long queue",
        "long job name",
        "long dedupe_key",
        "huge delay",
        "far run_at",
        "deep nesting",
        "oversized payload",
        "lone surrogate",
        "huge int",
        "NaN",
        "NUL",
    ):
        assert needed in names
    assert len(FACES) == 10  # 3 pools, 3 caller transactions, 2 x 2 embedded
