"""The worker runtime: claims jobs in batches, runs async jobs on the event loop and
sync jobs in threads, writes outcomes in batches, heartbeats from its own thread, and
rescues the jobs of dead workers."""

from soniq.worker.context import JobContext, current_job
from soniq.worker.runtime import Worker, WorkerConfig

__all__ = ["JobContext", "Worker", "WorkerConfig", "current_job"]
