"""The URL soniq.contrib.django builds from an entry of DATABASES, for the settings
projects write: both drivers must read it as Django's psycopg would."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from soniq import Soniq
from soniq.contrib.django.conf import url_from_settings


@pytest.mark.parametrize(
    ("entry", "url"),
    [
        (
            {"NAME": "db", "USER": "u", "HOST": "::1", "PORT": "5432"},
            "postgresql://u@[::1]:5432/db",
        ),
        ({"NAME": "db", "USER": "u", "HOST": "", "PORT": "5433"}, "postgresql://u@/db?port=5433"),
        (
            {"NAME": "db", "HOST": "/var/run/postgresql", "PORT": 5433},
            "postgresql:///db?host=%2Fvar%2Frun%2Fpostgresql&port=5433",
        ),
        (
            {"NAME": "db", "USER": "a b", "PASSWORD": "p@ss:w/rd", "HOST": "h"},
            "postgresql://a%20b:p%40ss%3Aw%2Frd@h/db",
        ),
        (
            {
                "NAME": "db",
                "HOST": "h",
                "OPTIONS": {
                    "options": "-c search_path=x",
                    "application_name": "my app",
                    "connect_timeout": 5,
                    "keepalives": True,
                    "sslmode": "require",
                    "isolation_level": 1,
                },
            },
            "postgresql://h/db?options=-c%20search_path%3Dx&application_name=my%20app"
            "&sslmode=require",
        ),
    ],
)
def test_the_url_of_a_databases_entry(entry: dict[str, object], url: str) -> None:
    assert url_from_settings(entry) == url
    Soniq(url)  # and Soniq reads it


def test_both_drivers_connect_with_spaces_and_libpq_options(database_url: str) -> None:
    info = psycopg.conninfo.conninfo_to_dict(database_url)
    url = url_from_settings(
        {
            "NAME": info["dbname"],
            "USER": info.get("user", "postgres"),
            "HOST": info.get("host", "127.0.0.1"),
            "PORT": info.get("port", "5432"),
            "OPTIONS": {
                "options": "-c search_path=public",
                "application_name": "my app",
                "connect_timeout": 3,
                "keepalives": True,
            },
        }
    )
    with psycopg.connect(url) as conn:
        assert conn.execute("SHOW application_name").fetchone() == ("my app",)
        assert conn.execute("SHOW search_path").fetchone() == ("public",)

    async def by_asyncpg() -> str:
        conn = await asyncpg.connect(url)
        try:
            return str(await conn.fetchval("SHOW application_name"))
        finally:
            await conn.close()

    assert asyncio.run(by_asyncpg()) == "my app"
