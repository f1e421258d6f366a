"""What every benchmark needs: throwaway databases, a description of the machine,
robust statistics and the table printed at the end."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def admin_url() -> str:
    """A URL with the right to create databases (``SONIQ_BENCH_DATABASE_URL``)."""
    return os.environ.get("SONIQ_BENCH_DATABASE_URL", DEFAULT_ADMIN_URL)


def url_for_database(admin: str, dbname: str) -> str:
    """``admin`` pointing at database ``dbname``, as a ``postgresql://`` URL (what
    Soniq, asyncpg and psycopg all take)."""
    info = psycopg.conninfo.conninfo_to_dict(admin)
    user = info.get("user") or "postgres"
    password = f":{info['password']}" if info.get("password") else ""
    host = info.get("host") or "127.0.0.1"
    port = info.get("port") or "5432"
    return f"postgresql://{user}{password}@{host}:{port}/{dbname}"


@contextlib.contextmanager
def fresh_databases(
    admin: str, labels: Sequence[str], *, statement_timeout: float
) -> Iterator[dict[str, str]]:
    """Create one empty database per label; yield ``{label: url}``; drop them all.

    Every statement on them is cancelled after ``statement_timeout`` seconds, so a
    pathological statement fails the measurement instead of stalling the run."""
    run = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    names = {label: f"soniq_bench_{run}_{label.replace('-', '_')}" for label in labels}
    created: list[str] = []
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in names.values():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                created.append(name)
                conn.execute(
                    sql.SQL("ALTER DATABASE {} SET statement_timeout = {}").format(
                        sql.Identifier(name), sql.Literal(f"{int(statement_timeout * 1000)}ms")
                    )
                )
        yield {label: url_for_database(admin, name) for label, name in names.items()}
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in created:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


def quiesce(conn: psycopg.Connection[Any], limit: float = 10.0) -> float:
    """Wait (up to ``limit`` seconds) until no autovacuum worker runs on the server, so
    that the vacuum of one system's rows does not land in another's measurement; the
    seconds waited. (Each measurement also empties its tables right after it.)"""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
        ).fetchone()
        if not row or not row[0]:
            break
        time.sleep(0.05)
    return time.perf_counter() - started


def _meminfo_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    kib = int(line.split()[1])
                    return f"{kib / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def _git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "soniq"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "-"
    return rev + ("+dirty" if dirty else "")


def cpu_check() -> float:
    """Milliseconds for a fixed pure-Python loop (best of 5): how fast this machine is
    right now. Shared or virtual machines vary by tens of percent over minutes; the
    suite measures it at the start and at the end of a run so that runs can be
    compared."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        total = 0
        for i in range(200_000):
            total += i * i
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 2)


def machine_info(admin: str) -> dict[str, Any]:
    """The facts a reader needs to weigh the figures: hardware, software, server settings."""
    with psycopg.connect(admin, autocommit=True) as conn:
        settings = {
            name: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]  # type: ignore[index]
            for name in (
                "server_version",
                "synchronous_commit",
                "fsync",
                "shared_buffers",
                "max_wal_size",
            )
        }
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory": _meminfo_total(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "postgresql": settings.pop("server_version"),
        "postgresql_settings": settings,
        "packages": {
            d: _version(d)
            for d in (
                "soniq",
                "asyncpg",
                "psycopg",
                "psycopg-pool",
                "pgqueuer",
                "procrastinate",
                "huey",
            )
        },
        "soniq_revision": _git_revision(),
        "cpu_check_ms": cpu_check(),
    }


def describe_machine(info: dict[str, Any]) -> str:
    s = info["postgresql_settings"]
    p = info["packages"]
    return "\n".join(
        [
            f"machine: {info['cores']} cores ({info['usable_cores']} usable), "
            f"{info['memory']} memory, {info['platform']}",
            f"PostgreSQL {info['postgresql']}: synchronous_commit={s['synchronous_commit']}, "
            f"fsync={s['fsync']}, shared_buffers={s['shared_buffers']}, "
            f"max_wal_size={s['max_wal_size']}",
            f"CPU check (a fixed pure-Python loop, lower is faster): {info['cpu_check_ms']} ms",
            f"Python {info['python']}; soniq {p['soniq']} ({info['soniq_revision']}), "
            f"asyncpg {p['asyncpg']}, psycopg {p['psycopg']}, psycopg-pool {p['psycopg-pool']}; "
            f"peers: pgqueuer {p['pgqueuer']}, procrastinate {p['procrastinate']}, "
            f"huey {p['huey']}",
        ]
    )


@dataclass
class Series:
    """The values of one measurement, one per repeat: rates (jobs/s), or latencies
    (ms) and memory (MiB) for the worker figures."""

    rates: list[float] = field(default_factory=list)

    failure: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def low(self) -> float:
        return min(self.rates)

    @property
    def high(self) -> float:
        return max(self.rates)

    def as_dict(self, digits: int = 1) -> dict[str, Any]:
        if not self.rates:
            return {"rates": [], "median": None, "min": None, "max": None, "failure": self.failure}
        return {
            "rates": [round(r, digits) for r in self.rates],
            "median": round(self.median, digits),
            "min": round(self.low, digits),
            "max": round(self.high, digits),
            "failure": self.failure,
        }


def paired_ratios(numerator: Series, denominator: Series) -> list[float]:
    """Per-repeat ratios: both were measured in the same repeat, moments apart (none
    when either side failed)."""
    if numerator.failure or denominator.failure:
        return []
    return [a / b for a, b in zip(numerator.rates, denominator.rates, strict=True)]


def target(
    what: str,
    value: float | None,
    want: float,
    *,
    at_most: bool = False,
    digits: int | None = None,
    spec: str = "",
) -> dict[str, Any]:
    """One target of a result: ``value`` (None: not measured, which misses it) against
    ``>= want``, or ``<= want`` with ``at_most``; ``value`` is shown rounded to
    ``digits`` and ``want`` formatted with ``spec``."""
    met = value is not None and (value <= want if at_most else value >= want)
    return {
        "what": what,
        "value": None if value is None else round(value, digits),
        "target": f"{'<=' if at_most else '>='} {want:{spec}}",
        "met": met,
    }


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """A plain-text table; columns in ``right`` are right-aligned."""
    filled = [r for r in rows if r]  # an empty row is a blank separator line
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *filled, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(r) if r else "" for r in rows)
    return "\n".join(out)


def write_results(name: str, data: dict[str, Any], path: str | None) -> Path:
    """Write ``data`` as JSON to ``path`` or ``benchmarks/results/NAME-<utc time>.json``."""
    if path is None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = RESULTS_DIR / f"{name}-{stamp}.json"
    else:
        target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2) + "\n")
    return target
