"""Soniq's benchmarks: ``python -m benchmarks`` (or ``nox -s bench``).

Every figure is measured beside the raw driver doing the same work by hand, in the
same run and on the same table, so a ratio to that baseline means something on any
machine; absolute rates only mean something on the machine that printed them.
"""
