"""The web page in a real browser: headless Chromium driven by Selenium against the real server.

Chromium and chromedriver are Debian's packages (`make browser-deps` installs them); Selenium is
given both paths, so it never runs Selenium Manager, which would try to download them. What the
page shows is checked against the API's own answer for the same bytes. Screenshots go to the
test's tmp_path, and also to $IMGCLF_SCREENSHOTS when that is set (CI can keep them as artifacts).
"""

import base64
import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving.conftest import TOKEN

pytestmark = pytest.mark.e2e

WAIT_S = 20
UPSCALE = 8  # the 8x8 digit is sent as a 64x64 PNG: the server resizes it as `normalize` would


@pytest.fixture
def page(browser, base_url):
    """The page freshly opened, with the model card loaded."""
    browser.get(f"{base_url}/")
    wait_for_text(browser, "model-name", lambda text: text not in ("", "loading…"))
    return browser


@pytest.fixture(scope="module")
def digit_png(digits_splits, served_model, tmp_path_factory) -> tuple[Path, str]:
    """A test-split digit the served model gets right once upscaled, as a PNG, and its label."""
    images, labels = digits_splits["test"]
    path = tmp_path_factory.mktemp("digit") / "digit.png"
    for image, label in zip(images, labels, strict=True):
        height, width = image.shape[1:]
        big = Image.fromarray(image[0]).resize((width * UPSCALE, height * UPSCALE), Image.Resampling.NEAREST)
        big.save(path)
        probabilities = served_model.predict(served_model.preprocess(path)[None])[0]
        if probabilities.argmax() == label and probabilities.max() > 0.9:
            return path, digits_splits["card"].classes[label]
    raise AssertionError("the served model gets no test digit right with confidence")


def api_prediction(base_url: str, png: bytes) -> dict:
    """The API's answer for one PNG: what the page must show."""
    files = {"file": ("image.png", png, "image/png")}
    response = httpx.post(f"{base_url}/v1/predict", files=files, timeout=30)
    response.raise_for_status()
    return response.json()["predictions"][0]


def wait_for_text(driver, element_id: str, condition=bool) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        text = d.find_element(By.ID, element_id).text
        return text if condition(text) else False

    return WebDriverWait(driver, WAIT_S).until(ready, f"#{element_id} never showed the expected text")


def shown_bars(driver) -> list[tuple[str, float]]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#bars li")
    return [(row.get_attribute("data-label"), float(row.get_attribute("data-probability"))) for row in rows]


def top_classes(prediction: dict, k: int = 5) -> list[tuple[str, float]]:
    return sorted(prediction["probabilities"].items(), key=lambda item: -item[1])[:k]


def upload(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "file").send_keys(str(path))
    driver.find_element(By.ID, "predict").click()


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    """The whole page to tmp_path (and $IMGCLF_SCREENSHOTS): a deliverable, not only a debug aid."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1000, max(height + 120, 800))
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), f"no screenshot at {path}"
    if os.environ.get("IMGCLF_SCREENSHOTS"):
        folder = Path(os.environ["IMGCLF_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, folder / name)
    return path


def severe_console_messages(driver) -> list[str]:
    """Script errors and failed loads the page caused (the log is emptied by each read)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_upload_shows_the_right_label_and_the_model(page, base_url, digit_png, tmp_path):
    from selenium.webdriver.common.by import By

    card = httpx.get(f"{base_url}/v1/model", timeout=30).json()
    assert page.find_element(By.ID, "model-name").text == card["name"]
    assert card["version"] in page.find_element(By.ID, "model-version").text
    assert page.find_element(By.ID, "model-classes").text == ", ".join(card["classes"])
    assert page.title == f"imgclf · {card['name']}"

    path, label = digit_png
    upload(page, path)

    assert wait_for_text(page, "label") == label
    expected = top_classes(api_prediction(base_url, path.read_bytes()))
    shown = shown_bars(page)
    assert [name for name, _ in shown] == [name for name, _ in expected]
    assert [p for _, p in shown] == pytest.approx([p for _, p in expected], abs=1e-6)
    confidence = page.find_element(By.ID, "confidence").text
    assert float(confidence.removesuffix("%")) == pytest.approx(expected[0][1] * 100, abs=0.1)
    assert not page.find_element(By.ID, "error").is_displayed()
    screenshot(page, tmp_path, "page-upload.png")
    assert severe_console_messages(page) == []


@pytest.mark.parametrize("pointer", ["mouse", "touch"])
def test_drawing_on_the_canvas_gets_the_drawing_classified(page, base_url, pointer, tmp_path):
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By

    canvas = page.find_element(By.ID, "canvas")
    side = canvas.size["height"]
    # A vertical stroke down the middle, dragged as a user would; it is classified on release.
    actions = ActionBuilder(page, mouse=PointerInput(pointer, pointer))
    stroke = actions.pointer_action.move_to(canvas, 0, -side // 3).pointer_down()
    for _ in range(4):
        stroke = stroke.move_by(0, side // 6)
    stroke.pointer_up()
    actions.perform()

    label = wait_for_text(page, "label")
    drawing = page.execute_script("return arguments[0].toDataURL('image/png')", canvas)
    png = base64.b64decode(drawing.split(",", 1)[1])
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    assert pixels[0, 0] == 0 and pixels.max() == 255, "expected white ink on a black ground"
    assert (pixels > 128).mean() > 0.02, "the stroke left too little ink"
    assert label == api_prediction(base_url, png)["label"]
    screenshot(page, tmp_path, f"page-drawing-{pointer}.png")

    page.find_element(By.ID, "clear").click()
    ink_left = page.execute_script(
        "const c = arguments[0];"
        "const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "return data.some((v, i) => i % 4 !== 3 && v !== 0);",
        canvas,
    )
    assert not ink_left
    assert page.find_element(By.ID, "predict").get_attribute("disabled") is not None
    assert severe_console_messages(page) == []


def test_a_dropped_file_is_the_one_classified(page, digit_png):
    from selenium.webdriver.common.by import By

    path, label = digit_png
    drop = page.find_element(By.ID, "drop")
    # WebDriver cannot drag a file from outside the browser: dispatch the events a drop fires.
    page.execute_script(
        "const [target, encoded, name] = arguments;"
        "const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));"
        "const data = new DataTransfer();"
        "data.items.add(new File([bytes], name, {type: 'image/png'}));"
        "for (const type of ['dragenter', 'dragover', 'drop'])"
        "  target.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));",
        drop,
        base64.b64encode(path.read_bytes()).decode(),
        path.name,
    )
    assert page.find_element(By.ID, "preview").is_displayed()
    assert path.name in page.find_element(By.ID, "source").text
    page.find_element(By.ID, "predict").click()
    assert wait_for_text(page, "label") == label


def test_a_file_that_is_not_an_image_shows_the_api_detail(page, base_url, tmp_path):
    from selenium.webdriver.common.by import By

    fake = tmp_path / "notes.png"
    fake.write_text("only text, named .png")
    files = {"file": ("notes.png", fake.read_bytes(), "image/png")}
    answer = httpx.post(f"{base_url}/v1/predict", files=files, timeout=30)
    assert answer.status_code == 400

    upload(page, fake)

    assert wait_for_text(page, "error") == answer.json()["detail"]
    assert not page.find_element(By.ID, "result").is_displayed()
    # No preview for it, its name instead.
    wait_for_text(page, "drop-text", lambda text: text == fake.name)
    screenshot(page, tmp_path, "page-error.png")


def test_a_server_with_a_token_gets_it_from_the_user(browser, secured_url, digit_png):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{secured_url}/")
    form = browser.find_element(By.ID, "auth")
    WebDriverWait(browser, WAIT_S).until(lambda _: form.is_displayed(), "no token form after a 401")
    assert browser.find_element(By.ID, "model-name").text == "token needed"

    browser.find_element(By.ID, "token").send_keys("wrong-token")
    browser.find_element(By.ID, "token-save").click()
    wait_for_text(browser, "auth-message", lambda text: "refused" in text)

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "token-save").click()
    card = httpx.get(f"{secured_url}/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    wait_for_text(browser, "model-name", lambda text: text == card["name"])
    assert not form.is_displayed()

    path, label = digit_png
    upload(browser, path)
    assert wait_for_text(browser, "label") == label
    assert browser.execute_script("return sessionStorage.getItem('imgclf.token')") == TOKEN
