"""The chat page at / in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium):
type a message, watch the reply stream in, read the usage line with cache hits and price."""

import os
import shutil

import pytest
from serving import Server, make_model_dir

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("NANOSEEK_REQUIRE_BROWSER"),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    flags = (
        "--headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run"
        " --disable-background-networking --disable-component-update --disable-sync --disable-quic"
    )
    for flag in [*flags.split(), f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_the_chat_page_streams_a_reply_and_shows_usage_with_cache_hits_and_price(browser, tokenizer, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with Server(make_model_dir(tmp_path / "model", tokenizer)) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        wait.until(lambda d: "spent" in d.find_element(By.ID, "spent").text)  # prices loaded from /v1/billing
        for field, value in (("temperature", "0"), ("max-tokens", "24")):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        browser.execute_script(  # count every change to the conversation: a streamed reply makes many
            "window.updates = 0; new MutationObserver((r) => { window.updates += r.length; })"
            ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});"
        )
        message = "Explain in two sentences what a Python generator is and when to use one " * 2
        for turn in (1, 2):
            browser.find_element(By.ID, "input").send_keys(message, Keys.ENTER)
            wait.until(
                lambda d, n=turn: (
                    len(d.find_elements(By.CSS_SELECTOR, ".turn .usage")) == n
                    and d.find_elements(By.CSS_SELECTOR, ".turn .usage")[-1].text
                )
            )
        turns = browser.find_elements(By.CSS_SELECTOR, ".turn")
        assert [t.find_element(By.CSS_SELECTOR, ".user").text for t in turns] == [message.strip()] * 2
        assert all(t.find_element(By.CSS_SELECTOR, ".content").text for t in turns)
        assert browser.execute_script("return window.updates") > 10  # the replies arrived piece by piece
        first, second = (t.find_element(By.CSS_SELECTOR, ".usage").text for t in turns)
        assert "cache hit 0 ·" in first and "completion 24" in first and "¥" in first
        hit = int(second.split("cache hit ")[1].split(" ")[0])
        assert hit > 0 and hit % 64 == 0  # the second turn's prompt starts with the first: a cache hit
