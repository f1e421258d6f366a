"""Regenerate the dashboard's screenshots in docs/img/ (``nox -s screenshots``, or
``python tools/dashboard_screenshots.py [OUTDIR]`` with soniq[dashboard] and selenium
installed, and Debian's ``chromium`` and ``chromium-driver``).

It fills a throwaway SQLite database as a small shop would: jobs done, failed,
cancelled, queued, scheduled, waiting, two running on a live worker, a paused queue, a
limited one. The finished jobs ran just now; to draw an hour of history, their end
times are then spread over the last hour, in that file alone, straight in SQLite
(the only thing here that is not Soniq's public API). Then it serves the dashboard
with uvicorn on a free port of 127.0.0.1 and saves each page as headless Chromium
shows it: ``dashboard-overview.png``, ``-jobs.png``, ``-job.png``, ``-workers.png``.
"""

from __future__ import annotations

import math
import random
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from selenium.webdriver.common.by import By

import soniq.dashboard
from soniq import Soniq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the browser helpers the dashboard's tests use

from tests.browser import BackgroundWorker, Server, chromium  # noqa: E402
from tests.polling import wait_until  # noqa: E402


def _fill(url: str, release: threading.Event) -> tuple[Soniq, int]:
    """The shop's jobs; returns the Soniq of the worker (jobs registered) and the id
    of a failed job."""
    eq = Soniq(url)

    @eq.job(name="shop.send_receipt", queue="mail")
    def send_receipt(order_id: int, to: str) -> str:
        return f"receipt for order {order_id} sent to {to}"

    @eq.job(name="shop.charge_card", queue="billing", max_retries=2)
    def charge_card(order_id: int, amount_cents: int) -> dict[str, Any]:
        if order_id % 23 == 0:
            raise ValueError(f"card declined for order {order_id}: insufficient funds")
        return {"charged": amount_cents, "currency": "EUR"}

    @eq.job(name="shop.build_report", queue="reports")
    def build_report(month: str) -> None:
        release.wait(600)

    @eq.job(name="shop.resize_image", queue="media")
    def resize_image(path: str, width: int) -> None:
        release.wait(600)

    eq.sync.ensure_initialized()
    ops = eq.sync
    ops.enqueue_many(
        send_receipt, [{"order_id": n, "to": f"customer{n}@example.com"} for n in range(1, 301)]
    )
    ops.enqueue_many(
        charge_card,
        [{"order_id": n, "amount_cents": 1000 + n * 7} for n in range(1, 161)],
        max_retries=0,
    )
    ops.run_worker(burst=True, burst_wait=0, concurrency=20)
    cancelled = ops.enqueue_many(send_receipt, [{"order_id": n, "to": "x"} for n in range(3)])
    for job_id in cancelled:
        ops.cancel_job(job_id)
    ops.enqueue_many(
        send_receipt, [{"order_id": n, "to": f"new{n}@example.com"} for n in range(400, 437)]
    )
    ops.enqueue_many(
        charge_card, [{"order_id": n, "amount_cents": 990} for n in range(500, 508)], delay=900
    )
    parent = ops.enqueue(charge_card, order_id=900, amount_cents=4200)
    ops.enqueue(send_receipt, order_id=900, to="vip@example.com", depends_on=[parent])
    ops.enqueue_many(build_report, [{"month": "2026-11"}, {"month": "2026-10"}])
    ops.enqueue_many(resize_image, [{"path": f"img/{n}.jpg", "width": 640} for n in range(2)])
    ops.pause_queue("reports")
    ops.set_queue_limits("mail", concurrency=5, rate_limit="100/m")
    failed = ops.list_jobs(status="failed", limit=1)[0].id
    ops.close()
    _spread_history(Path(url.removeprefix("sqlite:///")))
    return eq, failed


def _spread_history(path: Path) -> None:
    """Spread the finished jobs' end times over the last hour, busier now and then."""
    now = time.time()
    rng = random.Random(7)
    with sqlite3.connect(path) as db:
        ids = [
            row[0] for row in db.execute("SELECT id FROM soniq_jobs WHERE finished_at IS NOT NULL")
        ]
        weights = [1.4 + math.sin(m / 7) for m in range(60)]
        for job_id in ids:
            minute = rng.choices(range(60), weights)[0]
            end = now - minute * 60 - rng.random() * 59
            db.execute(
                "UPDATE soniq_jobs SET finished_at = ?, started_at = ?, created_at = ?, "
                "run_at = ? WHERE id = ?",
                (end, end - 0.2, end - 3, end - 3, job_id),
            )


def _shoot(driver: Any, url: str, out: Path) -> None:
    driver.set_window_size(1280, 900)
    driver.get(url)
    height, chrome = driver.execute_script(
        "return [document.documentElement.scrollHeight, outerHeight - innerHeight]"
    )
    driver.set_window_size(1280, min(max(int(height), 600), 2400) + int(chrome))
    time.sleep(0.3)  # the resize's relayout (a picture, not a test)
    out.write_bytes(driver.get_screenshot_as_png())
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


def main(argv: list[str]) -> int:
    outdir = Path(argv[0]) if argv else ROOT / "docs" / "img"
    outdir.mkdir(parents=True, exist_ok=True)
    release = threading.Event()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/shop.db"
        worker_eq, failed = _fill(url, release)
        worker = BackgroundWorker(worker_eq, queues=["media"], concurrency=4)
        reader = Soniq(url)
        wait_until(
            lambda: sum(len(w.running) for w in reader.sync.list_workers()) == 2,
            30,
            "the worker's two running jobs",
        )
        reader.sync.close()
        server = Server(soniq.dashboard.app(Soniq(url), actions=True, refresh=0))
        driver = chromium(1280, 900, "--hide-scrollbars", "--force-device-scale-factor=1")
        try:
            base = f"http://127.0.0.1:{server.port}"
            _shoot(driver, base + "/", outdir / "dashboard-overview.png")
            _shoot(driver, base + "/jobs?limit=25", outdir / "dashboard-jobs.png")
            _shoot(driver, f"{base}/jobs/{failed}", outdir / "dashboard-job.png")
            _shoot(driver, base + "/workers", outdir / "dashboard-workers.png")
            assert driver.find_elements(By.CSS_SELECTOR, "#workers tr[data-worker]")
        finally:
            driver.quit()
            release.set()
            worker.stop()
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
