"""`imgclf sweep`: an Optuna study whose trials are DVC experiments.

A bad search space stops the sweep before any work, in one line naming the key. Workers racing to
create one study on a fresh PostgreSQL database all join it. Two workers in two clones of one git
remote share a PostgreSQL study: every trial is one experiment on the remote and one tagged MLflow
run, and a third clone pulls the best one and has nothing to reproduce. A trial that trails the
others is pruned mid-training; Ctrl-C stops a trial cleanly.
"""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from imgclf.cli import main
from tests.conftest import REPO, copy_repo, run, tool_env
from tests.scale.conftest import create_database

STAGES = ("normalize", "train", "export", "evaluate")


# --- the search space and the options, checked before any work ---------------------------------


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """conf/ and params.yaml of this repo in a committed DVC repository, the current folder."""
    import shutil

    shutil.copytree(REPO / "conf", tmp_path / "conf")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    env = tool_env(tmp_path)
    for args in (["init", "--quiet", "--initial-branch=main"], ["add", "--all"], ["commit", "-qm", "conf"]):
        subprocess.run(["git", *args], cwd=tmp_path, env=env, check=True, capture_output=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return tmp_path


def sweep_error(capsys, *args: str) -> str:
    """Run `imgclf sweep ARGS` in-process; it must exit 2 with one line. The line."""
    with pytest.raises(SystemExit) as exited:
        main(["sweep", *args])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert err.startswith("imgclf: error: ") and err.count("\n") == 1, err
    return err.removeprefix("imgclf: error: ").strip()


BAD_SPACES = [
    ({"train.lr": {"low": 0.1, "high": 0.01}}, "sweep.params.train.lr: low 0.1 must be below high 0.01"),
    (
        {"train.lr": {"low": 0, "high": 0.1, "log": True}},
        "sweep.params.train.lr: a log scale needs low > 0, got low 0",
    ),
    (
        {"train.lr": {"lo": 0.001, "high": 0.1}},
        "sweep.params.train.lr: unknown key 'lo'; allowed: low, high, log, choices",
    ),
    ({"train.lr": {"low": 0.001}}, "sweep.params.train.lr.high is missing: expected a number"),
    ({"train.lr": 0.01}, "sweep.params.train.lr=0.01: expected {low, high}"),
    (
        {"train.lr": {"low": 0.001, "high": 0.1, "choices": [0.01]}},
        "sweep.params.train.lr: choices or a range (low, high, log), not both",
    ),
    ({"model.hidden": {"choices": []}}, "sweep.params.model.hidden.choices=[]: expected a list"),
    ({}, "sweep.params is empty"),
    # Keys and values the config refuses: every bound and choice is composed once, up front.
    (
        {"train.lrr": {"low": 0.001, "high": 0.1}},
        "sweep.params.train.lrr: train.lrr=0.001 does not compose: train.lrr=0.001: no key 'train.lrr'",
    ),
    (
        {"train.lr": {"low": -1.0, "high": 0.1}},
        "sweep.params.train.lr: train.lr=-1.0 does not compose: train.lr=-1.0: Input should be greater",
    ),
    (
        {"model.hidden": {"choices": [[64], 128]}},  # an MLP's hidden is a list of widths
        "sweep.params.model.hidden: model.hidden=128 does not compose: model.hidden=128:",
    ),
    ({"model": {"choices": ["mlp", "vit"]}}, "sweep.params.model: model='vit' does not compose"),
]


@pytest.mark.parametrize(("params", "expected"), BAD_SPACES)
def test_a_bad_search_space_exits_2_with_one_line_naming_the_key(workspace, capsys, params, expected):
    bad = {"name": "bad", **sweep_defaults(workspace), "params": params}
    (workspace / "conf" / "sweep" / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert expected in sweep_error(capsys, "sweep=bad", "--trials", "1")
    assert not (workspace / "optuna.db").exists()  # no study was created


def sweep_defaults(workspace: Path) -> dict:
    """conf/sweep/default.yaml's keys but `params` (a search space file names all its own)."""
    defaults = yaml.safe_load((workspace / "conf" / "sweep" / "default.yaml").read_text())
    return {key: value for key, value in defaults.items() if key not in ("name", "params")}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["sweep.direction=maximize"], "sweep.direction='maximize': val_loss is searched with minimize"),
        (["sweep.metric=accuracy"], "sweep.metric='accuracy': Input should be 'val_loss' or 'val_acc'"),
        (["sweep.pruning.warmup_epochs=-1"], "sweep.pruning.warmup_epochs=-1: Input should be greater"),
        (["--study", "a/b"], "sweep.study='a/b': String should match pattern"),
        (["--storage", "optuna.db"], "--storage 'optuna.db': not a database URL"),
        (["--remote", "upstream"], "--remote upstream: no such git remote; remotes here: none"),
        (["model=cnn"], "sweep.params.model.hidden: model.hidden=[128] does not compose"),  # sweep=cnn
    ],
)
def test_bad_options_exit_2_with_one_line(workspace, capsys, args, expected):
    assert expected in sweep_error(capsys, *args)
    assert not (workspace / "optuna.db").exists()


def test_the_cnn_search_space_composes_with_the_cnn(workspace):
    from imgclf.sweep import study as sweep
    from imgclf.sweep.space import check_search_space

    plan = sweep.make_plan(workspace, sweep.Request(["model=cnn", "sweep=cnn"], trials=1))
    check_search_space(
        plan.root, plan.overrides, plan.config.sweep.params
    )  # raises on a refused key or value
    assert plan.study == "digits-cnn" and plan.remote is None
    assert plan.storage == f"sqlite:///{workspace / 'optuna.db'}"


def test_sampled_floats_survive_the_yaml_round_trips_of_dvc(workspace):
    # DVC rewrites params.yaml and dvc.lock with ruamel.yaml; a value that comes back changed makes
    # the lock disagree with params.yaml, and a clone that applies the experiment trains again.
    import io

    import optuna
    from ruamel.yaml import YAML

    from imgclf.sweep import study as sweep
    from imgclf.sweep.space import suggest

    def round_trip(text: str) -> str:
        out = io.StringIO()
        YAML().dump(YAML().load(text), out)
        return out.getvalue()

    plan = sweep.make_plan(workspace, sweep.Request([], trials=1))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    floats = [
        value
        for _ in range(300)
        for value in suggest(study.ask(), plan.config.sweep.params).values()
        if isinstance(value, float)
    ]
    assert len(floats) == 900
    texts = [yaml.safe_dump({"x": value}) for value in floats]
    assert [text for text in texts if round_trip(text) != text] == []


def test_no_stage_reads_the_sweep_group():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    keys = [key for stage in stages.values() for key in stage.get("params", [])]
    assert keys and not [key for key in keys if key == "sweep" or key.startswith("sweep.")]


# --- the trial runner: the epochs come from the train stage's JSON-lines file --------------------

# Stands in for `dvc exp run`: appends epoch after epoch to $IMGCLF_EPOCH_LOG, each line in two
# writes (a read between them sees half a line), prints lines for people, then runs on.
FAKE_TRAINING = (
    "import json, os, sys, time\n"
    "for epoch in range(1, int(sys.argv[1]) + 1):\n"
    "    line = json.dumps({'epoch': epoch, 'val_loss': 1 / epoch, 'val_acc': 0.5}) + '\\n'\n"
    "    with open(os.environ['IMGCLF_EPOCH_LOG'], 'a') as f:\n"
    "        f.write(line[:9]); f.flush(); time.sleep(0.3); f.write(line[9:])\n"
    "    print(f'epoch {epoch}: val_loss is looking good', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
)


def fake_experiment(tmp_path, monkeypatch, epochs: int, then_s: float):
    from imgclf.sweep import trials

    monkeypatch.setattr(
        trials.Experiment,
        "command",
        lambda self: [sys.executable, "-c", FAKE_TRAINING, str(epochs), str(then_s)],
    )
    return trials.Experiment(tmp_path, "sweep-fake-0", [], "val_loss")


def test_the_runner_hands_over_each_epoch_whole_and_stops_the_experiment_when_told(tmp_path, monkeypatch):
    from imgclf.sweep import trials
    from imgclf.sweep.signals import Stop

    experiment = fake_experiment(tmp_path, monkeypatch, epochs=3, then_s=300)
    seen = []

    def on_epoch(epoch) -> bool:
        seen.append(epoch)
        return epoch["epoch"] == 2  # the pruner says stop

    started = time.monotonic()
    code, stopped_at = trials.run_watched(experiment, on_epoch, Stop())
    assert stopped_at == 2 and code != 0 and time.monotonic() - started < 60
    assert seen == [
        {"epoch": 1, "val_loss": 1.0, "val_acc": 0.5},
        {"epoch": 2, "val_loss": 0.5, "val_acc": 0.5},
    ]
    assert "epoch 1: val_loss is looking good" in experiment.log.read_text()  # the output, in the trial's log


def test_the_runner_does_not_prune_an_experiment_that_finished(tmp_path, monkeypatch):
    from imgclf.sweep import trials
    from imgclf.sweep.signals import Stop

    experiment = fake_experiment(tmp_path, monkeypatch, epochs=2, then_s=0)
    seen = []

    def on_epoch(epoch) -> bool:
        seen.append(epoch["epoch"])
        if epoch["epoch"] == 1:
            time.sleep(2)  # a slow study: the experiment writes its last epoch and ends meanwhile
        return epoch["epoch"] == 2

    assert trials.run_watched(experiment, on_epoch, Stop()) == (0, None)  # complete, not pruned
    assert seen == [1, 2]


# --- one study, many workers ---------------------------------------------------------------------


def test_workers_creating_one_study_at_once_on_a_fresh_database_all_join_it(postgres_url, tmp_path):
    # Optuna alone fails here: each process creates the tables, and all but one hit a duplicate key.
    import optuna

    url = create_database(postgres_url, f"race_{uuid.uuid4().hex[:8]}")
    go = tmp_path / "go"
    code = (  # imports and config first (seconds), then all open the study at the same moment
        "import sys, time; from pathlib import Path; from imgclf.sweep import study as sweep;"
        "plan = sweep.make_plan(Path.cwd(), sweep.Request([], 1, sys.argv[1], 'race'));"
        "Path(sys.argv[2] + '.ready' + sys.argv[3]).touch();"
        "exec('while not Path(sys.argv[2]).exists(): time.sleep(0.01)');"
        "print(sweep.open_study(plan).study_name)"
    )
    repo = copy_repo(tmp_path / "repo")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", code, url, str(go), str(i)],
            cwd=repo,
            env=tool_env(repo),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(5)
    ]
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("go.ready*"))) < 5:
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers)
        time.sleep(0.1)
    go.touch()
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 5, outputs
    assert [out.strip().splitlines()[-1] for out in outputs] == ["race"] * 5
    assert [study.study_name for study in optuna.get_all_study_summaries(url)] == ["race"]


def git(*args: str, cwd: Path) -> str:
    return run(["git", *args], cwd).stdout


def sweep_worker(clone: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`imgclf sweep ARGS` as its own process, in `clone`, one training thread (two share 2 cores)."""
    return subprocess.Popen(
        ["imgclf", "sweep", *args],
        cwd=clone,
        env=tool_env(clone) | {"OMP_NUM_THREADS": "1"} | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def mlflow_runs(store: Path) -> dict[str, dict]:
    """run id -> {status, tags} in a sqlite MLflow store."""
    with sqlite3.connect(store) as connection:
        rows = connection.execute("SELECT run_uuid, status FROM runs")
        runs = {run_id: {"status": status, "tags": {}} for run_id, status in rows}
        for run_id, key, value in connection.execute("SELECT run_uuid, key, value FROM tags"):
            runs[run_id]["tags"][key] = value
    return runs


@pytest.mark.e2e
@pytest.mark.slow
def test_two_workers_in_two_clones_share_a_postgresql_study_and_a_third_clone_applies_the_best(
    postgres_url, tmp_path
):
    import optuna

    # A team's set-up: a git remote, a DVC remote named in the committed .dvc/config, one study
    # database, one MLflow store (here a sqlite file both clones reach, as a server would be).
    origin, outputs, store = tmp_path / "origin.git", tmp_path / "dvc-remote", tmp_path / "mlflow.db"
    git("init", "--quiet", "--bare", "--initial-branch=main", str(origin), cwd=tmp_path)
    a = copy_repo(tmp_path / "a")
    run(["dvc", "remote", "add", "-d", "shared", str(outputs)], a)
    git("commit", "--quiet", "-am", "the team's DVC remote", cwd=a)
    git("remote", "add", "origin", str(origin), cwd=a)
    git("push", "--quiet", "origin", "main", cwd=a)
    b = tmp_path / "b"
    git("clone", "--quiet", str(origin), str(b), cwd=tmp_path)
    url = create_database(postgres_url, f"study_{uuid.uuid4().hex[:8]}")

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    args = ["--trials", "2", "--storage", url, "--study", "team", "train.max_epochs=2"]
    workers = [sweep_worker(clone, *args, env=env) for clone in (a, b)]
    logs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], logs
    for log in logs:  # one line per trial, then the best and how to apply it
        assert len(re.findall(r"^trial \d+  train\.lr=\S+ .* val_loss \d\.\d{4}  best ", log, re.M)) == 2, log
        assert "dvc exp pull origin sweep-team-" in log

    study = optuna.load_study(study_name="team", storage=url)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert {t.state.name for t in trials} == {"COMPLETE"}
    assert len({t.params["train.lr"] for t in trials}) == 4  # four distinct trials
    names = {f"sweep-team-{t.number}" for t in trials}
    assert {t.user_attrs["dvc.exp_name"] for t in trials} == names

    tagged = [r for r in mlflow_runs(store).values() if r["tags"].get("optuna.study") == "team"]
    assert sorted(r["tags"]["optuna.trial"] for r in tagged) == ["0", "1", "2", "3"]
    assert {r["tags"]["dvc.exp_name"] for r in tagged} == names
    assert {r["status"] for r in tagged} == {"FINISHED"}
    assert {t.user_attrs["mlflow.run_id"] for t in trials} == {
        run_id for run_id, r in mlflow_runs(store).items() if r["tags"].get("optuna.study") == "team"
    }

    refs = git("ls-remote", str(origin), "refs/exps/*", cwd=tmp_path).split()[1::2]
    assert sorted(ref.rsplit("/", 1)[1] for ref in refs) == sorted(names)

    # Anyone else: a clean clone pulls the best experiment (its git ref, and its outputs from the
    # DVC remote) and applies it; the pipeline is then up to date.
    best = study.best_trial.user_attrs["dvc.exp_name"]
    c = tmp_path / "c"
    git("clone", "--quiet", str(origin), str(c), cwd=tmp_path)
    run(["dvc", "exp", "pull", "origin", best], c)
    run(["dvc", "exp", "apply", best], c)
    repro = run(["dvc", "repro"], c).stdout
    assert re.findall(r"^Running stage '(\w+)'", repro, re.M) == ["download"], repro  # always_changed
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in repro
    assert json.loads((c / "metrics/train.json").read_text())["val_loss"] == study.best_value


# --- pruning and Ctrl-C, in one clone with the default sqlite storage ---------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_a_trial_that_trails_the_median_is_pruned_mid_training(tmp_path):
    import optuna

    repo = copy_repo(tmp_path / "repo")
    storage = f"sqlite:///{repo / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="prune", direction="minimize")
    fixed = {"train.weight_decay": 1e-5, "model.hidden": "[128]", "model.dropout": 0.0}
    study.enqueue_trial({"train.lr": 0.01, **fixed})  # learns
    study.enqueue_trial({"train.lr": 0.0003, **fixed})  # learns slowly: trails trial 0 at epoch 2
    pruning = ["sweep.pruning.startup_trials=1", "sweep.pruning.warmup_epochs=1"]
    worker = sweep_worker(repo, "--trials", "2", "--study", "prune", "train.max_epochs=8", *pruning)
    log = worker.communicate(timeout=600)[0]
    assert worker.returncode == 0, log

    assert re.search(r"^trial 1  train\.lr=0\.0003 .*  pruned at epoch 2  best \d", log, re.M), log
    trials = optuna.load_study(study_name="prune", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"]
    assert max(trials[1].intermediate_values) == 2  # stopped after its second epoch
    refs = git("for-each-ref", "--format=%(refname:lstrip=-1)", "refs/exps/", cwd=repo).split()
    assert refs == ["sweep-prune-0"]  # a pruned trial leaves no experiment
    runs = {r["tags"]["dvc.exp_name"]: r for r in mlflow_runs(repo / "mlflow.db").values()}
    assert runs["sweep-prune-1"]["status"] == "KILLED"
    assert runs["sweep-prune-1"]["tags"]["optuna.state"] == "PRUNED"


@pytest.mark.e2e
@pytest.mark.slow
def test_ctrl_c_stops_the_running_trial_and_tells_the_study(tmp_path):
    import optuna

    repo = copy_repo(tmp_path / "repo")
    # No early stopping: the trial must still be training when the signal comes, however slow the machine.
    worker = sweep_worker(
        repo, "--trials", "3", "--study", "stop", "train.max_epochs=200", "train.early_stopping_patience=200"
    )
    epochs = repo / ".dvc/tmp/sweep/sweep-stop-0.epochs.jsonl"  # what the train stage writes for the sweep
    deadline = time.monotonic() + 300
    while not (epochs.is_file() and epochs.read_text().endswith("\n")):
        assert worker.poll() is None and time.monotonic() < deadline, worker.stdout.read()
        time.sleep(0.5)
    worker.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
    out = worker.communicate(timeout=120)[0]
    assert worker.returncode == 130, out
    assert re.search(r"^trial 0  .*  FAILED: interrupted, the experiment stopped", out, re.M), out
    assert out.endswith("study stop: no trial complete yet (1 fail)\nimgclf: interrupted\n"), out

    trials = optuna.load_study(study_name="stop", storage=f"sqlite:///{repo / 'optuna.db'}").get_trials()
    assert [t.state.name for t in trials] == ["FAIL"]  # not left RUNNING, and no trial 1 started
    assert [r["status"] for r in mlflow_runs(repo / "mlflow.db").values()] == ["KILLED"]
    assert not git("for-each-ref", "refs/exps/", cwd=repo).strip()
    # Nothing of the experiment keeps running: no process works in the clone's folders.
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and in_folder(pid, repo)]
    assert not left, left


def in_folder(pid: str, folder: Path) -> bool:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")).is_relative_to(folder)
    except OSError:
        return False
