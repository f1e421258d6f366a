"""Soniq's embedded SQLite backend beside huey's ``SqliteHuey``, in the same run.

``python -m benchmarks.embedded [--quick] [-n N] [--repeats R] [--json PATH]``, and
the ``embedded`` part of ``python -m benchmarks`` (``nox -s bench``).

Every measurement gets a fresh database file in a temporary directory, on the same
disk for both systems, both in WAL mode. Each figure is taken at two durability
levels, with both systems at the same one (read back from each system's own
connection and printed):

* ``FULL``: Soniq's default; huey with ``fsync=True`` (its ``PRAGMA synchronous=2``;
  huey's default sets no pragma, which is SQLite's compiled default, FULL here).
* ``NORMAL``: Soniq with ``sqlite:///path.db?synchronous=normal``; huey through a
  storage subclass that runs ``PRAGMA synchronous=1`` on each connection (huey's own
  ``fsync=False`` means OFF). At NORMAL the last commits before a power loss can be
  lost, on both.

* **enqueue**: N jobs enqueued one by one from this process: ``eq.sync.enqueue(job,
  n=i)``, ``await eq.enqueue(job, n=i)`` and huey's ``task(i)``, each after its
  system's setup (untimed: ``ensure_initialized``, huey's table creation).
* **floors** under the enqueue, by hand with sqlite3 and no queue code, one
  autocommit ``INSERT`` per job: Soniq's statement into Soniq's table (``raw``), and
  huey's statement into huey's table and index with huey's serialised message
  (``floor``): the cheapest commit of a job row that any queue claiming in priority
  order (so keeping at least one index) can make. Their ratios to huey are printed
  too: when even the ``floor`` row is under 2x huey, no one-by-one enqueue can reach it.
* **drain**: N queued no-op jobs (queued untimed, Soniq with ``enqueue_many``, huey
  with ``task(i)``) drained by one worker process, timed from the spawn of the process
  to the moment every job has finished: for Soniq ``python -m soniq worker
  benchmarks.embedded_jobs:eq --burst --concurrency C``, up to the process's exit (so
  it includes the worker's shutdown); for huey a consumer with 4 worker threads
  (``Consumer(huey, workers=4, worker_type='thread')``, what ``huey_consumer -w 4 -k
  thread`` builds) that counts ``SIGNAL_COMPLETE`` and reports when the N-th task
  finished (its shutdown is not timed). Interpreter start-up and imports are in both.
  Afterwards the rows are checked: every Soniq job ``done``, huey's queue empty.

A warm-up round (N/5 jobs, untimed) comes first; then each repeat runs every figure of
a kind (enqueue, drain) back to back, in an order rotated from one repeat to the next.
Ratios Soniq/huey are per repeat, against huey at the same level, and summarised by
their median; the target is 2x huey.
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
from collections.abc import Callable
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
from soniq.core.sql import sqlite as soniq_sql
from soniq.drivers import sqlite as soniq_sqlite

HUEY_VERSION = "3.5.4"  # pip install huey==3.5.4
TARGET_RATIO = 2.0
ROOT = Path(__file__).resolve().parent.parent
SYNC_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


LEVELS = ("FULL", "NORMAL")


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    system: str  # soniq | huey
    kind: str  # enqueue | drain
    level: str  # FULL | NORMAL: the synchronous pragma of both systems
    jobs: str = "sync"  # sync | async: the job function (Soniq)
    concurrency: int = 4  # worker slots (Soniq drains)
    versus: str | None = None  # the huey figure this one's ratio is taken against
    target: bool = False  # the 2x target applies


def figures() -> list[Figure]:
    out: list[Figure] = []
    for level in LEVELS:
        huey_enqueue, huey_drain = f"huey-enqueue-{level}", f"huey-drain-{level}"
        out += [
            Figure(
                f"soniq-enqueue-sync-{level}",
                f"soniq eq.sync.enqueue, {level}",
                "soniq",
                "enqueue",
                level,
                versus=huey_enqueue,
                target=True,
            ),
            Figure(
                f"soniq-enqueue-async-{level}",
                f"soniq await eq.enqueue, {level}",
                "soniq",
                "enqueue",
                level,
                jobs="async",
                versus=huey_enqueue,
            ),
            Figure(huey_enqueue, f"huey {HUEY_VERSION} task(i), {level}", "huey", "enqueue", level),
            Figure(
                f"raw-enqueue-{level}",
                f"raw sqlite3: INSERT into soniq_jobs, one per commit, {level}",
                "raw",
                "enqueue",
                level,
                versus=huey_enqueue,
            ),
            Figure(
                f"floor-enqueue-{level}",
                f"raw sqlite3: huey's INSERT into huey's table, one per commit, {level}",
                "raw",
                "enqueue",
                level,
                versus=huey_enqueue,
            ),
        ]
        for jobs, concurrency in (("sync", 4), ("sync", 20), ("async", 4), ("async", 20)):
            out.append(
                Figure(
                    f"soniq-drain-{jobs}-{concurrency}-{level}",
                    f"soniq worker, {jobs} jobs, concurrency {concurrency}, {level}",
                    "soniq",
                    "drain",
                    level,
                    jobs=jobs,
                    concurrency=concurrency,
                    versus=huey_drain,
                    target=(jobs, concurrency) == ("sync", 4),
                )
            )
        label = f"huey {HUEY_VERSION} consumer, 4 threads, {level}"
        out.append(Figure(huey_drain, label, "huey", "drain", level))
    return out


# --- settings ------------------------------------------------------------------------


def _pragmas(conn: sqlite3.Connection) -> dict[str, str]:
    sync = conn.execute("PRAGMA synchronous").fetchone()[0]
    journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    return {"synchronous": SYNC_NAMES.get(sync, str(sync)), "journal_mode": str(journal)}


def settings(tmp: Path) -> dict[str, dict[str, str]]:
    """The synchronous/journal settings each system's own connections use, read back."""
    out: dict[str, dict[str, str]] = {}
    for level in LEVELS:
        app = ej.make_soniq(str(tmp / f"settings-soniq-{level}.db"), level)
        app.sync.ensure_initialized()
        backend = app.sync.backend
        conn = soniq_sqlite.connect(backend.path, backend.synchronous)  # type: ignore[attr-defined]
        try:
            out[f"soniq {level}"] = _pragmas(conn)
        finally:
            conn.close()
            app.sync.close()
    for level in (*LEVELS, "default"):
        h, _ = ej.make_huey(str(tmp / f"settings-huey-{level}.db"), level)
        out[f"huey {level}"] = _pragmas(h.storage.conn)
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

    def enqueue(self, f: Figure, n: int) -> float:
        path = self.fresh(f.key)
        deadline = time.perf_counter() + self.timeout
        if f.system == "soniq" and f.jobs == "sync":
            app = ej.make_soniq(str(path), f.level)
            app.sync.ensure_initialized()
            try:
                enqueue = app.sync.enqueue
                return self._one_by_one(f, n, deadline, lambda i: enqueue(ej.noop_sync, n=i))
            finally:
                app.sync.close()
        if f.system == "soniq":
            return asyncio.run(self._enqueue_async(f, path, n, deadline))
        if f.key.startswith("floor-"):
            return self._enqueue_floor(f, path, n, deadline)
        if f.system == "raw":
            return self._enqueue_raw(f, path, n, deadline)
        h, task = ej.make_huey(str(path), f.level)
        try:
            h.storage.conn  # noqa: B018  (open the connection before the clock starts)
            rate = self._one_by_one(f, n, deadline, task)
            if h.pending_count() != n:
                raise RuntimeError(f"{f.key}: {h.pending_count()} queued, not {n}")
            return rate
        finally:
            h.storage.close()

    def _one_by_one(
        self, f: Figure, n: int, deadline: float, enqueue_one: Callable[[int], object]
    ) -> float:
        """Jobs per second of ``enqueue_one(i)`` for i in 0..n-1, one after another;
        gives up past ``deadline``."""
        started = time.perf_counter()
        for i in range(n):
            enqueue_one(i)
            if i % 256 == 0 and time.perf_counter() > deadline:
                raise TimeoutError(f"{f.key}: {i} enqueued in {self.timeout}s")
        return n / (time.perf_counter() - started)

    def _enqueue_raw(self, f: Figure, path: Path, n: int, deadline: float) -> float:
        """The floor under Soniq's one-by-one enqueue: the same row into the same table
        (same indexes), by hand, one autocommit INSERT per job."""
        ej.make_soniq(str(path), f.level).sync.ensure_initialized()
        conn = soniq_sqlite.connect(str(path), f.level)
        insert = soniq_sql.INSERT_JOB

        def insert_one(i: int) -> None:
            now = time.time()
            conn.execute(
                insert, (ej.NOOP_SYNC, "default", f'{{"n": {i}}}', 0, now, 3, None, None, now)
            )

        try:
            return self._one_by_one(f, n, deadline, insert_one)
        finally:
            conn.close()

    def _enqueue_floor(self, f: Figure, path: Path, n: int, deadline: float) -> float:
        """The floor under any queue that keeps its jobs in a table with a claim index:
        huey's own statement into huey's own table and index (created by huey), with
        huey's serialised message as the data, by hand, one autocommit INSERT per job:
        huey's enqueue without huey's Python around it."""
        h, task = ej.make_huey(str(path), f.level)
        data = h.serialize_task(task.s(0))
        h.storage.close()
        conn = soniq_sqlite.connect(str(path), f.level)
        insert = "INSERT INTO task (queue, data, priority) VALUES (?, ?, ?)"
        try:
            return self._one_by_one(
                f, n, deadline, lambda i: conn.execute(insert, ("embedded", data, 0))
            )
        finally:
            conn.close()

    async def _enqueue_async(self, f: Figure, path: Path, n: int, deadline: float) -> float:
        app = ej.make_soniq(str(path), f.level)
        await app.ensure_initialized()
        try:
            started = time.perf_counter()
            for i in range(n):
                await app.enqueue(ej.noop, n=i)
                if i % 256 == 0 and time.perf_counter() > deadline:
                    raise TimeoutError(f"{f.key}: {i} enqueued in {self.timeout}s")
            return n / (time.perf_counter() - started)
        finally:
            await app.close()

    # drain

    def drain(self, f: Figure, n: int) -> float:
        path = self.fresh(f.key)
        if f.system == "soniq":
            return self._drain_soniq(f, path, n)
        return self._drain_huey(f, path, n)

    def _drain_soniq(self, f: Figure, path: Path, n: int) -> float:
        job = ej.noop_sync if f.jobs == "sync" else ej.noop
        app = ej.make_soniq(str(path), f.level)
        app.sync.ensure_initialized()
        for start in range(0, n, 1000):
            app.sync.enqueue_many(job, [{"n": i} for i in range(start, min(n, start + 1000))])
        app.sync.close()
        env = {**os.environ, "SONIQ_EMBEDDED_DB": str(path), "SONIQ_EMBEDDED_SYNC": f.level}
        env.pop("HUEY_EMBEDDED_DB", None)
        cmd = [
            sys.executable,
            "-m",
            "soniq",
            "worker",
            "benchmarks.embedded_jobs:eq",
            "--burst",
            "--concurrency",
            str(f.concurrency),
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
            raise TimeoutError(f"{f.key}: worker still running after {self.timeout}s") from None
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{f.key}: worker exited {proc.returncode}: {err.strip()[-500:]}")
        conn = sqlite3.connect(str(path))
        try:
            rows = dict(conn.execute("SELECT status, count(*) FROM soniq_jobs GROUP BY status"))
        finally:
            conn.close()
        if rows.get("done", 0) != n:
            raise RuntimeError(f"{f.key}: {rows} after the drain, not {n} done")
        return n / elapsed

    def _drain_huey(self, f: Figure, path: Path, n: int) -> float:
        key = f.key
        h, task = ej.make_huey(str(path), f.level)
        for i in range(n):
            task(i)
        h.storage.close()
        env = {**os.environ, "HUEY_EMBEDDED_DB": str(path), "HUEY_EMBEDDED_SYNC": f.level}
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
        h, _ = ej.make_huey(str(path), f.level)
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
        figs = figures()
        runner = Runner(tmp, args.n, args.timeout)
        series = {f.key: Series() for f in figs}
        groups = [[f for f in figs if f.kind == kind] for kind in ("enqueue", "drain")]

        def once(f: Figure, n: int) -> float:
            return (runner.enqueue if f.kind == "enqueue" else runner.drain)(f, n)

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
