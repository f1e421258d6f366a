"""``python -m benchmarks`` (``nox -s bench``): the whole suite in one run.

1. Enqueue (:mod:`benchmarks.enqueue`): single, in a caller's transaction, batch; on
   asyncpg, psycopg async and psycopg sync; Soniq beside the raw driver and a peer.
2. Worker (:mod:`benchmarks.worker`): drain (async and sync jobs), enqueue-to-start
   latency, worker memory, drain over 1,000,000 finished rows; Soniq beside pgqueuer,
   procrastinate and the raw limit.
3. Embedded (:mod:`benchmarks.embedded`): the SQLite backend's enqueue and drain
   beside huey's ``SqliteHuey``, at ``synchronous`` FULL and NORMAL (no server).
4. Periodic (:mod:`benchmarks.periodic`): 10 schedules every second, scheduled by 4
   worker processes for 60 s: every tick enqueued once.
5. Limits (:mod:`benchmarks.limits`): a drain under a per-key concurrency limit, and
   an unlimited drain by a worker with limits on another job, beside today's drain.
6. Workflows (:mod:`benchmarks.workflows`): a fan-out with a fan-in callback and a
   chain, each beside as many independent jobs; the chain's latency per link.

Prints one table per part and the targets, writes
``benchmarks/results/bench-<UTC time>.json`` and a PNG chart beside it. ``--quick``
is a smoke run for CI (small N, one repeat, a tiny bloat case): it fails only when a
system produced no figure, never for what a figure is.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import embedded, enqueue, limits, periodic, worker, workflows
from benchmarks._common import (
    RESULTS_DIR,
    admin_url,
    cpu_check,
    describe_machine,
    fresh_databases,
    machine_info,
    write_results,
)

PARTS = ("enqueue", "worker", "embedded", "periodic", "limits", "workflows")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Soniq beside the raw drivers, pgqueuer and procrastinate, each on a "
        "fresh database (admin URL from SONIQ_BENCH_DATABASE_URL).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run for CI: small N, one repeat, 20k-row bloat case; checks only that "
        "every system produced a figure",
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default 3)")
    enq = parser.add_argument_group("enqueue")
    enq.add_argument("-n", type=int, default=None, help="jobs per single/tx measurement")
    enq.add_argument("--batch", type=int, default=None, help="jobs in one batch enqueue")
    enq.add_argument("--warmup", type=int, default=200, help="jobs per enqueue warm-up")
    enq.add_argument(
        "--drivers",
        nargs="+",
        choices=enqueue.DRIVERS,
        default=list(enqueue.DRIVERS),
        metavar="DRIVER",
    )
    enq.add_argument(
        "--cases", nargs="+", choices=enqueue.CASES, default=list(enqueue.CASES), metavar="CASE"
    )
    emb = parser.add_argument_group("embedded")
    emb.add_argument(
        "--embedded-n", type=int, default=None, help="jobs per SQLite measurement (3000)"
    )
    wrk = parser.add_argument_group("worker")
    wrk.add_argument("--drain", type=int, default=None, help="jobs per drain (default 20000)")
    wrk.add_argument("--latency", type=int, default=None, help="jobs per latency run (500)")
    wrk.add_argument(
        "--bloat-rows", type=int, default=None, help="finished rows of the bloat case (1M)"
    )
    wrk.add_argument("--bloat-drain", type=int, default=None, help="jobs per bloat drain (20000)")
    wrk.add_argument(
        "--systems",
        nargs="+",
        choices=[s.key for s in worker.systems()],
        default=None,
        metavar="SYSTEM",
        help="worker systems to run (default: all)",
    )
    per = parser.add_argument_group("periodic")
    per.add_argument(
        "--periodic-seconds", type=float, default=None, help="how long the workers run (60)"
    )
    parser.add_argument(
        "--statement-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="cancel any statement running longer (default 60, --quick 10); the "
        "measurement then fails and is not tried again",
    )
    parser.add_argument("--output", help="JSON file (default benchmarks/results/bench-*.json)")
    parser.add_argument("--chart", help="also write the PNG chart here (e.g. docs/benchmarks.png)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "n": (300, 5000),
        "batch": (2000, 20_000),
        "repeats": (1, 3),
        "statement_timeout": (10.0, 60.0),
        "drain": (1000, 20_000),
        "latency": (50, 500),
        "bloat_rows": (20_000, 1_000_000),
        "bloat_drain": (1000, 20_000),
        "embedded_n": (300, 3000),
        "periodic_seconds": (5.0, 60.0),
    }
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    counts = (
        args.n,
        args.batch,
        args.repeats,
        args.warmup,
        args.drain,
        args.latency,
        args.embedded_n,
    )
    if min(counts) < 1 or args.bloat_rows < 0 or args.bloat_drain < 1:
        parser.error("counts must be >= 1")
    args.drivers = list(dict.fromkeys(args.drivers))
    args.cases = [c for c in enqueue.CASES if c in args.cases]
    return args


def worker_sizes(args: argparse.Namespace) -> worker.Sizes:
    return worker.Sizes(
        drain=args.drain,
        warmup=min(args.drain, 200 if args.quick else 2000),
        latency=args.latency,
        latency_warmup=10 if args.quick else 30,
        loaded=10 * args.latency,
        rate=100.0,
        bloat_rows=args.bloat_rows,
        bloat_drain=args.bloat_drain,
        repeats=args.repeats,
        timeout=30.0 if args.quick else 120.0,
        settle=0.3 if args.quick else 0.5,
    )


def missing_figures(result: dict[str, Any]) -> list[str]:
    """Measures that produced no figure (failed, or never ran)."""
    out = []
    for part in PARTS:
        for m in result.get(part, {}).get("measures", []):
            if m["failure"] or m["median"] is None:
                out.append(f"{part} {m['id']}: {m['failure'] or 'no figure'}")
    beats = result.get("periodic")
    if beats is not None and len(beats["schedules"]) < beats["schedules_expected"]:
        out.append(f"periodic: {len(beats['schedules'])} schedules enqueued a tick")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("soniq", "asyncpg", "psycopg", "psycopg.pool", "pgqueuer", "procrastinate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    admin = admin_url()
    info = machine_info(admin)
    print(describe_machine(info), flush=True)
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "soniq", "machine": info, "quick": args.quick}
    if "enqueue" in args.parts:
        result["enqueue"] = enqueue.run_benchmark(args, admin)
    if "worker" in args.parts:
        sizes = worker_sizes(args)
        plan = [s for s in worker.systems() if args.systems is None or s.key in args.systems]
        print(
            f"worker: drain {sizes.drain:,} jobs per run (fewer for a system with a cap); "
            f"latency {sizes.latency} jobs at {sizes.rate:.0f}/s, and {sizes.loaded:,} "
            f"enqueued by {worker.LOAD_COROUTINES} coroutines at once; bloat: "
            f"{sizes.bloat_rows:,} finished rows, {sizes.bloat_drain:,} queued; "
            f"{sizes.repeats} repeat(s) after a warm-up",
            flush=True,
        )
        with fresh_databases(
            admin, [s.key for s in plan], statement_timeout=args.statement_timeout
        ) as urls:
            result["worker"] = worker.run_worker_benchmark(urls, sizes, plan)
    embedded_text = None
    if "embedded" in args.parts:
        print(f"embedded: SQLite beside huey, {args.embedded_n:,} jobs per run", flush=True)
        embedded_args = argparse.Namespace(
            n=args.embedded_n, repeats=args.repeats, timeout=15.0 if args.quick else 120.0
        )
        embedded_text, result["embedded"] = embedded.report(embedded.run(embedded_args))
        result["embedded"]["measures"] = [
            {"id": key, "median": f["median"], "failure": f["failure"]}
            for key, f in result["embedded"]["figures"].items()
        ]
    if "periodic" in args.parts:
        seconds = args.periodic_seconds
        print(f"periodic: 4 worker processes for {seconds:g} s", flush=True)
        with fresh_databases(admin, ["periodic"], statement_timeout=args.statement_timeout) as urls:
            result["periodic"] = periodic.run(urls["periodic"], workers=4, seconds=seconds)
    if "limits" in args.parts:
        n, repeats = (2_000, 1) if args.quick else (20_000, args.repeats or 3)
        print(f"limits: {n:,} jobs per drain, {repeats} repeat(s)", flush=True)
        with fresh_databases(admin, ["limits"], statement_timeout=args.statement_timeout) as urls:
            result["limits"] = limits.run(urls["limits"], n=n, repeats=repeats)
    if "workflows" in args.parts:
        fan_out, links = (2_000, 200) if args.quick else (10_000, 1_000)
        repeats = 1 if args.quick else args.repeats
        print(
            f"workflows: a group of {fan_out:,} and a chain of {links:,}, each beside as "
            f"many independent jobs, {repeats} repeat(s)",
            flush=True,
        )
        with fresh_databases(
            admin, ["workflows"], statement_timeout=args.statement_timeout
        ) as urls:
            result["workflows"] = workflows.run(
                urls["workflows"], fan_out=fan_out, links=links, repeats=repeats
            )
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["machine"]["cpu_check_end_ms"] = cpu_check()

    if "enqueue" in result:
        print("\nENQUEUE (jobs/s, one client, one job at a time unless batch)\n", flush=True)
        print(enqueue.render(result["enqueue"]), flush=True)
    if "worker" in result:
        print("\nWORKER (one worker process per system)\n", flush=True)
        print(worker.render(result["worker"]), flush=True)
    if embedded_text is not None:
        print("\nEMBEDDED (SQLite, no server; soniq beside huey)\n", flush=True)
        print(embedded_text, flush=True)
    if "periodic" in result:
        print("\nPERIODIC (each tick once across workers)\n", flush=True)
        print(periodic.render(result["periodic"]), flush=True)
    if "limits" in result:
        print("\nLIMITS (drains under concurrency limits, asyncpg)\n", flush=True)
        print(limits.render(result["limits"]), flush=True)
    if "workflows" in result:
        print("\nWORKFLOWS (groups and chains beside independent jobs, asyncpg)\n", flush=True)
        print(workflows.render(result["workflows"]), flush=True)

    path = write_results("bench", result, args.output)
    print(
        f"\nCPU check: {info['cpu_check_ms']} ms at the start, "
        f"{info['cpu_check_end_ms']} ms at the end (a slower machine during the run "
        "lowers every figure)"
    )
    print(f"results: {path}  ({result['elapsed_s']:.0f} s)")
    try:
        from benchmarks import chart
    except ImportError as exc:  # matplotlib is installed by `nox -s bench` only
        print(f"no chart ({exc.name} is not installed; `nox -s bench` installs it)")
    else:
        png = path.with_suffix(".png") if args.output is None else RESULTS_DIR / "bench.png"
        extra = [Path(args.chart)] if args.chart else []
        for target in [png, *extra]:
            if chart.draw(result, target):
                print(f"chart: {target}")

    missing = missing_figures(result)
    for line in missing:
        print(f"NO FIGURE: {line}", file=sys.stderr)
    if args.quick:
        print(
            "--quick: small N, one repeat; a smoke test, not figures to quote. "
            + ("Every system produced a figure." if not missing else "")
        )
    # A system without a figure fails the run (so CI notices); a missed target does not.
    return 1 if missing else 0
