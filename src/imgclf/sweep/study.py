"""`imgclf sweep`: an Optuna study whose trials are DVC experiments, shared by any number of workers.

A worker asks the study for a trial, runs it as one `dvc exp run --temp` (the whole pipeline on
the trial's params, in a copy of the workspace, so the workspace is left alone), reads the
validation metric from the experiment's metrics/train.json, tells the study, tags the pipeline's
MLflow run with the study and trial, and pushes the experiment to the git remote (`dvc exp push`:
the git ref, and the outputs to the default DVC remote that the commit's .dvc/config names).

Workers on one machine share a sqlite file (the default, <repo>/optuna.db); workers on several
machines share a PostgreSQL database (`--storage postgresql+psycopg2://...`) and a git remote.
Experiment names are `sweep-<study>-<trial number>`: the study numbers its trials, so the names are
distinct across workers and their refs never collide on the remote.

Pruning reads the train stage's epoch lines (training.EpochLines, printed when its output is not a
terminal, as here) while the trial runs, reports the validation metric to the study epoch by epoch,
and stops the experiment (SIGINT to its process group) when the pruner says so. A pruned trial
leaves no experiment; its MLflow run ends KILLED.
"""

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.config import compose as configuration
from imgclf.config.operations import Config, SearchSpace, validate
from imgclf.config.pipeline import PARAMS_FILE
from imgclf.errors import ConfigError, ImgclfError

STORAGE_FILE = "optuna.db"  # beside mlflow.db; gitignored
LOG_DIR = Path(".dvc", "tmp", "sweep")  # one log per trial; DVC's .dvc/.gitignore covers tmp/
EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+\s+(.*)$")
METRIC_PAIR = re.compile(r"(\w+) (-?(?:\d+\.?\d*(?:e[-+]?\d+)?|nan|inf))")
STOP_GRACE_S = 60  # after SIGINT, a stage ends its MLflow run and DVC removes its temporary copy
FLOAT_DIGITS = 6  # significant digits of a sampled float, as the trial's experiment gets it
STUDY_ATTEMPTS = 8  # workers creating one fresh storage or study at once race on its tables
override_value = configuration._override_value  # a value in Hydra's override grammar: one home


class StudyBusy(ImgclfError):
    """The storage's tables or the study could not be created or loaded for racing workers: retry."""

    exit_code = 3


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


@dataclass(frozen=True)
class Outcome:
    state: str  # COMPLETE | PRUNED | FAIL, as told to the study
    value: float | None = None
    note: str = ""  # why it failed, where it was pruned


def sweep(
    root: Path,
    overrides: list[str],
    trials: int | None = None,
    storage: str | None = None,
    study: str | None = None,
    remote: str | None = None,
) -> None:
    """Run this worker's trials, one line each, then print the study's best trial and how to apply it."""
    plan = make_plan(root, overrides, trials, storage, study, remote)
    check_search_space(plan)
    optuna_study = open_study(plan)
    print(header(plan), flush=True)
    if plan.remote:
        warn_without_dvc_remote(plan.root)
    outcomes: list[Outcome] = []
    with stop_on_signals() as stop:
        while len(outcomes) < plan.n_trials and not stop.requested:
            outcomes.append(run_trial(plan, optuna_study, stop))
    print(summary(plan, optuna_study), flush=True)
    if stop.requested:
        raise KeyboardInterrupt  # exit 130, as for any interrupted command
    completed = sum(o.state == "COMPLETE" for o in outcomes)
    unpushed = [o for o in outcomes if "push failed" in o.note]
    if not completed and not all(o.state == "PRUNED" for o in outcomes):
        raise ImgclfError(f"no trial of this worker completed: see the logs in {LOG_DIR}/")
    if unpushed:
        raise ImgclfError(f"{len(unpushed)} experiment(s) not pushed to {plan.remote}: `dvc exp push` them")


# --- the plan: config, storage, remote ---------------------------------------------------------


def make_plan(
    root: Path,
    overrides: list[str],
    trials: int | None,
    storage: str | None,
    study: str | None,
    remote: str | None,
) -> Plan:
    if not (root / ".dvc").is_dir():
        raise ConfigError(f"{root} is not a DVC repository: run imgclf sweep in the repository's root")
    conf_dir, params = root / configuration.CONF_DIR, root / PARAMS_FILE
    # The workspace's experiment (params.yaml's overrides), then the command line's, as
    # `imgclf promote` does: `imgclf params model=cnn; imgclf sweep sweep=cnn` searches the CNN.
    base = (configuration.params_overrides(conf_dir, params) if params.is_file() else []) + list(overrides)
    only_here = [f"sweep.study={override_value(study)}"] if study is not None else []
    config = validate(configuration.compose(base + only_here, conf_dir))
    return Plan(
        root=root,
        config=config,
        overrides=base,
        study=config.sweep.study or f"{config.data.name}-{config.model.name}",
        storage=storage_url(storage, root),
        n_trials=trials or config.sweep.n_trials,
        remote=git_remote(root, remote),
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


def git(root: Path, *args: str, check: bool = True) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and done.returncode:
        raise ImgclfError(
            f"`git {' '.join(args)}` failed in {root}: {done.stderr.strip() or done.returncode}"
        )
    return done.stdout.strip()


def git_remote(root: Path, asked: str | None) -> str | None:
    """The git remote to push experiments to: `asked`, else `origin` if the clone has one."""
    if not git(root, "rev-parse", "--verify", "--quiet", "HEAD", check=False):
        raise ConfigError(f"{root} has no git commit: experiments need a baseline (`git commit` first)")
    remotes = git(root, "remote").split()
    if asked is not None and asked not in remotes:
        raise ConfigError(
            f"--remote {asked}: no such git remote; remotes here: {', '.join(remotes) or 'none'}"
        )
    if asked is not None:
        return asked
    return "origin" if "origin" in remotes else None


def warn_without_dvc_remote(root: Path) -> None:
    """`dvc exp push` sends outputs to the default DVC remote of the experiment's commit (not of
    the workspace): say so when HEAD's .dvc/config names none."""
    committed = git(root, "show", "HEAD:.dvc/config", check=False)
    if not re.search(r"^\s*remote\s*=", committed, re.MULTILINE):
        print(
            "note: HEAD's .dvc/config names no default DVC remote, so experiments are pushed without "
            "their outputs (models, data): `dvc remote add -d NAME URL`, commit .dvc/config, then sweep",
            flush=True,
        )


# --- the search space --------------------------------------------------------------------------


def check_search_space(plan: Plan) -> None:
    """Compose every bound and choice into the config once, before any trial: a key the config
    lacks, or a value its schema refuses, stops the sweep with a line naming the key."""
    conf_dir = plan.root / configuration.CONF_DIR
    for key, space in plan.config.sweep.params.items():
        for value in probes(space):
            override = f"{key}={override_value(value)}"
            try:
                validate(configuration.compose([*plan.overrides, override], conf_dir))
            except ConfigError as error:
                raise ConfigError(f"sweep.params.{key}: {override} does not compose: {error}") from None


def probes(space: SearchSpace) -> list[Any]:
    if space.choices is not None:
        return list(space.choices)
    return [space.low, space.high]


def suggest(trial, params: dict[str, SearchSpace]) -> dict[str, Any]:
    """The trial's value for each key, as the config takes it."""
    values = {}
    for key, space in params.items():
        if space.choices is not None:
            # Optuna stores scalars only: a list choice ([256, 128]) travels as its override text.
            encoded = {encode_choice(choice): choice for choice in space.choices}
            values[key] = encoded[trial.suggest_categorical(key, list(encoded))]
        elif isinstance(space.low, int) and isinstance(space.high, int):
            values[key] = trial.suggest_int(key, space.low, space.high, log=space.log)
        else:
            value = trial.suggest_float(key, float(space.low), float(space.high), log=space.log)
            # DVC reads and rewrites params.yaml and dvc.lock with ruamel.yaml, which changes the last
            # digit of some floats written with 16 (1.902357760267601e-05 comes back ...600e-05): the
            # lock then disagrees with params.yaml and a clone re-runs the stage. 6 digits survive.
            values[key] = float(f"{value:.{FLOAT_DIGITS}g}")
    return values


def encode_choice(choice: Any) -> Any:
    if choice is None or isinstance(choice, bool | int | float | str):
        return choice
    return override_value(choice)


def shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else override_value(value).strip("'")


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


def run_trial(plan: Plan, study, stop: "Stop") -> Outcome:
    """Ask, run the experiment, tell; tag its MLflow run; push it."""
    from optuna.trial import TrialState

    trial = study.ask()
    name = f"sweep-{plan.study}-{trial.number}"
    trial.set_user_attr("dvc.exp_name", name)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    values = suggest(trial, plan.config.sweep.params)
    params = " ".join(f"{key}={shown(value)}" for key, value in values.items())
    started = time.monotonic()
    outcome = run_experiment(plan, trial, name, values, stop)
    run_id = tag_mlflow_run(plan, name, trial.number, outcome.state)
    if run_id:
        trial.set_user_attr("mlflow.run_id", run_id)
    if outcome.state == "COMPLETE":
        study.tell(trial, outcome.value)
    else:
        study.tell(trial, state=TrialState[outcome.state])
    if outcome.state == "COMPLETE" and plan.remote:
        outcome = push(plan, name, outcome)
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


def run_experiment(plan: Plan, trial, name: str, values: dict[str, Any], stop: "Stop") -> Outcome:
    """`dvc exp run --temp` with the trial's params; the metric from its metrics/train.json."""
    overrides = [*plan.overrides, *(f"{k}={override_value(v)}" for k, v in values.items())]
    try:  # a combination the schema refuses (a CNN's hidden as a list) fails here, in a second
        validate(configuration.compose(overrides, plan.root / configuration.CONF_DIR))
    except ConfigError as error:
        return Outcome("FAIL", note=str(error))
    baseline = git(plan.root, "rev-parse", "HEAD")
    log = plan.root / LOG_DIR / f"{name}.log"
    command = [dvc_executable(), "exp", "run", "--temp", "-n", name]
    for override in overrides:
        command += ["-S", override]
    reporter = epoch_reporter(trial, plan.config.sweep.metric)
    code, pruned_at = run_logged(command, plan.root, log, reporter, stop)
    if pruned_at is not None:
        return Outcome("PRUNED", note=f"at epoch {pruned_at}")
    ref = experiment_ref(plan.root, name, baseline)
    if code or ref is None:
        why = "interrupted, the experiment stopped" if stop.requested else last_error(log)
        return Outcome("FAIL", note=f"{why} (log: {log.relative_to(plan.root)})")
    metrics = json.loads(git(plan.root, "show", f"{ref}:metrics/train.json") or "{}")
    value = metrics.get(plan.config.sweep.metric)
    if not isinstance(value, int | float) or math.isnan(value):
        return Outcome("FAIL", note=f"metrics/train.json of {name} has {plan.config.sweep.metric}={value!r}")
    return Outcome("COMPLETE", float(value))


def dvc_executable() -> str:
    beside = Path(sys.executable).parent / "dvc"  # the venv's, when imgclf runs from it
    return str(beside) if beside.is_file() else "dvc"


def epoch_reporter(trial, metric: str) -> Callable[[int, dict[str, float]], bool]:
    """Report the metric of the best epoch so far (lowest val_loss, as metrics/train.json picks
    it) at each epoch; True when the pruner would stop the trial."""
    best_loss = math.inf
    value = None

    def report(epoch: int, metrics: dict[str, float]) -> bool:
        nonlocal best_loss, value
        if "val_loss" not in metrics or metric not in metrics:
            return False
        if metrics["val_loss"] < best_loss or value is None:
            best_loss, value = metrics["val_loss"], metrics[metric]
        trial.report(value, epoch)
        return trial.should_prune()

    return report


def run_logged(command: list[str], root: Path, log: Path, on_epoch, stop: "Stop") -> tuple[int, int | None]:
    """Run `command` in its own process group, its output into `log`. Its exit code, and the epoch
    it was stopped at when `on_epoch` said so (else None)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as out:
        process = subprocess.Popen(
            command,
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a terminal's Ctrl-C reaches the sweep only: `Stop` passes it on
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
        with stop.watching(process):
            for line in process.stdout:
                out.write(line)
                match = EPOCH_LINE.match(line)
                if match and not stop.requested:
                    metrics = {key: float(value) for key, value in METRIC_PAIR.findall(match[2])}
                    if on_epoch(int(match[1]), metrics):
                        out.write(end_early(process))
                        return process.returncode, int(match[1])
            return process.wait(), None


def end_early(process: subprocess.Popen) -> str:
    """SIGINT to the experiment's process group, as Ctrl-C would: the stage ends its MLflow run as
    KILLED and DVC removes its temporary copy. SIGKILL if that takes too long. Its remaining output."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        rest, _ = process.communicate(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        rest, _ = process.communicate()
    return rest or ""


class Stop:
    """Ctrl-C (SIGINT) or SIGTERM during a sweep: the running experiment gets SIGINT, as Ctrl-C
    in its own terminal would (a second signal: SIGKILL); its trial is told FAIL; no trial starts
    after it. A flag, not an exception: nothing is cut short inside a database call."""

    def __init__(self) -> None:
        self.signals = 0
        self.process: subprocess.Popen | None = None

    @property
    def requested(self) -> bool:
        return self.signals > 0

    def __call__(self, signum, frame) -> None:
        self.signals += 1
        self.pass_on()

    def pass_on(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGINT if self.signals == 1 else signal.SIGKILL)

    @contextmanager
    def watching(self, process: subprocess.Popen) -> Iterator[None]:
        self.process = process
        if self.requested:  # the signal came while the trial was being set up
            self.pass_on()
        try:
            yield
        finally:
            self.process = None


@contextmanager
def stop_on_signals() -> Iterator[Stop]:
    stop = Stop()
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def last_error(log: Path) -> str:
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    errors = [line for line in lines if line.startswith(("ERROR", "imgclf: error"))]
    return (errors or lines or ["no output"])[-1][:300]


def experiment_ref(root: Path, name: str, baseline: str | None = None) -> str | None:
    """The git ref of experiment `name` (refs/exps/<baseline[:2]>/<baseline[2:]>/<name>); None if
    there is none here."""
    if baseline:
        ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"
        return ref if git(root, "rev-parse", "--verify", "--quiet", ref, check=False) else None
    refs = git(root, "for-each-ref", "--format=%(refname)", "refs/exps/", check=False).split()
    return next((ref for ref in refs if ref.rsplit("/", 1)[-1] == name), None)


# --- MLflow and the git remote -----------------------------------------------------------------


def tag_mlflow_run(plan: Plan, name: str, number: int, state: str) -> str | None:
    """Tag the pipeline's MLflow run of experiment `name` (found by its dvc.exp_name tag) with the
    study and trial; its id, or None when the trial made no run (it failed before training, or
    DVC's run cache restored the outputs of an identical earlier run)."""
    from imgclf.tracking import client as tracking

    client = tracking.client(plan.config)
    experiment = client.get_experiment_by_name(plan.config.tracking.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`dvc.exp_name` = '{name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run_id = runs[0].info.run_id
    tags = {
        "optuna.study": plan.study,
        "optuna.trial": str(number),
        "optuna.state": state,
        "dvc.exp_name": name,
    }
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return run_id


def push(plan: Plan, name: str, outcome: Outcome) -> Outcome:
    done = subprocess.run(
        [dvc_executable(), "exp", "push", plan.remote, name], cwd=plan.root, capture_output=True, text=True
    )
    if done.returncode:
        reason = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [f"exit {done.returncode}"]
        return Outcome(outcome.state, outcome.value, f"push failed: {reason[0]}")
    return Outcome(outcome.state, outcome.value, f"pushed to {plan.remote}")
