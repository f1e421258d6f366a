"""Soniq in a Flask application: :class:`SoniqFlask`.

``SoniqFlask(app)`` (or ``ext = SoniqFlask(); ext.init_app(app)``) gives the app a
:class:`soniq.Soniq`, and three things with it:

- **Jobs run inside an app context.** A run middleware (``@eq.middleware``) pushes
  ``app.app_context()`` around every run of a job, sync or async: ``current_app``,
  ``g`` (fresh for each run) and Flask-SQLAlchemy's ``db.session`` (one per run,
  removed when the run ends) work in job bodies. A sync job's context is pushed in
  its own thread; an async job's in its own task. Teardown handlers
  (``@app.teardown_appcontext``) see the job's exception.
- **``flask soniq ...``**: every ``soniq`` command (``worker``, ``migrate``,
  ``jobs``, ``job``, ``queues``, ``retry``, ``cancel``, ``purge``, ``stats``,
  ``workers``, ``check``, ``dashboard``) on the app's Soniq, with the same options:
  ``flask --app shop soniq worker --concurrency 20``.
- **``app.extensions["soniq"]``** is the app's Soniq (also :attr:`SoniqFlask.eq`).

Where the Soniq comes from:

- ``SoniqFlask(app, eq=eq)`` wraps a Soniq you built, so that jobs can be declared
  with ``@eq.job`` at import time, before any app exists (the app-factory pattern).
  Its database is the one it was built with; ``SONIQ_*`` keys in ``app.config`` are
  then refused (they would be ignored).
- ``SoniqFlask(app)`` builds one from ``app.config``: ``SONIQ_DATABASE_URL``,
  ``SONIQ_DRIVER``, ``SONIQ_SCHEMA``, ``SONIQ_POOL_SIZE``, ``SONIQ_CONNECT_TIMEOUT``,
  ``SONIQ_ACQUIRE_TIMEOUT``, ``SONIQ_PREPARED_STATEMENTS`` (the keywords of
  :class:`soniq.Soniq`; a key left out takes Soniq's default, and without
  ``SONIQ_DATABASE_URL`` the ``SONIQ_DATABASE_URL`` environment variable, then the
  embedded SQLite file).

A Soniq runs the jobs of one app at a time: when ``init_app`` is given the same Soniq
again (a factory called once per test), its jobs run in the context of the latest app.

Transactional enqueue needs nothing of this module: ``eq.sync.enqueue(job,
connection=db.session, ...)`` joins Flask-SQLAlchemy's transaction (see
docs/flask.md).
"""

from __future__ import annotations

import sys
import types
import weakref
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import click

from soniq.app import Soniq
from soniq.core.errors import ConfigurationError
from soniq.middleware import RunContext

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["CONFIG_KEYS", "SoniqFlask", "run_command", "soniq_from_config"]

#: The ``app.config`` keys :class:`SoniqFlask` reads, and the :class:`soniq.Soniq`
#: keyword each one sets.
CONFIG_KEYS: Mapping[str, str] = {
    "SONIQ_DATABASE_URL": "database_url",
    "SONIQ_DRIVER": "driver",
    "SONIQ_SCHEMA": "schema",
    "SONIQ_POOL_SIZE": "pool_size",
    "SONIQ_CONNECT_TIMEOUT": "connect_timeout",
    "SONIQ_ACQUIRE_TIMEOUT": "acquire_timeout",
    "SONIQ_PREPARED_STATEMENTS": "prepared_statements",
}

#: The ``soniq`` commands ``flask soniq`` offers (each told the app's Soniq as
#: :func:`soniq.cli.with_app` says), and their summaries.
_COMMANDS: Mapping[str, str] = {
    "worker": "Run a worker for this app's jobs.",
    "check": "Check that this code can run every job waiting to run.",
    "migrate": "Create or upgrade Soniq's tables (--sql: print the DDL).",
    "jobs": "List jobs, newest first.",
    "job": "Show one job (--wait: wait for its end).",
    "queues": "List, pause, resume or limit queues.",
    "retry": "Put failed or cancelled jobs back in line.",
    "cancel": "Cancel jobs (ask running ones to stop).",
    "purge": "Delete finished jobs older than a duration.",
    "stats": "Jobs ended per minute.",
    "workers": "List the live workers and their jobs.",
    "dashboard": "Serve the web dashboard (pip install 'soniq[dashboard]').",
}

#: The module ``flask soniq`` hands to ``soniq.cli`` as ``module:eq``.
_CLI_MODULE = "_soniq_flask_cli"

#: The attribute of a Soniq that holds its :class:`_AppContext` middleware (on the
#: Soniq itself: the Soniq, its app and the middleware are collected together).
_MIDDLEWARE_ATTR = "_soniq_flask_app_context"


def soniq_from_config(config: Mapping[str, Any]) -> Soniq:
    """A new :class:`soniq.Soniq` built from the ``SONIQ_*`` keys of ``config``
    (``app.config``; see :data:`CONFIG_KEYS`); the keys left out take Soniq's
    defaults."""
    options = {kw: config[key] for key, kw in CONFIG_KEYS.items() if key in config}
    database_url = options.pop("database_url", None)
    return Soniq(database_url, **options)


class SoniqFlask:
    """The Flask extension: ``SoniqFlask(app, eq=None)``, or ``SoniqFlask(eq=eq)``
    then ``init_app(app)`` in an app factory. See the module's documentation."""

    def __init__(self, app: Flask | None = None, *, eq: Soniq | None = None) -> None:
        if eq is not None and not isinstance(eq, Soniq):
            raise TypeError(f"SoniqFlask(eq=...) takes a soniq.Soniq, got {eq!r}")
        self._eq = eq
        self._apps: weakref.WeakSet[Flask] = weakref.WeakSet()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Give ``app`` its Soniq (``app.extensions["soniq"]``), run the Soniq's jobs
        inside ``app``'s context, and add the ``flask soniq`` commands."""
        if "soniq" in app.extensions:
            raise RuntimeError(f"Soniq is already set up on the Flask app {app.name!r}")
        if self._eq is None:
            eq = soniq_from_config(app.config)
        else:
            given = sorted(key for key in CONFIG_KEYS if key in app.config)
            if given:
                raise ConfigurationError(
                    f"SoniqFlask(eq=...) uses the Soniq it was given; app.config's "
                    f"{', '.join(given)} would be ignored: pass the settings to Soniq(...), "
                    "or leave out eq= to build the Soniq from app.config"
                )
            eq = self._eq
        app.extensions["soniq"] = eq
        middleware = getattr(eq, _MIDDLEWARE_ATTR, None)
        if middleware is None:
            middleware = _AppContext()
            setattr(eq, _MIDDLEWARE_ATTR, middleware)
            eq.middleware(middleware)
        middleware.app = app
        app.cli.add_command(_command_group(app))
        self._apps.add(app)

    @property
    def eq(self) -> Soniq:
        """The Soniq: the one given as ``eq=``, else that of the current app (or of
        the only app set up, outside an app context)."""
        if self._eq is not None:
            return self._eq
        from flask import current_app, has_app_context

        if has_app_context() and current_app._get_current_object() in self._apps:  # type: ignore[attr-defined]
            eq: Soniq = current_app.extensions["soniq"]
            return eq
        apps = list(self._apps)
        if len(apps) == 1:
            only: Soniq = apps[0].extensions["soniq"]
            return only
        raise RuntimeError(
            "SoniqFlask.eq: no Flask app was set up with init_app"
            if not apps
            else "SoniqFlask.eq: several apps were set up; use it inside an app context"
        )


class _AppContext:
    """The run middleware of a Soniq: pushes ``app.app_context()`` around each run, of
    the latest app given to :meth:`SoniqFlask.init_app`."""

    def __init__(self) -> None:
        self.app: Flask | None = None

    def __call__(self, ctx: RunContext) -> AbstractContextManager[Any]:
        app = self.app
        return nullcontext() if app is None else app.app_context()


# -- flask soniq ...  ----------------------------------------------------------------


def _command_group(app: Flask) -> click.Group:
    group = click.Group(
        "soniq",
        help="Soniq's commands on this app's Soniq: the options of `soniq COMMAND --help`, "
        "without the database options (--app, --database-url, --schema).",
    )
    for name, summary in _COMMANDS.items():
        group.add_command(_delegating(app, name, summary))
    return group


def _delegating(app: Flask, name: str, summary: str) -> click.Command:
    def run(args: tuple[str, ...]) -> None:
        code = run_command(app.extensions["soniq"], name, list(args))
        click.get_current_context().exit(code)

    return click.Command(
        name,
        callback=run,
        params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
        help=f"{summary} Options: `flask soniq {name} --help`.",
        short_help=summary,
        add_help_option=False,  # --help goes to soniq's own parser, which knows the options
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


def run_command(eq: Soniq, name: str, args: list[str]) -> int:
    """Run ``soniq NAME ARGS...`` (:func:`soniq.cli.main`) on ``eq``, as ``flask soniq
    NAME ARGS...`` does, and return its exit status (the Soniq goes where the command
    takes it: :func:`soniq.cli.with_app`)."""
    from soniq import cli

    module = types.ModuleType(_CLI_MODULE, "The Soniq that `flask soniq` runs a command on.")
    module.eq = eq  # type: ignore[attr-defined]
    sys.modules[_CLI_MODULE] = module
    spec = f"{_CLI_MODULE}:eq"
    try:
        # After the command's own arguments: ``queues pause mail --app ...`` (argparse
        # would give ``pause`` to no positional if an option came first).
        return cli.main(cli.with_app([name, *args], spec))
    finally:
        sys.modules.pop(_CLI_MODULE, None)
