"""Soniq's embedded SQLite backend beside huey's ``SqliteHuey``, in the same run.

``python -m benchmarks.embedded [--quick] [-n N] [--repeats R] [--json PATH]``

Every measurement gets a fresh database file in a temporary directory, on the same
disk for both systems. Both run with ``journal_mode=WAL`` and ``synchronous=FULL``
(read back from each system's own connection and printed): Soniq sets FULL itself
(:mod:`soniq.drivers.sqlite`); huey is given ``fsync=True`` (its ``PRAGMA
synchronous=2``). When huey's default (no ``fsync`` argument) is another level, it is
measured as an extra row.

* **enqueue**: N jobs enqueued one by one from this process: ``eq.sync.enqueue(job,
  n=i)``, ``await eq.enqueue(job, n=i)`` and huey's ``task(i)``, each after its
  system's setup (untimed: ``ensure_initialized``, huey's table creation).
* **drain**: N queued no-op jobs (queued untimed, Soniq with ``enqueue_many``, huey
  with ``task(i)``) drained by one worker process, timed from the spawn of the process
  to the moment every job has finished: for Soniq ``python -m soniq worker
  benchmarks.embedded_jobs:eq --burst --concurrency C``, up to the process's exit (so
  it includes the worker's shutdown); for huey a consumer with 4 worker threads
  (``Consumer(huey, workers=4, worker_type='thread')``, what ``huey_consumer -w 4 -k
  thread`` builds) that counts ``SIGNAL_COMPLETE`` and reports when the N-th task
  finished (its shutdown is not timed). Interpreter start-up and imports are in both.
  Afterwards the rows are checked: every Soniq job ``done``, huey's queue empty.

A warm-up round (N/5 jobs, untimed) comes first; then each repeat runs every system of
a measurement back to back, in an order rotated from one repeat to the next. Ratios
Soniq/huey are per repeat and summarised by their median; the target is 2x huey.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import embedded_jobs as ej
from benchmarks._common import (
    Series,
    _git_revision,
    _meminfo_total,
    _version,
    paired_ratios,
    render_table,
    write_results,
)
from soniq.drivers import sqlite as soniq_sqlite

HUEY_VERSION = "3.5.4"  # pip install huey==3.5.4
TARGET_RATIO = 2.0
ROOT = Path(__file__).resolve().parent.parent
SYNC_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    system: str  # soniq | huey
    kind: str  # enqueue | drain
    versus: str | None = None  # the huey figure this one's ratio is taken against
    target: bool = False  # the 2x target applies


HUEY_FULL = "huey-full"
HUEY_DEFAULT = "huey-default"


def figures(huey_default_differs: bool) -> list[Figure]:
    out = [
        Figure(
            "soniq-enqueue-sync", "soniq eq.sync.enqueue", "soniq", "enqueue", "huey-enqueue", True
        ),
        Figure("soniq-enqueue-async", "soniq await eq.enqueue", "soniq", "enqueue", "huey-enqueue"),
        Figure("huey-enqueue", f"huey {HUEY_VERSION} task(i), FULL", "huey", "enqueue"),
    ]
    if huey_default_differs:
        out.append(Figure("huey-enqueue-default", "huey task(i), its default", "huey", "enqueue"))
    out += [
        Figure(
            "soniq-drain-sync-4",
            "soniq worker, sync jobs, concurrency 4",
            "soniq",
            "drain",
            HUEY_FULL,
            True,
        ),
        Figure(
            "soniq-drain-sync-20",
            "soniq worker, sync jobs, concurrency 20",
            "soniq",
            "drain",
            HUEY_FULL,
        ),
        Figure(
            "soniq-drain-async-4",
            "soniq worker, async jobs, concurrency 4",
            "soniq",
            "drain",
            HUEY_FULL,
        ),
        Figure(
            "soniq-drain-async-20",
            "soniq worker, async jobs, concurrency 20",
            "soniq",
            "drain",
            HUEY_FULL,
        ),
        Figure(HUEY_FULL, f"huey {HUEY_VERSION} consumer, 4 threads, FULL", "huey", "drain"),
    ]
    if huey_default_differs:
        out.append(Figure(HUEY_DEFAULT, "huey consumer, 4 threads, its default", "huey", "drain"))
    return out


# --- settings ------------------------------------------------------------------------


def _pragmas(conn: sqlite3.Connection) -> dict[str, str]:
    sync = conn.execute("PRAGMA synchronous").fetchone()[0]
    journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    return {"synchronous": SYNC_NAMES.get(sync, str(sync)), "journal_mode": str(journal)}


def settings(tmp: Path) -> dict[str, dict[str, str]]:
    """The synchronous/journal settings each system's own connections use, read back."""
    conn = soniq_sqlite.connect(str(tmp / "settings-soniq.db"))
    try:
        out = {"soniq": _pragmas(conn)}
    finally:
        conn.close()
    for label, fsync in (("huey (fsync=True)", "1"), ("huey default", "default")):
        h, _ = ej.make_huey(str(tmp / f"settings-huey-{fsync}.db"), fsync)
        out[label] = _pragmas(h.storage.conn)
        h.storage.close()
    return out


def machine() -> dict[str, Any]:
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
        "sqlite": sqlite3.sqlite_version,
        "packages": {"soniq": _version("soniq"), "huey": _version("huey")},
        "soniq_revision": _git_revision(),
    }


# --- the measurements ------------------------------------------------------------------


class Runner:
    def __init__(self, tmp: Path, n: int, timeout: float) -> None:
        self.tmp = tmp
        self.n = n
        self.timeout = timeout
        self.seq = 0

    def fresh(self, name: str) -> Path:
        self.seq += 1
        return self.tmp / f"{self.seq:03d}-{name}.db"

    # enqueue

    def enqueue(self, key: str, n: int) -> float:
        path = self.fresh(key)
        deadline = time.perf_counter() + self.timeout
        if key == "soniq-enqueue-sync":
            app = ej.make_soniq(str(path))
            app.sync.ensure_initialized()
            try:
                enqueue = app.sync.enqueue
                started = time.perf_counter()
                for i in range(n):
                    enqueue(ej.noop_sync, n=i)
                    if i % 256 == 0 and time.perf_counter() > deadline:
                        raise TimeoutError(f"{key}: {i} enqueued in {self.timeout}s")
                return n / (time.perf_counter() - started)
            finally:
                app.sync.close()
        if key == "soniq-enqueue-async":
            return asyncio.run(self._enqueue_async(path, n, deadline))
        fsync = "default" if key == "huey-enqueue-default" else "1"
        h, task = ej.make_huey(str(path), fsync)
        try:
            h.storage.conn  # noqa: B018  (open the connection before the clock starts)
            started = time.perf_counter()
            for i in range(n):
                task(i)
                if i % 256 == 0 and time.perf_counter() > deadline:
                    raise TimeoutError(f"{key}: {i} enqueued in {self.timeout}s")
            rate = n / (time.perf_counter() - started)
            if h.pending_count() != n:
                raise RuntimeError(f"{key}: {h.pending_count()} queued, not {n}")
            return rate
        finally:
            h.storage.close()

    async def _enqueue_async(self, path: Path, n: int, deadline: float) -> float:
        app = ej.make_soniq(str(path))
        await app.ensure_initialized()
        try:
            started = time.perf_counter()
            for i in range(n):
                await app.enqueue(ej.noop, n=i)
                if i % 256 == 0 and time.perf_counter() > deadline:
                    raise TimeoutError(f"soniq-enqueue-async: {i} enqueued in {self.timeout}s")
            return n / (time.perf_counter() - started)
        finally:
            await app.close()

    # drain

    def drain(self, key: str, n: int) -> float:
        path = self.fresh(key)
        if key.startswith("soniq-"):
            return self._drain_soniq(key, path, n)
        return self._drain_huey(key, path, n)

    def _drain_soniq(self, key: str, path: Path, n: int) -> float:
        _, _, kind, concurrency = key.split("-")
        job = ej.noop_sync if kind == "sync" else ej.noop
        app = ej.make_soniq(str(path))
        app.sync.ensure_initialized()
        for start in range(0, n, 1000):
            app.sync.enqueue_many(job, [{"n": i} for i in range(start, min(n, start + 1000))])
        app.sync.close()
        env = {**os.environ, "SONIQ_EMBEDDED_DB": str(path)}
        env.pop("HUEY_EMBEDDED_DB", None)
        cmd = [
            sys.executable,
            "-m",
            "soniq",
            "worker",
            "benchmarks.embedded_jobs:eq",
            "--burst",
            "--concurrency",
            concurrency,
            "--log-level",
            "WARNING",
        ]
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        try:
            _, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise TimeoutError(f"{key}: worker still running after {self.timeout}s") from None
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{key}: worker exited {proc.returncode}: {err.strip()[-500:]}")
        conn = sqlite3.connect(str(path))
        try:
            rows = dict(conn.execute("SELECT status, count(*) FROM soniq_jobs GROUP BY status"))
        finally:
            conn.close()
        if rows.get("done", 0) != n:
            raise RuntimeError(f"{key}: {rows} after the drain, not {n} done")
        return n / elapsed

    def _drain_huey(self, key: str, path: Path, n: int) -> float:
        fsync = "default" if key == HUEY_DEFAULT else "1"
        h, task = ej.make_huey(str(path), fsync)
        for i in range(n):
            task(i)
        h.storage.close()
        env = {**os.environ, "HUEY_EMBEDDED_DB": str(path), "HUEY_EMBEDDED_FSYNC": fsync}
        env["SONIQ_EMBEDDED_DB"] = str(self.tmp / "unused-soniq.db")
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.embedded_jobs",
            "huey-drain",
            str(n),
            str(self.timeout),
        ]
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "done N" as the N-th task completes
        elapsed = time.perf_counter() - started
        try:
            _, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise TimeoutError(f"{key}: consumer still running after {self.timeout}s") from None
        if not line.startswith("done") or proc.returncode != 0:
            raise RuntimeError(f"{key}: {line.strip()!r}, exit {proc.returncode}: {err[-500:]}")
        h, _ = ej.make_huey(str(path), fsync)
        try:
            left = h.pending_count()
        finally:
            h.storage.close()
        if left:
            raise RuntimeError(f"{key}: {left} tasks still queued after the drain")
        return n / elapsed


# --- the run -------------------------------------------------------------------------------


def rotate(items: list[Figure], k: int) -> list[Figure]:
    k %= len(items)
    return items[k:] + items[:k]


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    run_started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="soniq-embedded-") as tmpdir:
        tmp = Path(tmpdir)
        pragmas = settings(tmp)
        huey_default_differs = pragmas["huey default"] != pragmas["huey (fsync=True)"]
        figs = figures(huey_default_differs)
        runner = Runner(tmp, args.n, args.timeout)
        series = {f.key: Series() for f in figs}
        groups = [[f for f in figs if f.kind == kind] for kind in ("enqueue", "drain")]

        def once(f: Figure, n: int) -> float:
            return (runner.enqueue if f.kind == "enqueue" else runner.drain)(f.key, n)

        print(f"warm-up ({max(50, args.n // 5)} jobs each) ...", flush=True)
        for group in groups:
            for f in group:
                try:
                    once(f, max(50, args.n // 5))
                except Exception as exc:
                    series[f.key].failure = f"warm-up: {exc}"
        for r in range(args.repeats):
            for group in groups:
                for f in rotate(group, r):
                    s = series[f.key]
                    if s.failure:
                        continue
                    try:
                        s.rates.append(once(f, args.n))
                    except Exception as exc:
                        s.failure = str(exc)
                        s.rates.clear()
            done = {k: round(s.rates[-1]) for k, s in series.items() if s.rates}
            print(f"repeat {r + 1}/{args.repeats}: {done}", flush=True)
    return {
        "benchmark": "embedded",
        "machine": info,
        "huey_version": HUEY_VERSION,
        "settings": pragmas,
        "n": args.n,
        "repeats": args.repeats,
        "figures": figs,
        "series": series,
        "seconds": time.perf_counter() - run_started,
    }


def report(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    figs: list[Figure] = result["figures"]
    series: dict[str, Series] = result["series"]
    rows: list[list[str]] = []
    out_figs: dict[str, Any] = {}
    verdicts: list[str] = []
    for kind in ("enqueue", "drain"):
        if rows:
            rows.append([])
        for f in (f for f in figs if f.kind == kind):
            s = series[f.key]
            entry: dict[str, Any] = {"label": f.label, "kind": kind, **s.as_dict()}
            if s.failure or not s.rates:
                cells = [f.label, "failed", "", "", ""]
            else:
                cells = [f.label, f"{s.median:,.0f}", f"{s.low:,.0f}-{s.high:,.0f}", "", ""]
            if f.versus:
                ratios = paired_ratios(s, series[f.versus])
                if ratios:
                    med = statistics.median(ratios)
                    cells[3] = f"{med:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
                    entry["ratio_vs"] = f.versus
                    entry["ratios"] = [round(x, 3) for x in ratios]
                    entry["ratio_median"] = round(med, 3)
                    if f.target:
                        met = med >= TARGET_RATIO
                        cells[4] = "yes" if met else "NO"
                        entry["target_met"] = met
                        verdicts.append(
                            f"{f.label}: {med:.2f}x huey, target >= {TARGET_RATIO:.0f}x "
                            f"{'met' if met else 'NOT met'}"
                        )
            rows.append(cells)
            out_figs[f.key] = entry
    table = render_table(
        ["figure (jobs/s)", "median", "min-max", "soniq/huey", f">= {TARGET_RATIO:.0f}x"],
        rows,
        right={1, 2, 3},
    )
    m = result["machine"]
    st = result["settings"]
    lines = [
        f"machine: {m['cores']} cores ({m['usable_cores']} usable), {m['memory']} memory, "
        f"{m['platform']}",
        f"Python {m['python']}, SQLite {m['sqlite']}; soniq {m['packages']['soniq']} "
        f"({m['soniq_revision']}), huey {m['packages']['huey']} (pinned {HUEY_VERSION})",
        "settings read back from each system's connection:",
        *(
            f"  {name}: journal_mode={v['journal_mode']}, synchronous={v['synchronous']}"
            for name, v in st.items()
        ),
        f"N={result['n']} jobs, {result['repeats']} repeats (median, min-max), "
        "fresh database file per measurement",
        "",
        table,
        "",
        *verdicts,
        f"run took {result['seconds']:.1f} s",
    ]
    data = {
        "benchmark": "embedded",
        "machine": m,
        "huey_version": HUEY_VERSION,
        "settings": st,
        "n": result["n"],
        "repeats": result["repeats"],
        "target_ratio": TARGET_RATIO,
        "figures": out_figs,
        "seconds": round(result["seconds"], 1),
    }
    return "\n".join(lines), data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.embedded", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 repeat, N=300 (a smoke test)")
    parser.add_argument("-n", type=int, default=None, help="jobs per measurement (3000)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats (5)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--json", default=None, help="where to write the results")
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = 300 if args.quick else 3000
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.timeout is None:
        args.timeout = 15.0 if args.quick else 120.0
    result = run(args)
    text, data = report(result)
    print(text)
    path = write_results("embedded", data, args.json)
    print(f"results: {path}")
    failed = [k for k, v in data["figures"].items() if v.get("failure")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
