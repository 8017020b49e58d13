"""What a trial leaves for the other workers and clones: its MLflow run tagged with the study and
trial, its experiment pushed to the git remote (`dvc exp push`: the ref, and the outputs to the
default DVC remote of the experiment's commit)."""

import re
import subprocess
from pathlib import Path

from imgclf.config.operations import Config
from imgclf.errors import ConfigError
from imgclf.sweep.trials import dvc_executable, git


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


def tag_mlflow_run(config: Config, name: str, tags: dict[str, str]) -> str | None:
    """Tag the pipeline's MLflow run of experiment `name` (found by its dvc.exp_name tag) with
    `tags`; its id, or None when the trial made no run (it failed before training, or DVC's run
    cache restored the outputs of an identical earlier run)."""
    from imgclf.tracking import client as tracking

    client = tracking.client(config)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
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
    for key, value in {**tags, "dvc.exp_name": name}.items():
        client.set_tag(run_id, key, value)
    return run_id


def push(root: Path, remote: str, name: str) -> str | None:
    """`dvc exp push REMOTE NAME`; None when done, else why not in one line."""
    done = subprocess.run(
        [dvc_executable(), "exp", "push", remote, name], cwd=root, capture_output=True, text=True
    )
    if not done.returncode:
        return None
    reason = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
    return reason[0] if reason else f"exit {done.returncode}"
