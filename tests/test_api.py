"""The public API of DESIGN.md for enqueue and inspection, on every driver."""

from __future__ import annotations

from soniq import JobStatus, Soniq


async def test_enqueue_then_get_job(eq: Soniq) -> None:
    @eq.job(name="billing.send_invoice", queue="invoices", max_retries=5)
    async def send_invoice(order_id: int) -> None: ...

    job_id = await eq.enqueue(send_invoice, order_id=1)
    job = await eq.get_job(job_id)
    assert job is not None
    assert (job.name, job.queue, job.args, job.status, job.max_retries, job.attempts) == (
        "billing.send_invoice", "invoices", {"order_id": 1}, JobStatus.QUEUED, 5, 0,
    )
