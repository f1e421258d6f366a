"""The documented maximums of an enqueue call.

Each one is checked in Python, before any SQL is built, so that a value past it is
refused with an error that names the argument and never reaches (and aborts) the
caller's transaction. They are the same on every backend (PostgreSQL, SQLite, memory),
so that a job accepted by one is accepted by all.

Import them as ``from soniq.core import limits`` (e.g. ``limits.MAX_QUEUE_LENGTH``).
"""

from __future__ import annotations

import datetime as dt

#: Characters in a queue name. A queue's name is the payload of the one NOTIFY an
#: enqueue call sends, and PostgreSQL refuses payloads of 8000 bytes or more: 200
#: characters are at most 800 bytes of UTF-8, far below it, and far above any name a
#: person types.
MAX_QUEUE_LENGTH = 200

#: Characters in a job's name (``@eq.job(name=...)``, ``module.qualname``, or a name
#: given to ``enqueue`` as a string): the same bound as a queue's.
MAX_JOB_NAME_LENGTH = 200

#: Characters in a ``dedupe_key``. The key is held by a unique btree index, whose
#: entries PostgreSQL caps at 2704 bytes; 512 characters are at most 2048 bytes of
#: UTF-8. Hash a longer key (``hashlib.sha256(key.encode()).hexdigest()``).
MAX_DEDUPE_KEY_LENGTH = 512

#: Seconds of ``delay``: 100 years. ``now + delay`` then stays a time that PostgreSQL
#: (interval and timestamptz), SQLite (epoch seconds as REAL) and Python's ``datetime``
#: (years 1 to 9999) all hold.
MAX_DELAY_SECONDS = 100 * 365.25 * 24 * 3600.0

#: Seconds of a job's ``timeout``: the same 100 years, below what waits on a thread
#: accept (``threading.TIMEOUT_MAX``, 292 years on Linux). For no timeout pass None.
MAX_TIMEOUT_SECONDS = MAX_DELAY_SECONDS

#: The latest ``run_at`` (compared in UTC): one day before the end of Python's
#: ``datetime`` range, so that the time can be read back as a ``datetime`` in any
#: session time zone, by every driver.
MAX_RUN_AT = dt.datetime(9999, 12, 30, tzinfo=dt.timezone.utc)

#: The earliest ``run_at`` (compared in UTC): one day after the start of Python's
#: ``datetime`` range, for the same reason. A ``run_at`` in the past is due at once.
MIN_RUN_AT = dt.datetime(1, 1, 2, tzinfo=dt.timezone.utc)

#: Levels of lists and dicts inside one argument (``[[1]]`` is 2). JSON parsers
#: recurse per level (Python's ``json`` in the worker, PostgreSQL's jsonb input);
#: 100 levels stay far from Python's recursion limit and from any real argument.
MAX_NESTING_DEPTH = 100

#: Characters of JSON in one job's arguments (JSON is written ASCII-only, so this is
#: also bytes): 1,000,000, the same as the job result that is kept
#: (:data:`MAX_RESULT_CHARS`). A queue row is read by every claim and
#: rewritten at every status change; PostgreSQL's jsonb would take 255 MiB, but data
#: that large belongs in a table, a file or object storage, with its id as argument.
MAX_ARGS_JSON_CHARS = 1_000_000

#: Characters of JSON in the arguments of all the jobs of one ``enqueue_many`` call.
#: The batch travels as one jsonb array, whose binary form PostgreSQL caps at 255 MiB
#: and which can be several times larger than its text (small numbers); 32,000,000
#: characters stay below that cap in every case. Split a larger batch into calls.
MAX_BATCH_JSON_CHARS = 32_000_000

#: Decimal digits of an integer argument. Python refuses to convert longer integers
#: from and to text unless told otherwise (``sys.set_int_max_str_digits``; 4300 by
#: default, and 640 is the lowest limit any process may set), so a longer integer might
#: be written by one process and unreadable by the worker. Pass it as a string.
MAX_INT_DIGITS = 640

#: Characters of ``"Type: message"`` kept in a failed run's ``last_error``.
MAX_ERROR_CHARS = 4_000

#: Characters of a failed run's traceback kept in ``last_traceback`` (its start and
#: its end, the middle cut).
MAX_TRACEBACK_CHARS = 64_000

#: Characters of JSON in a job's return value kept as its ``result``: the same bound
#: as its arguments. A larger value leaves the job done with no result, and says so.
MAX_RESULT_CHARS = MAX_ARGS_JSON_CHARS

__all__ = [
    "MAX_ARGS_JSON_CHARS",
    "MAX_BATCH_JSON_CHARS",
    "MAX_DEDUPE_KEY_LENGTH",
    "MAX_DELAY_SECONDS",
    "MAX_ERROR_CHARS",
    "MAX_INT_DIGITS",
    "MAX_JOB_NAME_LENGTH",
    "MAX_NESTING_DEPTH",
    "MAX_QUEUE_LENGTH",
    "MAX_RESULT_CHARS",
    "MAX_RUN_AT",
    "MAX_TIMEOUT_SECONDS",
    "MAX_TRACEBACK_CHARS",
    "MIN_RUN_AT",
]
