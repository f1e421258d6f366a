"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``; .ci/run installs them) driven by selenium through the system's
chromedriver, against a uvicorn server on a free port of 127.0.0.1, on PostgreSQL.

It clicks as an operator would: overview (with a live worker, auto-refresh) → jobs →
filter → a job → retry → cancel → pause → resume → purge → workers, and checks each
action in the database. Arguments and errors carry markup that would run if it were
not escaped; the page's own flag says it never ran. Skipped only when the browser or
its driver is not installed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

import soniq.dashboard
from soniq import JobStatus, Soniq
from tests.browser import CHROMEDRIVER, CHROMIUM, WAIT, BackgroundWorker, Server, chromium
from tests.conftest import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
        reason="chromium and chromedriver are not installed (apt-get install chromium "
        "chromium-driver)",
    ),
]

#: Markup in a job's arguments and error: run, it would set ``window.__xss``.
ARG_XSS = "<script>window.__xss = 'args'</script>"
ERROR_XSS = "<img src=x onerror=\"window.__xss = 'error'\">"


# -- the server, a worker and the browser ---------------------------------------------


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    driver = chromium()
    yield driver
    driver.quit()


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    """Wait (bounded) until ``condition(driver)`` is true; a page reloaded meanwhile
    (auto-refresh, or the redirect after a form) is read again."""

    def check(d: WebDriver) -> Any:
        try:
            return condition(d)
        except StaleElementReferenceException:
            return False
        except WebDriverException as error:
            # Chromium reports a node of a page replaced mid-read this way, not as stale.
            if "does not belong to the document" in str(error.msg):
                return False
            raise

    return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(check, f"waiting for {what}")


def text_of(driver: WebDriver, element_id: str) -> str:
    """The element's visible text, read in one step so that a page replaced between
    finding the element and reading it cannot fail the read."""
    text = driver.execute_script(
        "const e = document.getElementById(arguments[0]); return e ? e.innerText : null",
        element_id,
    )
    if text is None:
        raise NoSuchElementException(f"no element with id {element_id!r}")
    return str(text).strip()


def xss_ran(driver: WebDriver) -> Any:
    return driver.execute_script("return window.__xss === undefined ? null : window.__xss")


def click_and_confirm(driver: WebDriver, element_id: str) -> None:
    """Click a button whose form asks for confirmation, and accept it."""
    driver.find_element(By.ID, element_id).click()
    alert = wait_for(driver, lambda d: _alert(d), "the confirmation")
    alert.accept()


def _alert(driver: WebDriver) -> Any:
    try:
        return driver.switch_to.alert
    except NoAlertPresentException:
        return False


# -- the test -------------------------------------------------------------------------


def register(eq: Soniq, release: threading.Event) -> dict[str, Any]:
    @eq.job(name="shop.send_mail")
    def send_mail(to: str) -> str:
        return f"sent to {to}"

    @eq.job(name="shop.charge", max_retries=0)
    def charge(note: str) -> None:
        raise ValueError(f"card declined {ERROR_XSS}")

    @eq.job(name="shop.hold")
    def hold() -> None:
        release.wait(60)

    return {"send_mail": send_mail, "charge": charge, "hold": hold}


def test_an_operator_clicks_through_the_dashboard(
    browser: WebDriver, database_url: str, schema: str
) -> None:
    started = time.monotonic()
    release = threading.Event()
    setup = Soniq(database_url, schema=schema)
    jobs = register(setup, release)
    setup.sync.ensure_initialized()
    ops = setup.sync
    ops.enqueue_many(jobs["send_mail"], [{"to": f"user{n}@example.com"} for n in range(3)])
    failed = ops.enqueue(jobs["charge"], note=ARG_XSS, queue="billing")
    ops.run_worker(burst=True, burst_wait=0)
    waiting = ops.enqueue(jobs["send_mail"], to="later@example.com", queue="mail", delay=3600)
    held = ops.enqueue(jobs["hold"], queue="slow")

    worker_eq = Soniq(database_url, schema=schema)
    register(worker_eq, release)
    worker = BackgroundWorker(worker_eq, queues=["slow"], concurrency=2)
    server_eq = Soniq(database_url, schema=schema)
    server = Server(soniq.dashboard.app(server_eq, actions=True, refresh=1))
    try:
        wait_until(lambda: ops.list_workers() and ops.list_workers()[0].running, 30, "the worker")
        timings = {"setup": time.monotonic() - started}
        _click_through(browser, server.url, ops, failed=failed, waiting=waiting, held=held)
        timings["clicks"] = time.monotonic() - started - timings["setup"]
        print(f"browser test timings: {timings}")
    finally:
        release.set()
        worker.stop()
        server.stop()
        ops.close()


def _click_through(
    browser: WebDriver, url: str, ops: Any, *, failed: int, waiting: int, held: int
) -> None:
    # Auto-refresh (every second here): a queue that appears is shown without a
    # click. Then it is turned off, and stays off from page to page.
    browser.get(url + "/")
    ops.enqueue("shop.unknown", queue="fresh")
    wait_for(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, '#queues tr[data-queue="fresh"]'),
        "the auto-refresh to show the new queue",
    )

    def turn_off(d: WebDriver) -> bool:
        box = d.find_element(By.ID, "auto-refresh")
        if box.is_selected():
            box.click()
        return bool(
            d.execute_script("return localStorage.getItem('soniq-dashboard-refresh')") == "off"
        )

    wait_for(browser, turn_off, "auto-refresh to be off")

    # Overview: queues, charts, the live worker.
    browser.get(url + "/")
    assert browser.title == "Overview · Soniq"
    assert not browser.find_element(By.ID, "auto-refresh").is_selected()  # remembered
    rows = {
        row.get_attribute("data-queue")
        for row in browser.find_elements(By.CSS_SELECTOR, "#queues tr[data-queue]")
    }
    assert rows == {"billing", "fresh", "mail", "slow"}
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-throughput rect.done")
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-failures rect.failed")
    assert text_of(browser, "worker-count") == "1"
    assert "Throughput: 3 done" in browser.page_source

    # Jobs: every job, then filtered to the failed ones.
    browser.find_element(By.ID, "nav-jobs").click()
    wait_for(browser, lambda d: d.title == "Jobs · Soniq", "the jobs page")
    all_rows = browser.find_elements(By.CSS_SELECTOR, "#jobs tr[data-id]")
    assert len(all_rows) == 7
    Select(browser.find_element(By.ID, "filter-status")).select_by_value("failed")
    browser.find_element(By.ID, "filter-submit").click()
    wait_for(browser, lambda d: "status=failed" in d.current_url, "the filtered page")
    shown = [
        int(r.get_attribute("data-id"))
        for r in browser.find_elements(By.CSS_SELECTOR, "#jobs tr[data-id]")
    ]
    assert shown == [failed]
    assert "card declined <img src=x" in browser.find_element(By.CSS_SELECTOR, "td.err").text
    assert xss_ran(browser) is None

    # The failed job: its arguments and error shown as text, not run.
    browser.find_element(By.CSS_SELECTOR, f'tr[data-id="{failed}"] a.job-link').click()
    wait_for(browser, lambda d: d.title == f"Job {failed} · Soniq", "the job page")
    assert text_of(browser, "job-status") == "failed"
    assert ARG_XSS in text_of(browser, "job-args")
    assert ERROR_XSS in text_of(browser, "job-error")
    assert "ValueError" in text_of(browser, "job-traceback")
    assert "ended" in text_of(browser, "timeline")
    assert xss_ran(browser) is None

    # Retry, then cancel the retried job before any worker takes it (its queue,
    # billing, has none).
    browser.find_element(By.ID, "retry").click()
    wait_for(browser, lambda d: "was put back in line" in text_of(d, "notice"), "retry")
    assert text_of(browser, "job-status") == "queued"
    assert ops.get_job(failed).status is JobStatus.QUEUED
    browser.find_element(By.ID, "cancel").click()
    wait_for(browser, lambda d: "was cancelled" in text_of(d, "notice"), "cancel")
    assert ops.get_job(failed).status is JobStatus.CANCELLED
    assert not browser.find_elements(By.ID, "cancel")

    # Pause and resume a queue from the overview.
    browser.find_element(By.ID, "nav-overview").click()
    pause = wait_for(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, 'tr[data-queue="mail"] button.queue-action'),
        "the overview",
    )
    assert pause.text == "Pause"
    pause.click()
    wait_for(browser, lambda d: "Queue paused" in text_of(d, "notice"), "pause")
    assert ops.paused_queues() == ["mail"]
    row = browser.find_element(By.CSS_SELECTOR, 'tr[data-queue="mail"]')
    assert "paused" in row.text
    row.find_element(By.CSS_SELECTOR, "button.queue-action").click()
    wait_for(browser, lambda d: "Queue resumed" in text_of(d, "notice"), "resume")
    assert ops.paused_queues() == []

    # Purge the done jobs (asked to confirm first); the others stay.
    older = browser.find_element(By.NAME, "older_than")
    older.clear()
    older.send_keys("0")
    for status in ("failed", "cancelled"):
        browser.find_element(By.NAME, f"status_{status}").click()  # untick
    click_and_confirm(browser, "purge")
    wait_for(browser, lambda d: "Deleted 3 finished job(s)" in text_of(d, "notice"), "purge")
    assert ops.list_jobs(status="done") == []
    assert ops.get_job(failed) is not None and ops.get_job(waiting) is not None

    # Workers: the live one, and the job it runs.
    browser.find_element(By.ID, "nav-workers").click()
    wait_for(browser, lambda d: d.title == "Workers · Soniq", "the workers page")
    rows = browser.find_elements(By.CSS_SELECTOR, "#workers tr[data-worker]")
    assert len(rows) == 1 and "slow" in rows[0].text and "1/2" in rows[0].text
    rows[0].find_element(By.LINK_TEXT, str(held)).click()
    wait_for(browser, lambda d: d.title == f"Job {held} · Soniq", "the running job")
    assert text_of(browser, "job-status") == "running"
    assert browser.find_elements(By.ID, "cancel")  # a running job can be asked to stop


def test_the_read_only_dashboard_offers_no_action(browser: WebDriver, tmp_path: Path) -> None:
    eq = Soniq(f"sqlite:///{tmp_path}/jobs.db")
    eq.sync.ensure_initialized()
    job_id = eq.sync.enqueue("shop.unknown", queue="mail")
    eq.sync.close()
    server = Server(soniq.dashboard.app(Soniq(f"sqlite:///{tmp_path}/jobs.db"), refresh=0))
    try:
        browser.get(server.url + "/")
        assert text_of(browser, "mode") == "read-only"
        assert not browser.find_elements(By.CSS_SELECTOR, "form[method=post]")
        assert not browser.find_elements(By.ID, "auto-refresh")
        browser.get(f"{server.url}/jobs/{job_id}")
        assert text_of(browser, "job-status") == "queued"
        assert not browser.find_elements(By.ID, "cancel")
    finally:
        server.stop()
