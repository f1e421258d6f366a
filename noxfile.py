"""Developer tasks: `nox -s tests tests_oldest reliability lint types imports` and
`nox -s bench -- --quick` are what CI runs."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "lint", "types", "imports"]
nox.options.reuse_existing_virtualenvs = True

RUFF = "ruff==0.17.6"  # lint's, and the generator's (tools/unasync.py)

# Everything the suite exercises: the package with psycopg's binary wheels, and the
# frameworks whose connections transactional enqueue must accept.
TEST_DEPS = [
    "-e",
    ".[binary,sqlalchemy,django,tortoise,psycopg2]",
    "pytest>=8",
    "pytest-asyncio>=0.24",
    "pytest-timeout>=2.3",
    "pytest-postgresql>=6",
    "hypothesis>=6.100",
    # The seed documentation's examples are FastAPI routes; they run as written.
    "fastapi>=0.110",
    "httpx>=0.27",
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


@nox.session(python="3.10")
def tests_oldest(session: nox.Session) -> None:
    """The behaviour suites on the oldest Python Soniq supports (asyncio's timeouts
    and a few other details differ there). CI runs it after `tests`."""
    session.install(*TEST_DEPS)
    session.run(
        "pytest",
        *(
            session.posargs
            or ["tests/test_behaviour.py", "tests/test_api.py", "tests/test_sqlite.py"]
        ),
    )


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
    session.install("-e", ".[binary]", "mypy==2.4.1")
    session.run("mypy", "--strict", "soniq")


@nox.session
def imports(session: nox.Session) -> None:
    """Layering contracts (pyproject.toml [tool.importlinter])."""
    session.install("-e", ".[binary]", "import-linter>=2.0")
    session.run("lint-imports")


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
    session.install("-e", ".[binary]", *BENCH_PEERS, "matplotlib==3.11.2")
    session.run("python", "-m", "benchmarks", *session.posargs)
