"""Soniq in a Django project.

:func:`close_stale_connections` runs around every sync job in a worker (as Django does
around each request), so that a job never reuses a connection the server has closed
meanwhile. It costs a dictionary lookup where Django is not loaded.
"""

from __future__ import annotations

import sys


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
