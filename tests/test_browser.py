"""The demo page in a real headless browser (Debian's Chromium and ChromeDriver).

`.ci/run` installs them; on another machine: apt-get install chromium chromium-driver.
"""

import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from test_cli import cli_server  # noqa: F401  (fixture)


def find(*names):
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("none of %s is installed (apt-get install chromium chromium-driver)" % (names,))


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = find("chromium", "chromium-browser")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--user-data-dir=%s" % (tmp_path / "profile")):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(find("chromedriver")), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def log_lines(driver):
    return [line.text for line in driver.find_elements(By.CSS_SELECTOR, "#log div")]


@pytest.mark.parametrize("mode", ["echo", "chat"])
def test_demo_page_connects_sends_and_shows_the_reply(browser, cli_server, mode):  # noqa: F811
    server = cli_server(*(["--broadcast"] if mode == "chat" else []))
    browser.get("http://127.0.0.1:%d/" % server.port)
    assert browser.title == "wsloop " + mode
    wait = WebDriverWait(browser, 10)
    wait.until(lambda d: d.find_element(By.ID, "status").text == "connected")
    browser.find_element(By.ID, "message").send_keys("hello from chromium")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(log_lines(d)) == 2)
    lines = browser.find_elements(By.CSS_SELECTOR, "#log div")
    assert [(line.get_attribute("class"), line.text) for line in lines] == [
        ("out", "hello from chromium"),
        ("in", "hello from chromium"),  # the server's reply, shown by the page
    ]
    assert "open from 127.0.0.1:" in server.wait_for("open from")  # after the page and favicon requests
