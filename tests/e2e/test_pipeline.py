"""The whole pipeline, for real: `dvc repro` on digits in a copy of this repo.

Tests in this module share one copy and run in order: each later one changes the workspace.
"""

import csv
import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml

from imgclf.models import load_checkpoint
from imgclf.runtime import inference_session
from imgclf.stages.export import Probabilities
from tests.conftest import REPO, copy_repo, run

pytestmark = pytest.mark.e2e

STAGES = ["download", "normalize", "train", "export", "evaluate"]


def stages_run(output: str) -> list[str]:
    """The stages that did work: download runs on every repro, and says when it had nothing to do."""
    ran = re.findall(r"Running stage '(\w+)'", output)
    if re.search(r"^download: \S+ is up to date$", output, re.MULTILINE):
        ran.remove("download")
    return ran


def git_outputs() -> set[str]:
    """The outputs dvc.yaml gives to git (cache: false): metrics and plot data."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {
        path
        for stage in stages.values()
        for kind in ("outs", "metrics")
        for entry in stage.get(kind, [])
        if isinstance(entry, dict)
        for path, options in entry.items()
        if options.get("cache") is False
    }


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(evaluated_pipeline, tmp_path_factory):
    pristine, output = evaluated_pipeline
    assert stages_run(output) == STAGES
    root = tmp_path_factory.mktemp("pipeline") / "repo"
    shutil.copytree(pristine, root, symlinks=True)
    shutil.copy(root / "models/model.onnx", root.parent / "first_model.onnx")
    return root


@pytest.fixture(scope="module")
def mlflow_run(repo):
    from mlflow.tracking import MlflowClient

    made_by = json.loads((repo / "models/run.json").read_text())
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    return client, client.get_run(made_by["mlflow_run_id"])


def test_default_config_reaches_097_test_accuracy(repo):
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert metrics["accuracy"] >= 0.97
    assert metrics["n_test"] == 270
    per_class = list(csv.DictReader((repo / "plots/per_class.csv").open()))
    assert [row["class"] for row in per_class] == [str(d) for d in range(10)]
    assert sum(int(row["support"]) for row in per_class) == 270
    # Timings are this machine's: git-ignored, beside the metrics git tracks, and in MLflow.
    assert not {"latency_ms_p50_b1", "throughput_b256"} & set(metrics)
    speed = json.loads((repo / "metrics/local/eval.json").read_text())
    assert speed["latency_ms_p50_b1"] > 0 and speed["throughput_b256"] > 0
    assert speed["onnx_sha256"] == hashlib.sha256((repo / "models/model.onnx").read_bytes()).hexdigest()
    ignored = run(["git", "check-ignore", "metrics/local/eval.json", "models/run.json"], repo).stdout.split()
    assert ignored == ["metrics/local/eval.json", "models/run.json"]
    confusion = (repo / "plots/confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 271


def test_mlflow_run_has_params_epoch_metrics_tags_and_model(repo, mlflow_run, monkeypatch):
    client, mlflow_run_ = mlflow_run
    data = mlflow_run_.data
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert data.params["model.hidden.0"] == str(params["model"]["hidden"][0])
    assert data.params["train.lr"] == str(params["train"]["lr"])
    assert data.params["data.name"] == "digits"

    epochs = json.loads((repo / "metrics/train.json").read_text())["epochs"]
    history = client.get_metric_history(mlflow_run_.info.run_id, "val_loss")
    assert len(history) == epochs > 1
    assert data.metrics["test_accuracy"] >= 0.97
    assert "parity_max_abs_diff" in data.metrics
    assert data.metrics["test_latency_ms_p50_b1"] > 0 and data.metrics["train_seconds"] > 0

    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert data.tags["git.commit"] == head
    assert data.tags["git.dirty"] == "false"
    assert len(data.tags["data.normalized_sha256"]) == 64

    artifacts = {a.path for a in client.list_artifacts(mlflow_run_.info.run_id)}
    assert {"params.yaml", "train.json", "eval.json", "model.json", "plots"} <= artifacts
    models = client.search_logged_models(experiment_ids=[mlflow_run_.info.experiment_id])
    assert [m.source_run_id for m in models] == [mlflow_run_.info.run_id]

    import mlflow.pyfunc

    # Not mlflow.set_tracking_uri: it would point every later test's MLflow calls at this store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo}/mlflow.db")
    served = mlflow.pyfunc.load_model(models[0].model_uri)
    images = np.load(repo / "data/normalized/test/images.npy")[:5]
    expected = inference_session(repo / "models/model.onnx").run(None, {"image": images})[0]
    np.testing.assert_allclose(served.predict(images)["probabilities"], expected, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 17])
def test_onnx_matches_the_checkpoint(repo, batch):
    net = load_checkpoint(repo / "models/model.ckpt").net
    images = np.load(repo / "data/normalized/test/images.npy")[:batch]
    with torch.inference_mode():
        expected = Probabilities(net).eval()(torch.from_numpy(images)).numpy()
    actual = inference_session(repo / "models/model.onnx").run(None, {"image": images})[0]
    assert np.abs(actual - expected).max() <= 1e-4
    assert (actual.argmax(1) == expected.argmax(1)).all()


def test_repro_writes_nothing_undeclared_and_a_second_repro_runs_nothing(repo):
    status = run(["git", "status", "--porcelain", "--untracked-files=all"], repo).stdout
    changed = {line[3:] for line in status.splitlines()}
    assert "dvc.lock" in changed and changed <= {"dvc.lock", "plots/.gitignore", *git_outputs()}
    assert {"metrics/eval.json", "plots/per_class.csv"} <= git_outputs()
    assert not list(repo.rglob("lightning_logs")) and not list(repo.rglob(".hydra"))
    assert not (repo / "outputs").exists() and not (repo / "mlruns").exists()
    assert stages_run(run(["dvc", "repro"], repo).stdout) == []


def stage_command(repo, stage: str) -> list[str]:
    """A stage's `cmd:` from dvc.yaml, as DVC runs it for the default data set."""
    cmd = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    return cmd.replace("${data.name}", "digits").split()


def test_bad_value_in_params_stops_a_stage_before_any_work(repo):
    params = repo / "params.yaml"
    good = params.read_text()
    before = {p: sha256(p) for p in (repo / "models").iterdir()}
    params.write_text(good.replace("batch_size: 64", "batch_size: lots"))
    try:
        done = run(stage_command(repo, "train"), repo, check=False)
    finally:
        params.write_text(good)
    assert done.returncode == 2
    assert done.stderr.strip() == "imgclf: error: train.batch_size='lots': Input should be a valid integer"
    assert {p: sha256(p) for p in (repo / "models").iterdir()} == before

    done = run(["imgclf", "params", "train.batch_size=lots"], repo, check=False)
    assert done.returncode == 2 and params.read_text() == good


def test_changing_lr_reruns_exactly_train_export_evaluate(repo):
    run(["imgclf", "params", "train.lr=0.003"], repo)
    done = run(["dvc", "repro"], repo)
    assert stages_run(done.stdout) == ["train", "export", "evaluate"]
    assert json.loads((repo / "metrics/eval.json").read_text())["accuracy"] >= 0.9


def test_two_clean_runs_give_the_same_model_bytes(repo, tmp_path_factory):
    first = repo.parent / "first_model.onnx"
    other = copy_repo(tmp_path_factory.mktemp("again"))
    run(["dvc", "repro"], other)
    assert sha256(other / "models/model.onnx") == sha256(first)


def test_dvc_exp_run_composes_overrides(repo):
    from mlflow.tracking import MlflowClient

    done = run(
        ["dvc", "exp", "run", "-S", "model=cnn", "-S", "train.lr=0.01", "-S", "train.max_epochs=2"],
        repo,
    )
    assert stages_run(done.stdout) == ["train", "export", "evaluate"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["model"]["name"] == "cnn" and params["train"]["lr"] == 0.01
    sidecar = json.loads((repo / "models/model.json").read_text())
    assert sidecar["model"]["name"] == "cnn"
    made_by = json.loads((repo / "models/run.json").read_text())
    name = made_by["dvc.exp_name"]
    assert name
    # DVC wrote params.yaml without imgclf's header: `make run`'s check accepts it as it is.
    assert "written by DVC" in run(["imgclf", "params", "--check"], repo).stdout
    run_ = MlflowClient(f"sqlite:///{repo}/mlflow.db").get_run(made_by["mlflow_run_id"])
    assert run_.data.tags["git.dirty"] == "false" and run_.data.tags["dvc.exp_name"] == name
    assert run_.info.run_name == name and run_.info.status == "FINISHED"

    # The experiment carries its metrics: exp show and metrics diff read them, exp apply restores them.
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    metrics = {}
    for row in shown:
        revisions = [row, *(rev for exp in row.get("experiments") or [] for rev in exp["revs"])]
        for revision in revisions:
            found = (revision["data"].get("metrics") or {}).get("metrics/eval.json", {})
            assert "data" in found, f"no metrics for {revision['rev']}: {found.get('error')}"
            metrics[revision["name"] or revision["rev"]] = found["data"]
    assert {"workspace", "main", name} <= set(metrics)
    # The README's command for a readable table fits 80 columns: nothing cut to "…", no "!".
    keep = ["--drop", ".*", "--keep", r"^(Experiment|accuracy|macro_f1|model\.name|train\.lr)$"]
    table = run(["dvc", "exp", "show", "--no-pager", *keep], repo, extra_env={"COLUMNS": "80"}).stdout
    assert "…" not in table and "!" not in table and name in table and "cnn" in table
    assert "accuracy" in run(["dvc", "metrics", "diff", "HEAD"], repo).stdout
    run(["dvc", "exp", "apply", name], repo)
    assert json.loads((repo / "metrics/eval.json").read_text())["accuracy"] == metrics[name]["accuracy"]
    assert (
        sha256(repo / "models/model.onnx")
        == json.loads((repo / "models/model.json").read_text())["lineage"]["onnx_sha256"]
    )


def test_a_changed_image_folder_is_picked_up_by_a_plain_repro(tmp_path_factory):
    from PIL import Image

    repo = copy_repo(tmp_path_factory.mktemp("folder"))
    photos = tmp_path_factory.mktemp("photos")
    for label, colour in enumerate([(220, 30, 30), (30, 220, 30)]):
        (photos / f"class{label}").mkdir()
        for i in range(10):
            Image.new("RGB", (6, 6), tuple(c + i for c in colour)).save(photos / f"class{label}" / f"{i}.png")
    run(["imgclf", "params", "data=imagefolder", f"data.path={photos}", "data.image_size=[8,8]"], repo)
    assert stages_run(run(["dvc", "repro", "normalize"], repo).stdout) == ["download", "normalize"]
    Image.new("RGB", (6, 6), (250, 10, 10)).save(photos / "class0" / "new.png")
    assert stages_run(run(["dvc", "repro", "normalize"], repo).stdout) == ["download", "normalize"]
    report = json.loads((repo / "data/normalized/report.json").read_text())
    assert sum(report["n_images"].values()) == 21
    assert stages_run(run(["dvc", "repro", "normalize"], repo).stdout) == []  # nothing changed: nothing done


@pytest.mark.parametrize(
    ("path", "reruns"),
    [
        ("src/imgclf/data/normalize.py", ["normalize"]),  # same splits out: no retraining
        ("src/imgclf/stages/evaluation.py", ["evaluate"]),  # the latency measurement: no re-export
    ],
)
def test_editing_one_stages_code_reruns_that_stage_only(repo, path, reruns):
    file = repo / path
    original = file.read_text()
    file.write_text(original + "\n# an edit that changes no behaviour\n")
    try:
        assert stages_run(run(["dvc", "repro"], repo).stdout) == reruns
    finally:
        file.write_text(original)
    run(["dvc", "repro"], repo)


# Operations code and schema: what `imgclf promote`, `register`, `rollback`, `sweep` and `params` run.
OPERATIONS = sorted(
    str(path.relative_to(REPO))
    for pattern in (
        "src/imgclf/cli.py",
        "src/imgclf/config/operations.py",
        "src/imgclf/config/compose.py",
        "src/imgclf/registry/*.py",
        "src/imgclf/sweep/*.py",
    )
    for path in REPO.glob(pattern)
)


@pytest.mark.parametrize("path", OPERATIONS)
def test_editing_operations_code_changes_no_stage(repo, path):
    file = repo / path
    original = file.read_text()
    file.write_text(original + "\nOPERATIONS_EDIT = 1  # code, not only a comment\n")
    try:
        status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
    finally:
        file.write_text(original)
    # download is always_changed (it checks its source itself); no stage has a changed dependency.
    assert status == {"download": ["always changed"]}, f"editing {path} changes {status}"


def test_the_operations_list_is_not_empty():
    assert {"src/imgclf/cli.py", "src/imgclf/config/operations.py"} <= set(OPERATIONS)
    assert any(path.startswith("src/imgclf/registry/") for path in OPERATIONS)
    assert any(path.startswith("src/imgclf/sweep/") for path in OPERATIONS)


def test_summary_never_points_at_a_run_the_store_does_not_have(repo):
    run_id = json.loads((repo / "models/run.json").read_text())["mlflow_run_id"]
    assert f"MLflow run      {run_id}  (" in run(["python", "-m", "imgclf.tracking.summary"], repo).stdout
    store, aside = repo / "mlflow.db", repo.parent / "mlflow.db.aside"
    store.rename(aside)  # as after `rm mlflow.db; make run`: outputs come back from DVC's run cache
    try:
        out = run(["python", "-m", "imgclf.tracking.summary"], repo).stdout
    finally:
        aside.rename(store)
    assert f"run {run_id} is not in sqlite:///{store}" in out and "dvc repro --force" in out


def test_dvc_plots_show_draws_each_plot_once_and_needs_no_network(repo):
    page = REPO / ".dvc/plots/index.html"  # built by `make install` (Makefile: PLOTS_PAGE)
    assert page.is_file(), "run `make install` to build .dvc/plots/index.html"
    shutil.copy(page, repo / ".dvc/plots/index.html")
    run(["dvc", "plots", "show"], repo)
    html = (repo / "dvc_plots/index.html").read_text()
    assert "<script src=" not in html and "cdn.jsdelivr" not in html  # Vega is inlined
    assert "vegaEmbed" in html
    for image in ("confusion.png", "train_curves.png"):
        assert len(re.findall(rf'<img src="[^"]*{image}"', html)) == 1, image
    for title in ("Loss per epoch", "Accuracy per epoch", "Confusion matrix", "Recall per class"):
        assert html.count(f'"text": "{title}') + html.count(f'"title": "{title}') >= 1, title
