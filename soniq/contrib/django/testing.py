"""Test helpers for a Django project on Soniq (see also :mod:`soniq.testing`).

Django's ``TransactionTestCase`` empties the tables of the project's models after
each test, but Soniq's tables are not models of the project (the admin's ``Job`` is
unmanaged): jobs a test committed stay for the next test, whose ``drain`` would run
them. Call :func:`clear_jobs` in ``setUp``::

    from soniq.contrib.django.testing import clear_jobs

    class CheckoutTests(TransactionTestCase):
        def setUp(self) -> None:
            clear_jobs()
"""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from soniq.contrib.django.conf import soniq_settings

__all__ = ["clear_jobs"]


def clear_jobs() -> None:
    """Delete every job, worker, schedule and queue setting from Soniq's tables on
    the test database (on Django's connection of ``SONIQ["DATABASE"]``, so in a
    ``TestCase`` it is rolled back with the test). The schema version stays.

    Refuses (``ImproperlyConfigured``) unless the connection is on a test database
    (Django's test runner renamed it: ``test_...`` or its ``TEST["NAME"]``)."""
    options = soniq_settings()
    connection = connections[options["DATABASE"]]
    name = connection.settings_dict["NAME"] or ""
    test_name = (connection.settings_dict.get("TEST") or {}).get("NAME")
    if not (name.startswith("test_") or (test_name and name == test_name)):
        raise ImproperlyConfigured(
            f"clear_jobs() deletes every job: it runs on a test database only, and "
            f"DATABASES[{connection.alias!r}] is {name!r}"
        )
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name) "
            "FROM information_schema.tables WHERE table_schema = %s "
            "AND table_name LIKE 'soniq\\_%%' AND table_name <> 'soniq_migrations' "
            "AND table_type = 'BASE TABLE'",
            [options["SCHEMA"]],
        )
        # DELETE, not TRUNCATE: TRUNCATE's lock would make Soniq's own pool wait for
        # the end of a TestCase's transaction.
        for (table,) in cursor.fetchall():
            cursor.execute(f"DELETE FROM {table}")
