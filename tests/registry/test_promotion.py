"""`imgclf register`, `promote`, `rollback` and `models`, run as a user runs them, on real evaluated
pipelines, against a sqlite store and against a real `mlflow server`."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import tool_env
from tests.registry.conftest import imgclf, set_param

pytestmark = pytest.mark.e2e

PERMISSIVE = ["promote.min_improvement=-1", "promote.max_class_recall_drop=1", "promote.min_value=0"]


def model_name(repo) -> str:
    import yaml

    return yaml.safe_load((repo / "params.yaml").read_text())["registry"]["model_name"]


def aliases(store: str, name: str) -> dict[str, str]:
    model = MlflowClient(store, registry_uri=store).get_registered_model(name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def versions(store: str, name: str) -> list:
    return MlflowClient(store, registry_uri=store).search_model_versions(f"name = '{name}'")


def outputs(path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def test_register_is_idempotent_and_tags_what_the_gates_need(repos, store, tmp_path):
    good = repos["good"]
    first = imgclf(good, store, "register", "--outputs", str(tmp_path / "out1"))
    again = imgclf(good, store, "register", "--outputs", str(tmp_path / "out2"))
    assert outputs(tmp_path / "out1") == {"version": "1", "created": "true"}
    assert outputs(tmp_path / "out2") == {"version": "1", "created": "false"}
    assert "version 1" in first.stdout and "nothing to do" in again.stdout
    (version,) = versions(store, model_name(good))
    sidecar = json.loads((good / "models/model.json").read_text())
    metrics = json.loads((good / "metrics/eval.json").read_text())
    tags = version.tags
    assert tags["imgclf.sha256"] == sidecar["lineage"]["onnx_sha256"]
    made_by = json.loads((good / "models/run.json").read_text())  # the commit: git-ignored, beside it
    assert tags["imgclf.commit"] == made_by["git.commit"] and tags["imgclf.dirty"] == "false"
    assert "git.commit" not in sidecar["lineage"]  # DVC-tracked: the same for every run
    assert tags["imgclf.data_sha256"] == sidecar["lineage"]["data.normalized_sha256"]
    assert json.loads(tags["imgclf.classes"]) == sidecar["classes"]
    assert float(tags["imgclf.metric.accuracy"]) == metrics["accuracy"]
    assert len(json.loads(tags["imgclf.recall"])) == 10
    assert "test accuracy" in version.description
    # The version is the ONNX file itself, downloadable from the store.
    import mlflow.artifacts

    uri = MlflowClient(store, registry_uri=store).get_model_version_download_uri(model_name(good), "1")
    folder = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl"), tracking_uri=store)
    (onnx_file,) = list(Path(folder).rglob("*.onnx"))
    assert onnx_file.read_bytes() == (good / "models/model.onnx").read_bytes()


def test_register_makes_the_pipelines_logged_model_a_version(repos):
    """Against the store the pipeline tracked into, the version is the run's own logged model."""
    good = repos["good"]
    own = f"sqlite:///{good / 'mlflow.db'}"
    imgclf(good, own, "register")
    (version,) = versions(own, model_name(good))
    run_id = json.loads((good / "models/run.json").read_text())["mlflow_run_id"]
    assert version.run_id == run_id
    (logged,) = MlflowClient(own).get_run(run_id).outputs.model_outputs
    assert version.source == f"models:/{logged.model_id}"


def test_register_refuses_a_model_that_was_not_evaluated(repos, sqlite_store):
    good = repos["good"]
    (good / "models/model.onnx").write_bytes((good / "models/model.onnx").read_bytes() + b"\0")
    done = imgclf(good, sqlite_store, "register", check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "imgclf: error: models/model.onnx is not what the evaluate stage last measured (dvc.lock): "
        "run `dvc repro` first"
    ]


def test_another_store_reruns_no_stage(pipelines, tmp_path):
    """tracking.uri is no stage's param: pointing the pipeline at another store retrains nothing."""
    good = tmp_path / "good"
    shutil.copytree(pipelines["good"], good, symlinks=True)
    set_param(good, "tracking.uri", "http://127.0.0.1:9/elsewhere")
    status = subprocess.run(["dvc", "status"], cwd=good, env=tool_env(good), capture_output=True, text=True)
    changed = [
        line for line in status.stdout.splitlines() if line.rstrip().endswith(":") and "download" not in line
    ]
    assert changed == [], status.stdout


def test_promote_gates_moves_aliases_and_records_who_and_why(repos, store, tmp_path):
    good, weak = repos["good"], repos["weak"]
    name = model_name(good)
    ci = {
        "GITHUB_ACTOR": "octocat",
        "GITHUB_SERVER_URL": "https://github.example",
        "GITHUB_REPOSITORY": "o/r",
    }
    ci["GITHUB_RUN_ID"] = "42"
    imgclf(good, store, "register")
    imgclf(good, store, "promote", "--reason", "first model", env=ci)
    assert aliases(store, name) == {"champion": "1"}

    # The weak model loses to the champion: exit 1, a table naming the failed gates, nothing moves.
    imgclf(weak, store, "register")
    report = tmp_path / "summary.md"
    failed = imgclf(
        weak, store, "promote", "--report", str(report), "--outputs", str(tmp_path / "o"), check=False
    )
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert failed.stderr.strip() == "imgclf: error: version 2 failed its gates: champion did not move"
    improvement = next(line for line in failed.stdout.splitlines() if line.startswith("improvement"))
    assert improvement.split()[-1] == "FAIL"
    assert "| improvement |" in report.read_text() and "**FAIL**" in report.read_text()
    assert outputs(tmp_path / "o") == {"version": "2", "champion": "1", "passed": "false", "approve": "false"}
    assert aliases(store, name) == {"champion": "1"}

    # With gates that let it through: previous <- 1, champion <- 2.
    imgclf(weak, store, "promote", "--reason", "try the small model", *PERMISSIVE, env=ci)
    assert aliases(store, name) == {"champion": "2", "previous": "1"}
    # A rollback goes back; a second one undoes the first.
    imgclf(weak, store, "rollback", "--reason", "bad on the night shift", env=ci)
    assert aliases(store, name) == {"champion": "1", "previous": "2"}
    imgclf(weak, store, "rollback", "--reason", "it was the camera", env=ci)
    assert aliases(store, name) == {"champion": "2", "previous": "1"}

    rows = [json.loads(line) for line in imgclf(good, store, "models", "--json").stdout.splitlines()]
    assert [(r["version"], r["aliases"], r["gate"]) for r in rows] == [
        ("1", ["previous"], "pass"),
        ("2", ["champion"], "pass"),
    ]
    history = [
        json.loads(line) for line in imgclf(good, store, "models", "--history", "--json").stdout.splitlines()
    ]
    assert [(h["action"], h["alias"], h["version"], h["replaced"], h["moved"]) for h in history] == [
        ("promote", "champion", "1", "", "true"),
        ("gate", "champion", "2", "1", "false"),
        ("promote", "champion", "2", "1", "true"),
        ("rollback", "champion", "1", "2", "true"),
        ("rollback", "champion", "2", "1", "true"),
    ]
    assert history[3]["actor"] == "octocat" and history[3]["reason"] == "bad on the night shift"
    assert history[3]["ci_run"] == "https://github.example/o/r/actions/runs/42"
    tags = MlflowClient(store, registry_uri=store).get_model_version(name, "1").tags
    assert (
        tags["imgclf.champion.by"] == "octocat" and tags["imgclf.champion.reason"] == "bad on the night shift"
    )


def test_challenger_then_approval_and_the_champion_check(repos, sqlite_store, tmp_path):
    good, weak = repos["good"], repos["weak"]
    name = model_name(good)
    imgclf(good, sqlite_store, "register")
    # A dry run of an unregistered model gates the work tree's files and changes nothing.
    dry = imgclf(weak, sqlite_store, "promote", "--dry-run", *PERMISSIVE)
    assert "models/model.onnx (not registered)" in dry.stdout and "dry run" in dry.stdout
    assert len(versions(sqlite_store, name)) == 1 and aliases(sqlite_store, name) == {}

    imgclf(good, sqlite_store, "promote", "--to", "challenger", "--outputs", str(tmp_path / "o"))
    assert aliases(sqlite_store, name) == {"challenger": "1"}
    assert outputs(tmp_path / "o") == {
        "version": "1",
        "champion": "none",
        "passed": "true",
        "approve": "true",
    }
    # An approval given for another champion than the one there now: exit 3, nothing moves.
    stale = imgclf(good, sqlite_store, "promote", "--version", "1", "--expect-champion", "7", check=False)
    assert stale.returncode == 3
    assert "the champion moved: expected version 7, found none" in stale.stderr
    # The approval, on a machine without the pipeline's outputs: the recorded gates hold.
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    (elsewhere / "params.yaml").write_text((good / "params.yaml").read_text())
    approved = imgclf(elsewhere, sqlite_store, "promote", "--version", "1", "--expect-champion", "none")
    assert "passed its gates against the champion (none)" in approved.stdout
    assert aliases(sqlite_store, name) == {"champion": "1"}


def test_a_champion_scored_on_another_split_is_scored_again(repos, sqlite_store):
    good, weak = repos["good"], repos["weak"]
    name = model_name(good)
    imgclf(good, sqlite_store, "register")
    imgclf(good, sqlite_store, "promote")
    client = MlflowClient(sqlite_store, registry_uri=sqlite_store)
    client.set_model_version_tag(name, "1", "imgclf.test_sha256", "0" * 64)  # as if evaluated elsewhere
    client.set_model_version_tag(name, "1", "imgclf.metric.accuracy", "0.5")
    client.set_model_version_tag(name, "1", "imgclf.metrics", json.dumps({"accuracy": 0.5}))
    imgclf(weak, sqlite_store, "register")
    done = imgclf(weak, sqlite_store, "promote", "--dry-run", *PERMISSIVE)
    assert "scoring it on this one" in done.stdout
    floor = next(line for line in done.stdout.splitlines() if line.startswith("accuracy floor"))
    # Its real accuracy on this split (the same split, in truth), not the 0.5 its tags claim.
    assert floor.split()[3] == f"{json.loads((good / 'metrics/eval.json').read_text())['accuracy']:.4f}"


def test_the_lock_times_out_and_an_expired_one_is_taken_over(repos, sqlite_store):
    good = repos["good"]
    name = model_name(good)
    client = MlflowClient(sqlite_store, registry_uri=sqlite_store)
    held = {"state": "held", "holder": "x", "actor": "someone", "purpose": "promote", "since": "now"}
    client.create_registered_model(f"{name}.lock.1", tags={**held, "expires": str(time.time() + 600)})
    set_param(good, "promote.lock_timeout_s", 1)
    done = imgclf(good, sqlite_store, "register", check=False)  # register takes the lock too
    assert done.returncode == 3, done.stderr
    assert "is held by someone (imgclf promote" in done.stderr
    client.set_registered_model_tag(f"{name}.lock.1", "expires", str(time.time() - 1))
    done = imgclf(good, sqlite_store, "register")
    assert "taking over the registry lock that someone left" in done.stdout
    # The next generation replaced it, and was marked free when register was done.
    (lock,) = client.search_registered_models(f"name LIKE '{name}.lock%'")
    assert (lock.name, lock.tags["state"]) == (f"{name}.lock.2", "released")


@pytest.mark.parametrize("expect", [False, True], ids=["serialised", "expect-champion"])
def test_two_promotions_at_once(repos, store, expect):
    """Two real processes promote two versions at the same moment. Serialised by the lock, both
    pass, and the second replaces the first: no champion is lost from `previous`. With
    --expect-champion none, exactly one wins and the other exits 3."""
    good, weak = repos["good"], repos["weak"]
    name = model_name(good)
    imgclf(good, store, "register")
    imgclf(weak, store, "register")
    extra = ["--expect-champion", "none"] if expect else []
    env = tool_env(good) | {"MLFLOW_TRACKING_URI": store}
    processes = [
        subprocess.Popen(
            ["imgclf", "promote", "--version", version, *extra, *PERMISSIVE],
            cwd=good,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for version in ("1", "2")
    ]
    codes = [process.wait(timeout=300) for process in processes]
    errors = [process.stderr.read() for process in processes]
    moved = [
        h for h in map(json.loads, imgclf(good, store, "models", "--history", "--json").stdout.splitlines())
    ]
    if expect:
        assert sorted(codes) == [0, 3], errors
        assert "the champion moved" in errors[codes.index(3)]
        assert len(moved) == 1 and aliases(store, name) == {"champion": moved[0]["version"]}
    else:
        assert codes == [0, 0], errors
        first, second = moved
        assert (first["replaced"], second["replaced"]) == ("", first["version"])
        assert aliases(store, name) == {"champion": second["version"], "previous": first["version"]}


def test_the_mlflow_ui_shows_the_model_card_and_links_each_version_to_its_run(repos, mlflow_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    good = repos["good"]
    name = model_name(good)
    imgclf(good, mlflow_server, "register")
    version = MlflowClient(mlflow_server).get_model_version(name, "1")
    run_name = MlflowClient(mlflow_server).get_run(version.run_id).info.run_name
    wait = WebDriverWait(browser, 30)
    browser.get(f"{mlflow_server}/#/models/{name}")
    wait.until(expected_conditions.text_to_be_present_in_element((By.TAG_NAME, "body"), "test accuracy"))
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "champion" in page and "imgclf rollback" in page  # the aliases, explained
    browser.get(f"{mlflow_server}/#/models/{name}/versions/1")
    link = wait.until(expected_conditions.presence_of_element_located((By.PARTIAL_LINK_TEXT, run_name[:12])))
    assert version.run_id in link.get_attribute("href")


READ_PROBE = """
import json, sys
from imgclf import cli
try:
    cli.main(sys.argv[1:])
    code = 0
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "mlflow": "mlflow" in sys.modules}), file=sys.stderr)
"""


def test_the_read_commands_read_a_server_without_mlflow_and_say_what_its_client_says(repos, mlflow_server):
    """`imgclf models` and `imgclf promote --dry-run` read an `mlflow server` over REST, so they
    import no mlflow; what they print is what they print through MLflow's own client."""
    from imgclf.registry import client
    from imgclf.serving.registry_reader import MlflowReader

    good, weak = repos["good"], repos["weak"]
    imgclf(good, mlflow_server, "register")
    imgclf(good, mlflow_server, "promote", "--reason", "first model")
    env = tool_env(weak) | {"MLFLOW_TRACKING_URI": mlflow_server}
    for args in (["models"], ["models", "--json"], ["models", "--history"], ["promote", "--dry-run"]):
        done = subprocess.run(
            [sys.executable, "-c", READ_PROBE, *args], cwd=weak, env=env, capture_output=True, text=True
        )
        probe = json.loads(done.stderr.strip().splitlines()[-1])
        assert probe["mlflow"] is False, args
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(client, "registry_reader", MlflowReader)
            through_mlflow = imgclf(weak, mlflow_server, *args, check=False)
        assert (probe["code"], done.stdout) == (through_mlflow.returncode, through_mlflow.stdout), args
    assert "models/model.onnx (not registered)" in done.stdout  # the dry run gated the weak model
