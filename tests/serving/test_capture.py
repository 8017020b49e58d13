"""`imgclf serve --capture DIR` on a real uvicorn server with the real digits model: what is kept,
where, the manifest, the size bound, failing disks, labelling through /v1/feedback, the token,
and labels or requests that try to leave DIR."""

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from imgclf.serving.app import create_app
from imgclf.serving.capture import LABELLED, MANIFEST, Capture, folder_name
from tests.conftest import REPO, tool_env
from tests.serving.conftest import TOKEN, encode, grey_png, running_server


def probabilities(model, png: bytes) -> np.ndarray:
    return model.predict(model.preprocess(png)[None])[0]


@pytest.fixture(scope="module")
def unsure_pngs(digits_splits, served_model) -> list[bytes]:
    """Distinct PNGs the model answers with a top-1 probability below 0.6: two digits blended."""
    images = digits_splits["test"][0]
    found = []
    for i in range(len(images)):
        for j in range(i + 1, i + 40):
            blend = ((images[i].astype(np.uint16) + images[j % len(images)]) // 2).astype(np.uint8)
            png = grey_png(blend)
            if probabilities(served_model, png).max() < 0.6:
                found.append(png)
                break
        if len(found) == 12:
            return found
    raise AssertionError("no blended digits that the model is unsure of")


@pytest.fixture(scope="module")
def confident_pngs(digits_splits, served_model) -> list[bytes]:
    """Distinct PNGs of test digits that the model answers with a top-1 probability above 0.95."""
    found = []
    for image in digits_splits["test"][0]:
        png = grey_png(image)
        if probabilities(served_model, png).max() > 0.95 and png not in found:
            found.append(png)
        if len(found) == 30:
            return found
    raise AssertionError("too few confidently classified test digits")


def post(url: str, png: bytes, name: str = "image.png", headers: dict | None = None) -> httpx.Response:
    files = {"file": (name, png, "image/png")}
    response = httpx.post(f"{url}/v1/predict", files=files, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response


def manifest(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / MANIFEST).read_text().splitlines()]


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not on /metrics")


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def capturing(served_model, tmp_path):
    """A server with capture on in tmp_path/captures: (url, Capture, DIR); factory for options."""
    started = []

    def start(root: Path | None = None, token: str | None = None, model=served_model, **options):
        capture = Capture(root or tmp_path / "captures", **options)
        server = running_server(create_app(model, token=token, capture=capture))
        url = server.__enter__()
        started.append((server, capture))
        return url, capture, capture.root

    yield start
    for server, capture in started:
        server.__exit__(None, None, None)
        capture.close()


def test_unsure_uploads_are_kept_as_sent_and_confident_ones_are_not(
    capturing, served_model, unsure_pngs, confident_pngs
):
    url, capture, root = capturing()
    jpegs = (encode(Image.open(io.BytesIO(png)), "JPEG", quality=95) for png in unsure_pngs[1:])
    jpeg_unsure = next(j for j in jpegs if probabilities(served_model, j).max() < 0.6)
    answers = [post(url, png).json()["predictions"][0] for png in (unsure_pngs[0], confident_pngs[0])]
    jpeg_answer = post(url, jpeg_unsure, "photo.jpg").json()["predictions"][0]
    capture.flush()

    sha = hashlib.sha256(unsure_pngs[0]).hexdigest()
    jpeg_sha = hashlib.sha256(jpeg_unsure).hexdigest()
    kept = f"{answers[0]['label']}/{sha}.png"
    assert files_under(root) == sorted([kept, f"{jpeg_answer['label']}/{jpeg_sha}.jpg", MANIFEST])
    assert (root / kept).read_bytes() == unsure_pngs[0]  # the bytes as uploaded, not re-encoded
    records = manifest(root)
    assert [r["sha256"] for r in records] == [sha, jpeg_sha]
    record = records[0]
    assert record["event"] == "captured"
    assert record["file"] == kept
    assert record["label"] == answers[0]["label"]
    assert record["model"] == {"name": "digits-test", "version": served_model.version}
    assert record["probabilities"] == pytest.approx(answers[0]["probabilities"])
    assert record["reason"] == "low_confidence"
    # The drift monitor's state when it was kept: no window closed yet, so no signal in drift.
    assert record["signals"]["drift"] == [] and record["signals"]["status"] in (
        "off",
        "waiting for the first window",
    )
    assert record["time"].endswith("Z")
    assert metric(url, "imgclf_captured_total") == 2
    assert metric(url, "imgclf_capture_errors_total") == 0

    # The same bytes again are kept once.
    post(url, unsure_pngs[0])
    capture.flush()
    assert len(manifest(root)) == 2


def test_the_monitor_state_is_recorded_with_each_capture(capturing, unsure_pngs):
    url, capture, root = capturing()
    capture.signals = lambda: {"brightness": {"alarm": True}}
    post(url, unsure_pngs[0])
    capture.flush()
    assert manifest(root)[0]["signals"] == {"brightness": {"alarm": True}}


def test_a_seeded_sample_of_confident_uploads_is_kept(capturing, confident_pngs):
    url, capture, root = capturing(sample=0.5, seed=7)
    for png in confident_pngs[:20]:
        post(url, png)  # one at a time: the draws are taken in this order
    capture.flush()
    draws = random.Random(7)
    expected = [hashlib.sha256(png).hexdigest() for png in confident_pngs[:20] if draws.random() < 0.5]
    assert 3 <= len(expected) <= 17
    records = manifest(root)
    assert [r["sha256"] for r in records] == expected
    assert {r["reason"] for r in records} == {"sample"}


def test_capture_is_off_by_default_and_its_routes_say_so(base_url, confident_pngs):
    post(base_url, confident_pngs[0])
    listed = httpx.get(f"{base_url}/v1/captures")
    assert listed.json() == {"enabled": False, "waiting": 0, "captures": []}
    for response in (
        httpx.get(f"{base_url}/v1/captures/{'0' * 64}"),
        httpx.post(f"{base_url}/v1/feedback", json={"sha256": "0" * 64, "label": "3"}),
    ):
        assert response.status_code == 404
        assert "--capture DIR" in response.json()["detail"]
    assert "imgclf_captured_total" not in httpx.get(f"{base_url}/metrics").text


def test_the_folder_stays_within_its_size_by_deleting_the_oldest_unlabelled(capturing, confident_pngs):
    pngs = confident_pngs[:6]
    budget = sum(len(p) for p in pngs[:3])
    url, capture, root = capturing(below=0.0, sample=1.0, max_bytes=budget)
    post(url, pngs[0])
    capture.flush()
    first = capture.pending(10)[1][0]
    httpx.post(f"{url}/v1/feedback", json={"sha256": first["sha256"], "label": "1"}).raise_for_status()
    for png in pngs[1:]:
        post(url, png)
        capture.flush()
    shas = [hashlib.sha256(p).hexdigest() for p in pngs]
    images = [name for name in files_under(root) if name != MANIFEST]
    kept = {Path(name).stem for name in images}
    # The labelled one is kept; the newest unlabelled fill the rest of the budget.
    assert shas[0] in kept and shas[5] in kept
    assert shas[1] not in kept and shas[2] not in kept
    assert sum((root / name).stat().st_size for name in images) <= budget
    evicted = [r["sha256"] for r in manifest(root) if r["event"] == "evicted"]
    assert evicted[:2] == shas[1:3]
    assert metric(url, "imgclf_capture_evicted_total") == len(evicted)

    # A restart reads the manifest back: the same images await a label.
    again = Capture(root, max_bytes=budget)
    assert again.pending(10) == capture.pending(10)
    again.close()


def test_a_capture_folder_that_cannot_be_written_never_fails_a_request(
    capturing, tmp_path, unsure_pngs, caplog
):
    # Tests may run as root, whom chmod does not stop: a folder under a regular file cannot be made
    # by anyone.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    url, capture, _ = capturing(root=blocker / "captures")
    with caplog.at_level(logging.WARNING, logger="imgclf.serving.capture"):
        for png in unsure_pngs[:5]:
            post(url, png)
        capture.flush()
    assert metric(url, "imgclf_capture_errors_total") == 5
    assert metric(url, "imgclf_captured_total") == 0
    warnings = [r for r in caplog.records if r.name == "imgclf.serving.capture"]
    assert len(warnings) == 1, warnings  # one line, not one per request
    assert "cannot write" in warnings[0].getMessage()


def test_a_folder_that_goes_away_while_serving_is_counted_not_fatal(capturing, unsure_pngs):
    url, capture, root = capturing()
    post(url, unsure_pngs[0])
    capture.flush()
    shutil.rmtree(root)
    root.write_text("someone put a file here")
    for png in unsure_pngs[1:4]:
        post(url, png)
    capture.flush()
    assert metric(url, "imgclf_capture_errors_total") == 3
    assert root.read_text() == "someone put a file here"


@pytest.fixture
def tiny_disk(tmp_path) -> Path:
    """A 64 KiB tmpfs: a disk that fills up for real (root only; skipped where mount is refused)."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mountpoint)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mountpoint
    subprocess.run(["umount", str(mountpoint)], check=True)


def test_a_full_disk_and_a_read_only_one_never_fail_a_request(capturing, tiny_disk):
    url, capture, _ = capturing(root=tiny_disk / "captures", below=0.0, sample=1.0)
    rng = np.random.default_rng(0)
    for _ in range(12):  # 12 distinct 100x100 noise PNGs of about 10 KB each: more than 64 KiB
        post(url, grey_png(rng.integers(0, 256, (100, 100), dtype=np.uint8)))
    capture.flush()
    assert metric(url, "imgclf_capture_errors_total") > 0
    assert 0 < metric(url, "imgclf_captured_total") < 12

    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    errors = metric(url, "imgclf_capture_errors_total")
    post(url, grey_png(rng.integers(0, 256, (8, 8), dtype=np.uint8)))
    capture.flush()
    assert metric(url, "imgclf_capture_errors_total") == errors + 1


def test_labelling_moves_the_image_and_records_it(capturing, unsure_pngs):
    url, capture, root = capturing()
    guess = post(url, unsure_pngs[0]).json()["predictions"][0]["label"]
    capture.flush()
    sha = hashlib.sha256(unsure_pngs[0]).hexdigest()

    listed = httpx.get(f"{url}/v1/captures").json()
    assert listed["waiting"] == 1
    assert [(c["sha256"], c["label"], c["reason"]) for c in listed["captures"]] == [
        (sha, guess, "low_confidence")
    ]
    assert listed["captures"][0]["probability"] < 0.6
    image = httpx.get(f"{url}/v1/captures/{sha}")
    assert image.status_code == 200
    assert image.content == unsure_pngs[0]
    assert image.headers["content-type"] == "image/png"
    assert image.headers["x-content-type-options"] == "nosniff"

    truth = "7" if guess != "7" else "1"
    answer = httpx.post(f"{url}/v1/feedback", json={"sha256": sha, "label": truth})
    assert answer.status_code == 200, answer.text
    assert answer.json()["true_label"] == truth
    assert files_under(root) == sorted([f"{LABELLED}/{truth}/{sha}.png", MANIFEST])
    assert (root / LABELLED / truth / f"{sha}.png").read_bytes() == unsure_pngs[0]
    assert httpx.get(f"{url}/v1/captures").json() == {"enabled": True, "waiting": 0, "captures": []}
    labelled = manifest(root)[-1]
    assert (labelled["event"], labelled["sha256"], labelled["label"]) == ("labelled", sha, truth)
    assert labelled["file"] == f"{LABELLED}/{truth}/{sha}.png"
    assert metric(url, "imgclf_capture_labelled_total") == 1

    # A second label corrects the first: the image moves again.
    httpx.post(f"{url}/v1/feedback", json={"sha256": sha, "label": "0"}).raise_for_status()
    assert files_under(root) == sorted([f"{LABELLED}/0/{sha}.png", MANIFEST])


def test_feedback_refuses_what_it_cannot_do(capturing, unsure_pngs):
    url, capture, _ = capturing()
    post(url, unsure_pngs[0])
    capture.flush()
    sha = hashlib.sha256(unsure_pngs[0]).hexdigest()

    for label in ("../x", "cat", "10", ""):
        refused = httpx.post(f"{url}/v1/feedback", json={"sha256": sha, "label": label})
        assert refused.status_code == 422
        assert f"label {label!r} is not one of the model's classes" in refused.json()["detail"]
    unknown = httpx.post(f"{url}/v1/feedback", json={"sha256": "ab" * 32, "label": "3"})
    assert unknown.status_code == 404
    assert "ab" * 32 in unknown.json()["detail"]
    assert httpx.post(f"{url}/v1/feedback", json={"label": "3"}).status_code == 422
    assert httpx.get(f"{url}/v1/captures", params={"limit": 0}).status_code == 422
    assert httpx.get(f"{url}/v1/captures").json()["waiting"] == 1  # nothing moved


def test_paths_that_try_to_leave_the_folder_are_refused(capturing, unsure_pngs, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(unsure_pngs[1])
    url, capture, _ = capturing()
    post(url, unsure_pngs[0])
    capture.flush()
    for path in (
        "../../secret.png",
        "..%2F..%2Fsecret.png",
        "%2e%2e%2f%2e%2e%2fsecret.png",
        "captures.jsonl",
        "0" * 64,
        hashlib.sha256(unsure_pngs[1]).hexdigest(),  # the secret's: not a capture
    ):
        response = httpx.get(f"{url}/v1/captures/{path}")
        assert response.status_code in (404, 422), (path, response.status_code)  # no such, or not a SHA-256
        assert response.content != unsure_pngs[1]
    for sha in ("../../secret", "/etc/passwd", "..", ""):
        response = httpx.post(f"{url}/v1/feedback", json={"sha256": sha, "label": "3"})
        assert response.status_code == 422, sha
        assert "sha256" in str(response.json()["detail"])
    assert secret.read_bytes() == unsure_pngs[1]


def test_token_is_required_when_set(capturing, unsure_pngs):
    url, capture, _ = capturing(token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    post(url, unsure_pngs[0], headers=auth)
    capture.flush()
    sha = hashlib.sha256(unsure_pngs[0]).hexdigest()
    for method, path, body in (
        ("GET", "/v1/captures", None),
        ("GET", f"/v1/captures/{sha}", None),
        ("POST", "/v1/feedback", {"sha256": sha, "label": "3"}),
    ):
        assert httpx.request(method, url + path, json=body).status_code == 401
        assert httpx.request(method, url + path, json=body, headers=auth).status_code == 200


@pytest.mark.parametrize(
    "label",
    ["../x", "a/b", "..", ".", "", ".hidden", "labelled", "a\\b", "nul\x00x", "猫", "e\u0301", "x" * 300],
)
def test_any_label_is_one_folder_inside(label):
    name = folder_name(label, frozenset({LABELLED}))
    assert name not in ("", ".", "..", LABELLED)
    assert not name.startswith(".")
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert len(name) <= 100
    assert Path(name).name == name


def test_folder_names_keep_plain_labels_and_never_collide():
    assert [folder_name(label) for label in ("7", "cat", "猫", "golden retriever")] == [
        "7",
        "cat",
        "猫",
        "golden retriever",
    ]
    assert folder_name("a/b") != folder_name("a_b")
    assert folder_name("../x") != folder_name("_.._x")


@pytest.fixture(scope="module")
def hostile_model(digits_network, tmp_path_factory):
    """The digits network with class names that are not plain folder names."""
    from imgclf.serving.model import ServedModel
    from imgclf.stages.export import to_onnx

    network, example, card = digits_network
    classes = ("../x", "a/b", "..", ".", "labelled", "猫", "/etc", "c\\d", "../../../tmp/evil", "ok")
    proto = to_onnx(network, example, replace(card, classes=classes))
    path = tmp_path_factory.mktemp("hostile") / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    return ServedModel.load(str(path), threads=1)


def test_a_model_whose_classes_are_paths_writes_nothing_outside(
    capturing, hostile_model, tmp_path, unsure_pngs
):
    outer = tmp_path / "outer"
    root = outer / "inner" / "captures"
    url, capture, root = capturing(root=root, model=hostile_model, below=1.01)
    labels = set()
    for png in unsure_pngs:
        labels.add(post(url, png).json()["predictions"][0]["label"])
    capture.flush()
    for entry in capture.pending(100)[1]:
        for label in hostile_model.card.classes:
            response = httpx.post(f"{url}/v1/feedback", json={"sha256": entry["sha256"], "label": label})
            assert response.status_code == 200, response.text
    # Only DIR was written, and everything in it is one image folder deep.
    assert [p.name for p in outer.iterdir()] == ["inner"]
    assert [p.name for p in (outer / "inner").iterdir()] == ["captures"]
    assert not (tmp_path / "tmp").exists()
    for name in files_under(root):
        parts = Path(name).parts
        assert name == MANIFEST or len(parts) == 2 or (len(parts) == 3 and parts[0] == LABELLED), name
        assert ".." not in parts
    assert len(labels) >= 2


@pytest.mark.e2e
def test_an_image_is_labelled_on_the_web_page(browser, capturing, unsure_pngs):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, capture, root = capturing()
    guess = post(url, unsure_pngs[0]).json()["predictions"][0]["label"]
    capture.flush()
    sha = hashlib.sha256(unsure_pngs[0]).hexdigest()
    truth = "7" if guess != "7" else "1"

    browser.get(f"{url}/")
    wait = WebDriverWait(browser, 20)
    item = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#captures li[data-sha256="{sha}"]'))[0]
    assert f"Model: {guess}" in item.text
    assert browser.find_element(By.ID, "captures-count").text == "1 image to label."
    # The image is shown from the server's bytes (a blob URL, fetched with the token if any).
    wait.until(lambda d: item.find_element(By.TAG_NAME, "img").get_property("naturalWidth") == 8)
    Select(item.find_element(By.TAG_NAME, "select")).select_by_value(truth)
    item.find_element(By.CLASS_NAME, "label-button").click()
    wait.until(lambda d: browser.find_element(By.ID, "captures-count").text == "Nothing to label.")
    assert (root / LABELLED / truth / f"{sha}.png").read_bytes() == unsure_pngs[0]
    assert not browser.find_elements(By.CSS_SELECTOR, "#captures li")


def test_imgclf_serve_captures_and_drains_on_a_clean_stop(model_path, tmp_path, unsure_pngs):
    """The command line end to end: the options, the startup line, the image kept, a clean exit."""
    from tests.support.servers import free_port

    port = free_port()
    root = tmp_path / "captures"
    command = ["imgclf", "serve", "--model", str(model_path), "--port", str(port), "--capture", str(root)]
    command += ["--capture-below", "0.6", "--capture-max-mb", "5"]
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            command, cwd=tmp_path, env=tool_env(REPO), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while "Uvicorn running" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert f"keeping uploads below 0.6 top-1 probability (and a 0 sample) in {root}, at most 5 MiB" in (
            log.read_text()
        )
        label = post(url, unsure_pngs[0]).json()["predictions"][0]["label"]
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
    assert code == 0, log.read_text()
    sha = hashlib.sha256(unsure_pngs[0]).hexdigest()
    assert (root / label / f"{sha}.png").read_bytes() == unsure_pngs[0]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--capture-sample", "0.5"], "need --capture DIR"),
        (["--capture", "d", "--capture-below", "1.5"], "--capture-below 1.5: expected a probability"),
        (["--capture", "d", "--capture-sample", "nan"], "--capture-sample nan: expected a fraction"),
    ],
)
def test_capture_options_are_checked_in_one_line(options, message):
    from imgclf.cli import build_parser, cmd_serve
    from imgclf.errors import ConfigError

    args = build_parser().parse_args(["serve", "--model", "model.onnx", *options])
    with pytest.raises(ConfigError, match=re.escape(message)):
        cmd_serve(args)
