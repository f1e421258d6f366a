"""Fixtures: a fresh PostgreSQL database for the run, a fresh schema per test.

``SONIQ_TEST_DATABASE_URL`` is an admin URL (default
``postgresql://postgres@127.0.0.1:5432/postgres``). The run creates its own database
there and drops it at the end. When no server answers, a throwaway cluster is started
from the installed PostgreSQL binaries (see ``tests/throwaway_pg.py``).
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from soniq import Soniq

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
_schemas = itertools.count()


def _server_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3, autocommit=True):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A superuser URL of a server for this run (the configured one, or a throwaway)."""
    url = os.environ.get("SONIQ_TEST_DATABASE_URL", DEFAULT_ADMIN_URL)
    if _server_answers(url):
        yield url
        return
    from tests.throwaway_pg import throwaway_cluster

    with throwaway_cluster(tmp_path_factory.mktemp("pg")) as throwaway_url:
        yield throwaway_url


def url_for_database(admin_url: str, dbname: str) -> str:
    """``admin_url`` pointing at another database."""
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo("", **info)


@pytest.fixture(scope="session")
def database_url(admin_url: str) -> Iterator[str]:
    """A database created for this test run, dropped at its end."""
    name = f"soniq_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(url_for_database(admin_url, name))
    # Soniq takes URLs; build one from the parts.
    host = info.get("host", "127.0.0.1")
    port = info.get("port", "5432")
    user = info.get("user", "postgres")
    password = f":{info['password']}" if info.get("password") else ""
    yield f"postgresql://{user}{password}@{host}:{port}/{name}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def schema(database_url: str) -> Iterator[str]:
    """A schema name no other test uses; dropped afterwards."""
    name = f"t{os.getpid()}_{next(_schemas)}"
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(params=["asyncpg", "psycopg"])
async def eq(
    request: pytest.FixtureRequest, database_url: str, schema: str
) -> AsyncIterator[Soniq]:
    """A migrated Soniq on each async driver, in its own schema."""
    app = Soniq(database_url, driver=request.param, schema=schema)
    await app.ensure_initialized()
    yield app
    await app.close()


@pytest.fixture
def sync_eq(database_url: str, schema: str) -> Iterator[Soniq]:
    """A migrated Soniq for the sync twin (``sync_eq.sync``), in its own schema."""
    app = Soniq(database_url, schema=schema)
    app.sync.ensure_initialized()
    yield app
    app.sync.close()


@pytest.fixture
def pg(database_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit psycopg connection to the run's database, for assertions."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def django_connection(database_url: str) -> Iterator[Any]:
    """``django.db.connection`` on the psycopg 3 backend, configured once per process
    for the run's database; closed after each test so the next one connects lazily."""
    import django
    from django.conf import settings

    if not settings.configured:
        info = psycopg.conninfo.conninfo_to_dict(database_url)
        settings.configure(
            DATABASES={
                "default": {
                    "ENGINE": "django.db.backends.postgresql",
                    "NAME": info["dbname"],
                    "USER": info.get("user", ""),
                    "PASSWORD": info.get("password", ""),
                    "HOST": info.get("host", ""),
                    "PORT": info.get("port", ""),
                }
            },
            USE_TZ=True,
        )
        django.setup()
    from django.db import connection

    assert (
        connection.settings_dict["NAME"]
        == psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    ), "Django was configured for another database earlier in this process"
    connection.close()
    yield connection
    connection.close()
