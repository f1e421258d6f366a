"""Workflows and the drain: what a fan-in callback and a chain cost beside the same
number of independent jobs.

One process, one database, the asyncpg driver, one Soniq app knowing a no-op job and
a fan-in callback (it returns how many parent results it was given). Four drains per
repeat, each by ``run_worker(concurrency=100, burst=True, retention=None)``:

* **independent**: N no-op jobs (``enqueue_many``), the baseline of the group;
* **group**: N no-op members and one callback, ``enqueue_group(..., then=...)``: the
  callback runs once all members are done, with their N results;
* **independent, chain size**: L no-op jobs (``enqueue_many``), the chain's baseline;
* **chain**: L no-op links (``enqueue_chain``), each run once the one before is done.

Each repeat runs the four back to back, in an order rotated from one repeat to the
next, on an emptied, vacuumed table (analyzed after the enqueue, as in
:mod:`benchmarks.limits`). A drain is timed from the call to ``run_worker`` to its
return, the enqueue excluded. A rate counts every job of the drain (the group's
callback too). After a drain every row is
checked: all done, the callback ran once and saw every member's result.

The chain's latency per link is ``started_at`` of link i+1 minus ``finished_at`` of
link i, both the server's clock (the start of the transaction that claimed link i+1,
and of the one that wrote link i's outcome and queued link i+1); its p50 and p90 per
repeat, summarised by their median. Ratios are per repeat (against the independent
drain of the same size in the same repeat), summarised by their median.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from typing import Any

import asyncpg

from soniq import Soniq, current_job

CONCURRENCY = 100
NOOP = "bench.noop"
FAN_IN = "bench.fan_in"
CASES = ("independent", "group", "independent-chain-size", "chain")
#: Jobs (members, links) of each case's warm-up drain.
WARMUP = {"independent": 1_000, "group": 1_000, "independent-chain-size": 100, "chain": 100}
#: A drain that has not ended after this long failed.
DRAIN_TIMEOUT = 120.0


class _Tally:
    """What the jobs report to the benchmark (one process: the worker runs in its
    loop): how many ran, and the parent ids each fan-in callback saw."""

    def __init__(self) -> None:
        self.ran = 0
        self.fan_ins: list[list[int]] = []

    def expect(self, jobs: int) -> None:
        self.ran, self.fan_ins = 0, []

    def tick(self) -> None:
        self.ran += 1


def _app(url: str, tally: _Tally) -> Soniq:
    app = Soniq(url, driver="asyncpg")

    @app.job(name=NOOP)
    async def noop(n: int) -> None:
        tally.tick()

    @app.job(name=FAN_IN)
    async def fan_in() -> int:
        parents = current_job().parent_results
        tally.fan_ins.append(sorted(parents))
        tally.tick()
        return len(parents)

    return app


async def _empty(control: asyncpg.Connection) -> None:
    await control.execute("TRUNCATE soniq_jobs, soniq_job_deps")
    await control.execute("VACUUM ANALYZE soniq_jobs, soniq_job_deps")


async def _drain(app: Soniq, tally: _Tally, jobs: int) -> float:
    """Run a burst worker until no job is left; the seconds from the call to its
    return."""
    tally.expect(jobs)
    started = time.perf_counter()
    await asyncio.wait_for(
        app.run_worker(concurrency=CONCURRENCY, burst=True, retention=None), DRAIN_TIMEOUT
    )
    elapsed = time.perf_counter() - started
    if tally.ran < jobs:
        raise RuntimeError(f"{tally.ran:,} of {jobs:,} jobs ran")
    return elapsed


async def _enqueue(app: Soniq, case: str, n: int) -> list[int]:
    if case == "group":
        members = [(NOOP, {"n": i}) for i in range(n)]
        return await app.enqueue_group(members, then=(FAN_IN, {}))
    if case == "chain":
        return await app.enqueue_chain([(NOOP, {"n": i}) for i in range(n)])
    return await app.enqueue_many(NOOP, [{"n": i} for i in range(n)])


async def _measure(
    app: Soniq, tally: _Tally, control: asyncpg.Connection, case: str, n: int
) -> dict[str, Any]:
    """One drain of ``case`` with ``n`` jobs (members, links): its rate, checked; the
    chain's gaps between links too."""
    await _empty(control)
    ids = await _enqueue(app, case, n)
    await control.execute("ANALYZE soniq_jobs")
    elapsed = await _drain(app, tally, len(ids))
    rows = await control.fetch(
        "SELECT id, status, started_at, finished_at FROM soniq_jobs ORDER BY id"
    )
    wrong = [r["id"] for r in rows if r["status"] != "done"]
    if wrong or sorted(r["id"] for r in rows) != sorted(ids):
        raise RuntimeError(f"{case}: {len(wrong):,} of {len(rows):,} job(s) not done")
    out: dict[str, Any] = {"rate": len(ids) / elapsed}
    if case == "group":
        members, callback = ids[:-1], ids[-1]
        job = await app.get_job(callback)
        if job is None or job.result != n or job.attempts != 1:
            raise RuntimeError(f"group: the callback ended as {job!r}")
        if tally.fan_ins != [sorted(members)]:
            seen = [len(p) for p in tally.fan_ins]
            raise RuntimeError(f"group: callback runs saw {seen} parent results, not [{n}]")
    if case == "chain":
        at = {r["id"]: (r["started_at"], r["finished_at"]) for r in rows}
        gaps = [
            (at[after][0] - at[before][1]).total_seconds() * 1000
            for before, after in itertools.pairwise(ids)
        ]
        if min(gaps) < 0:
            raise RuntimeError(f"chain: a link started {-min(gaps):.3f} ms before its parent ended")
        out["gaps_ms"] = gaps
    return out


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[8]


async def _run(url: str, fan_out: int, links: int, repeats: int) -> dict[str, Any]:
    tally = _Tally()
    app = _app(url, tally)
    await app.ensure_initialized()
    control = await asyncpg.connect(url)
    sizes = {"independent": fan_out, "group": fan_out, "independent-chain-size": links}
    sizes["chain"] = links
    rates: dict[str, list[float]] = {case: [] for case in CASES}
    p50: list[float] = []
    p90: list[float] = []
    try:
        for case in CASES:  # warm-up
            await _measure(app, tally, control, case, min(sizes[case], WARMUP[case]))
        for repeat in range(repeats):
            shift = repeat % len(CASES)
            for case in CASES[shift:] + CASES[:shift]:
                m = await _measure(app, tally, control, case, sizes[case])
                rates[case].append(m["rate"])
                if case == "chain":
                    p50.append(statistics.median(m["gaps_ms"]))
                    p90.append(_p90(m["gaps_ms"]))
        await _empty(control)
    finally:
        await control.close()
        await app.close()

    def ratios(case: str, base: str) -> list[float]:
        return [a / b for a, b in zip(rates[case], rates[base], strict=True)]

    per_repeat = {"group": ratios("group", "independent")}
    per_repeat["chain"] = ratios("chain", "independent-chain-size")
    median = {case: statistics.median(rates[case]) for case in CASES}
    latency = {"p50_ms": statistics.median(p50), "p90_ms": statistics.median(p90)}
    return {
        "fan_out": fan_out,
        "links": links,
        "repeats": repeats,
        "concurrency": CONCURRENCY,
        "rates": rates,
        "median": median,
        "ratios": {k: statistics.median(v) for k, v in per_repeat.items()},
        "ratio_range": {k: (min(v), max(v)) for k, v in per_repeat.items()},
        "ratios_per_repeat": per_repeat,
        "chain_latency": {**latency, "p50_per_repeat": p50, "p90_per_repeat": p90},
        "measures": [
            *({"id": case, "median": median[case], "failure": None} for case in CASES),
            {"id": "chain-latency-p50", "median": latency["p50_ms"], "failure": None},
        ],
    }


def run(url: str, *, fan_out: int, links: int, repeats: int) -> dict[str, Any]:
    """Measure the four drains on ``url`` (a fresh database)."""
    if fan_out < 1 or links < 2 or repeats < 1:
        raise ValueError("fan_out >= 1, links >= 2 and repeats >= 1")
    return asyncio.run(_run(url, fan_out, links, repeats))


def render(result: dict[str, Any]) -> str:
    """The drains in jobs/s, their ratios to the independent drain of the same size in
    the same repeat, and the chain's latency per link."""
    med, ratio, span = result["median"], result["ratios"], result["ratio_range"]
    n, links = result["fan_out"], result["links"]
    group_met = "met" if ratio["group"] >= 0.70 else "NOT met"
    lat = result["chain_latency"]

    def vs(case: str) -> str:
        low, high = span[case]
        return f"{ratio[case]:.2f}x ({low:.2f}-{high:.2f})"

    rows = [
        (f"{n:,} independent jobs", med["independent"], ""),
        (f"group: {n:,} members + fan-in callback", med["group"], vs("group")),
        (f"{links:,} independent jobs", med["independent-chain-size"], ""),
        (f"chain of {links:,} links", med["chain"], vs("chain")),
    ]
    width = max(len(label) for label, _, _ in rows)
    lines = [
        f"no-op jobs, asyncpg, concurrency {result['concurrency']}, "
        f"median of {result['repeats']} repeat(s); ratios to the independent drain of "
        "the same size, same repeat"
    ]
    lines += [f"  {label:<{width}}  {rate:>9,.0f}/s  {r}".rstrip() for label, rate, r in rows]
    lines[2] += f"  (target >= 0.70x: {group_met})"
    lines += [
        f"  chain latency per link, started_at of link i+1 - finished_at of link i: "
        f"p50 {lat['p50_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms "
        f"(the drain: {1000 / med['chain']:.2f} ms a link)",
    ]
    return "\n".join(lines)


def main() -> None:
    """``python -m benchmarks.workflows [FAN_OUT] [LINKS] [REPEATS]`` on a fresh
    database (10,000 members, 1,000 links, 5 repeats)."""
    import sys

    from benchmarks._common import admin_url, fresh_databases

    fan_out = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    links = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    started = time.perf_counter()
    with fresh_databases(admin_url(), ["workflows"], statement_timeout=120) as urls:
        print(render(run(urls["workflows"], fan_out=fan_out, links=links, repeats=repeats)))
    print(f"run took {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
