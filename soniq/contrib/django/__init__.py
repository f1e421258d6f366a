"""Soniq in a Django project (docs/django.md).

Add ``"soniq.contrib.django"`` to ``INSTALLED_APPS`` and, optionally,
``SONIQ = {"DATABASE": "default", "SCHEMA": "public"}`` to the settings. Then::

    from soniq.contrib.django import eq      # the project's Soniq (get_soniq())

    @eq.job()
    def send_invoice(order_id: int) -> None: ...

The app imports each installed app's ``jobs`` and ``tasks`` modules at start, ships
Soniq's schema as Django migrations (``manage.py migrate``), runs the ``soniq``
command with the project's Soniq (``manage.py soniq worker``), an admin over the jobs,
and, on Django 6, a Tasks backend (:mod:`soniq.contrib.django.tasks`).

:func:`close_stale_connections` runs around every sync job in a worker (as Django does
around each request), so that a job never reuses a connection the server has closed
meanwhile. It costs a dictionary lookup where Django is not loaded.

This module imports neither Django nor the rest of Soniq (the worker runtime imports
it); the project's Soniq is built on first access.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__all__ = ["close_stale_connections", "eq", "get_soniq"]


def close_stale_connections() -> None:
    """In a configured Django project, close the connections that are unusable or
    past their ``CONN_MAX_AGE`` (``django.db.close_old_connections``); elsewhere,
    nothing."""
    if "django" not in sys.modules:
        return
    try:
        from django.conf import settings

        if not settings.configured:
            return
        from django.db import close_old_connections
    except Exception:  # a Django too broken to import: not ours to report here
        return
    close_old_connections()


def get_soniq() -> Any:
    """The project's :class:`~soniq.contrib.django.conf.DjangoSoniq` (a
    :class:`soniq.Soniq`), configured from ``settings.SONIQ`` and ``DATABASES`` on
    first call; the same object every time (``soniq.contrib.django.eq`` is this too).
    Typed as ``Any`` here; ``soniq.contrib.django.conf.get_soniq`` is the same,
    typed."""
    # Imported by name, and no type imported: the worker runtime imports this package
    # for close_stale_connections and must not depend on the Soniq facade
    # (import-linter's contract).
    return importlib.import_module("soniq.contrib.django.conf").get_soniq()


def __getattr__(name: str) -> Any:
    """``soniq.contrib.django.eq``: :func:`get_soniq`."""
    if name == "eq":
        return get_soniq()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
