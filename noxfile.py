"""Developer tasks: `nox -s tests tests_oldest reliability lint types imports` and
`nox -s bench -- --quick` are what CI runs."""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "lint", "types", "imports"]
nox.options.reuse_existing_virtualenvs = True

RUFF = "ruff==0.17.6"  # lint's, and the generator's (tools/unasync.py)

# Everything the suite exercises: the package with psycopg's binary wheels, and the
# frameworks whose connections transactional enqueue must accept.
TEST_DEPS = [
    "-e",
    ".[binary,sqlalchemy,django,tortoise,psycopg2,dashboard,prometheus,otel,flask,fastapi]",
    # tests/test_flask.py: the example app (examples/flask_app) uses Flask-SQLAlchemy.
    "flask-sqlalchemy>=3.1",
    # tests/test_otel.py records spans with the SDK's in-memory exporter.
    "opentelemetry-sdk>=1.20",
    "pytest>=8",
    "pytest-asyncio>=0.24",
    "pytest-timeout>=2.3",
    "pytest-postgresql>=6",
    "hypothesis>=6.100",
    # The seed documentation's examples are FastAPI routes; they run as written.
    "fastapi>=0.110",
    "httpx>=0.27",
    # `soniq migrate --sql --from N` is run inside an Alembic revision
    # (tests/test_migrate_tools.py).
    "alembic>=1.13",
    # The dashboard's browser tests drive the system's chromium through its
    # chromedriver (Debian's packages; .ci/run installs them), never a downloaded one.
    "selenium>=4.20",
    # tools/unasync.py formats what it generates with ruff (tests/test_unasync.py).
    RUFF,
]


@nox.session
def demo(session: nox.Session) -> None:
    """Soniq with no server at all: the embedded SQLite default, a worker with a
    progress bar, a retried job, a summary."""
    session.install("-e", ".[binary]")
    session.run("python", "examples/demo.py")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, against the PostgreSQL of SONIQ_TEST_DATABASE_URL (or a
    throwaway cluster when none answers)."""
    session.install(*TEST_DEPS)
    # The fault matrix (tests/reliability, minutes of real processes) has its own
    # session; its conftest deselects it here, and its quick bad-input matrix stays.
    session.run("pytest", *session.posargs)


@nox.session
def reliability(session: nox.Session) -> None:
    """The fault matrix of docs/reliability.md, with real worker processes and a
    PostgreSQL cluster of its own (started from the installed binaries, restarted and
    crashed by the tests; the shared server is never touched): restarts under a
    drain, a fault-injecting proxy, a stateful model check on PostgreSQL and SQLite,
    and a soak of SONIQ_SOAK_JOBS jobs (100,000 by default) with and without random
    SIGKILLs. Prints the figures at the end. `-- -k proxy` etc. pass to pytest."""
    session.install(*TEST_DEPS)
    session.run(
        "pytest",
        "tests/reliability",
        "--durations=5",
        *session.posargs,
    )


@nox.session
def coverage(session: nox.Session) -> None:
    """The test suite measured by coverage (configured in pyproject.toml: the worker
    and CLI processes the tests start count too); prints the lines missed."""
    session.install(*TEST_DEPS, "pytest-cov>=5", "coverage>=7.10")
    session.run("pytest", "--cov", "--cov-report=term", *session.posargs)


#: The oldest psycopg and psycopg-pool pyproject.toml accepts: a floor nothing runs
#: rots. (Under psycopg 3.1, which lacks ``notifies(timeout=)``, every lent
#: connection was closed on its return; under 3.2.0-3.3.5 a psycopg worker whose
#: connections go silent does not stop within 20 s, tests/test_half_open.py.)
OLDEST_PSYCOPG = ["psycopg[binary]==3.3.6", "psycopg-pool==3.2.0"]


@nox.session(python="3.10")
def tests_oldest(session: nox.Session) -> None:
    """The behaviour suites on the oldest Python Soniq supports (asyncio's timeouts
    and a few other details differ there), with the oldest psycopg and psycopg-pool
    it declares, and the suites of psycopg's own code paths (lent connections, the
    merged enqueue statement, connections that go silent). CI runs it after `tests`."""
    session.install(*TEST_DEPS)
    session.install(*OLDEST_PSYCOPG)
    session.run(
        "pytest",
        *(
            session.posargs
            or [
                "tests/test_behaviour.py",
                "tests/test_api.py",
                "tests/test_sqlite.py",
                "tests/test_lent_connections.py",
                "tests/test_group_commit.py",
                "tests/test_half_open.py",
            ]
        ),
    )


# soniq.contrib.django is tested on Django's LTS releases and the latest (6 needs
# Python 3.12; its Tasks backend is tested there).
DJANGO_VERSIONS = [("3.11", "4.2"), ("3.11", "5.2"), ("3.12", "6.0"), ("3.12", "6.1")]


@nox.session
@nox.parametrize("python,django", DJANGO_VERSIONS, ids=[version for _, version in DJANGO_VERSIONS])
def django(session: nox.Session, django: str) -> None:
    """soniq.contrib.django on each Django of DJANGO_VERSIONS (`nox -s "django(5.2)"`
    for one): the test project (tests/django_project) and the example project
    (examples/django_app), with Django's test runner, against the PostgreSQL of
    SONIQ_TEST_DATABASE_URL (default 127.0.0.1:5432, user postgres)."""
    from urllib.parse import unquote, urlsplit

    session.install("-e", ".[binary]", f"django~={django}.0")
    session.run(
        "python",
        "-m",
        "django",
        "test",
        "tests.django_project",
        env={"DJANGO_SETTINGS_MODULE": "tests.django_project.settings"},
    )
    admin = urlsplit(
        os.environ.get("SONIQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    session.chdir("examples/django_app")
    session.run(
        "python",
        "manage.py",
        "test",
        env={
            "DJANGO_SETTINGS_MODULE": "project.settings",
            "EXAMPLE_DB_NAME": f"soniq_example_{os.getpid()}",
            "PGHOST": admin.hostname or "127.0.0.1",
            "PGPORT": str(admin.port or 5432),
            "PGUSER": unquote(admin.username or "postgres"),
            "PGPASSWORD": unquote(admin.password or ""),
        },
    )


@nox.session
def screenshots(session: nox.Session) -> None:
    """Regenerate the dashboard's screenshots (docs/img/dashboard-*.png) with headless
    Chromium (Debian's chromium and chromium-driver) on a throwaway SQLite database.
    Not in the default sessions."""
    session.install("-e", ".[binary,dashboard]", "selenium>=4.20")
    session.run("python", "tools/dashboard_screenshots.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check, and the generated sync files are current."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("python", "tools/unasync.py", "--check")


@nox.session
def types(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".[binary,dashboard,prometheus,otel,flask,fastapi]", "mypy==2.4.1")
    session.run("mypy", "--strict", "soniq")


@nox.session
def imports(session: nox.Session) -> None:
    """Layering contracts (pyproject.toml [tool.importlinter])."""
    session.install("-e", ".[binary,dashboard,prometheus,otel,flask,fastapi]", "import-linter>=2.0")
    session.run("lint-imports")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (mkdocs-material, the API reference by mkdocstrings from
    the docstrings) built in strict mode: a broken link or reference fails it. The
    site lands in site/; `-- serve` previews it instead."""
    session.install(
        "-e",
        ".[binary,dashboard,prometheus,otel,flask,fastapi,django]",
        "mkdocs>=1.6,<2",
        "mkdocs-material>=9.5",
        "mkdocstrings[python]>=0.26",
    )
    session.env["NO_MKDOCS_2_WARNING"] = "1"
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", *session.posargs[1:])
    else:
        session.run("mkdocs", "build", "--strict", *session.posargs)


# The peers measured by `nox -s bench`, pinned so that figures compare across runs.
BENCH_PEERS = ["pgqueuer==1.6.0", "procrastinate==3.10.0", "huey==3.5.4"]


@nox.session
def bench(session: nox.Session) -> None:
    """Soniq beside the raw drivers and its peers (pgqueuer, procrastinate, huey,
    pinned): enqueue, drain, latency, worker memory and a drain over 1M finished rows,
    each system on a fresh database of SONIQ_BENCH_DATABASE_URL, and the SQLite
    backend beside huey's SqliteHuey; writes a table, JSON and a PNG chart to
    benchmarks/results/. `nox -s bench -- --quick` is a smoke run of
    under a minute. Not in the default sessions."""
    # prometheus: the drain with metrics (soniq-asyncpg-metrics) beside the one without.
    session.install("-e", ".[binary,prometheus]", *BENCH_PEERS, "matplotlib==3.11.2")
    session.run("python", "-m", "benchmarks", *session.posargs)
