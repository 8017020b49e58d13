"""The imagefolder source end to end: a generated folder of class subfolders, locally and as an
archive over HTTP, through the real download and normalize code."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from imgclf.config.compose import compose
from imgclf.config.operations import validate
from imgclf.config.pipeline import ImageFolderData
from imgclf.data.archives import ArchiveError
from imgclf.data.download import MANIFEST, download
from imgclf.data.normalize import normalize
from imgclf.data.normalized import SPLITS, load_card, load_sizes, load_split
from imgclf.data.sources.imagefolder import decode_folder
from imgclf.errors import ConfigError, ImgclfError
from tests.conftest import REPO, data_config, tool_env

CLASSES = ["cats", "dogs", "owls"]  # each has its own dominant colour channel: R, G, B
PER_CLASS = 20
BAD = {
    "cats/truncated.jpg": "truncated",
    "dogs/text.png": "not an image",
    "owls/empty.png": "empty file",
}


def class_image(label: int, i: int) -> Image.Image:
    colour = [40 + i, 40 + i, 40 + i]
    colour[label] = 200 + i  # no two images alike: no duplicates to leak across splits
    return Image.new("RGB", (6 + i % 5, 5 + i % 7), tuple(colour))


def encode(image: Image.Image, i: int) -> tuple[str, bytes]:
    """Cycle through the forms a real folder mixes: RGB and RGBA PNG, palette PNG, JPEG."""
    buffer = io.BytesIO()
    kind = i % 4
    if kind == 0:
        image.save(buffer, "PNG")
    elif kind == 1:
        image.convert("RGBA").save(buffer, "PNG")
    elif kind == 2:
        image.convert("P", palette=Image.Palette.ADAPTIVE).save(buffer, "PNG")
    else:
        image.save(buffer, "JPEG", quality=95)
    return (".jpg" if kind == 3 else ".png"), buffer.getvalue()


def make_tree(root: Path) -> Path:
    for label, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
            suffix, data = encode(class_image(label, i), i)
            folder = root / name / ("more" if i >= 15 else "")  # images below a class folder count too
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:02d}{suffix}").write_bytes(data)
    jpeg = io.BytesIO()  # noise, so that half the file is well into the pixel data
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (root / "cats" / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "dogs" / "text.png").write_text("a text file with an image's name")
    (root / "owls" / "empty.png").write_bytes(b"")
    # Left out: not images by name, hidden, macOS litter, loose files beside the class folders.
    (root / "cats" / "notes.txt").write_text("not an image")
    (root / "dogs" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "README.md").write_text("my pets")
    (root / "__MACOSX" / "cats").mkdir(parents=True)
    (root / "__MACOSX" / "cats" / "._00.png").write_bytes(b"\0\5\26\7")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("pets") / "pets")


def zipped(root: Path, prefix: str = "pets/") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(root).as_posix())
        if prefix:
            zf.writestr("README.txt", "beside the wrapping folder: not a class")
    return buffer.getvalue()


def tarred(root: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(root, arcname="pets")
    return buffer.getvalue()


def config_for(tmp_path: Path, **keys) -> ImageFolderData:
    """conf/data/imagefolder.yaml's values, small images, one worker, a private cache, then `keys`."""
    defaults = {"image_size": [8, 8], "workers": 1, "cache_dir": str(tmp_path / "cache")}
    return data_config("imagefolder", **(defaults | keys))


def run_stages(config: ImageFolderData, data: Path) -> dict:
    raw = download(config, data / "raw" / "imagefolder")
    return normalize(config, 0, raw, data / "normalized")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, hidden ones included: a failure must change none, add none."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


@pytest.fixture
def data(tmp_path, tree) -> Path:
    """A data/ folder holding an earlier, successful run's outputs."""
    folder = tmp_path / "data"
    run_stages(config_for(tmp_path, path=str(tree)), folder)
    return folder


def test_local_folder_downloads_and_normalizes(tmp_path, tree, data):
    raw = data / "raw" / "imagefolder"
    listed = [line.split("  ")[1] for line in (raw / MANIFEST).read_text().splitlines()]
    assert len(listed) == 3 * PER_CLASS + len(BAD)  # images and bad files; no litter, no loose files
    assert "cats/more/16.png" in listed and "cats/notes.txt" not in listed
    assert sorted(p.name for p in raw.iterdir()) == sorted([*CLASSES, MANIFEST])
    assert (raw / "dogs" / "03.jpg").read_bytes() == (tree / "dogs" / "03.jpg").read_bytes()

    normalized = data / "normalized"
    card = load_card(normalized)
    assert list(card.classes) == CLASSES
    # What the model will carry, so that serving sizes uploads as normalize did (crop: the default).
    assert (card.input.mode, card.input.size, card.input.resize) == ("RGB", (8, 8), "crop")
    stats = card.normalization.to_json()
    report = json.loads((normalized / "report.json").read_text())
    assert sum(report["n_images"].values()) == 3 * PER_CLASS
    for split in SPLITS:
        images, labels = load_split(normalized, split)
        assert images.dtype == np.uint8 and images.shape[1:] == (3, 8, 8) and len(images) == len(labels)
        # Every image still carries its own class's colour: labels and pixels stayed together.
        assert np.array_equal(images.mean(axis=(2, 3)).argmax(axis=1), labels)
        assert set(labels.tolist()) == {0, 1, 2}
    train, _ = load_split(normalized, "train")
    assert stats["mean"] == pytest.approx(train.mean(axis=(0, 2, 3)).tolist(), abs=1e-5)
    assert stats["std"] == pytest.approx(train.std(axis=(0, 2, 3)).tolist(), abs=1e-5)

    assert [entry["path"] for entry in report["bad_files"]] == sorted(BAD)
    for entry in report["bad_files"]:
        assert BAD[entry["path"]] in entry["reason"].lower()
    assert report["source"]["files"] == 3 * PER_CLASS + len(BAD)
    assert report["source"]["modes"] == {"P": 15, "RGB": 30, "RGBA": 15}
    assert report["source"]["width"] == {"min": 6, "median": 8.0, "max": 10}
    assert report["source"]["height"]["max"] == 11
    # Each image's size as its file was, beside its pixels: the drift reference's size and aspect.
    sizes = np.concatenate([load_sizes(normalized, split) for split in SPLITS])
    assert sizes.dtype == np.int32 and sizes.shape == (3 * PER_CLASS, 2)
    assert [sizes[:, 0].min(), float(np.median(sizes[:, 0])), sizes[:, 0].max()] == [6, 8.0, 10]
    assert sizes[:, 1].max() == 11
    for split in SPLITS:  # row for row with the pixels: image i is (6 + i % 5, 5 + i % 7), grey 40 + i
        images, _ = load_split(normalized, split)
        i = np.rint(images.mean(axis=(2, 3)).min(axis=1)).astype(int) - 40
        lossless = i % 4 != 3  # JPEG moves the grey a little
        expected = np.stack([6 + i % 5, 5 + i % 7], axis=1)
        assert np.array_equal(load_sizes(normalized, split)[lossless], expected[lossless])
    assert report["class_counts"]["train"]["cats"] + report["class_counts"]["val"]["cats"] == 17
    assert report["duplicates_across_splits"] == {"train-val": 0, "train-test": 0, "val-test": 0}


def test_decode_pool_gives_what_one_process_gives(tmp_path, data):
    raw = data / "raw" / "imagefolder"
    (tmp_path / "one").mkdir()
    (tmp_path / "pool").mkdir()
    one = decode_folder(config_for(tmp_path, path="x", workers=1), raw, tmp_path / "one")
    pool = decode_folder(config_for(tmp_path, path="x", workers=2), raw, tmp_path / "pool")
    assert len(one.labels) == 3 * PER_CLASS
    assert np.array_equal(one.images, pool.images)
    assert np.array_equal(one.labels, pool.labels)
    assert one.bad_files == pool.bad_files and one.source == pool.source


def test_chunks_of_a_few_images_give_the_same_output(tmp_path, tree, data, monkeypatch):
    """Splits, statistics and report do not depend on how many images are in memory at once."""
    from imgclf.data import normalize as normalize_module

    monkeypatch.setattr(normalize_module, "CHUNK_BYTES", 3 * 3 * 8 * 8)  # three images a chunk
    config = config_for(tmp_path, path=str(tree))
    normalize(config, 0, data / "raw" / "imagefolder", tmp_path / "chunked")
    assert snapshot(tmp_path / "chunked") == snapshot(data / "normalized")


def test_bad_images_with_fail_stop_and_are_all_named(tmp_path, tree, data):
    before = snapshot(data)
    with pytest.raises(ImgclfError, match=r"^3 bad image\(s\) in .*on_bad_image=fail") as error:
        run_stages(config_for(tmp_path, path=str(tree), on_bad_image="fail"), data)
    message = str(error.value)
    assert "\n" not in message
    assert "cats/truncated.jpg: corrupt or truncated" in message
    assert "dogs/text.png" in message and "owls/empty.png" in message
    assert snapshot(data) == before


def test_too_few_images_in_a_class_fails_and_says_which(tmp_path, tree, data):
    before = snapshot(data)
    with pytest.raises(ImgclfError) as error:
        run_stages(config_for(tmp_path, path=str(tree), min_class_count=4), data)
    message = str(error.value)
    # 20 images a class: 14 train, 3 val, 3 test; every class is short in val and test.
    assert message.startswith("3 class(es) have fewer than data.min_class_count=4 images in a split: ")
    assert "'cats' (train 14, val 3, test 3)" in message and "\n" not in message
    assert snapshot(data) == before


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_over_http_gives_the_same_raw_data(tmp_path, tree, data, http_mirror, kind):
    archive = zipped(tree) if kind == "zip" else tarred(tree)
    http_mirror.files[f"pets.{kind}"] = archive
    url = http_mirror.mirror() + f"pets.{kind}"
    config = config_for(tmp_path, url=url, sha256=hashlib.sha256(archive).hexdigest())
    fresh = tmp_path / "fresh"
    run_stages(config, fresh)
    local = snapshot(data / "raw" / "imagefolder")
    assert snapshot(fresh / "raw" / "imagefolder") == local  # the wrapping "pets/" folder is looked through
    assert snapshot(fresh / "normalized") == snapshot(data / "normalized")
    # A second download is answered by the verified cache: the server is not asked again.
    asked = dict(http_mirror.hits)
    download(config, tmp_path / "again" / "imagefolder")
    assert http_mirror.hits == asked
    assert snapshot(tmp_path / "again" / "imagefolder") == local


def test_archive_without_a_checksum_is_fetched_and_its_digest_printed(tmp_path, tree, http_mirror, capsys):
    archive = zipped(tree, prefix="")
    http_mirror.files["pets.zip"] = archive
    raw = download(config_for(tmp_path, url=http_mirror.mirror() + "pets.zip"), tmp_path / "raw")
    assert sorted(p.name for p in raw.iterdir()) == sorted([*CLASSES, MANIFEST])
    assert f"SHA-256 {hashlib.sha256(archive).hexdigest()}" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # nothing to verify a cached copy by: nothing cached


def test_archive_with_path_traversal_is_refused(tmp_path, data, http_mirror):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("pets/cats/a.png", b"a")
        zf.writestr("pets/dogs/b.png", b"b")
        zf.writestr("../../escaped.png", b"evil")
    http_mirror.files["evil.zip"] = buffer.getvalue()
    config = config_for(tmp_path, url=http_mirror.mirror() + "evil.zip")
    before = snapshot(data)
    expected = r"evil\.zip: member '\.\./\.\./escaped\.png' has a '\.\.' component"
    with pytest.raises(ArchiveError, match=expected):
        download(config, data / "raw" / "imagefolder")
    assert snapshot(data) == before
    assert not list(tmp_path.rglob("escaped.png"))


def test_failed_download_leaves_data_as_it_was(tmp_path, data, http_mirror):
    before = snapshot(data)
    config = config_for(tmp_path, url=http_mirror.mirror("missing") + "pets.zip", sha256="0" * 64)
    with pytest.raises(ImgclfError, match="HTTP 404"):
        download(config, data / "raw" / "imagefolder")
    assert snapshot(data) == before


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "data.path and data.url: set exactly one (neither is set)"),
        (
            ["data.path=/x", "data.url=http://x/a.zip"],
            "data.path and data.url: set exactly one (both are set)",
        ),
        (["data.url=ftp://x/a.zip"], "data.url='ftp://x/a.zip': scheme 'ftp' is not supported"),
        (
            ["data.url=https://x/pets"],
            "data.url='https://x/pets': must end with the archive's file name: .zip",
        ),
        (["data.url='https://x/a.zip?raw=1'"], None),  # a query after the name is fine
    ],
)
def test_schema_checks_path_and_url_in_one_clear_line(overrides, message):
    if message is None:
        validate(compose(["data=imagefolder", *overrides], REPO / "conf"))
        return
    with pytest.raises(ConfigError) as error:
        validate(compose(["data=imagefolder", *overrides], REPO / "conf"))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert error.value.exit_code == 2


def test_a_missing_folder_is_one_clear_line_and_writes_nothing(tmp_path):
    with pytest.raises(ConfigError) as error:
        download(config_for(tmp_path, path="/no/such/folder"), tmp_path / "raw" / "imagefolder")
    assert str(error.value) == "data.path='/no/such/folder': no such folder"
    assert error.value.exit_code == 2
    assert list((tmp_path / "raw").iterdir()) == []


def test_one_class_or_an_empty_class_is_refused(tmp_path):
    (tmp_path / "one" / "cats").mkdir(parents=True)
    class_image(0, 0).save(tmp_path / "one" / "cats" / "a.png")
    with pytest.raises(ImgclfError, match=r"1 class folder\(s\) \['cats'\]; need at least 2"):
        download(config_for(tmp_path, path=str(tmp_path / "one")), tmp_path / "raw")
    (tmp_path / "one" / "dogs").mkdir()
    (tmp_path / "one" / "dogs" / "notes.txt").write_text("no images here")
    with pytest.raises(ImgclfError, match=r"class folder\(s\) \['dogs'\] hold no image files"):
        download(config_for(tmp_path, path=str(tmp_path / "one")), tmp_path / "raw")


def test_params_and_the_stage_entry_point_exit_2_before_any_work(tmp_path):
    expected = (
        "imgclf: error: data.path and data.url: set exactly one (neither is set): a local folder with one "
        "subfolder per class, or the http(s):// or file:// URL of a .zip or .tar archive of one"
    )
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    env = tool_env(REPO) | {"PYTHONPATH": str(REPO / "src") + os.pathsep + str(REPO)}
    imgclf = [sys.executable, "-c", "from imgclf.cli import main; main()"]
    done = subprocess.run(
        [*imgclf, "params", "data=imagefolder"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "params.yaml").exists()

    # A params.yaml edited by hand is checked again by the stage, before it downloads anything.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(compose(["data=imagefolder"], REPO / "conf")))
    stage = [sys.executable, str(REPO / "pipelines" / "download.py"), "--params", "params.yaml"]
    done = subprocess.run(
        [*stage, "--raw", "data/raw/imagefolder"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "data").exists()


def test_a_file_name_that_is_not_utf8_stops_download(tmp_path, data):
    root = make_tree(tmp_path / "pets")
    with open(os.path.join(os.fsencode(root / "cats"), b"caf\xe9.png"), "wb") as f:
        f.write(b"not even an image")
    before = snapshot(data)
    with pytest.raises(ImgclfError, match=r"caf\\udce9\.png.*not valid UTF-8"):
        download(config_for(tmp_path, path=str(root)), data / "raw" / "imagefolder")
    assert snapshot(data) == before
