"""The retraining loop's last step, for real: labelled images in `data.extra_train`, `dvc repro`.

A newly labelled image re-runs normalize and what follows it; an unchanged folder re-runs nothing;
the validation and test splits stay what they were, so `imgclf promote` compares the retrained
model with the champion on the same test set.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from imgclf.registry.evidence import test_split_sha256 as split_sha256
from tests.conftest import run
from tests.e2e.test_pipeline import STAGES, stages_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # four `dvc repro` runs: minutes


def held_out(normalized) -> dict[str, str]:
    """SHA-256 of every file of the validation and test splits."""
    return {
        f"{split}/{name}": hashlib.sha256((normalized / split / name).read_bytes()).hexdigest()
        for split in ("val", "test")
        for name in ("images.npy", "labels.npy")
    }


def save_digit(folder, label: int, seed: int) -> None:
    """A captured upload as serving keeps it: `<sha256>.png` under its true label, any size."""
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24), dtype=np.uint8)
    path = folder / str(label) / "upload.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    path.rename(path.with_name(f"{hashlib.sha256(path.read_bytes()).hexdigest()}.png"))


def test_a_labelled_image_retrains_and_val_and_test_stay_the_same(evaluated_pipeline, tmp_path):
    pristine, _ = evaluated_pipeline
    repo = tmp_path / "repo"
    shutil.copytree(pristine, repo, symlinks=True)
    normalized = repo / "data" / "normalized"
    before, test_sha = held_out(normalized), split_sha256(normalized)
    n_train = len(np.load(normalized / "train" / "labels.npy"))

    labelled = repo / "captures" / "labelled"  # relative to the repository root in params.yaml
    for seed, label in enumerate([3, 3, 8]):
        save_digit(labelled, label, seed)
    run(["imgclf", "params", "data.extra_train=[captures/labelled]"], repo)
    assert stages_run(run(["dvc", "repro"], repo).stdout) == STAGES
    assert held_out(normalized) == before and split_sha256(normalized) == test_sha
    report = json.loads((normalized / "report.json").read_text())
    assert report["extra_train"] == {"captures/labelled": {"3": 2, "8": 1}}
    assert report["n_images"]["train"] == n_train + 3

    save_digit(labelled, 5, 10)  # one more labelled image: retrain
    assert stages_run(run(["dvc", "repro"], repo).stdout) == STAGES
    assert held_out(normalized) == before
    assert len(np.load(normalized / "train" / "labels.npy")) == n_train + 4

    done = run(["dvc", "repro"], repo).stdout  # nothing changed: nothing but download's check
    assert stages_run(done) == [] and "download: data/raw/digits is up to date" in done

    touched = next(labelled.rglob("*.png"))  # a new time, the same bytes: the copy hashes the same
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert stages_run(run(["dvc", "repro"], repo).stdout) == ["download"]
    assert held_out(normalized) == before
