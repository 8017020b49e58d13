"""`imgclf drift`: replay folders and capture manifests against a model's reference; exit 0 no
drift, 1 drift, 2 a usage error in one line."""

import json
import subprocess

import pytest

from imgclf.drift.reference import SIGNALS
from tests.conftest import REPO, tool_env
from tests.serving.conftest import grey_png


def imgclf(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["imgclf", *args], cwd=cwd, env=tool_env(REPO), capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def folders(digits_splits, tmp_path_factory):
    """200 test digits as they are, and inverted, as 8x8 PNG files."""
    root = tmp_path_factory.mktemp("drift-images")
    images = digits_splits["test"][0][:200]
    for name, batch in (("normal", images), ("inverted", 255 - images)):
        (root / name).mkdir()
        for i, pixels in enumerate(batch):
            (root / name / f"{i:03d}.png").write_bytes(grey_png(pixels))
    return root


def test_in_distribution_images_exit_0_and_write_the_plot(monitored_model_path, folders, tmp_path):
    done = imgclf(
        "drift",
        "--model",
        str(monitored_model_path),
        "--window",
        "100",
        str(folders / "normal"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "200 images, 2 windows of 100: no drift" in done.stdout
    assert (tmp_path / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {tmp_path / 'drift.png'}" in done.stdout


def test_inverted_images_exit_1_naming_the_signal(monitored_model_path, folders, tmp_path):
    plot = tmp_path / "out" / "inverted.png"
    args = ["drift", "--model", str(monitored_model_path), "--window", "100", "--plot", str(plot)]
    done = imgclf(*args, str(folders / "normal"), str(folders / "inverted"), cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["window", "images", *(f"p({name})" for name in SIGNALS), "alarm"]
    assert lines[1].split()[-1] == "-" and lines[2].split()[-1] == "-"  # the normal windows
    assert "brightness" in lines[3] and "brightness" in lines[4]  # the inverted ones
    assert "drift in 2 windows (" in done.stdout and plot.is_file()


def test_a_capture_manifest_names_the_images(monitored_model_path, folders, tmp_path):
    manifest = folders / "captures.jsonl"  # paths relative to the manifest's folder; "path" or "file"
    records = [{("path" if i % 2 else "file"): f"inverted/{i:03d}.png", "label": "3"} for i in range(100)]
    manifest.write_text("".join(json.dumps(record) + "\n" for record in records))
    done = imgclf(
        "drift", "--model", str(monitored_model_path), "--window", "100", str(manifest), cwd=tmp_path
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "100 images, 1 windows of 100" in done.stdout


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "no such file or folder"),
        ("no-reference", "has no drift reference"),
        ("bad-manifest", 'no "path" or "file" field'),
        ("too-few", "fewer than half a window"),
        ("bad-window", "--window: '0': expected a positive integer"),
    ],
)
def test_usage_errors_exit_2_in_one_line(case, expected, monitored_model_path, model_path, folders, tmp_path):
    model, paths, window = str(monitored_model_path), [str(folders / "normal")], "100"
    if case == "missing":
        paths = [str(tmp_path / "nowhere")]
    elif case == "no-reference":
        model = str(model_path)
    elif case == "bad-manifest":
        (tmp_path / "m.jsonl").write_text('{"name": "x.png"}\n')
        paths = [str(tmp_path / "m.jsonl")]
    elif case == "too-few":
        window = "1000"
    elif case == "bad-window":
        window = "0"
    done = imgclf("drift", "--model", model, "--window", window, *paths, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
    if case != "bad-window":  # argparse prints its usage first
        assert len(done.stderr.strip().splitlines()) == 1
