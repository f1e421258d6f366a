"""The Django app ``soniq.contrib.django`` (label ``soniq``)."""

from __future__ import annotations

import functools
import importlib
from typing import Any

from django.apps import AppConfig, apps
from django.conf import settings
from django.core import checks
from django.utils.module_loading import module_has_submodule

#: The Tasks backend's path in ``settings.TASKS`` (Django 6).
TASKS_BACKEND = "soniq.contrib.django.tasks.SoniqBackend"


class SoniqConfig(AppConfig):  # type: ignore[misc]  # Django has no type information
    """At start: import the ``jobs`` and ``tasks`` modules of every installed app
    (``SONIQ["AUTODISCOVER"]``), so that a worker knows every job of the project;
    register the Tasks backend's job when ``settings.TASKS`` uses it; and have
    Django's test runner close Soniq's pools before it drops a test database."""

    name = "soniq.contrib.django"
    label = "soniq"
    verbose_name = "Soniq"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """See the class docstring."""
        from soniq.contrib.django.conf import soniq_settings

        checks.register(check_settings)
        _close_pools_before_test_database_is_dropped()
        if _uses_tasks_backend():
            from soniq.contrib.django import tasks

            tasks.register_runner()
        autodiscover(soniq_settings()["AUTODISCOVER"])


def autodiscover(module_names: Any = ("jobs", "tasks")) -> list[str]:
    """Import ``<app>.<name>`` for each installed app (in ``INSTALLED_APPS`` order)
    and each of ``module_names`` that exists; return the modules imported. An error
    inside such a module propagates (a worker must not start without its jobs)."""
    imported = []
    for config in apps.get_app_configs():
        if config.name == SoniqConfig.name:
            continue  # ours: soniq.contrib.django.tasks is the Tasks backend
        for name in module_names:
            if module_has_submodule(config.module, name):
                module = f"{config.name}.{name}"
                importlib.import_module(module)
                imported.append(module)
    return imported


def _uses_tasks_backend() -> bool:
    tasks = getattr(settings, "TASKS", None) or {}
    return any(
        isinstance(options, dict) and options.get("BACKEND") == TASKS_BACKEND
        for options in tasks.values()
    )


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """``manage.py check``: ``SONIQ`` is valid and names a PostgreSQL database."""
    from django.core.exceptions import ImproperlyConfigured

    from soniq.contrib.django.conf import database_url, soniq_settings

    try:
        database_url(soniq_settings()["DATABASE"])
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="soniq.E001")]
    return []


_patched = False


def _close_pools_before_test_database_is_dropped() -> None:
    """Wrap ``BaseDatabaseCreation.create_test_db`` and ``destroy_test_db`` (once): the
    project's Soniq follows the alias to the test database and back, and its pools on
    the test database close before Django drops it (an open connection would make the
    DROP DATABASE fail)."""
    global _patched
    if _patched:
        return
    from django.db.backends.base.creation import BaseDatabaseCreation

    create, destroy = BaseDatabaseCreation.create_test_db, BaseDatabaseCreation.destroy_test_db

    @functools.wraps(create)
    def create_test_db(self: Any, *args: Any, **kwargs: Any) -> Any:
        from soniq.contrib.django.conf import follow_database

        name = create(self, *args, **kwargs)
        follow_database(self.connection.alias)
        return name

    @functools.wraps(destroy)
    def destroy_test_db(self: Any, *args: Any, **kwargs: Any) -> Any:
        from soniq.contrib.django.conf import close_for_test_database, follow_database

        close_for_test_database(self.connection.alias)
        try:
            return destroy(self, *args, **kwargs)
        finally:
            follow_database(self.connection.alias)

    BaseDatabaseCreation.create_test_db = create_test_db
    BaseDatabaseCreation.destroy_test_db = destroy_test_db
    _patched = True
