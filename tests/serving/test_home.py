"""`imgclf predict`, `imgclf serve` and the export stage leave the user's home and temporary folder
as they found them.

Each runs as a user runs it, with HOME and TMPDIR pointing at empty folders and no XDG_* set.
ONNX Runtime (a device id and usage database under ~/.cache/Microsoft, a `.ses` file in the
temporary folder) and MLflow (~/.config/mlflow/telemetry.json) report usage unless told not to,
and stay quiet by themselves when they see a CI marker: those markers are removed here, so the
tests see what a user's machine sees, on a CI runner too.
"""

import shlex
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO, tool_env
from tests.serving.conftest import grey_png
from tests.support.servers import free_port, server_group

# Variables that turn the libraries' reporting off by themselves: the CI markers ONNX Runtime and
# MLflow read, pytest's own, and the switches. Without them only imgclf's defaults are left.
QUIETING = {
    "CI", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL", "TF_BUILD", "BUILDKITE",
    "TEAMCITY_VERSION", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ID", "CODEBUILD_BUILD_ARN",
    "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID",
    "PYTEST_CURRENT_TEST", "ORT_RUNNING_UNIT_TESTS",
    "ORT_DISABLE_TELEMETRY", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK",
    "MPLCONFIGDIR",  # set in this process by any earlier test that drew a plot (tracking.plots)
}  # fmt: skip


@pytest.fixture
def user_folders(tmp_path) -> tuple[Path, Path]:
    """An empty HOME and an empty TMPDIR."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    return home, tmp


def user_env(folders: tuple[Path, Path], root: Path = REPO) -> dict[str, str]:
    """`tool_env(root)` without the quieting variables and XDG_*, HOME and TMPDIR at `folders`."""
    env = {k: v for k, v in tool_env(root).items() if k not in QUIETING and not k.startswith("XDG_")}
    home, tmp = folders
    return env | {"HOME": str(home), "TMPDIR": str(tmp)}


def assert_left_empty(folders: tuple[Path, Path], command: str) -> None:
    home, tmp = folders
    left = [f"$HOME/{path.relative_to(home)}" for path in sorted(home.rglob("*"))]
    left += [f"$TMPDIR/{path.relative_to(tmp)}" for path in sorted(tmp.rglob("*"))]
    assert not left, f"{command} left these behind: {', '.join(left)}"


def test_predict_writes_nothing_under_home_or_tmpdir(model_path, digits_splits, user_folders, tmp_path):
    image = tmp_path / "digit.png"
    image.write_bytes(grey_png(digits_splits["test"][0][0]))
    done = subprocess.run(
        ["imgclf", "predict", "--model", str(model_path), "--json", str(image)],
        cwd=tmp_path, env=user_env(user_folders), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"label"' in done.stdout
    assert_left_empty(user_folders, "imgclf predict")


def test_serve_writes_nothing_under_home_or_tmpdir(model_path, digits_splits, user_folders, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = ["imgclf", "serve", "--model", str(model_path), "--port", str(port)]
    env = user_env(user_folders)
    with server_group("imgclf serve", command, tmp_path, env, f"{url}/health", tmp_path / "serve.log"):
        image = {"file": ("digit.png", grey_png(digits_splits["test"][0][0]), "image/png")}
        answer = httpx.post(f"{url}/v1/predict", files=image, timeout=30)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["predictions"]) == 1
    assert_left_empty(user_folders, "imgclf serve")


@pytest.mark.slow
def test_export_stage_writes_nothing_under_home_or_tmpdir(evaluated_pipeline, user_folders, tmp_path):
    # The stage's command as DVC runs it: ONNX Runtime runs the parity gate here, and the tracking
    # worker imports MLflow to log the model.
    root = tmp_path / "repo"
    shutil.copytree(evaluated_pipeline[0], root, symlinks=True)
    data_name = yaml.safe_load((root / "params.yaml").read_text())["data"]["name"]
    command = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["export"]["cmd"]
    done = subprocess.run(
        shlex.split(command.replace("${data.name}", data_name)),
        cwd=root, env=user_env(user_folders, root), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert_left_empty(user_folders, "the export stage")


def test_the_stages_plots_keep_matplotlibs_cache_in_imgclfs(user_folders, tmp_path):
    """train and evaluate draw their PNGs with matplotlib, whose font cache would go to
    ~/.cache/matplotlib and ~/.config/matplotlib: it goes to imgclf's cache folder instead."""
    png = tmp_path / "curves.png"
    rows = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "train_acc": 0.5, "val_acc": 0.4}]
    script = (
        f"import pathlib, imgclf.tracking.plots as p; p.draw_curves({rows!r}, pathlib.Path({str(png)!r}))"
    )
    done = subprocess.run(
        ["python", "-c", script],
        cwd=tmp_path,
        env=user_env(user_folders),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert png.stat().st_size > 0
    home, _ = user_folders
    outside = [
        str(path.relative_to(home))
        for path in home.rglob("*")
        if not path.is_relative_to(home / ".cache/imgclf")
    ]
    assert set(outside) <= {".cache"}, f"matplotlib left these behind: {outside}"
    assert any((home / ".cache/imgclf/matplotlib").iterdir())
