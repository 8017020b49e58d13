"""ServedModel: what it reads from the file, the sidecar and the MLflow registry."""

import json
import subprocess
import sys

import numpy as np
import pytest

from imgclf.images import BadImage
from imgclf.serving.model import ModelError, ServedModel
from tests.conftest import REPO, tool_env
from tests.serving.conftest import grey_png


def test_spec_and_card_come_from_the_file_and_its_sidecar(served_model, model_path):
    assert served_model.card.input.shape == (1, 8, 8)
    assert (served_model.card.input.mode, served_model.card.input.resize) == ("L", "stretch")
    card = served_model.describe()
    assert set(card) >= {"name", "version", "classes", "input", "lineage", "registry"}
    assert card["name"] == "digits-test"
    assert card["source"] == str(model_path)


def test_without_a_sidecar_the_name_is_the_file_stem(model_path, tmp_path):
    alone = tmp_path / "alone.onnx"
    alone.write_bytes(model_path.read_bytes())
    model = ServedModel.load(str(alone))
    assert (model.name, model.lineage) == ("alone", {})
    assert model.version.startswith("sha256:")


def test_a_broken_sidecar_is_a_model_error(model_path, tmp_path):
    (tmp_path / "model.onnx").write_bytes(model_path.read_bytes())
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="sidecar"):
        ServedModel.load(str(tmp_path / "model.onnx"))


def test_input_metadata_that_contradicts_itself_is_a_model_error(model_path, tmp_path):
    import onnx

    proto = onnx.load(str(model_path))
    for prop in proto.metadata_props:
        if prop.key == "imgclf.card":
            card = json.loads(prop.value)
            card["input"]["mode"] = "RGB"  # the shape says 1 channel
            prop.value = json.dumps(card)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    with pytest.raises(ModelError, match=r"bad imgclf.card metadata: .*inconsistent"):
        ServedModel.load(str(tmp_path / "model.onnx"))


def test_preprocess_and_predict_agree_with_the_raw_array(served_model, reference_session, digits_splits):
    images = digits_splits["test"][0][:8]
    decoded = np.stack([served_model.preprocess(grey_png(image)) for image in images])
    np.testing.assert_array_equal(decoded, images)
    np.testing.assert_array_equal(
        served_model.predict(decoded), reference_session.run(None, {"image": images})[0]
    )
    with pytest.raises(BadImage):
        served_model.preprocess(b"GIF89a broken")


REGISTER = """
import sys, mlflow, mlflow.onnx, onnx
mlflow.set_tracking_uri(sys.argv[1])
with mlflow.start_run() as run:
    # As the export stage logs it: one self-contained file.
    info = mlflow.onnx.log_model(onnx.load(sys.argv[2]), name="model", save_as_external_data=False)
    mlflow.log_artifact(sys.argv[3])
version = mlflow.register_model(info.model_uri, "digits")
mlflow.MlflowClient().set_registered_model_alias("digits", "champion", version.version)
print(run.info.run_id)
"""


@pytest.fixture(scope="module")
def registry(model_path, tmp_path_factory):
    """An MLflow store with model `digits` version 1 aliased `champion`, as `imgclf promote` leaves it."""
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    sidecar = model_path.with_suffix(".json")
    done = subprocess.run(
        [sys.executable, "-c", REGISTER, uri, str(model_path), str(sidecar)],
        cwd=folder,
        env=tool_env(REPO),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return uri, done.stdout.split()[-1]


@pytest.mark.parametrize("uri", ["models:/digits@champion", "models:/digits/1"])
def test_registry_uri_loads_the_registered_file_with_its_version(
    registry, monkeypatch, served_model, digits_splits, uri
):
    store, run_id = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    model = ServedModel.load(uri)
    assert model.sha256 == served_model.sha256  # the very file that was registered
    images = digits_splits["test"][0][:16]
    np.testing.assert_array_equal(model.predict(images), served_model.predict(images))
    assert model.version == "1"
    alias = "champion" if "@" in uri else None
    assert model.registry == {
        "name": "digits",
        "version": "1",
        "alias": alias,
        "run_id": run_id,
        "tracking_uri": store,
    }
    assert model.name == "digits-test"  # the export's model.json, logged in the same run
    assert model.lineage["mlflow_run_id"] == "0123456789abcdef"


@pytest.mark.parametrize(
    "uri, message",
    [("models:/digits@nobody", "nobody"), ("models:/absent/1", "absent"), ("models:/digits", "expected")],
)
def test_unknown_registry_entries_are_model_errors(registry, monkeypatch, uri, message):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry[0])
    with pytest.raises(ModelError, match=message) as error:
        ServedModel.load(uri)
    assert "\n" not in str(error.value)


def test_a_registry_uri_without_a_store_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / ".git").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"no MLflow store at .*run `make run`"):
        ServedModel.load("models:/imgclf@champion")


def test_model_card_is_json_serialisable(served_model):
    assert json.loads(json.dumps(served_model.describe()))["classes"] == list(served_model.card.classes)


def test_registry_store_follows_the_pipelines_rule(tmp_path, monkeypatch):
    from imgclf.serving.model import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"  # no params.yaml yet
    (tmp_path / "params.yaml").write_text("tracking: {uri: 'http://127.0.0.1:5000', experiment: x}\n")
    assert tracking_uri() == "http://127.0.0.1:5000"  # the config's tracking.uri, as export used
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert tracking_uri() == "sqlite:////elsewhere.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / "params.yaml").write_text("tracking: [not, a, mapping]\n")
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
