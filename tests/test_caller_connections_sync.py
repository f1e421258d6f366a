"""Transactional enqueue on callers' blocking connections (``eq.sync.enqueue``), with
the real libraries: raw psycopg 3 and psycopg2, SQLAlchemy ``Session`` on both (the
Flask-SQLAlchemy shape) and Django's connection on its psycopg 3 backend.

As in ``test_caller_connections_async``: committed, the order, its job and one wake-up
exist; rolled back, none of them. Then the traps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg2
import psycopg2.extras
import pytest
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from sqlalchemy import Engine, Integer, create_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    scoped_session,
    sessionmaker,
)

from soniq import ConnectionStateError, SchemaNotReadyError, Soniq
from tests.caller_env import Env as BaseEnv
from tests.caller_env import Rollback, rollback_if

pytestmark = pytest.mark.timeout(30)


def send_invoice(order_id: int, note: str = "") -> None:
    """The job every test enqueues (registered per test with the seed's options)."""


class Base(DeclarativeBase):
    pass


class Order(Base):
    """An application's model; "app" is mapped to the test's schema."""

    __tablename__ = "orders"
    __table_args__ = {"schema": "app"}
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    quantity: Mapped[int] = mapped_column(Integer)


class Env(BaseEnv):
    def enqueue(self, connection: Any, order_id: int) -> int:
        return self.eq.sync.enqueue(send_invoice, connection=connection, order_id=order_id)


@pytest.fixture
def env(database_url: str, schema: str, pg: psycopg.Connection) -> Iterator[Env]:
    setup = Soniq(database_url, schema=schema)
    setup.sync.ensure_initialized()
    setup.sync.close()
    pg.execute(f'CREATE TABLE "{schema}".orders (id serial PRIMARY KEY, quantity int)')
    eq = Soniq(database_url, schema=schema)
    eq.job(queue="invoices", max_retries=5)(send_invoice)
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f'LISTEN "soniq:{schema}"')
        yield Env(database_url, schema, eq, pg, listener)
    eq.sync.close()


def check_atomic(env: Env, work: Callable[[int, bool], object], *, orders: bool = True) -> None:
    """Run ``work(order_id, fail)`` committed, then rolled back: the order, its job and
    one wake-up, or none of them; Soniq's own pools are never opened."""
    work(1, False)
    assert env.order_ids() == ([1] if orders else [])
    assert env.jobs() == [{"order_id": 1}]
    assert env.wakeups() == ["invoices"]
    with pytest.raises(Rollback):
        work(2, True)
    assert env.order_ids() == ([1] if orders else [])
    assert env.jobs() == [{"order_id": 1}]
    assert env.wakeups() == []
    assert env.eq.sync.backend._pool is None
    assert env.eq.backend._pool is None


# --- psycopg 3 ------------------------------------------------------------------------


@pytest.mark.parametrize("autocommit", [False, True], ids=["autocommit-off", "autocommit-on"])
@pytest.mark.parametrize("row_factory", [None, dict_row], ids=["tuple_row", "dict_row"])
def test_psycopg_transaction_block(env: Env, autocommit: bool, row_factory: Any) -> None:
    options = {"row_factory": row_factory} if row_factory else {}
    with psycopg.connect(env.url, autocommit=autocommit, **options) as conn:

        def create_order(order_id: int, fail: bool) -> None:
            with conn.transaction():
                conn.execute(f"INSERT INTO {env.orders} (id) VALUES (%s)", (order_id,))
                env.enqueue(conn, order_id)
                rollback_if(fail)

        check_atomic(env, create_order)


def test_psycopg_joins_the_implicit_transaction(env: Env) -> None:
    with psycopg.connect(env.url) as conn:
        env.enqueue(conn, 1)
        assert conn.info.transaction_status == TransactionStatus.INTRANS
        assert env.jobs() == [] and env.wakeups() == []  # in flight: invisible, silent
        conn.commit()
        assert env.jobs() == [{"order_id": 1}]
        assert env.wakeups() == ["invoices"]
        env.enqueue(conn, 2)
        conn.rollback()
        assert env.jobs() == [{"order_id": 1}] and env.wakeups() == []


def test_psycopg_autocommit_outside_a_block_commits_at_once(env: Env) -> None:
    with psycopg.connect(env.url, autocommit=True) as conn:
        env.enqueue(conn, 1)
        assert conn.info.transaction_status == TransactionStatus.IDLE
    assert env.jobs() == [{"order_id": 1}]
    assert env.wakeups() == ["invoices"]


def test_psycopg_transaction_in_error_is_refused_before_any_sql(env: Env) -> None:
    with psycopg.connect(env.url) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        with pytest.raises(ConnectionStateError, match="roll it back") as refused:
            env.enqueue(conn, 1)
        assert refused.value.__context__ is None  # no statement was sent and failed
        assert conn.info.transaction_status == TransactionStatus.INERROR
        conn.rollback()  # the caller can still recover
        env.enqueue(conn, 2)
        conn.commit()
    assert env.jobs() == [{"order_id": 2}]


# --- psycopg2 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cursor_factory",
    [None, psycopg2.extras.RealDictCursor],
    ids=["cursor", "RealDictCursor"],
)
def test_psycopg2_connection(env: Env, cursor_factory: Any) -> None:
    conn = psycopg2.connect(env.url, cursor_factory=cursor_factory)
    try:

        def create_order(order_id: int, fail: bool) -> None:
            with conn, conn.cursor() as cur:  # psycopg2: commit, or roll back on error
                cur.execute(f"INSERT INTO {env.orders} (id) VALUES (%s)", (order_id,))
                env.enqueue(conn, order_id)
                rollback_if(fail)

        check_atomic(env, create_order)
    finally:
        conn.close()


def test_psycopg2_joins_the_implicit_transaction(env: Env) -> None:
    conn = psycopg2.connect(env.url)
    try:
        env.enqueue(conn, 1)
        assert env.jobs() == [] and env.wakeups() == []
        conn.commit()
        assert env.jobs() == [{"order_id": 1}] and env.wakeups() == ["invoices"]
    finally:
        conn.close()


def test_psycopg2_transaction_in_error_is_refused_before_any_sql(env: Env) -> None:
    conn = psycopg2.connect(env.url)
    try:
        with pytest.raises(psycopg2.errors.DivisionByZero), conn.cursor() as cur:
            cur.execute("SELECT 1/0")
        with pytest.raises(ConnectionStateError, match="roll it back") as refused:
            env.enqueue(conn, 1)
        assert refused.value.__context__ is None
        conn.rollback()
        env.enqueue(conn, 2)
        conn.commit()
    finally:
        conn.close()
    assert env.jobs() == [{"order_id": 2}]


def test_closed_connections_are_refused(env: Env) -> None:
    conn = psycopg.connect(env.url)
    conn.close()
    with pytest.raises(ConnectionStateError, match="closed"):
        env.enqueue(conn, 1)
    conn2 = psycopg2.connect(env.url)
    conn2.close()
    with pytest.raises(ConnectionStateError, match="closed"):
        env.enqueue(conn2, 1)


@pytest.mark.parametrize("kind", ["psycopg", "psycopg2"])
def test_callers_client_encoding_is_not_trusted(env: Env, kind: str) -> None:
    """A UTF8 database read through a LATIN1 connection (a legacy app's setting)."""
    note = "caf\u00e9 \u2615 \U0001f600"
    if kind == "psycopg":
        conn: Any = psycopg.connect(env.url, options="-c client_encoding=LATIN1")
    else:
        conn = psycopg2.connect(env.url)
        conn.set_client_encoding("LATIN1")
    try:
        env.eq.sync.enqueue(send_invoice, connection=conn, order_id=1, note=note)
        conn.commit()
    finally:
        conn.close()
    assert env.jobs() == [{"order_id": 1, "note": note}]


@pytest.mark.parametrize("kind", ["psycopg", "psycopg2"])
def test_missing_schema_says_to_migrate(
    database_url: str, schema: str, pg: psycopg.Connection, kind: str
) -> None:
    """On a caller's connection Soniq never migrates (no DDL in their transaction) and
    never opens its own pool: a schema that was never migrated is a clear error."""
    eq = Soniq(database_url, schema=schema)
    eq.job(send_invoice)
    conn: Any = (
        psycopg.connect(database_url) if kind == "psycopg" else psycopg2.connect(database_url)
    )
    try:
        with pytest.raises(SchemaNotReadyError, match="soniq migrate"):
            eq.sync.enqueue(send_invoice, connection=conn, order_id=1)
        conn.rollback()
    finally:
        conn.close()
    assert eq.sync.backend._pool is None
    assert pg.execute("SELECT to_regnamespace(%s)", (schema,)).fetchone() == (None,)


# --- SQLAlchemy -----------------------------------------------------------------------


@pytest.fixture(params=["psycopg", "psycopg2"])
def engine(request: pytest.FixtureRequest, env: Env) -> Iterator[Engine]:
    """A SQLAlchemy engine on each driver; the model's "app" schema is the test's."""
    url = env.url.replace("postgresql://", f"postgresql+{request.param}://", 1)
    engine = create_engine(url, execution_options={"schema_translate_map": {"app": env.schema}})
    yield engine
    engine.dispose()


def test_sqlalchemy_session_begin_block(env: Env, engine: Engine) -> None:
    def create_order(order_id: int, fail: bool) -> None:
        with Session(engine) as session, session.begin():
            session.add(Order(id=order_id, quantity=1))
            session.flush()
            env.enqueue(session, order_id)
            rollback_if(fail)

    check_atomic(env, create_order)


def test_sqlalchemy_session_begin_block_before_any_statement(env: Env, engine: Engine) -> None:
    def create_order(order_id: int, fail: bool) -> None:
        with Session(engine) as session, session.begin():
            env.enqueue(session, order_id)
            session.add(Order(id=order_id, quantity=1))  # flushed at commit
            rollback_if(fail)

    check_atomic(env, create_order)


def test_flask_sqlalchemy_scoped_session(env: Env, engine: Engine) -> None:
    """Flask-SQLAlchemy's ``db.session`` is a scoped_session: commit as you go."""
    db_session = scoped_session(sessionmaker(engine))
    try:

        def create_order(order_id: int, fail: bool) -> None:
            try:
                db_session.add(Order(id=order_id, quantity=1))
                env.enqueue(db_session, order_id)
                rollback_if(fail)
                db_session.commit()
            except Rollback:
                db_session.rollback()
                raise

        check_atomic(env, create_order)
    finally:
        db_session.remove()


def test_sqlalchemy_connection_commit_as_you_go(env: Env, engine: Engine) -> None:
    """A Connection outside begin() autobegins like any statement would, even when the
    enqueue is its only one: conn.commit() keeps the job, closing without it drops it."""

    def enqueue_only(order_id: int, fail: bool) -> None:
        with engine.connect() as conn:
            env.enqueue(conn, order_id)
            rollback_if(fail)
            conn.commit()

    check_atomic(env, enqueue_only, orders=False)


# --- Django ---------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", ["proxy", "connections['default']"])
def test_django_atomic(env: Env, django_connection: Any, wrapper: str) -> None:
    from django.db import connections, transaction

    conn = django_connection if wrapper == "proxy" else connections["default"]

    def create_order(order_id: int, fail: bool) -> None:
        with transaction.atomic():
            with conn.cursor() as cur:
                cur.execute(f"INSERT INTO {env.orders} (id) VALUES (%s)", [order_id])
            env.enqueue(conn, order_id)
            rollback_if(fail)

    check_atomic(env, create_order)


def test_django_atomic_before_its_first_query(env: Env, django_connection: Any) -> None:
    from django.db import transaction

    def create_order(order_id: int, fail: bool) -> None:
        with transaction.atomic():
            env.enqueue(django_connection, order_id)
            with django_connection.cursor() as cur:
                cur.execute(f"INSERT INTO {env.orders} (id) VALUES (%s)", [order_id])
            rollback_if(fail)

    check_atomic(env, create_order)


def test_django_nested_atomic_rolls_back_with_its_savepoint(
    env: Env, django_connection: Any
) -> None:
    from django.db import transaction

    with transaction.atomic():
        env.enqueue(django_connection, 1)
        with pytest.raises(Rollback), transaction.atomic():
            env.enqueue(django_connection, 2)
            raise Rollback
    assert env.jobs() == [{"order_id": 1}]
    assert env.wakeups() == ["invoices"]


def test_django_outside_atomic_commits_at_once(env: Env, django_connection: Any) -> None:
    """Django runs in autocommit mode outside atomic(), on a lazily opened connection."""
    assert django_connection.connection is None
    env.enqueue(django_connection, 1)
    assert env.jobs() == [{"order_id": 1}]
    assert env.wakeups() == ["invoices"]


async def test_sync_connections_are_refused_by_await_enqueue(
    env: Env, django_connection: Any
) -> None:
    """The type is checked before any I/O, so even Django's connection is safe to pass
    from async code: the error names eq.sync.enqueue."""
    conn = psycopg2.connect(env.url)
    try:
        for wrong in (django_connection, conn):
            with pytest.raises(TypeError, match=r"eq\.sync\.enqueue"):
                await env.eq.enqueue(send_invoice, connection=wrong, order_id=1)
    finally:
        conn.close()
    assert env.jobs() == []
