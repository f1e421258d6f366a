"""The ``soniq`` command.

``soniq migrate --database-url URL [--schema S]`` applies pending migrations;
``soniq migrate --sql [--schema S]`` prints the DDL instead, for projects that migrate
with Alembic, Django or plain psql.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from soniq.core.errors import SoniqError
from soniq.core.sql.migrate import LATEST_VERSION, MigrationPlan


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soniq", description="Soniq job queue")
    commands = parser.add_subparsers(dest="command", required=True)
    migrate = commands.add_parser("migrate", help="create or upgrade Soniq's tables")
    migrate.add_argument(
        "--database-url",
        default=os.environ.get("SONIQ_DATABASE_URL"),
        help="postgresql:// URL (default: $SONIQ_DATABASE_URL)",
    )
    migrate.add_argument("--schema", default="public", help="schema of Soniq's tables")
    migrate.add_argument("--sql", action="store_true", help="print the DDL instead of applying it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``soniq`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "migrate":
        return _migrate(args)
    return 2  # pragma: no cover  (argparse rejects unknown commands)


def _migrate(args: argparse.Namespace) -> int:
    try:
        if args.sql:
            sys.stdout.write(MigrationPlan(args.schema).script())
            return 0
        if not args.database_url:
            print("soniq migrate: pass --database-url or set SONIQ_DATABASE_URL", file=sys.stderr)
            return 2
        from soniq.app import Soniq

        eq = Soniq(args.database_url, schema=args.schema)
        try:
            eq.sync.ensure_initialized()
        finally:
            eq.sync.close()
    except (SoniqError, ValueError) as exc:
        print(f"soniq migrate: {exc}", file=sys.stderr)
        return 1
    print(f"soniq migrate: schema {args.schema!r} is at version {LATEST_VERSION}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
