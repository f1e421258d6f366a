"""``python manage.py soniq COMMAND ...``: the ``soniq`` command (``soniq --help``)
with Django set up and the project's Soniq (``soniq.contrib.django:eq``).

``manage.py soniq worker --concurrency 20`` runs ``soniq worker
soniq.contrib.django:eq --concurrency 20``; the operator commands (``jobs``, ``job``,
``retry``, ``cancel``, ``purge``, ``queues``, ``workers``, ``stats``, ``migrate``) get
``--app soniq.contrib.django:eq``; ``check`` and ``dashboard`` the app as their
argument. A command given ``--app`` or ``--database-url`` is left as it is.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from django.core.management.base import BaseCommand, CommandError

APP = "soniq.contrib.django:eq"
# Django's own options, which ManagementUtility has read already: not soniq's.
_DJANGO_OPTIONS = ("--settings", "--pythonpath")


def soniq_argv(argv: Sequence[str]) -> list[str]:
    """The ``soniq`` command line for ``manage.py soniq ARGV...``: the project's
    Soniq added where the command takes it (:func:`soniq.cli.with_app`)."""
    from soniq.cli import with_app

    return with_app(_without_django_options(argv), APP)


def _without_django_options(argv: Sequence[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _DJANGO_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in _DJANGO_OPTIONS)):
            kept.append(arg)
    return kept


def run(argv: Sequence[str]) -> int:
    """Run ``soniq`` with :func:`soniq_argv` of ``argv``; its exit status."""
    from soniq.cli import main

    try:
        return main(soniq_argv(argv))
    except SystemExit as exc:  # argparse's usage errors and --help
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1


class Command(BaseCommand):  # type: ignore[misc]  # Django has no type information
    """``manage.py soniq ...``: see the module's docstring."""

    help = "Soniq's command (worker, migrate, jobs, retry, cancel, ...) on the project's Soniq"
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Everything after ``soniq`` goes to the soniq command."""
        parser.add_argument("argv", nargs=argparse.REMAINDER, help="soniq's command and options")

    def run_from_argv(self, argv: list[str]) -> None:
        """``manage.py soniq ...``: exit with soniq's status (Django's parser is not
        used, so ``--help`` shows soniq's)."""
        sys.exit(run(argv[2:]))

    def print_help(self, prog_name: str, subcommand: str) -> None:
        """``manage.py help soniq``: soniq's own help."""
        run(["--help"])

    def handle(self, *args: Any, **options: Any) -> None:
        """``call_command("soniq", "worker", "--burst")``: a non-zero exit status is a
        :class:`CommandError` carrying it."""
        status = run([*args, *options.get("argv", [])])
        if status:
            raise CommandError(f"soniq exited with status {status}", returncode=status)
