"""Registry versions are downloaded once, into imgclf's cache ($XDG_CACHE_HOME/imgclf/registry).

A second load of `models:/<name>@champion` downloads nothing, but still asks the store which
version the alias names: when the alias moves, the new version is downloaded. A damaged entry is
downloaded again; a download that is not the file `imgclf register` recorded is refused, and not
kept. `imgclf predict` from a server writes nothing but the cache and imports no mlflow, on the
first call as on the second. Against a real `mlflow server` (read over REST) and a sqlite store
(read through MLflow's client), with versions registered as the pipeline registers them.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgclf.serving.cache import ENTRY, cache_folder
from imgclf.serving.model import RegistryUnavailable, ServedModel
from imgclf.serving.registry_reader import MlflowReader, RestReader
from tests.conftest import REPO, tool_env
from tests.serving.conftest import grey_png
from tests.serving.test_follow import mlflow_pointed_at, register


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(params=[pytest.param("server", marks=pytest.mark.e2e), "sqlite"])
def store(request, tmp_path) -> str:
    if request.param == "server":
        return request.getfixturevalue("mlflow_server")
    from imgclf.tracking.store import prepare_store

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    prepare_store(uri)
    return uri


@pytest.fixture
def registered(store, model_path, crop_model_path, monkeypatch, tmp_path) -> dict:
    """Versions 1 (the digits model) and 2 (the same network, another file) of a model of this
    test's own, `champion` on 1, this process pointed at the store."""
    from mlflow import MlflowClient

    name = f"cache-{tmp_path.name}"  # the server is shared by the whole session
    mlflow_pointed_at(monkeypatch, store)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    client.create_registered_model(name)
    assert register(client, name, model_path, model_path.with_suffix(".json")) == "1"
    assert register(client, name, crop_model_path, crop_model_path.with_suffix(".json")) == "2"
    client.set_registered_model_alias(name, "champion", "1")
    return {"client": client, "name": name, "uri": f"models:/{name}@champion", "store": store}


def entries(name: str) -> dict[str, Path]:
    """version -> the cache entry (its folder) of model `name`, whichever store it came from."""
    return {path.parent.name: path.parent for path in cache_folder().glob(f"*/{name}/*/{ENTRY}")}


def cached_onnx(entry: Path) -> Path:
    return next((entry / "files").rglob("*.onnx"))


def test_the_cache_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder() == tmp_path / "xdg" / "imgclf" / "registry"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_folder() == tmp_path / "home" / ".cache" / "imgclf" / "registry"


def test_a_second_load_downloads_nothing(registered, model_path, monkeypatch, digits_splits):
    first = ServedModel.load(registered["uri"], threads=1)
    assert (first.version, first.sha256) == ("1", sha256(model_path))
    assert list(entries(registered["name"])) == ["1"]

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded again")

    for reader in (RestReader, MlflowReader):
        monkeypatch.setattr(reader, "download_version", no_download)
        monkeypatch.setattr(reader, "download_run_file", no_download)
    second = ServedModel.load(registered["uri"], threads=1)
    assert second.describe() == first.describe()  # name and lineage from the cached model.json too
    assert second.name == "digits-test" and second.registry["alias"] == "champion"
    images = digits_splits["test"][0][:16]
    np.testing.assert_array_equal(second.predict(images), first.predict(images))


def test_a_moved_alias_is_asked_for_and_its_version_downloaded(registered, model_path, crop_model_path):
    assert ServedModel.load(registered["uri"]).sha256 == sha256(model_path)
    registered["client"].set_registered_model_alias(registered["name"], "champion", "2")
    moved = ServedModel.load(registered["uri"])
    assert (moved.version, moved.sha256) == ("2", sha256(crop_model_path))
    assert moved.card.input.resize == "crop"
    cached = entries(registered["name"])
    assert sorted(cached) == ["1", "2"] and sha256(cached_onnx(cached["2"])) == sha256(crop_model_path)


@pytest.mark.parametrize("damage", ["a flipped byte", "a deleted file", "a truncated entry.json"])
def test_a_damaged_entry_is_downloaded_again(registered, model_path, damage):
    ServedModel.load(registered["uri"])
    folder = entries(registered["name"])["1"]
    onnx_file = cached_onnx(folder)
    if damage == "a flipped byte":
        data = bytearray(onnx_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        onnx_file.write_bytes(bytes(data))
    elif damage == "a deleted file":
        onnx_file.unlink()
    else:
        (folder / ENTRY).write_text((folder / ENTRY).read_text()[:20])
    model = ServedModel.load(registered["uri"])
    assert model.sha256 == sha256(model_path)
    assert sha256(cached_onnx(entries(registered["name"])["1"])) == sha256(model_path)  # whole again
    assert json.loads((folder / ENTRY).read_text())["identity"]["version"] == "1"


def test_a_download_that_is_not_the_registered_file_is_refused_and_not_kept(registered):
    """`imgclf register` records the ONNX file's SHA-256 on the version: a download must match it."""
    registered["client"].set_model_version_tag(registered["name"], "1", "imgclf.sha256", "0" * 64)
    with pytest.raises(RegistryUnavailable, match=r"no ONNX file with the SHA-256 .*registered") as error:
        ServedModel.load(registered["uri"])
    assert "\n" not in str(error.value)
    assert entries(registered["name"]) == {}
    assert not list(cache_folder().glob(f"*/{registered['name']}/*"))  # no half entry either


PROBE = """
import runpy, sys
sys.argv = ["imgclf", "predict", "--model", sys.argv[1], sys.argv[2], "--json"]
try:
    runpy.run_module("imgclf.cli", run_name="imgclf_cli")["main"]()
except SystemExit as exit:
    assert not exit.code, exit.code
print(sorted({m.split(".")[0] for m in sys.modules} & {"mlflow", "torch", "lightning"}))
"""


def files_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


@pytest.mark.parametrize("store", ["server"], indirect=True)
def test_predict_from_a_server_writes_only_the_cache_and_imports_no_mlflow(
    registered, model_path, digits_splits, tmp_path
):
    """Run as a user runs it, with HOME, the temporary folder and the working folder watched."""
    home, temp, work = tmp_path / "home", tmp_path / "temp", tmp_path / "work"
    for folder in (home, temp, work):
        folder.mkdir()
    (work / "seven.png").write_bytes(grey_png(digits_splits["test"][0][0]))
    cache = home / ".cache"
    env = tool_env(REPO) | {"HOME": str(home), "TMPDIR": str(temp)}
    env["MLFLOW_TRACKING_URI"] = registered["store"]
    env.pop("XDG_CACHE_HOME", None)
    answers = []
    for model in (str(model_path), registered["uri"], registered["uri"]):  # the file, a download, the cache
        done = subprocess.run(
            [sys.executable, "-c", PROBE, model, "seven.png"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        prediction, imported = done.stdout.splitlines()
        assert imported == "[]"  # no mlflow, no torch
        answers.append(json.loads(prediction))
        if model == str(model_path):  # what predicting from a file writes (ONNX Runtime: $TMPDIR/.ses)
            before = files_under(tmp_path)
    assert answers[0] == answers[1] == answers[2] and answers[0]["file"] == "seven.png"
    written = files_under(tmp_path) - before
    outside = {path for path in written if not path.startswith(str(cache.relative_to(tmp_path)))}
    assert outside == set(), outside
    (onnx_file,) = (cache / "imgclf" / "registry").rglob("*.onnx")
    assert sha256(onnx_file) == sha256(model_path)
