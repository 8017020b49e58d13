"""`imgclf sweep`: an Optuna study whose trials are DVC experiments, shared by any number of workers.

A worker asks the study for a trial, runs it as one `dvc exp run --temp` (the whole pipeline on
the trial's params, in a copy of the workspace, so the workspace is left alone: trials.py), reads
the validation metric from the experiment's metrics/train.json, tells the study, tags the
pipeline's MLflow run with the study and trial, and pushes the experiment to the git remote
(publish.py).

Workers on one machine share a sqlite file (the default, <repo>/optuna.db); workers on several
machines share a PostgreSQL database (`--storage postgresql+psycopg2://...`) and a git remote.
Experiment names are `sweep-<study>-<trial number>`: the study numbers its trials, so the names are
distinct across workers and their refs never collide on the remote.

Pruning reads the train stage's epochs (a JSON-lines file, trials.EPOCH_LOG_ENV) while the trial
runs, reports the validation metric to the study epoch by epoch, and stops the experiment (SIGINT
to its process group) when the pruner says so. A pruned trial leaves no experiment; its MLflow run
ends KILLED.
"""

import math
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imgclf.config import compose as configuration
from imgclf.config.operations import Config, validate
from imgclf.config.pipeline import PARAMS_FILE
from imgclf.errors import ConfigError, ImgclfError
from imgclf.sweep import publish
from imgclf.sweep.signals import Stop, stop_on_signals
from imgclf.sweep.space import check_search_space, override_value, shown, suggest
from imgclf.sweep.trials import LOG_DIR, Epoch, Experiment, Outcome, experiment_ref, run_experiment

STORAGE_FILE = "optuna.db"  # beside mlflow.db; gitignored
STUDY_ATTEMPTS = 8  # workers creating one fresh storage or study at once race on its tables


class StudyBusy(ImgclfError):
    """The storage's tables or the study could not be created or loaded for racing workers: retry."""

    exit_code = 3


@dataclass(frozen=True)
class Request:
    """What `imgclf sweep` was asked on its command line; None: the config's default."""

    overrides: list[str]
    trials: int | None = None
    storage: str | None = None
    study: str | None = None
    remote: str | None = None


@dataclass(frozen=True)
class Plan:
    """What a worker does, settled before any trial: validated config, storage, remote."""

    root: Path
    config: Config
    overrides: list[str]  # every trial's `dvc exp run -S`, before the trial's own
    study: str
    storage: str
    n_trials: int
    remote: str | None  # the git remote each experiment is pushed to; None: not pushed


def sweep(root: Path, request: Request) -> None:
    """Run this worker's trials, one line each, then print the study's best trial and how to apply it."""
    plan = make_plan(root, request)
    check_search_space(plan.root, plan.overrides, plan.config.sweep.params)
    optuna_study = open_study(plan)
    print(header(plan), flush=True)
    if plan.remote:
        publish.warn_without_dvc_remote(plan.root)
    outcomes: list[Outcome] = []
    with stop_on_signals() as stop:
        while len(outcomes) < plan.n_trials and not stop.requested:
            outcomes.append(run_trial(plan, optuna_study, stop))
    print(summary(plan, optuna_study), flush=True)
    if stop.requested:
        raise KeyboardInterrupt  # exit 130, as for any interrupted command
    completed = sum(o.state == "COMPLETE" for o in outcomes)
    unpushed = [o for o in outcomes if o.unpushed]
    if not completed and not all(o.state == "PRUNED" for o in outcomes):
        raise ImgclfError(f"no trial of this worker completed: see the logs in {LOG_DIR}/")
    if unpushed:
        raise ImgclfError(f"{len(unpushed)} experiment(s) not pushed to {plan.remote}: `dvc exp push` them")


# --- the plan: config, storage, remote ---------------------------------------------------------


def make_plan(root: Path, request: Request) -> Plan:
    if not (root / ".dvc").is_dir():
        raise ConfigError(f"{root} is not a DVC repository: run imgclf sweep in the repository's root")
    conf_dir, params = root / configuration.CONF_DIR, root / PARAMS_FILE
    # The workspace's experiment (params.yaml's overrides), then the command line's, as
    # `imgclf promote` does: `imgclf params model=cnn; imgclf sweep sweep=cnn` searches the CNN.
    workspace = configuration.params_overrides(conf_dir, params) if params.is_file() else []
    base = [*workspace, *request.overrides]
    only_here = [f"sweep.study={override_value(request.study)}"] if request.study is not None else []
    config = validate(configuration.compose(base + only_here, conf_dir))
    return Plan(
        root=root,
        config=config,
        overrides=base,
        study=config.sweep.study or f"{config.data.name}-{config.model.name}",
        storage=storage_url(request.storage, root),
        n_trials=request.trials or config.sweep.n_trials,
        remote=publish.git_remote(root, request.remote),
    )


def storage_url(given: str | None, root: Path) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    url = given or f"sqlite:///{root / STORAGE_FILE}"
    try:
        make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"--storage {url!r}: not a database URL; e.g. sqlite:///optuna.db (one machine) or "
            "postgresql+psycopg2://USER@HOST/DATABASE (several)"
        ) from None
    return url


def shown_url(url: str) -> str:
    """`url` without its password, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# --- the study ---------------------------------------------------------------------------------


def open_study(plan: Plan):
    """Create the study, or load it if another worker did. Workers starting at once on a fresh
    storage race to create its tables and the study: each retries until one has won."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours
    sweep = plan.config.sweep
    pruner = (
        optuna.pruners.MedianPruner(
            n_startup_trials=sweep.pruning.startup_trials,
            n_warmup_steps=sweep.pruning.warmup_epochs + 1,  # steps are epochs, counted from 1
        )
        if sweep.pruning.enabled
        else optuna.pruners.NopPruner()
    )
    sqlite = plan.storage.startswith("sqlite")
    # sqlite: wait for another worker's write instead of failing at once; a server: drop dead connections.
    engine = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    where = shown_url(plan.storage)
    error: Exception | None = None
    for attempt in range(STUDY_ATTEMPTS):
        try:
            storage = optuna.storages.RDBStorage(plan.storage, engine_kwargs=engine)
            study = optuna.create_study(
                storage=storage,
                study_name=plan.study,
                direction=sweep.direction,
                pruner=pruner,
                load_if_exists=True,
            )
            break
        except (IntegrityError, ProgrammingError, optuna.exceptions.StorageInternalError) as raced:
            error = raced
        except OperationalError as raced:
            if "locked" not in str(raced):
                reason = str(raced.orig).strip().splitlines()[0] if raced.orig else str(raced)
                raise ImgclfError(f"cannot open the study storage {where}: {reason}") from None
            error = raced
        except ModuleNotFoundError as missing:
            raise ConfigError(f"--storage {where}: needs the Python package {missing.name!r}") from None
        time.sleep(random.uniform(0.1, 0.5) * (attempt + 1))
    else:
        reason = str(error).splitlines()[0] if error else "unknown"
        raise StudyBusy(f"could not create or load study {plan.study!r} in {where}: {reason}; run again")
    if study.direction.name.lower() != sweep.direction:
        raise ConfigError(
            f"study {plan.study!r} in {where} is to {study.direction.name.lower()}, sweep.direction is "
            f"{sweep.direction} ({sweep.metric}): use another --study"
        )
    return study


def header(plan: Plan) -> str:
    sweep = plan.config.sweep
    pruning = (
        f"median after {sweep.pruning.startup_trials} trials, {sweep.pruning.warmup_epochs} warm-up epochs"
        if sweep.pruning.enabled
        else "off"
    )
    push = (
        f"each experiment pushed to {plan.remote}" if plan.remote else "no git remote: experiments stay here"
    )
    return (
        f"study {plan.study} in {shown_url(plan.storage)}: {sweep.direction} {sweep.metric} "
        f"(metrics/train.json, validation split) over {', '.join(sweep.params)}; {plan.n_trials} trials "
        f"here; pruning {pruning}; {push}"
    )


def summary(plan: Plan, study) -> str:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    tally = ", ".join(f"{n} {state.name.lower()}" for state, n in counts.items() if n)
    try:
        best = study.best_trial
    except ValueError:
        return f"study {plan.study}: no trial complete yet ({tally})"
    name = best.user_attrs.get("dvc.exp_name", "")
    params = " ".join(f"{key}={shown(value)}" for key, value in best.params.items())
    lines = [
        f"best of study {plan.study} ({len(trials)} trials: {tally}): trial {best.number}, "
        f"{plan.config.sweep.metric} {best.value:.4f}, experiment {name}",
        f"  {params}",
    ]
    if experiment_ref(plan.root, name) is not None:
        lines.append(f"  apply it here:        dvc exp apply {name}")
    if plan.remote:
        lines.append(f"  in any other clone:   dvc exp pull {plan.remote} {name} && dvc exp apply {name}")
    elif experiment_ref(plan.root, name) is None:
        lines.append(f"  it ran in another clone ({best.user_attrs.get('worker')}): apply or push it there")
    lines.append("  then `dvc repro` runs nothing but download's check, and `git commit` keeps the recipe")
    return "\n".join(lines)


# --- one trial ---------------------------------------------------------------------------------


def run_trial(plan: Plan, study, stop: Stop) -> Outcome:
    """Ask, run the experiment, tell; tag its MLflow run; push it."""
    from optuna.trial import TrialState

    trial = study.ask()
    name = f"sweep-{plan.study}-{trial.number}"
    trial.set_user_attr("dvc.exp_name", name)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    values = suggest(trial, plan.config.sweep.params)
    params = " ".join(f"{key}={shown(value)}" for key, value in values.items())
    started = time.monotonic()
    overrides = [*plan.overrides, *(f"{k}={override_value(v)}" for k, v in values.items())]
    try:  # a combination the schema refuses (a CNN's hidden as a list) fails here, in a second
        validate(configuration.compose(overrides, plan.root / configuration.CONF_DIR))
    except ConfigError as error:
        outcome = Outcome("FAIL", note=str(error))
    else:
        experiment = Experiment(plan.root, name, overrides, plan.config.sweep.metric)
        outcome = run_experiment(experiment, epoch_reporter(trial, plan.config.sweep.metric), stop)
    tags = {"optuna.study": plan.study, "optuna.trial": str(trial.number), "optuna.state": outcome.state}
    run_id = publish.tag_mlflow_run(plan.config, name, tags)
    if run_id:
        trial.set_user_attr("mlflow.run_id", run_id)
    if outcome.state == "COMPLETE":
        study.tell(trial, outcome.value)
    else:
        study.tell(trial, state=TrialState[outcome.state])
    if outcome.state == "COMPLETE" and plan.remote:
        failed = publish.push(plan.root, plan.remote, name)
        note = f"push failed: {failed}" if failed else f"pushed to {plan.remote}"
        outcome = Outcome(outcome.state, outcome.value, note, unpushed=failed is not None)
    seconds = time.monotonic() - started
    print(f"trial {trial.number}  {params}  {result_text(plan, study, outcome)}  {seconds:.0f} s", flush=True)
    return outcome


def result_text(plan: Plan, study, outcome: Outcome) -> str:
    metric = plan.config.sweep.metric
    if outcome.state == "FAIL":
        return f"FAILED: {outcome.note}"  # told the study FAIL
    try:
        best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
    except ValueError:
        best = "best: none yet"
    if outcome.state == "PRUNED":
        return f"pruned {outcome.note}  {best}"
    note = f"  {outcome.note}" if outcome.note else ""
    return f"{metric} {outcome.value:.4f}  {best}{note}"


def epoch_reporter(trial, metric: str) -> Callable[[Epoch], bool]:
    """Report the metric of the best epoch so far (lowest val_loss, as metrics/train.json picks
    it) at each epoch; True when the pruner would stop the trial."""
    best_loss = math.inf
    value = None

    def report(epoch: Epoch) -> bool:
        nonlocal best_loss, value
        if "val_loss" not in epoch or metric not in epoch:
            return False
        if epoch["val_loss"] < best_loss or value is None:
            best_loss, value = epoch["val_loss"], epoch[metric]
        trial.report(value, epoch["epoch"])
        return trial.should_prune()

    return report
