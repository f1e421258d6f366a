"""I/O: each driver executes what ``soniq.core`` builds, owns its pool, and runs
statements on a caller's connection. No business rule lives here."""
