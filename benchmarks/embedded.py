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
* **threads**: the same one-by-one enqueue from 8 threads of this process at once
  (N/8 each; what a threaded web server's requests do): ``eq.sync.enqueue`` beside
  huey's ``task(i)``. Besides jobs/s, the slowest single call of each run is recorded
  (the median over repeats is printed under the table): how long one request can be
  held up by the others.
* **drain**: N queued no-op jobs (queued untimed, Soniq with ``enqueue_many``, huey
  with ``task(i)``) drained by one fresh worker process
  (:mod:`benchmarks.embedded_jobs`), which imports only its own system's library and
  times the drain itself, after its imports (as the PostgreSQL worker benchmark does):
  for Soniq the call ``eq.sync.run_worker(concurrency=C, burst=True)``, from the
  worker's start to its return (so its shutdown is included); for huey a consumer with
  4 worker threads (``Consumer(huey, workers=4, worker_type='thread')``, what
  ``huey_consumer -w 4 -k thread`` builds), from ``start()`` until its
  ``SIGNAL_COMPLETE`` has fired N times (its shutdown is not timed). Interpreter
  start-up and imports are in neither: they differ with what else is installed (huey
  imports psycopg when it is present) and say nothing about draining. Afterwards the
  rows are checked: every Soniq job ``done``, huey's queue empty.

A warm-up round (N/5 jobs, untimed) comes first; then each repeat runs every figure of
a kind (enqueue, threads, drain) back to back, in an order rotated from one repeat to the next.
Ratios Soniq/huey are per repeat, against huey at the same level, and summarised by
their median; the target is 2x huey.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
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
THREADS = 8  # producer threads of the "threads" figures
ROOT = Path(__file__).resolve().parent.parent
SYNC_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


LEVELS = ("FULL", "NORMAL")
KINDS = ("enqueue", "threads", "drain")


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    system: str  # soniq | huey
    kind: str  # enqueue | threads | drain
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
        huey_threads = f"huey-threads-{level}"
        out += [
            Figure(
                f"soniq-threads-{level}",
                f"soniq eq.sync.enqueue, {THREADS} threads, {level}",
                "soniq",
                "threads",
                level,
                versus=huey_threads,
            ),
            Figure(
                huey_threads,
                f"huey {HUEY_VERSION} task(i), {THREADS} threads, {level}",
                "huey",
                "threads",
                level,
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
        conn = backend.database.connect()  # type: ignore[attr-defined]
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
        self.slowest: dict[str, list[float]] = {}  # "threads" figures: ms, per run

    def fresh(self, name: str) -> Path:
        self.seq += 1
        return self.tmp / f"{self.seq:03d}-{name}.db"

    # enqueue

    def enqueue(self, f: Figure, n: int) -> float:
        path = self.fresh(f.key)
        deadline = time.perf_counter() + self.timeout
        if f.system == "soniq" and f.jobs == "async":
            return asyncio.run(self._enqueue_async(f, path, n, deadline))
        if f.key.startswith("floor-"):
            return self._enqueue_floor(f, path, n, deadline)
        if f.system == "raw":
            return self._enqueue_raw(f, path, n, deadline)
        with self._enqueuer(f, path) as enqueue_one:
            rate = self._one_by_one(f, n, deadline, enqueue_one)
        self._check_queued(f, path, n)
        return rate

    @contextlib.contextmanager
    def _enqueuer(self, f: Figure, path: Path) -> Iterator[Callable[[int], object]]:
        """``enqueue_one(i)`` of ``f``'s system (Soniq's ``eq.sync.enqueue`` or huey's
        ``task(i)``) on a fresh file, everything set up before any clock starts (Soniq's
        schema, huey's connection); closed afterwards."""
        if f.system == "soniq":
            app = ej.make_soniq(str(path), f.level)
            app.sync.ensure_initialized()
            enqueue = app.sync.enqueue
            try:
                yield lambda i: enqueue(ej.noop_sync, n=i)
            finally:
                app.sync.close()
        else:
            h, task = ej.make_huey(str(path), f.level)
            h.storage.conn  # noqa: B018  (opened here, not by the first timed call)
            try:
                yield task
            finally:
                h.storage.close()

    def _check_queued(self, f: Figure, path: Path, n: int) -> None:
        queued = self._count_queued(f, path)
        if queued != n:
            raise RuntimeError(f"{f.key}: {queued} queued, not {n}")

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

    # threads

    def threads(self, f: Figure, n: int) -> float:
        """Jobs per second of THREADS threads enqueueing n/THREADS jobs each, one by
        one, all at once; the slowest single call goes to ``self.slowest``."""
        path = self.fresh(f.key)
        deadline = time.perf_counter() + self.timeout
        per = max(1, n // THREADS)
        slowest = [0.0] * THREADS
        errors: list[BaseException] = []

        def produce(k: int) -> None:
            try:
                for i in range(k * per, (k + 1) * per):
                    started = time.perf_counter()
                    enqueue_one(i)
                    slowest[k] = max(slowest[k], time.perf_counter() - started)
                    if started > deadline:
                        return
            except BaseException as exc:
                errors.append(exc)

        # Daemon threads, joined with a deadline: a stuck call fails this figure and
        # does not hold up the run (or the interpreter's exit).
        producers = [
            threading.Thread(target=produce, args=(k,), daemon=True) for k in range(THREADS)
        ]
        with self._enqueuer(f, path) as enqueue_one:
            started = time.perf_counter()
            for thread in producers:
                thread.start()
            for thread in producers:
                thread.join(max(0.0, deadline - time.perf_counter()))
            elapsed = time.perf_counter() - started
        if errors:
            raise errors[0]
        if any(t.is_alive() for t in producers) or time.perf_counter() > deadline:
            raise TimeoutError(f"{f.key}: not done in {self.timeout}s")
        self._check_queued(f, path, per * THREADS)
        self.slowest.setdefault(f.key, []).append(max(slowest) * 1000)
        return per * THREADS / elapsed

    def _count_queued(self, f: Figure, path: Path) -> int:
        """Jobs in ``f``'s system's file (Soniq: every row; huey: its pending tasks)."""
        if f.system == "soniq":
            with contextlib.closing(sqlite3.connect(str(path))) as conn:
                return int(conn.execute("SELECT count(*) FROM soniq_jobs").fetchone()[0])
        h, _ = ej.make_huey(str(path), f.level)
        try:
            return int(h.pending_count())
        finally:
            h.storage.close()

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
        env = {"SONIQ_EMBEDDED_DB": str(path), "SONIQ_EMBEDDED_SYNC": f.level}
        args = ["soniq-drain", str(f.concurrency), str(self.timeout)]
        elapsed = self._drain_child(f, env, args)
        conn = sqlite3.connect(str(path))
        try:
            rows = dict(conn.execute("SELECT status, count(*) FROM soniq_jobs GROUP BY status"))
        finally:
            conn.close()
        if rows.get("done", 0) != n:
            raise RuntimeError(f"{f.key}: {rows} after the drain, not {n} done")
        return n / elapsed

    def _drain_huey(self, f: Figure, path: Path, n: int) -> float:
        h, task = ej.make_huey(str(path), f.level)
        for i in range(n):
            task(i)
        h.storage.close()
        env = {"HUEY_EMBEDDED_DB": str(path), "HUEY_EMBEDDED_SYNC": f.level}
        elapsed = self._drain_child(f, env, ["huey-drain", str(n), str(self.timeout)])
        left = self._count_queued(f, path)
        if left:
            raise RuntimeError(f"{f.key}: {left} tasks still queued after the drain")
        return n / elapsed

    def _drain_child(self, f: Figure, env: dict[str, str], args: list[str]) -> float:
        """Run ``python -m benchmarks.embedded_jobs ARGS`` with ``env`` (and only that
        system's variables) and return the drain's seconds, as the child measured
        them after its imports."""
        env = {**{k: v for k, v in os.environ.items() if "_EMBEDDED_" not in k}, **env}
        cmd = [sys.executable, "-m", "benchmarks.embedded_jobs", *args]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        # The child gives up after self.timeout itself; this is for a child that hangs.
        wait = self.timeout + 30
        try:
            out, err = proc.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise TimeoutError(f"{f.key}: still running after {wait:.0f}s") from None
        words = out.split()
        if proc.returncode != 0 or len(words) != 3 or words[0] != "done":
            raise RuntimeError(f"{f.key}: {out.strip()!r}, exit {proc.returncode}: {err[-500:]}")
        return float(words[2])


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
        groups = [[f for f in figs if f.kind == kind] for kind in KINDS]
        measure = {"enqueue": runner.enqueue, "threads": runner.threads, "drain": runner.drain}

        def once(f: Figure, n: int) -> float:
            return measure[f.kind](f, n)

        print(f"warm-up ({max(50, args.n // 5)} jobs each) ...", flush=True)
        for group in groups:
            for f in group:
                try:
                    once(f, max(50, args.n // 5))
                except Exception as exc:
                    series[f.key].failure = f"warm-up: {exc}"
        runner.slowest.clear()
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
        "slowest_ms": runner.slowest,
        "seconds": time.perf_counter() - run_started,
    }


def report(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    figs: list[Figure] = result["figures"]
    series: dict[str, Series] = result["series"]
    rows: list[list[str]] = []
    out_figs: dict[str, Any] = {}
    verdicts: list[str] = []
    slowest: dict[str, list[float]] = result.get("slowest_ms", {})
    for kind in KINDS:
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
            if f.key in slowest and not s.failure:
                entry["slowest_call_ms"] = [round(x, 2) for x in slowest[f.key]]
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
        *(_slowest_line(out_figs, level) for level in LEVELS),
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
        "threads": THREADS,
        "figures": out_figs,
        "seconds": round(result["seconds"], 1),
    }
    return "\n".join(lines), data


def _slowest_line(figs: dict[str, Any], level: str) -> str:
    """The slowest single call of the "threads" figures at ``level``."""
    parts = []
    for name in ("soniq", "huey"):
        calls = figs.get(f"{name}-threads-{level}", {}).get("slowest_call_ms")
        parts.append(f"{name} {statistics.median(calls):.1f} ms" if calls else f"{name} failed")
    return (
        f"{THREADS} threads, slowest single enqueue of a run (median of the repeats), "
        f"{level}: {', '.join(parts)}"
    )


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
