"""The conformance suite, continued: the operations of workflows (jobs that wait for
others, groups and chains, replacing by dedupe key, waiting for an end, progress),
the same test on every backend (see tests/test_conformance.py)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
import pytest

from soniq import Job, JobNotFound, Soniq
from soniq.core import outcomes
from soniq.core.jobs import WorkerIdentity
from tests.test_conformance import Face, caller_transaction, face, server_eq

__all__ = ["face", "server_eq"]  # fixtures, used by name

UTC = dt.timezone.utc


async def _group(face: Face, members: list[tuple[str, dict[str, Any]]], **kw: Any) -> list[int]:
    if face.sync:
        return face.eq.sync.enqueue_group(members, **kw)
    return await face.eq.enqueue_group(members, **kw)


async def _chain(face: Face, links: list[tuple[str, dict[str, Any]]]) -> list[int]:
    if face.sync:
        return face.eq.sync.enqueue_chain(links)
    return await face.eq.enqueue_chain(links)


def state(job: Job) -> tuple[str, tuple[int, ...], int, str | None]:
    """What every backend must agree on about a job that may wait."""
    return (job.status.value, job.parents, job.waiting_for, job.last_error)


async def _run(any_eq: Soniq, job_id: int, outcome: str = "done", result: Any = None) -> None:
    """Claim ``job_id`` (it must be first in line) and end it as ``outcome``."""
    [claimed] = await any_eq.backend.claim_jobs(1, "w", None)
    assert claimed.id == job_id
    if outcome == "done":
        ended = outcomes.succeeded(job_id, 1, result)
    elif outcome == "failed":
        ended = outcomes.failed(job_id, 1, 0, ValueError("bad"), lambda: 0.5)
    else:
        ended = outcomes.cancelled(job_id, 1)
    await any_eq.backend.finish_jobs([ended], "w", keep=True)


async def _states(any_eq: Soniq, *ids: int) -> list[tuple[str, tuple[int, ...], int, str | None]]:
    found = [await any_eq.get_job(i) for i in ids]
    return [state(job) for job in found if job is not None]


# -- depends_on -----------------------------------------------------------------------


async def test_a_job_waits_for_its_parents_and_is_queued_when_the_last_is_done(
    face: Face,
) -> None:
    pay = await face.enqueue("c.pay", max_retries=0)
    pack = await face.enqueue("c.pack", max_retries=0)
    ship = await face.enqueue("c.ship", order=1, depends_on=[pay, pack, pay])  # once each
    assert state(await face.get(ship)) == ("waiting", (pay, pack), 2, None)
    assert await face.queued() == [pay, pack]  # a waiting job is not in line


async def test_parents_ending_release_or_cancel_their_children_in_turn(any_eq: Soniq) -> None:
    first = await any_eq.enqueue("c.a", max_retries=0)
    second = await any_eq.enqueue("c.a", max_retries=0)
    both = await any_eq.enqueue("c.b", depends_on=[first, second])
    after_first = await any_eq.enqueue("c.b", depends_on=first)
    anyway = await any_eq.enqueue("c.b", depends_on=[second], on_parent_failure="run")
    grandchild = await any_eq.enqueue("c.c", depends_on=[both])

    await _run(any_eq, first, "done", {"n": 1})
    assert await _states(any_eq, both, after_first) == [
        ("waiting", (first, second), 1, None),
        ("queued", (first,), 0, None),
    ]
    await _run(any_eq, second, "failed")
    gone = "Cancelled: parent job {} failed"
    assert await _states(any_eq, both, anyway, grandchild) == [
        ("cancelled", (first, second), 1, gone.format(second)),
        ("queued", (second,), 0, None),
        ("cancelled", (both,), 1, f"Cancelled: parent job {both} was cancelled"),
    ]
    for job_id in (both, grandchild):
        job = await any_eq.get_job(job_id)
        assert job is not None and job.finished_at is not None


async def test_a_parent_cancelled_by_its_worker_cancels_its_children(any_eq: Soniq) -> None:
    parent = await any_eq.enqueue("c.a")
    child = await any_eq.enqueue("c.b", depends_on=[parent])
    await _run(any_eq, parent, "cancelled")
    assert await _states(any_eq, child) == [
        ("cancelled", (parent,), 1, f"Cancelled: parent job {parent} was cancelled")
    ]


async def test_parents_that_ended_before_the_child_was_enqueued(face: Face) -> None:
    done = await face.enqueue("c.a")
    gone = await face.enqueue("c.a")
    await face.cancel(gone)
    backend = face.eq.backend
    [claimed] = await backend.claim_jobs(1, "w", None)
    await backend.finish_jobs([outcomes.succeeded(claimed.id, 1, 7)], "w", keep=True)
    ready = await face.enqueue("c.b", depends_on=[done])
    doomed = await face.enqueue("c.b", depends_on=[done, gone])
    anyway = await face.enqueue("c.b", depends_on=[gone], on_parent_failure="run")
    assert state(await face.get(ready)) == ("queued", (done,), 0, None)
    assert state(await face.get(doomed)) == (
        "cancelled",
        (done, gone),
        0,
        f"Cancelled: parent job {gone} was cancelled",
    )
    assert state(await face.get(anyway)) == ("queued", (gone,), 0, None)
    assert await face.queued("c.b") == [ready, anyway]


async def test_an_unknown_parent_is_an_error_and_nothing_is_inserted(face: Face) -> None:
    parent = await face.enqueue("c.a")
    with pytest.raises(JobNotFound, match="depends_on: no job has id 987654321") as caught:
        await face.enqueue_many("c.b", [{"n": 1}, {"n": 2}], depends_on=[parent, 987654321])
    assert caught.value.job_id == 987654321
    assert await face.queued() == [parent]
    assert state(await face.get(parent))[:1] == ("queued",)


async def test_cancelling_a_waiting_job_cancels_its_children(face: Face) -> None:
    parent = await face.enqueue("c.a")
    child = await face.enqueue("c.b", depends_on=[parent])
    grandchild = await face.enqueue("c.c", depends_on=[child])
    assert await face.cancel(child) is True
    assert state(await face.get(child))[0] == "cancelled"
    assert state(await face.get(grandchild)) == (
        "cancelled",
        (child,),
        1,
        f"Cancelled: parent job {child} was cancelled",
    )
    assert state(await face.get(parent))[0] == "queued"  # parents are not touched


async def test_a_rescued_parent_out_of_attempts_cancels_its_children(any_eq: Soniq) -> None:
    parent = await any_eq.enqueue("c.a", max_retries=0)
    child = await any_eq.enqueue("c.b", depends_on=[parent])
    assert [c.id for c in await any_eq.backend.claim_jobs(1, "ghost", None)] == [parent]
    ops = any_eq.backend.maintenance()
    try:
        assert ops.rescue_stale(30) == [(parent, "failed")]
    finally:
        ops.close()
    assert await _states(any_eq, child) == [
        ("cancelled", (parent,), 1, f"Cancelled: parent job {parent} failed")
    ]


async def test_a_rescued_parent_with_attempts_left_keeps_its_children_waiting(
    any_eq: Soniq,
) -> None:
    await any_eq.backend.register_worker(WorkerIdentity("alive", "h", 1, None, 1))
    parent = await any_eq.enqueue("c.a")
    child = await any_eq.enqueue("c.b", depends_on=[parent])
    assert [c.id for c in await any_eq.backend.claim_jobs(1, "ghost", None)] == [parent]
    ops = any_eq.backend.maintenance()
    try:
        assert ops.rescue_stale(30) == [(parent, "queued")]
    finally:
        ops.close()
    assert await _states(any_eq, child) == [("waiting", (parent,), 1, None)]


async def test_a_parent_deleted_at_its_end_still_releases_its_children(any_eq: Soniq) -> None:
    parent = await any_eq.enqueue("c.a")
    child = await any_eq.enqueue("c.b", depends_on=[parent])
    assert [c.id for c in await any_eq.backend.claim_jobs(1, "w", None)] == [parent]
    await any_eq.backend.finish_jobs([outcomes.succeeded(parent, 1, None)], "w", keep=False)
    assert await any_eq.get_job(parent) is None
    assert await _states(any_eq, child) == [("queued", (parent,), 0, None)]


async def test_a_fenced_out_end_settles_nothing(any_eq: Soniq) -> None:
    parent = await any_eq.enqueue("c.a")
    child = await any_eq.enqueue("c.b", depends_on=[parent])
    await any_eq.backend.claim_jobs(1, "w", None)
    # Another worker's (or another attempt's) late end is not this run's end.
    await any_eq.backend.finish_jobs([outcomes.succeeded(parent, 1, None)], "other", keep=True)
    await any_eq.backend.finish_jobs([outcomes.succeeded(parent, 2, None)], "w", keep=True)
    assert await _states(any_eq, child) == [("waiting", (parent,), 1, None)]


async def test_a_claimed_child_carries_the_results_of_its_parents(any_eq: Soniq) -> None:
    a = await any_eq.enqueue("c.a")
    b = await any_eq.enqueue("c.a")
    child = await any_eq.enqueue("c.b", depends_on=[a, b])
    plain = await any_eq.enqueue("c.p", priority=-1)
    await _run(any_eq, a, "done", {"rows": [1, 2]})
    await _run(any_eq, b, "done", None)
    claimed = await any_eq.backend.claim_jobs(5, "w", None)
    assert [(c.id, c.parent_results) for c in claimed] == [
        (child, {a: {"rows": [1, 2]}, b: None}),
        (plain, None),
    ]


# -- groups and chains ------------------------------------------------------------------


async def test_a_group_waits_for_all_its_members(face: Face) -> None:
    ids = await _group(face, [("c.m", {"n": n}) for n in range(3)], then=("c.then", {"album": 9}))
    *members, then = ids
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert [state(await face.get(i)) for i in members] == [("queued", (), 0, None)] * 3
    assert state(await face.get(then)) == ("waiting", tuple(members), 3, None)
    assert (await face.get(then)).args == {"album": 9}
    assert await face.queued() == members
    # Options may ride along in a member's mapping.
    [high] = await _group(face, [("c.m", {"n": 4, "priority": 7, "queue": "q"})])
    job = await face.get(high)
    assert (job.priority, job.queue, job.args) == (7, "q", {"n": 4})


async def test_a_chain_runs_link_after_link(face: Face) -> None:
    ids = await _chain(face, [("c.a", {"n": 1}), ("c.b", {"n": 2}), ("c.c", {"n": 3})])
    assert [state(await face.get(i)) for i in ids] == [
        ("queued", (), 0, None),
        ("waiting", (ids[0],), 1, None),
        ("waiting", (ids[1],), 1, None),
    ]


async def test_a_chain_is_released_and_cancelled_link_by_link(any_eq: Soniq) -> None:
    ids = await any_eq.enqueue_chain([("c.a", {}), ("c.b", {}), ("c.c", {})])
    await _run(any_eq, ids[0], "done", 1)
    assert [s[0] for s in await _states(any_eq, *ids)] == ["done", "queued", "waiting"]
    await _run(any_eq, ids[1], "failed")
    assert await _states(any_eq, ids[2]) == [
        ("cancelled", (ids[1],), 1, f"Cancelled: parent job {ids[1]} failed")
    ]


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
async def test_a_graph_in_a_callers_transaction(
    server_eq: Soniq, database_url: str, commit: bool
) -> None:
    async with caller_transaction(server_eq.backend.name, database_url, commit) as conn:
        pay = await server_eq.enqueue("c.pay", connection=conn)
        ship = await server_eq.enqueue("c.ship", depends_on=[pay], connection=conn)
        group = await server_eq.enqueue_group(
            [("c.m", {"n": 1})], then=("c.then", {}), connection=conn
        )
        assert await server_eq.get_job(ship) is None  # not committed: invisible outside
    found = [await server_eq.get_job(i) for i in (pay, ship, *group)]
    if commit:
        assert [state(j)[:3] if j else None for j in found] == [
            ("queued", (), 0),
            ("waiting", (pay,), 1),
            ("queued", (), 0),
            ("waiting", (group[0],), 1),
        ]
    else:
        assert found == [None] * 4
    with psycopg.connect(database_url) as sync_conn:  # the sync twin's face
        chain = server_eq.sync.enqueue_chain([("c.a", {}), ("c.b", {})], connection=sync_conn)
        if not commit:
            sync_conn.rollback()
    assert (server_eq.sync.get_job(chain[1]) is None) is not commit


# -- dedupe="replace" ---------------------------------------------------------------------


async def test_replace_updates_the_holder_that_has_not_started(face: Face) -> None:
    first = await face.enqueue("c.job", n=1, dedupe_key="k", dedupe="replace", delay=600)
    again = await face.enqueue("c.job", n=2, dedupe_key="k", dedupe="replace", delay=10, priority=3)
    assert again == first
    job = await face.get(first)
    assert (job.args, job.priority, job.status.value) == ({"n": 2}, 3, "queued")
    assert 5 < (job.run_at - dt.datetime.now(UTC)).total_seconds() <= 10  # the last call's
    # "keep" (the default) still drops a duplicate's arguments.
    assert await face.enqueue("c.job", n=3, dedupe_key="k") == first
    assert (await face.get(first)).args == {"n": 2}


async def test_replace_leaves_a_running_holder_and_queues_a_new_job(any_eq: Soniq) -> None:
    first = await any_eq.enqueue("c.job", n=1, dedupe_key="k")
    [claimed] = await any_eq.backend.claim_jobs(1, "w", None)
    assert claimed.id == first
    second = await any_eq.enqueue("c.job", n=2, dedupe_key="k", dedupe="replace")
    third = await any_eq.enqueue("c.job", n=3, dedupe_key="k", dedupe="replace")
    assert second != first and third == second
    running, queued = await any_eq.get_job(first), await any_eq.get_job(second)
    assert running is not None and queued is not None
    assert (running.status.value, running.args, running.dedupe_key) == ("running", {"n": 1}, None)
    assert (queued.status.value, queued.args, queued.dedupe_key) == ("queued", {"n": 3}, "k")


# -- waiting for an end, progress, the stored traceback ---------------------------------------


async def test_mark_awaited_is_true_while_the_job_is_active(any_eq: Soniq) -> None:
    parent = await any_eq.enqueue("c.a")
    child = await any_eq.enqueue("c.b", depends_on=[parent])
    assert await any_eq.backend.mark_awaited(parent) is True
    assert await any_eq.backend.mark_awaited(child) is True  # waiting is active
    await _run(any_eq, parent, "done")
    assert await any_eq.backend.mark_awaited(parent) is False
    assert await any_eq.backend.mark_awaited(2**40) is False


async def test_progress_is_stored_for_its_run(any_eq: Soniq) -> None:
    job_id = await any_eq.enqueue("c.job")
    await any_eq.backend.claim_jobs(1, "w", None)
    await any_eq.backend.set_progress(job_id, 1, 0.25, "a quarter")
    await any_eq.backend.set_progress(job_id, 2, 0.9, "another run's")  # not this row's run
    job = await any_eq.get_job(job_id)
    assert job is not None and (job.progress, job.progress_message) == (0.25, "a quarter")


async def test_get_job_shows_the_last_traceback(any_eq: Soniq) -> None:
    job_id = await any_eq.enqueue("c.job", max_retries=0)
    await any_eq.backend.claim_jobs(1, "w", None)
    try:
        raise ValueError("deep down")
    except ValueError as exc:
        failure = outcomes.failed(job_id, 1, 0, exc, lambda: 0.5)
    await any_eq.backend.finish_jobs([failure], "w", keep=True)
    job = await any_eq.get_job(job_id)
    assert job is not None and job.last_error == "ValueError: deep down"
    assert job.traceback is not None and 'raise ValueError("deep down")' in job.traceback


async def test_parent_results_come_in_the_order_of_depends_on(any_eq: Soniq) -> None:
    a, b, c = [await any_eq.enqueue("c.a") for _ in range(3)]
    child = await any_eq.enqueue("c.b", depends_on=[c, a, b])
    for job_id, result in ((a, "A"), (b, "B"), (c, "C")):
        await _run(any_eq, job_id, "done", result)
    [claimed] = await any_eq.backend.claim_jobs(1, "w", None)
    assert claimed.id == child
    assert claimed.parent_results is not None
    assert list(claimed.parent_results.items()) == [(c, "C"), (a, "A"), (b, "B")]


async def test_a_child_is_retried_only_once_its_parents_are_done(face: Face) -> None:
    parent = await face.enqueue("c.a", delay=3600)
    child = await face.enqueue("c.b", depends_on=[parent])
    await face.cancel(child)
    retry = face.eq.sync.retry_job if face.sync else face.eq.retry_job
    assert await _maybe(retry(child)) is False  # its parent has not run
    backend = face.eq.backend
    assert await face.cancel(parent) is True
    assert await _maybe(retry(parent)) is True  # the parent first
    assert await _maybe(retry(child)) is False  # still not done
    ids = await backend.claim_jobs(5, "w", None)
    assert [c.id for c in ids] == [parent]
    await backend.finish_jobs([outcomes.succeeded(parent, 1, 1)], "w", keep=True)
    assert await _maybe(retry(child)) is True
    assert state(await face.get(child)) == ("queued", (parent,), 0, None)


async def _maybe(value: Any) -> Any:
    return await value if hasattr(value, "__await__") else value


async def test_ids_outside_every_database_name_no_job(face: Face) -> None:
    huge = 2**70
    assert await face.missing(huge)
    assert await face.cancel(huge) is False
    retry = face.eq.sync.retry_job if face.sync else face.eq.retry_job
    assert await _maybe(retry(huge)) is False
    job_id = await face.enqueue("c.a")
    page = (
        face.eq.sync.list_jobs(before_id=huge)
        if face.sync
        else await face.eq.list_jobs(before_id=huge)
    )
    assert [j.id for j in page] == [job_id]
