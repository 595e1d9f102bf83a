"""The demo page end to end in a real headless browser (chromium driven by selenium): upload a photo, get tokens
and a reconstruction back, see a bad upload's error on the page, and the page still working after it."""

from __future__ import annotations

import io
import shutil
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.slow  # about 15 s: the page, the browser and three round trips


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or (str(CHROMIUM) if CHROMIUM.is_file() else None)
    driver = shutil.which("chromedriver") or (str(CHROMEDRIVER) if CHROMEDRIVER.is_file() else None)
    if chromium is None or driver is None:
        pytest.skip("no chromium + chromedriver on this machine")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,2400"):  # fmt: skip
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)  # the system's driver: nothing is downloaded


@pytest.fixture()
def page(released_dir, tmp_path, monkeypatch):
    """The demo of a tiny model served on a free port, and a headless browser on it."""
    pytest.importorskip("gradio")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from qlip.demo import build_app

    app = build_app(released_dir)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        browser = _browser()
    except BaseException:
        app.close()
        raise
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        yield browser, app
    finally:
        browser.quit()
        app.close()


def test_upload_a_photo_get_tokens_and_a_reconstruction_and_survive_a_bad_upload(page, image_files, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, app = page
    wait = WebDriverWait(browser, 60)
    model = app.qlip_session.model

    def value(elem_id: str) -> str:
        return browser.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea").get_property("value")

    def upload(path: Path, until) -> str:
        clear = browser.find_elements(By.CSS_SELECTOR, "#tok-upload button[aria-label=Clear]")
        if clear:
            clear[0].click()
        field = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tok-upload input[type=file]"))[0]
        browser.execute_script("document.querySelector('#tok-status textarea').value = ''")
        field.send_keys(str(path))
        wait.until(lambda b: until(value("tok-status")))
        return value("tok-status")

    def shown(elem_id: str) -> Image.Image:
        src = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, f"#{elem_id} img"))[0].get_attribute("src")
        with urllib.request.urlopen(src, timeout=30) as r:
            return Image.open(io.BytesIO(r.read())).convert("RGB")

    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tok-upload input[type=file]"))
    assert upload(image_files["rgb"], lambda s: s == "ok") == "ok"  # the astronaut, a real photo
    g = model.grid_size
    assert f"{g} x {g} tokens of {model.num_bits} bits" in value("tok-stats") and "PSNR" in value("tok-stats")
    assert shown("tok-recon").size == (model.image_size, model.image_size)
    assert shown("tok-grid").size[0] % g == 0
    expected = app.qlip_session.tokenize(str(image_files["rgb"]))
    assert np.array_equal(np.asarray(shown("tok-recon")), np.asarray(expected.reconstruction))  # PNG: exact pixels

    bad = tmp_path / "notes.txt"
    bad.write_text("this is not an image")
    status = upload(bad, lambda s: s.startswith("error"))
    assert "notes.txt" in status and "upload an image file" in status

    assert upload(image_files["jpeg"], lambda s: s == "ok") == "ok"  # the page still works: coffee
    assert f"{g} x {g} tokens" in value("tok-stats")
    assert shown("tok-recon").size == (model.image_size, model.image_size)
