"""The page at / in a real headless Chromium (Debian's chromium and chromium-driver, which `make browser-deps`
installs): pick the model, upload a digit PNG and read the label the page shows; a non-image file gets a clear
message; and the Swagger UI page renders the API from the server's own files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.images import encode
from tests.models import write_version
from tests.server.http.serving import ServerThread, running_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 20
SCREENSHOT_VARIABLE = "CONVSERVE_PAGE_SCREENSHOT"
"""Set to a path to keep a screenshot of the answered page there (docs/http.png was made so)."""

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (`make browser-deps` installs them "
                    "where apt-get can)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=900,820",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repository = tmp_path_factory.mktemp("http-page") / "models"
    write_version(repository, "digits", 1, labels=tuple("0123456789"))
    with running_server(repository) as server:
        yield server


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sklearn.datasets import load_digits

    digit = np.round(load_digits().images[3] * (255.0 / 16)).astype(np.uint8)
    path = tmp_path_factory.mktemp("page-files") / "digit.png"
    path.write_bytes(encode(digit, "PNG"))
    return path


def wait_for(driver: object, condition: object) -> object:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(condition)


def open_page(driver, served: ServerThread) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"http://127.0.0.1:{served.port}/")
    wait_for(driver, lambda d: "CPUExecutionProvider" in d.find_element(By.ID, "model-info").text)


def test_a_digit_png_gets_the_label_the_api_gives(browser, served, digit_png):
    from selenium.webdriver.common.by import By

    expected = served.request("POST", "/v2/models/digits/classify", digit_png.read_bytes(),
                              {"Content-Type": "image/png"}).json()["results"][0]
    open_page(browser, served)
    assert browser.find_element(By.ID, "model").get_attribute("value") == "digits"
    assert "version 1" in browser.find_element(By.ID, "model-info").text
    browser.find_element(By.ID, "file").send_keys(str(digit_png))
    wait_for(browser, lambda d: d.find_element(By.ID, "result").is_displayed())
    assert browser.find_element(By.ID, "label").text == expected["label"]
    assert browser.find_element(By.ID, "score").text == f"{expected['score'] * 100:.1f}%"
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars li")
    assert [bar.find_element(By.CLASS_NAME, "label").text for bar in bars] == \
        [entry["label"] for entry in expected["top_k"]]
    answered_by = browser.find_element(By.ID, "answered-by").text
    assert "model digits, version 1" in answered_by and "CPUExecutionProvider" in answered_by
    assert "verified" in answered_by
    assert not browser.find_element(By.ID, "message").is_displayed()
    if os.environ.get(SCREENSHOT_VARIABLE):
        browser.save_screenshot(os.environ[SCREENSHOT_VARIABLE])


def test_a_file_that_is_not_an_image_gets_a_clear_message(browser, served, tmp_path):
    from selenium.webdriver.common.by import By

    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    open_page(browser, served)
    browser.find_element(By.ID, "file").send_keys(str(notes))
    wait_for(browser, lambda d: d.find_element(By.ID, "message").is_displayed())
    message = browser.find_element(By.ID, "message").text
    assert "“notes.txt” is not an image" in message and "PNG" in message
    assert not browser.find_element(By.ID, "result").is_displayed()
    # A file that claims to be a PNG and is not: the server's reason is shown.
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not a png at all")
    browser.find_element(By.ID, "file").send_keys(str(fake))
    wait_for(browser, lambda d: "could not classify" in d.find_element(By.ID, "message").text)
    assert "“fake.png”" in browser.find_element(By.ID, "message").text


def test_the_swagger_ui_page_renders_the_api(browser, served):
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{served.port}/v2/docs")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    paths = {element.text.replace("\u200b", "") for element in
             browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert "/v2/models/{model_name}/infer" in paths and "/v2/models/{model_name}/classify" in paths


def test_with_a_token_the_page_asks_for_it_and_then_sends_it(browser, digit_png, tmp_path_factory):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    repository = tmp_path_factory.mktemp("http-page-token") / "models"
    write_version(repository, "digits", 1, labels=tuple("0123456789"))
    with running_server(repository, auth_token="page-token") as served:
        browser.get(f"http://127.0.0.1:{served.port}/")
        wait_for(browser, lambda d: d.find_element(By.ID, "token-field").is_displayed())
        assert "needs a token" in browser.find_element(By.ID, "message").text
        browser.find_element(By.ID, "token").send_keys("page-token", Keys.TAB)
        wait_for(browser, lambda d: "CPUExecutionProvider" in d.find_element(By.ID, "model-info").text)
        browser.find_element(By.ID, "file").send_keys(str(digit_png))
        wait_for(browser, lambda d: d.find_element(By.ID, "result").is_displayed())
        expected = served.request("POST", "/v2/models/digits/classify", digit_png.read_bytes(),
                                  {"Content-Type": "image/png", "Authorization": "Bearer page-token"})
        assert browser.find_element(By.ID, "label").text == expected.json()["results"][0]["label"]
