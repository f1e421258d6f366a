"""The transition table, driven directly (no database), exhaustively."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from soniq.core import states
from soniq.core.errors import InvalidTransition
from soniq.core.states import TRANSITIONS, Event, JobStatus


def test_every_status_has_a_row() -> None:
    assert set(TRANSITIONS) == set(JobStatus)


def test_finished_statuses_are_terminal() -> None:
    assert {JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED} == states.FINISHED
    for status in states.FINISHED:
        for event in Event:
            with pytest.raises(InvalidTransition, match=status.value):
                states.next_status(status, event)


def test_a_queued_job_can_only_be_claimed_or_cancelled() -> None:
    assert TRANSITIONS[JobStatus.QUEUED] == {
        Event.CLAIM: JobStatus.RUNNING,
        Event.CANCEL: JobStatus.CANCELLED,
    }


def test_putting_back_a_running_job_makes_it_queued() -> None:
    for event in (Event.RETRY, Event.RESCUE, Event.RELEASE):
        assert states.next_status(JobStatus.RUNNING, event) is JobStatus.QUEUED


def test_dedupe_keys_are_held_while_waiting_queued_or_running() -> None:
    assert {JobStatus.WAITING, JobStatus.QUEUED, JobStatus.RUNNING} == states.ACTIVE
    assert states.sql_status_list(states.ACTIVE) == "('waiting', 'queued', 'running')"


def test_a_waiting_job_is_queued_when_its_parents_are_done_or_cancelled() -> None:
    assert TRANSITIONS[JobStatus.WAITING] == {
        Event.PARENTS_DONE: JobStatus.QUEUED,
        Event.PARENT_FAILED: JobStatus.CANCELLED,
        Event.CANCEL: JobStatus.CANCELLED,
    }
    assert {JobStatus.WAITING, JobStatus.QUEUED} == states.CANCELLED_AT_ONCE
    assert {JobStatus.FAILED, JobStatus.CANCELLED} == states.UNSUCCESSFUL


@given(st.lists(st.sampled_from(list(Event)), max_size=30))
def test_any_event_sequence_stays_in_the_table(events: list[Event]) -> None:
    """Apply events from queued; legal moves follow the table, illegal ones raise and
    leave the status unchanged; a job never leaves a finished status."""
    status = JobStatus.QUEUED
    for event in events:
        legal = event in TRANSITIONS[status]
        try:
            after = states.next_status(status, event)
        except InvalidTransition:
            assert not legal
            continue
        assert legal
        assert after == TRANSITIONS[status][event]
        assert status not in states.FINISHED
        status = after


@given(st.sampled_from(list(JobStatus)), st.sampled_from(list(Event)))
def test_sources_agree_with_the_table(status: JobStatus, event: Event) -> None:
    assert (status in states.sources(event)) == (event in TRANSITIONS[status])


def test_every_status_reaches_a_finished_one() -> None:
    """No status is a trap: from each, some path ends the job."""
    for start in JobStatus:
        seen, frontier = {start}, [start]
        while frontier:
            for after in TRANSITIONS[frontier.pop()].values():
                if after not in seen:
                    seen.add(after)
                    frontier.append(after)
        assert seen & states.FINISHED
