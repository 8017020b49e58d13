"""`data.extra_train`: labelled folders join the training split, and nothing else changes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.config.pipeline import validate_pipeline
from imgclf.data import watch
from imgclf.data.download import download
from imgclf.data.normalize import normalize
from imgclf.data.normalized import load_card, load_split
from imgclf.errors import ConfigError
from imgclf.images import decode_image
from tests.conftest import compose_config
from tests.data.test_watch import params_with


def labelled(folder: Path, counts: dict[str, int], size=(20, 12)) -> Path:
    """folder/<class>/<i>.png as the capture feature writes them: any size, RGB."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in counts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", size, (255 - 20 * i, 40 * int(name), 90)).save(folder / name / f"{i}.png")
    return folder


def digits_with(tmp_path: Path, folders: list[str], root: Path | None = None) -> tuple[Path, dict]:
    """download + normalize of digits with data.extra_train=folders; the normalized folder, report."""
    config = compose_config(f"data.extra_train=[{','.join(folders)}]")
    out = tmp_path / "out"
    raw = download(config.data, out / "raw" / "digits", root=root or tmp_path)
    report = normalize(config.data, config.seed, raw, out / "normalized")
    return out / "normalized", report


def test_extra_images_grow_train_only_and_leave_val_and_test_byte_for_byte(tmp_path, digits_dirs):
    _, plain = digits_dirs
    labelled(tmp_path / "captures" / "labelled", {"3": 2, "8": 3})
    labelled(tmp_path / "more", {"3": 1})
    (tmp_path / "more" / "3" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "more" / "notes.txt").write_text("a loose file, not a class")
    normalized, report = digits_with(tmp_path, ["captures/labelled", str(tmp_path / "more")])

    for split in ("val", "test"):
        for name in ("images.npy", "labels.npy"):
            assert (normalized / split / name).read_bytes() == (plain / split / name).read_bytes()
    before, after = load_split(plain, "train"), load_split(normalized, "train")
    n = len(before[1])
    assert len(after[1]) == n + 6
    assert np.array_equal(after[0][:n], before[0]) and np.array_equal(after[1][:n], before[1])
    assert after[1][n:].tolist() == [3, 3, 8, 8, 8, 3]  # folder by folder, class by class, sorted
    # Decoded as serving decodes an upload for this data set: grey, stretched to 8x8.
    spec = load_card(normalized).input
    assert (spec.mode, spec.size) == ("L", (8, 8))
    assert np.array_equal(after[0][n + 2], decode_image(tmp_path / "captures/labelled/8/0.png", spec, 10**8))

    assert report["n_images"]["train"] == n + 6
    assert report["class_counts"]["train"]["3"] == int((before[1] == 3).sum()) + 3
    assert report["extra_train"] == {"captures/labelled": {"3": 2, "8": 3}, str(tmp_path / "more"): {"3": 1}}
    bad = [entry["path"] for entry in report["bad_files"]]
    assert bad == [f"{tmp_path / 'more'}/3/broken.png"]
    assert json.loads((normalized / "report.json").read_text())["extra_train"] == report["extra_train"]


def test_no_extra_folders_change_nothing(tmp_path, digits_dirs):
    _, plain = digits_dirs
    labelled(tmp_path / "empty", {})
    normalized, report = digits_with(tmp_path, ["empty"])
    for split in ("train", "val", "test"):
        assert (normalized / split / "images.npy").read_bytes() == (plain / split / "images.npy").read_bytes()
    assert report["extra_train"] == {"empty": {}}
    assert "extra_train" not in json.loads((plain / "report.json").read_text())  # none listed: as before
    assert (normalized / "card.json").read_bytes() == (plain / "card.json").read_bytes()


def test_a_class_the_data_set_lacks_is_refused_naming_it_and_the_classes(tmp_path):
    labelled(tmp_path / "captures", {"3": 1})
    (tmp_path / "captures" / "cat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "captures" / "cat" / "a.png")
    with pytest.raises(ConfigError, match=r"data.extra_train\[0\]='captures'.*\['cat'\].*0, 1, 2, 3"):
        digits_with(tmp_path, ["captures"])


def test_a_missing_folder_is_refused_before_downloading(tmp_path):
    with pytest.raises(ConfigError, match=r"data.extra_train\[0\]='nowhere': no such folder"):
        digits_with(tmp_path, ["nowhere"])
    assert not (tmp_path / "out").exists()


def test_relative_folders_are_under_the_repository_root(tmp_path):
    labelled(tmp_path / "repo" / "captures" / "labelled", {"1": 1})
    _, report = digits_with(tmp_path, ["captures/labelled"], root=tmp_path / "repo")
    assert report["extra_train"] == {"captures/labelled": {"1": 1}}


def test_the_list_override_composes_and_validates():
    assert compose_config("data.extra_train=[captures/labelled]").data.extra_train == ["captures/labelled"]
    two = compose_config("data.extra_train=[captures/labelled,/srv/more labelled]")
    assert two.data.extra_train == ["captures/labelled", "/srv/more labelled"]
    assert compose_config().data.extra_train == []
    with pytest.raises(ConfigError, match=r"data\.extra_train"):
        compose_config("data.extra_train=captures/labelled")  # a string, not a list


def test_the_schema_requires_the_key():
    raw = compose_config().model_dump()
    del raw["data"]["extra_train"]
    with pytest.raises(ConfigError, match="extra_train"):
        validate_pipeline(raw)


def test_an_extra_folder_is_part_of_the_download_fingerprint(tmp_path):
    captures = labelled(tmp_path / "captures", {"3": 1})
    raw = tmp_path / "raw" / "digits"
    raw.mkdir(parents=True)
    params = params_with(tmp_path, name="digits", extra_train=["captures"])
    watch.record(raw, watch.fingerprint(params))
    assert watch.is_current(raw, watch.fingerprint(params))  # unchanged: nothing to do
    Image.new("RGB", (8, 8)).save(captures / "3" / "new.png")  # a newly labelled image
    assert not watch.is_current(raw, watch.fingerprint(params))
    watch.record(raw, watch.fingerprint(params))
    shutil.rmtree(captures)
    assert watch.fingerprint(params) == watch.NEVER  # the download reports the missing folder
