"""The project's Soniq, configured from Django's settings.

``SONIQ = {"DATABASE": "default", "SCHEMA": "public", ...}`` names one of
``DATABASES`` (the URL is built from that alias's settings, so there is no second URL
to keep in step) and the schema of Soniq's tables. :func:`get_soniq` returns the one
:class:`DjangoSoniq` of the process; ``from soniq.contrib.django import eq`` is the
same object.

The instance follows its database alias: when Django's test runner renames the
database to ``test_...`` (after the project's modules were imported and their jobs
registered), the next call that needs the database uses the test database, with the
same jobs and middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from soniq.app import Soniq

log = logging.getLogger("soniq.contrib.django")

#: The keys of ``settings.SONIQ`` and their defaults.
DEFAULTS: Mapping[str, Any] = {
    "DATABASE": "default",
    "SCHEMA": "public",
    "DRIVER": None,
    "POOL_SIZE": 10,
    "CONNECT_TIMEOUT": 5.0,
    "ACQUIRE_TIMEOUT": 10.0,
    "PREPARED_STATEMENTS": True,
    "AUTODISCOVER": ("jobs", "tasks"),
}

# Keys of a PostgreSQL alias's OPTIONS that are Django's, not libpq's.
_DJANGO_OPTIONS = frozenset(
    {
        "isolation_level",
        "server_side_binding",
        "pool",
        "assume_role",
        "cursor_factory",
        "context",
        "prepare_threshold",
    }
)
_POSTGRES_VENDORS = ("postgresql",)


def soniq_settings() -> dict[str, Any]:
    """``settings.SONIQ`` over :data:`DEFAULTS`; an unknown key is an
    ``ImproperlyConfigured`` error that names the known ones."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    given = getattr(settings, "SONIQ", None) or {}
    if not isinstance(given, Mapping):
        raise ImproperlyConfigured(f"SONIQ must be a dict, got {type(given).__name__}")
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ImproperlyConfigured(
            f"SONIQ: unknown key(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}"
        )
    merged = {**DEFAULTS, **given}
    if merged["DATABASE"] not in settings.DATABASES:
        raise ImproperlyConfigured(
            f"SONIQ['DATABASE'] is {merged['DATABASE']!r}, which is not in DATABASES "
            f"({', '.join(settings.DATABASES)})"
        )
    return merged


def _settings_dict(alias: str) -> dict[str, Any]:
    """The alias's settings as Django's connections use them (the dict the test
    runner renames NAME in)."""
    from django.db import connections

    settings_dict: dict[str, Any] = connections.settings[alias]
    return settings_dict


def _key(alias: str) -> tuple[Any, ...]:
    d = _settings_dict(alias)
    return (d.get("NAME"), d.get("HOST"), d.get("PORT"), d.get("USER"), d.get("PASSWORD"))


def database_url(alias: str = "default") -> str:
    """A ``postgresql://`` URL for Django's database ``alias``: NAME, USER, PASSWORD,
    HOST (a socket directory too) and PORT, and the libpq parameters of its OPTIONS
    (``sslmode``, ``sslrootcert``, ``application_name``...) as query parameters.
    Django's own OPTIONS (``isolation_level``, ``pool``, ``server_side_binding``...)
    are left out. Raises ``ImproperlyConfigured`` for a database that is not
    PostgreSQL."""
    from django.core.exceptions import ImproperlyConfigured
    from django.db import connections

    d = _settings_dict(alias)
    vendor = connections[alias].vendor
    if vendor not in _POSTGRES_VENDORS:
        raise ImproperlyConfigured(
            f"soniq.contrib.django needs a PostgreSQL database; DATABASES[{alias!r}] is "
            f"{vendor} ({d.get('ENGINE')}). Point SONIQ['DATABASE'] at a PostgreSQL alias"
        )
    return url_from_settings(d)


#: libpq parameters a Django project may set in OPTIONS that asyncpg does not know
#: (it would pass them to the server as settings, and every connection would fail).
_LIBPQ_ONLY = frozenset(
    {
        "connect_timeout",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
    }
)


def url_from_settings(settings_dict: Mapping[str, Any]) -> str:
    """The ``postgresql://`` URL of a PostgreSQL entry of ``DATABASES`` (see
    :func:`database_url`)."""
    d = settings_dict
    query: dict[str, str] = {}
    for name, value in (d.get("OPTIONS") or {}).items():
        # Left out: Django's own options, and libpq's that asyncpg (the default
        # driver) would send to the server as settings and fail on; Soniq has its
        # own connect_timeout (SONIQ["CONNECT_TIMEOUT"]) and sets keepalives itself.
        if name in _DJANGO_OPTIONS or name in _LIBPQ_ONLY:
            continue
        if isinstance(value, bool):
            query[name] = "1" if value else "0"
        elif isinstance(value, (str, int, float)):
            query[name] = str(value)
    host = str(d.get("HOST") or "")
    port = str(d.get("PORT") or "")
    if host.startswith("/") or (not host and port):
        # A Unix socket (its directory, or libpq's default one): host= and port=
        # as parameters, which libpq and asyncpg both read.
        if host:
            query["host"] = host
        if port:
            query["port"] = port
        host = port = ""
    elif ":" in host and not host.startswith("["):  # an IPv6 address
        host = f"[{host}]"
    user = str(d.get("USER") or "")
    password = str(d.get("PASSWORD") or "")
    auth = ""
    if user:
        auth = quote(user, safe="")
        if password:
            auth += ":" + quote(password, safe="")
        auth += "@"
    netloc = auth + quote(host, safe=":[]") + (f":{port}" if port else "")
    name = quote(str(d.get("NAME") or ""), safe="")
    url = f"postgresql://{netloc}/{name}"
    # quote, not quote_plus: libpq does not read "+" as a space.
    return f"{url}?{urlencode(query, quote_via=quote)}" if query else url


def _build(options: Mapping[str, Any]) -> Soniq:
    return Soniq(
        database_url(options["DATABASE"]),
        driver=options["DRIVER"],
        schema=options["SCHEMA"],
        pool_size=options["POOL_SIZE"],
        connect_timeout=options["CONNECT_TIMEOUT"],
        acquire_timeout=options["ACQUIRE_TIMEOUT"],
        prepared_statements=options["PREPARED_STATEMENTS"],
    )


class DjangoSoniq(Soniq):
    """The project's :class:`Soniq`, on the database of ``SONIQ["DATABASE"]``.

    It is a plain :class:`Soniq` (``@eq.job``, ``eq.enqueue``, ``eq.sync``, the worker,
    ``soniq.testing``), that also follows its alias: when Django's test runner creates
    the test database (and switches NAME to it) or destroys it (and switches back),
    the app's hooks call :meth:`follow`, which closes the pools it had and points it
    there, keeping the registered jobs and middleware. Keep a reference to ``eq``
    rather than to ``eq.sync`` across such a switch.
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        self._soniq_options = dict(options)
        self._soniq_key = _key(options["DATABASE"])
        self._soniq_lock = threading.Lock()
        # Soniq.__init__ validates and adopts a configuration: a fresh Soniq does the
        # first, and this instance adopts what it built.
        self._adopt(_build(options)._config)

    @property
    def alias(self) -> str:
        """The Django database alias Soniq uses (``SONIQ["DATABASE"]``)."""
        alias: str = self._soniq_options["DATABASE"]
        return alias

    def follow(self) -> None:
        """Point this instance at its alias's database as the settings now say (a no-op
        when they have not changed): close the pools it had, keep the jobs and
        middleware. The app calls it when Django creates or destroys a test database."""
        options = self._soniq_options
        key = _key(options["DATABASE"])
        with self._soniq_lock:
            if key == self._soniq_key:
                return
            old = self._config
            fresh = _build(options)._config
            fresh.registry = old.registry
            fresh.middleware = old.middleware
            self.close_pools()
            self._soniq_key = key
            self._adopt(fresh)
            log.debug("Soniq follows DATABASES[%r] to %s", options["DATABASE"], fresh.shown_url)

    def close_pools(self) -> None:
        """Close the pools this instance has opened (the sync twin's, and the async
        one when no event loop is running in this thread); they reopen on next use.
        Called before Django drops a test database, and when the alias changes."""
        sync = self.__dict__.get("_sync")
        if sync is not None:
            with contextlib.suppress(Exception):
                sync.close()
        backend = self.__dict__.get("backend")
        if backend is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            with contextlib.suppress(Exception):
                asyncio.run(backend.close())


_instance: DjangoSoniq | None = None
_instance_lock = threading.Lock()


def get_soniq() -> DjangoSoniq:
    """The project's Soniq (created on first call from ``settings.SONIQ``)."""
    global _instance
    if _instance is None:
        with _instance_lock:
            if _instance is None:
                _instance = DjangoSoniq(soniq_settings())
    return _instance


def close_for_test_database(alias: str) -> None:
    """Close the project Soniq's pools if it uses ``alias`` (before Django drops that
    alias's test database, which open connections would block)."""
    if _instance is not None and _instance._soniq_options["DATABASE"] == alias:
        _instance.close_pools()


def follow_database(alias: str) -> None:
    """Point the project Soniq at ``alias``'s database as the settings now say, if it
    uses ``alias`` (after Django created or destroyed its test database)."""
    if _instance is not None and _instance._soniq_options["DATABASE"] == alias:
        _instance.follow()
