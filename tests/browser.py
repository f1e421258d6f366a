"""A real browser on the dashboard, for its tests (tests/test_dashboard_browser.py)
and its screenshots (tools/dashboard_screenshots.py): uvicorn in a thread, a worker
in a thread, headless Chromium through the system's chromedriver. No pytest here."""

from __future__ import annotations

import asyncio
import shutil
import threading
from typing import Any

import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from soniq import Soniq
from tests.polling import wait_until
from tests.throwaway_pg import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

#: How long a page may take to load.
WAIT = 20


class Server:
    """uvicorn serving ``app`` on a free port of 127.0.0.1, in a thread (uvicorn
    installs no signal handler there); its lifespan runs as in production."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, lifespan="on", log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), 30, "uvicorn")
        assert self.server.started, "uvicorn did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "uvicorn did not stop"


class BackgroundWorker:
    """``eq.run_worker(**options)`` on an event loop of its own thread, until
    :meth:`stop` cancels it (a graceful shutdown, as SIGTERM does)."""

    def __init__(self, eq: Soniq, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.task: asyncio.Task[None] | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.task = self.loop.create_task(eq.run_worker(**options))
            started.set()
            try:
                self.loop.run_until_complete(self.task)
            except asyncio.CancelledError:
                pass
            finally:
                self.loop.run_until_complete(eq.close())
                self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)

    def stop(self) -> None:
        assert self.task is not None
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the worker did not stop"


def chromium(width: int = 1280, height: int = 1000, *extra: str) -> WebDriver:
    """Headless Chromium through the system's chromedriver (never a downloaded one),
    with ``extra`` command-line switches."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        f"--window-size={width},{height}",
        *extra,
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    return driver
