"""``python -m benchmarks``: the enqueue benchmark (see :mod:`benchmarks.enqueue`)."""

from __future__ import annotations

from benchmarks.enqueue import main

raise SystemExit(main())
