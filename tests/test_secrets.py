"""A database password never appears in a message, a log line or a repr: malformed
URLs of many shapes, the reprs of Soniq and its drivers, and the logs and errors of a
connection that fails."""

from __future__ import annotations

import logging

import pytest

from soniq import ConfigurationError, DatabaseUnavailable, Soniq
from soniq.drivers._common import redact_url, scrub, split_postgres_url
from tests.throwaway_pg import free_port

PW = "Tr0ub4dor"

MALFORMED = [
    f"postgresql:user:{PW}@host/db",  # the example: no //
    f"postgres:user:{PW}@host:5432/db",
    f"postgresql//user:{PW}@host/db",
    f"user:{PW}@host/db",  # no scheme at all
    f"postgresql://user:{PW}@host:notaport/db",  # bad port
    f"postgresql://user:{PW}@host:99999/db",  # port out of range
    f"postgresql://user:{PW}/x@host/db",  # an unencoded / in the password
    f"postgresql://user:{PW}:x@h1:5432,h2:5433/db",  # a colon, and several hosts
    f"mysql://user:{PW}@host/db",  # bad scheme
    f"postgresql+asyncpgx://user:{PW}@host/db",  # bad driver in the scheme
    f"http://user:{PW}@host/db",
    f"sqlite://user:{PW}@host/db",  # sqlite without ///
    f"memory://user:{PW}@host",
    f"postgresql://user:{PW}%ZZ@host/db",  # a % that starts no escape (libpq quotes it)
    f"postgresql://user:{PW} x@host/db",  # a space (libpq quotes it too)
]


@pytest.mark.parametrize("url", MALFORMED)
def test_a_malformed_url_is_refused_without_its_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        eq = Soniq(url)
        pytest.fail(f"accepted: {eq!r}")
    assert PW not in str(info.value), str(info.value)
    assert PW not in repr(info.value)
    cause = info.value.__cause__ or info.value.__context__
    while cause is not None:  # nothing chained carries it either
        assert PW not in str(cause), repr(cause)
        cause = cause.__cause__ or cause.__context__


@pytest.mark.parametrize(
    "password", [PW, "p@ss:w/rd", "p%40ss", "it's", "with space", "ü-ñicode", "a?b#c&d"]
)
def test_special_characters_in_passwords(password: str) -> None:
    for url in (
        f"postgresql:user:{password}@host/db",
        f"postgresql://user:{password}@host:bad/db",
        f"mysql://user:{password}@host/db",
    ):
        with pytest.raises(ConfigurationError) as info:
            Soniq(url)
        assert password not in str(info.value), (url, str(info.value))
        assert password not in redact_url(url)


def test_what_the_redaction_keeps() -> None:
    """Everything but the password stays readable (user, host, port, database)."""
    assert redact_url(f"postgresql://app:{PW}@db.internal:6543/shop") == (
        "postgresql://app:***@db.internal:6543/shop"
    )
    assert redact_url("postgresql://app@db/shop") == "postgresql://app@db/shop"
    assert redact_url(f"postgresql:///shop?host=/tmp&password={PW}") == (
        "postgresql:///shop?host=/tmp&password=***"
    )
    assert redact_url(f"host=db password='{PW} x' dbname=shop") == (
        "host=db password=*** dbname=shop"
    )
    assert scrub(f"oops {PW} and p%40w", f"postgresql://u:{PW}@h/db") == "oops *** and p%40w"
    with pytest.raises(ConfigurationError) as info:
        split_postgres_url(f"postgresql://app:{PW}/oops@db:5432/shop")
    assert "postgresql://app:***@db:5432/shop" in str(info.value)


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_reprs_hide_the_password(driver: str) -> None:
    eq = Soniq(f"postgresql://app:{PW}@db.internal:6543/shop", driver=driver)
    for obj in (eq, eq.backend, eq.sync, eq.sync.backend):
        text = repr(obj)
        assert PW not in text and "db.internal" in text, text
    assert repr(eq) == (
        f"Soniq('postgresql://app:***@db.internal:6543/shop', driver={driver!r}, schema='public')"
    )


def test_reprs_of_the_embedded_backends() -> None:
    assert repr(Soniq("memory://")) == "Soniq('memory://', driver='memory', schema='public')"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_failing_connect_logs_and_raises_no_password(
    driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"postgresql://app:{PW}@127.0.0.1:{free_port()}/shop"
    caplog.set_level(logging.DEBUG)
    eq = Soniq(url, driver=driver, connect_timeout=0.5, acquire_timeout=0.5)

    @eq.job(name="ping")
    async def ping() -> None: ...

    with pytest.raises(DatabaseUnavailable) as info:
        await eq.enqueue(ping)
    with pytest.raises(DatabaseUnavailable):
        await eq.run_worker(burst=True, wait_for_database=1.2)  # logs its retries
    await eq.close()
    assert any("retrying" in r.getMessage() for r in caplog.records)
    assert PW not in str(info.value) and PW not in repr(info.value.args)
    for record in caplog.records:
        assert PW not in record.getMessage(), record.getMessage()
        assert PW not in caplog.text


@pytest.mark.timeout(60)
def test_the_sync_twin_logs_and_raises_no_password(caplog: pytest.LogCaptureFixture) -> None:
    url = f"postgresql://app:{PW}@127.0.0.1:{free_port()}/shop"
    caplog.set_level(logging.DEBUG)
    eq = Soniq(url, connect_timeout=0.5, acquire_timeout=0.5)
    with pytest.raises(DatabaseUnavailable) as info:
        eq.sync.get_job(1)
    eq.sync.close()
    assert PW not in str(info.value)
    assert PW not in caplog.text
