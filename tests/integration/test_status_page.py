"""The status page in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
driven by Selenium): it shows the demo topology's three nodes, the layer coverage and a
session, and updates when a worker is killed. Skips, saying why, where no browser is installed
(`make test` installs one with apt-get where it can)."""

from __future__ import annotations

import shutil
import signal

import httpx
import pytest
from helpers.cluster import start_cluster

from consortium.core.config import LayerRange

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="no headless Chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser(request):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    request.addfinalizer(driver.quit)
    return driver


def _texts(driver, selector: str) -> list[str]:
    """The texts of the elements `selector` matches, read in one go (the page redraws each second)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.textContent)", selector
    )


def _rows(driver) -> dict[str, str]:
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll('#nodes tbody tr'), r => [r.dataset.node, r.dataset.role])"
    )
    return dict(rows)


def test_status_page_shows_the_nodes_and_a_killed_worker(request, tiny_gguf, tmp_path, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    cluster = start_cluster(
        request,
        tiny_gguf,
        tmp_path,
        LayerRange(2, 4),
        [LayerRange(0, 1), LayerRange(1, 2)],
        coordinator_args=["--http-port", "0", "--node-timeout", "2", "--heartbeat-interval", "0.5"],
    )
    done = httpx.post(
        cluster.http_url + "/v1/completions",
        json={"model": "tiny", "prompt": "the cat", "max_tokens": 5},
        timeout=60,
    )
    assert done.status_code == 200
    browser.get(cluster.http_url + "/")
    serving = {"coordinator": "serving", "worker-0": "serving", "worker-1": "serving"}
    WebDriverWait(browser, 30).until(lambda d: _rows(d) == serving)
    assert _texts(browser, "#coverage div") == ["1", "1", "1", "1"]
    sessions = _texts(browser, "#sessions tbody tr")
    assert len(sessions) == 1 and "finished" in sessions[0]
    assert "worker-0 0-1 → worker-1 1-2 → coordinator 2-4" in _texts(browser, "#route")[0]
    browser.save_screenshot(str(tmp_path / "status-before.png"))

    cluster.process("worker-1").signal_group(signal.SIGKILL)
    WebDriverWait(browser, 30).until(lambda d: _rows(d).get("worker-1") == "dead")
    WebDriverWait(browser, 10).until(lambda d: _texts(d, "#coverage div") == ["1", "0", "1", "1"])
    assert "no complete pipeline" in _texts(browser, "#route")[0]
    browser.save_screenshot(str(tmp_path / "status-after.png"))
