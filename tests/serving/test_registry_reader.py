"""The registry reader: over REST, a real `mlflow server` answers what MLflow's own client reads
from it (aliases, versions, searches, files, the runs of an experiment, and the errors), and an
unreachable one is one line naming it. Only a plain server is read over REST."""

import pytest

from imgclf.serving.registry_reader import (
    MlflowReader,
    RegistryReadError,
    RestReader,
    registry_reader,
)
from tests.serving.test_follow import free_port, mlflow_pointed_at, register, register_file


@pytest.fixture(scope="module")
def served(mlflow_server, model_path, crop_model_path, tmp_path_factory) -> dict:
    """A model with version 1 (a logged ONNX model and its model.json), 2 (another) and 3 (a run's
    folder), aliases, tags, and a history experiment of two runs."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("reader")
    name = f"reader-{folder.name}"
    with pytest.MonkeyPatch.context() as monkeypatch:
        mlflow_pointed_at(monkeypatch, mlflow_server)
        client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
        client.create_registered_model(name)
        register(client, name, model_path, model_path.with_suffix(".json"))
        register(client, name, crop_model_path)
        (folder / "notes.txt").write_text("not a model")
        register_file(client, name, folder / "notes.txt")
    client.set_registered_model_alias(name, "champion", "1")
    client.set_registered_model_alias(name, "challenger", "2")
    client.set_model_version_tag(name, "2", "imgclf.sha256", "ab" * 32)
    experiment = client.create_experiment(f"{name} registry")
    for action in ("promote", "rollback"):
        client.create_run(experiment, tags={"imgclf.action": action, "imgclf.at": "2026-01-01T00:00:00Z"})
    readers = {"rest": RestReader(mlflow_server), "mlflow": MlflowReader(mlflow_server)}
    return {"name": name, "store": mlflow_server, **readers}


def both(served, read):
    """What `read(reader)` gives over REST and through MLflow's client, which must agree."""
    rest, mlflow = read(served["rest"]), read(served["mlflow"])
    assert rest == mlflow
    return rest


@pytest.mark.e2e
def test_rest_reads_what_mlflows_client_reads(served):
    name = served["name"]
    assert both(served, lambda r: r.aliases(name)) == {"champion": "1", "challenger": "2"}
    assert both(served, lambda r: r.aliases(name + "-absent")) is None
    one = both(served, lambda r: r.version(name, "1"))
    assert (one.name, one.version) == (name, "1") and one.run_id and one.source.startswith("models:/")
    assert both(served, lambda r: r.version_by_alias(name, "challenger")).tags == {"imgclf.sha256": "ab" * 32}
    every = both(served, lambda r: sorted(r.search_versions(f"name = '{name}'"), key=lambda v: v.version))
    assert [v.version for v in every] == ["1", "2", "3"]
    query = f"name = '{name}' and tags.`imgclf.sha256` = '{'ab' * 32}'"
    assert [v.version for v in both(served, lambda r: r.search_versions(query))] == ["2"]
    assert both(served, lambda r: r.search_versions(f"name = '{name}-absent'")) == []
    experiment = both(served, lambda r: r.experiment_id(f"{name} registry"))
    runs = both(served, lambda r: [tags["imgclf.action"] for tags in r.run_tags(experiment)])
    assert runs == ["promote", "rollback"]  # oldest first
    assert both(served, lambda r: r.experiment_id(f"{name} absent")) is None


@pytest.mark.e2e
def test_rest_downloads_the_files_mlflows_client_downloads(served, tmp_path, model_path):
    name = served["name"]

    def files(folder):
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    for version in ("1", "3"):
        rest = served["rest"].download_version(name, version, tmp_path / f"rest-{version}")
        mlflow = served["mlflow"].download_version(name, version, tmp_path / f"mlflow-{version}")
        assert files(rest) == files(mlflow) and files(rest)
    assert files(tmp_path / "rest-1")["model.onnx"] == model_path.read_bytes()
    run_id = served["rest"].version(name, "1").run_id
    rest = served["rest"].download_run_file(run_id, "model.json", tmp_path / "rest-run")
    mlflow = served["mlflow"].download_run_file(run_id, "model.json", tmp_path / "mlflow-run")
    assert rest.read_bytes() == mlflow.read_bytes() == model_path.with_suffix(".json").read_bytes()
    assert served["rest"].download_run_file(run_id, "absent.json", tmp_path / "none") is None


@pytest.mark.e2e
@pytest.mark.parametrize(
    "missing, code",
    [
        ("nobody", "INVALID_PARAMETER_VALUE"),
        ("99", "RESOURCE_DOES_NOT_EXIST"),
        ("-absent", "RESOURCE_DOES_NOT_EXIST"),
    ],
    ids=["alias", "version", "model"],
)
def test_errors_are_mlflows_own_words(served, missing, code):
    name = served["name"]
    calls = {
        "nobody": lambda r: r.version_by_alias(name, "nobody"),
        "99": lambda r: r.version(name, "99"),
        "-absent": lambda r: r.version(name + "-absent", "1"),
    }
    errors = []
    for reader in (served["rest"], served["mlflow"]):
        with pytest.raises(RegistryReadError) as error:
            calls[missing](reader)
        errors.append((error.value.code, str(error.value)))
    assert errors[0] == errors[1]  # the same code and the same line
    assert errors[0][0] == code and missing in errors[0][1] and "\n" not in errors[0][1]


def test_an_unreachable_server_is_one_line_naming_it(monkeypatch):
    port = free_port()  # nothing listens on it
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    with pytest.raises(RegistryReadError) as error:
        RestReader(f"http://127.0.0.1:{port}").aliases("imgclf")
    message = str(error.value)
    assert f"127.0.0.1:{port}" in message and "after 1 retries" in message and "\n" not in message
    assert error.value.code == ""


def test_only_a_plain_server_is_read_over_rest(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials
    for key in ("MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4", "MLFLOW_WORKSPACE"):
        monkeypatch.delenv(key, raising=False)
    assert isinstance(registry_reader("http://127.0.0.1:5001"), RestReader)
    assert isinstance(registry_reader(f"sqlite:///{tmp_path / 'mlflow.db'}"), MlflowReader)
    monkeypatch.setenv("MLFLOW_TRACKING_AUTH", "some_plugin")  # an auth plugin: MLflow's client
    assert isinstance(registry_reader("http://127.0.0.1:5001"), MlflowReader)
    monkeypatch.delenv("MLFLOW_TRACKING_AUTH")
    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".mlflow" / "credentials").write_text("[mlflow]\nmlflow_tracking_username = me\n")
    assert isinstance(registry_reader("http://127.0.0.1:5001"), MlflowReader)
