"""download's fast way out: only when neither its source, its code nor its output changed."""

from pathlib import Path

import yaml

from imgclf.data import watch

SCRIPT = Path(__file__).resolve().parents[2] / "pipelines" / "download.py"


def params_with(tmp_path: Path, **data) -> Path:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"name": "imagefolder", **data}}))
    return params


def test_a_folder_source_is_current_until_it_or_the_output_changes(tmp_path):
    photos, raw = tmp_path / "photos", tmp_path / "raw" / "imagefolder"
    (photos / "cats").mkdir(parents=True)
    (photos / "cats" / "a.png").write_bytes(b"a")
    raw.mkdir(parents=True)
    (raw / "SHA256SUMS").write_text("x\n")
    params = params_with(tmp_path, path=str(photos), url=None)
    assert not watch.is_current(raw, watch.fingerprint(params, SCRIPT))  # never downloaded
    watch.record(raw, watch.fingerprint(params, SCRIPT))
    assert watch.is_current(raw, watch.fingerprint(params, SCRIPT))
    (photos / "cats" / "b.png").write_bytes(b"b")  # the user adds an image
    assert not watch.is_current(raw, watch.fingerprint(params, SCRIPT))
    watch.record(raw, watch.fingerprint(params, SCRIPT))
    (raw / "SHA256SUMS").unlink()  # someone edits the output by hand
    assert not watch.is_current(raw, watch.fingerprint(params, SCRIPT))


def test_an_unpinned_archive_url_is_always_fetched_again(tmp_path):
    raw = tmp_path / "raw" / "imagefolder"
    raw.mkdir(parents=True)
    params = params_with(tmp_path, path=None, url="https://example.com/pets.zip", sha256=None)
    watch.record(raw, watch.fingerprint(params, SCRIPT))
    assert not watch.is_current(raw, watch.fingerprint(params, SCRIPT))
    pinned = params_with(tmp_path, path=None, url="https://example.com/pets.zip", sha256="0" * 64)
    watch.record(raw, watch.fingerprint(pinned, SCRIPT))
    assert watch.is_current(raw, watch.fingerprint(pinned, SCRIPT))
