"""The demo page in a real headless browser (Debian's Chromium and ChromeDriver).

`.ci/run` installs them; on another machine: apt-get install chromium chromium-driver.
"""

import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from helpers import Client
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


def open_page(browser, server, mode):
    browser.get("http://127.0.0.1:%d/" % server.port)
    assert browser.title == "wsloop " + mode
    wait = WebDriverWait(browser, 10)
    wait.until(lambda d: d.find_element(By.ID, "status").text == "connected")
    return wait


def send_from_page(browser, text):
    browser.find_element(By.ID, "message").send_keys(text)
    browser.find_element(By.ID, "send").click()


def test_demo_page_connects_sends_and_shows_the_reply(browser, cli_server):  # noqa: F811
    server = cli_server()
    wait = open_page(browser, server, "echo")
    send_from_page(browser, "hello from chromium")
    wait.until(lambda d: len(log_lines(d)) == 2)
    lines = browser.find_elements(By.CSS_SELECTOR, "#log div")
    assert [(line.get_attribute("class"), line.text) for line in lines] == [
        ("out", "hello from chromium"),
        ("in", "hello from chromium"),  # the server's reply, shown by the page
    ]
    assert "open from 127.0.0.1:" in server.wait_for("open from")  # after the page and favicon requests


def test_chat_page_shows_your_message_once_and_binary_as_its_size(browser, cli_server):  # noqa: F811
    server = cli_server("--broadcast")
    wait = open_page(browser, server, "chat")
    other = Client(server.port)  # another member of the chat, on a raw socket
    send_from_page(browser, "hello from chromium")
    assert other.recv_message() == "hello from chromium"  # broadcast, so the page gets it too
    other.send_binary(b"abc")
    wait.until(lambda d: any("binary" in line or "Blob" in line for line in log_lines(d)))
    other.send_text("last")  # the page gets it after its own message and the binary one
    wait.until(lambda d: "last" in log_lines(d))
    lines = log_lines(browser)
    assert lines.count("hello from chromium") == 1, lines
    assert not any("[object Blob]" in line for line in lines), lines
    assert [line for line in lines if "binary" in line and "3" in line], lines


def test_chat_page_with_history_recovers_after_a_drop(browser, cli_server):  # noqa: F811
    """The page keeps the last position and reconnects with ?since=: what
    was said while it was away is shown once, after a recovery note."""
    server = cli_server("--broadcast", "--history", "10")
    wait = open_page(browser, server, "chat")
    other = Client(server.port)
    other.send_text("before")
    other.recv_message()
    wait.until(lambda d: "before" in log_lines(d))
    browser.execute_script("ws.close()")
    wait.until(lambda d: "reconnecting" in d.find_element(By.ID, "status").text)
    for text in ("away 1", "away 2"):
        other.send_text(text)
        other.recv_message()
    wait.until(lambda d: "away 2" in log_lines(d))
    lines = log_lines(browser)
    assert lines == ["before", "(reconnected: nothing missed)", "away 1", "away 2"], lines
