"""What the caller-connection tests share: a migrated schema with an ``orders`` table,
and ways to read back orders, jobs and worker wake-ups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from soniq import Soniq

SENTINEL = "sentinel: every earlier notification has been delivered"


class Rollback(Exception):
    """Raised inside a transaction block so that its owner rolls it back."""


def rollback_if(fail: bool) -> None:
    if fail:
        raise Rollback


@dataclass
class Env:
    """A migrated schema with an ``orders`` table, a Soniq whose own pools are not open,
    an autocommit connection for assertions and one that LISTENs for wake-ups."""

    url: str
    schema: str
    eq: Soniq
    pg: psycopg.Connection
    listener: psycopg.Connection

    @property
    def orders(self) -> str:
        return f'"{self.schema}".orders'

    def order_ids(self) -> list[int]:
        return [r[0] for r in self.pg.execute(f"SELECT id FROM {self.orders} ORDER BY id")]

    def jobs(self) -> list[dict[str, Any]]:
        """The arguments of every stored job, oldest first."""
        sql = f'SELECT args FROM "{self.schema}".soniq_jobs ORDER BY id'
        return [r[0] for r in self.pg.execute(sql)]

    def wakeups(self) -> list[str]:
        """Payloads of the notifications committed so far and not yet read.

        Notifications arrive in commit order, so reading up to a sentinel sent now sees
        every earlier one: no waiting in the hope that nothing else comes.
        """
        self.pg.execute("SELECT pg_notify(%s, %s)", (f"soniq:{self.schema}", SENTINEL))
        payloads = []
        for note in self.listener.notifies(timeout=10):
            if note.payload == SENTINEL:
                return payloads
            payloads.append(note.payload)
        raise AssertionError(f"the sentinel notification never arrived (got {payloads})")
