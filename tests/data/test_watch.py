"""download's fast way out: only when neither its source, its code nor its output changed."""

import shutil
from pathlib import Path

import yaml

from imgclf.data import watch
from tests.conftest import REPO


def params_with(tmp_path: Path, **data) -> Path:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"name": "imagefolder", **data}}))
    if not (tmp_path / "dvc.yaml").exists():  # the stage's code deps, as in the repo
        shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
        for dep in watch.code_deps(REPO, "download"):
            target = tmp_path / dep.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(dep, target)
    return params


def test_a_folder_source_is_current_until_it_or_the_output_changes(tmp_path):
    photos, raw = tmp_path / "photos", tmp_path / "raw" / "imagefolder"
    (photos / "cats").mkdir(parents=True)
    (photos / "cats" / "a.png").write_bytes(b"a")
    raw.mkdir(parents=True)
    (raw / "SHA256SUMS").write_text("x\n")
    params = params_with(tmp_path, path=str(photos), url=None)
    assert not watch.is_current(raw, watch.fingerprint(params))  # never downloaded
    watch.record(raw, watch.fingerprint(params))
    assert watch.is_current(raw, watch.fingerprint(params))
    (photos / "cats" / "b.png").write_bytes(b"b")  # the user adds an image
    assert not watch.is_current(raw, watch.fingerprint(params))
    watch.record(raw, watch.fingerprint(params))
    (raw / "SHA256SUMS").unlink()  # someone edits the output by hand
    assert not watch.is_current(raw, watch.fingerprint(params))


def test_an_unpinned_archive_url_is_always_fetched_again(tmp_path):
    raw = tmp_path / "raw" / "imagefolder"
    raw.mkdir(parents=True)
    params = params_with(tmp_path, path=None, url="https://example.com/pets.zip", sha256=None)
    watch.record(raw, watch.fingerprint(params))
    assert not watch.is_current(raw, watch.fingerprint(params))
    pinned = params_with(tmp_path, path=None, url="https://example.com/pets.zip", sha256="0" * 64)
    watch.record(raw, watch.fingerprint(pinned))
    assert watch.is_current(raw, watch.fingerprint(pinned))


def test_editing_the_download_code_downloads_again_and_other_code_does_not(tmp_path):
    raw = tmp_path / "raw" / "digits"
    raw.mkdir(parents=True)
    params = params_with(tmp_path)
    watch.record(raw, watch.fingerprint(params))
    normalize = tmp_path / "src/imgclf/data/normalize.py"  # not download's: not copied, not read
    assert not normalize.exists() and watch.is_current(raw, watch.fingerprint(params))
    fetch = tmp_path / "src/imgclf/data/fetch.py"
    fetch.write_text(fetch.read_text() + "\n# an edit\n")
    assert not watch.is_current(raw, watch.fingerprint(params))
