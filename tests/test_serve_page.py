"""The page at `/`, driven in headless Chromium (Debian's chromium and chromium-driver,
which `.ci/run` installs): generate, rate, and find the rating in the feedback store."""

from __future__ import annotations

import os
import shutil

import pytest

from genframe.feedback import FeedbackStore
from genframe.serving.app import create_app
from genframe.serving.models import load_served
from tests.support import serving

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# CI installs the browser and sets this, so there the test can only pass or fail.
REQUIRED = os.environ.get("GENFRAME_REQUIRE_BROWSER") == "1"
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER) and not REQUIRED,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or "/usr/bin/chromium"
    # Without the background-networking flags Chromium keeps trying outside hosts,
    # which this machine's closed network refuses.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER or "/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_the_page_generates_rates_and_the_rating_is_stored(browser, tiny_vae_run, tiny_lm_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    served = [load_served("digits", str(tiny_vae_run)), load_served("lm", str(tiny_lm_run))]
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    app = create_app(served, token="t0ken", store=store)
    wait = WebDriverWait(browser, 60)
    try:
        with serving(app) as base:
            browser.get(base + "/")
            wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 2)
            browser.find_element(By.ID, "token").send_keys("t0ken")
            # A language model: two texts; the first corrected and rated up.
            Select(browser.find_element(By.ID, "model")).select_by_value("lm")
            browser.find_element(By.ID, "prompt").send_keys("The ")
            for field, value in (("num", "2"), ("max-tokens", "6")):
                box = browser.find_element(By.ID, field)
                box.clear()
                box.send_keys(value)
            browser.find_element(By.ID, "generate").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#samples .sample")) == 2)
            first = browser.find_elements(By.CSS_SELECTOR, "#samples .sample")[0]
            text_id = first.get_attribute("data-id")
            fix = first.find_element(By.TAG_NAME, "textarea")
            fix.clear()
            fix.send_keys("a corrected text")
            first.find_element(By.CLASS_NAME, "rate-up").click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "feedback stored"))
            # An image model: the second image rated down.
            Select(browser.find_element(By.ID, "model")).select_by_value("digits")
            assert not browser.find_element(By.ID, "prompt-row").is_displayed()
            browser.find_element(By.ID, "generate").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#samples .sample img"))
            cards = browser.find_elements(By.CSS_SELECTOR, "#samples .sample")
            image_id = cards[1].get_attribute("data-id")
            assert cards[1].find_element(By.TAG_NAME, "img").get_attribute("naturalWidth") == "8"
            cards[1].find_element(By.CLASS_NAME, "rate-down").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f".sample.rated[data-id='{image_id}']"))
    finally:
        for m in served:
            m.worker.close()
    text_feedback = store.feedback(text_id)
    assert [(f["rating"], f["corrected_text"]) for f in text_feedback] == [(1, "a corrected text")]
    assert store.sample(text_id)["prompt"] == "The "
    assert [f["rating"] for f in store.feedback(image_id)] == [-1]
    assert store.sample(image_id)["kind"] == "image"
