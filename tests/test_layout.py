"""What the package's layout promises its users: importing Soniq's test helpers, or
using the embedded backends, loads no PostgreSQL driver (they cost ~0.3 s to import,
which a test suite on memory:// need not pay)."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import sys
import soniq.testing
from soniq import Soniq

eq = Soniq("memory://")

@eq.job(name="probe.job")
def job(n: int) -> int:
    return n

eq.sync.enqueue(job, n=1)
soniq.testing.assert_enqueued(eq.sync, job, n=1)
assert soniq.testing.drain(eq.sync).done == 1
drivers = {"asyncpg", "psycopg", "psycopg2", "psycopg_pool"}
loaded = sorted({m.split(".")[0] for m in sys.modules} & drivers)
print(",".join(loaded) or "none")
"""


def test_soniq_testing_on_memory_loads_no_postgres_driver() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "none", out.stderr
