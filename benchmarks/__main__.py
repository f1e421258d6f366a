"""``python -m benchmarks``: the whole suite (see :mod:`benchmarks.suite`)."""

from __future__ import annotations

from benchmarks.suite import main

raise SystemExit(main())
