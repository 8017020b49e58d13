"""Shared fixtures: real data from the embedded digits set, a real model trained on it, and
copies of this repo to run DVC in.

The model is trained for a few seconds with a plain PyTorch loop on the digits splits that the
real download and normalize stages produce, then exported by the export stage's `to_onnx`, so its
predictions mean something and its file is what the pipeline would ship. It is exported twice:
with `resize: stretch` (the model most tests serve) and with `resize: crop`.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.repo import copy_repo  # the end-to-end tests run DVC in such copies

REPO = Path(__file__).resolve().parents[1]

# A shell starts background jobs (`make test &`, nohup) with Ctrl-C ignored, and every process
# the tests start would inherit that: the tests that send SIGINT, as a terminal's Ctrl-C does,
# would see it ignored. A terminal's foreground job has the default: so do the tests.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
BIN = Path(sys.executable).parent


def tool_env(root: Path) -> dict[str, str]:
    """The environment a user has after `source .venv/bin/activate`, pointed at `root`'s code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(root / "src")
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "imgclf tests"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "tests@imgclf.invalid"
    return env


def compose_config(*overrides: str):
    """The validated config that `imgclf params OVERRIDE...` would give: conf/'s defaults, no others."""
    from imgclf.config.compose import compose
    from imgclf.config.operations import validate

    return validate(compose(list(overrides), REPO / "conf"))


def data_config(name: str, **keys):
    """The `data` section of `data=<name>` as conf/ composes it, with `keys` over it, validated."""
    from pydantic import TypeAdapter

    from imgclf.config.compose import compose
    from imgclf.config.pipeline import DataChoice

    data = compose([f"data={name}"], REPO / "conf")["data"] | keys
    return TypeAdapter(DataChoice).validate_python(data)


def make_card(shape=(1, 8, 8), n_classes: int = 10, resize: str = "stretch"):
    """A model card for uint8 images of `shape` (C, H, W), `n_classes` classes named 0, 1, ..."""
    from imgclf.card import InputSpec, ModelCard, Normalization

    channels = shape[0]
    return ModelCard(
        tuple(str(c) for c in range(n_classes)),
        InputSpec.for_shape(shape, resize),
        Normalization([100.0] * channels, [50.0] * channels),
    )


def run(
    args: list[str], cwd: Path, check: bool = True, extra_env: dict | None = None, **kwargs
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        args,
        cwd=cwd,
        env=tool_env(cwd) | (extra_env or {}),
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{args} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="session")
def digits_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """data/raw/digits and data/normalized for the default config, made by the real stages' code."""
    from imgclf.data.download import download
    from imgclf.data.normalize import normalize

    root = tmp_path_factory.mktemp("digits")
    config = compose_config()
    raw = download(config.data, root / "raw" / "digits")
    normalize(config.data, config.seed, raw, root / "normalized")
    return raw, root / "normalized"


# --- a real digits model, trained in seconds and exported by the export stage's to_onnx --------

MODEL_EPOCHS = 25


@pytest.fixture(scope="session")
def digits_splits(digits_dirs) -> dict:
    """The normalized digits splits: images uint8 (N, 1, 8, 8) and labels, and the model card."""
    from imgclf.data.normalized import load_card, load_split

    _, normalized = digits_dirs
    splits = {split: load_split(normalized, split) for split in ("train", "test")}
    return {**splits, "card": load_card(normalized)}


def train_digits_network(digits_splits, crop_padding: int = 0) -> tuple:
    """(an MLP trained on the digits train split with its softmax, an example batch, its card).

    crop_padding > 0 shifts each training batch by up to that many pixels, with the pipeline's
    own augmentation (train.augment.crop_padding).
    """
    import torch
    from torch.nn import functional

    from imgclf.config.pipeline import AugmentConfig
    from imgclf.data.augment import BatchAugment
    from imgclf.models import build_model
    from imgclf.stages.export import Probabilities

    images, labels = digits_splits["train"]
    card = digits_splits["card"]
    torch.manual_seed(0)
    net = build_model(compose_config("model.hidden=[64]", "model.dropout=0.0").model, card)
    augment = BatchAugment(AugmentConfig(crop_padding=crop_padding, hflip=False, invert=False), seed=0)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.from_numpy(images), torch.from_numpy(labels).long()
    for _ in range(MODEL_EPOCHS):
        for batch in torch.randperm(len(x)).split(64):
            loss = functional.cross_entropy(net(augment(x[batch])), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return Probabilities(net).eval(), x[:2], card


@pytest.fixture(scope="session")
def digits_network(digits_splits) -> tuple:
    """The model the serving tests serve: trained on the digits as they are."""
    return train_digits_network(digits_splits)


def export_model(digits_network: tuple, folder: Path, resize: str, reference_images=None) -> Path:
    """model.onnx and its sidecar model.json, as the export stage lays them out in models/; with
    reference_images, the drift reference the export stage computes on them (imgclf.reference)."""
    from dataclasses import replace

    from imgclf.drift.reference import METADATA_KEY
    from imgclf.stages.export import drift_reference, to_onnx

    model, example, card = digits_network
    card = replace(card, input=replace(card.input, resize=resize))
    proto = to_onnx(model, example, card)
    if reference_images is not None:
        import numpy as np

        height, width = reference_images.shape[-2:]  # the digits as their files are: 8x8
        sizes = np.tile([width, height], (len(reference_images), 1))
        reference = drift_reference(proto, reference_images, sizes)
        proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(reference.to_json()))
    (folder / "model.onnx").write_bytes(proto.SerializeToString())
    sidecar = {
        "name": "digits-test",
        **card.to_json(),
        "lineage": {"mlflow_run_id": "0123456789abcdef", "data.name": "digits"},
    }
    (folder / "model.json").write_text(json.dumps(sidecar))
    return folder / "model.onnx"


@pytest.fixture(scope="session")
def model_path(digits_network, tmp_path_factory) -> Path:
    """The model that stretches an image to its 8x8 input."""
    return export_model(digits_network, tmp_path_factory.mktemp("models"), "stretch")


@pytest.fixture(scope="session")
def crop_model_path(digits_network, tmp_path_factory) -> Path:
    """The same network, exported to centre-crop an image to its 8x8 input."""
    return export_model(digits_network, tmp_path_factory.mktemp("crop-models"), "crop")


@pytest.fixture(scope="session")
def monitored_model_path(digits_network, digits_dirs, tmp_path_factory) -> Path:
    """The same network with the drift reference the export stage computes on the val split."""
    from imgclf.data.normalized import load_split

    val_images, _ = load_split(digits_dirs[1], "val")
    return export_model(digits_network, tmp_path_factory.mktemp("monitored-models"), "stretch", val_images)


@pytest.fixture(scope="session")
def evaluated_pipeline(tmp_path_factory) -> tuple[Path, str]:
    """A copy of this repo after `dvc repro` from scratch, and what DVC printed. Shared by the
    tests that need an evaluated pipeline: copy it (shutil.copytree) before changing anything."""
    root = copy_repo(tmp_path_factory.mktemp("evaluated") / "repo")
    done = run(["dvc", "repro"], root)
    return root, done.stdout


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """One real `mlflow server` for the whole test session (it takes 15-30 s to start); its URL."""
    from tests.support.servers import mlflow_server as server

    with server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


# --- a headless browser: Debian's chromium, driven by Selenium (the web page, the MLflow UI) ----

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        why = "Debian's chromium and chromium-driver are not installed (`make browser-deps`)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # A driver path given to Service: Selenium skips its manager, which would try to download one.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


# --- servers for scaling out: PostgreSQL (Debian's, `make server-deps`) and S3 (moto) --------


def postgres_or_skip() -> None:
    """Skip (fail on CI) where Debian's PostgreSQL server is not installed."""
    from tests.support.servers import POSTGRES_BIN

    if not list(Path(POSTGRES_BIN).glob("*/bin/pg_ctl")):
        why = "PostgreSQL is not installed (`make server-deps`)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A private PostgreSQL cluster for the whole session; the URL of its `imgclf` database."""
    from tests.support.servers import postgres_server

    postgres_or_skip()
    with postgres_server() as url:
        yield url


@pytest.fixture
def s3() -> dict[str, str]:
    """A moto S3 server with the bucket `imgclf` for one test: the environment a client needs."""
    from tests.support.servers import s3_server

    with s3_server("imgclf") as env:
        yield env
