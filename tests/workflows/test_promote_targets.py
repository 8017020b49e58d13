"""The make targets that promote.yml runs, run for real in the workflow's order with the
environment its steps give them, against a real `mlflow server` as vars.MLFLOW_TRACKING_URI.

What GitHub does between steps (a job's `outputs:`, the champion job's `if:`, the `production`
approval) is checked on the YAML by test_contract.py; here a step's inputs are the $GITHUB_OUTPUT
lines of the step before, which is what those expressions pass on.

A push registers the pipeline's model, gates it (`challenger`) and, approved, makes it `champion`.
The same model pushed again registers nothing and asks for no approval. A pull request with
another model gets the gates' dry run and a metrics diff (ci.yml); merged, it becomes champion and
the first one `previous`. A rollback moves champion back.
"""

import itertools
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tool_env
from tests.conftest import run as run_tool
from tests.support.repo import git_commit

WORKFLOWS = REPO / ".github" / "workflows"
GATE_ROW = re.compile(r"^\| .+ \| (pass|n/a|\*\*FAIL\*\*) \|$", re.MULTILINE)
# Another model, quick to train; the test is about the aliases, not about which model is better,
# so the gates accept a slightly worse one.
FEWER_EPOCHS = ["train.max_epochs=10", "promote.min_improvement=-0.05", "promote.max_class_recall_drop=0.2"]
SERVER_URL, REPOSITORY = "https://github.invalid", "local/repo"
RUN_IDS = itertools.count(1000)


def step_env(workflow: str, job: str, target: str) -> dict[str, str]:
    """The `env:` of the step `make TARGET` in JOB, as written (its expressions unevaluated)."""
    steps = yaml.safe_load((WORKFLOWS / workflow).read_text(encoding="utf-8"))["jobs"][job]["steps"]
    return next(step.get("env", {}) for step in steps if step.get("run") == f"make {target}")


@dataclass
class Step:
    code: int
    outputs: dict[str, str]  # what it wrote to $GITHUB_OUTPUT
    summary: str  # what it wrote to $GITHUB_STEP_SUMMARY
    log: str


class Job:
    """One job's steps in a repo: each `make TARGET` with the job's environment and a step's own."""

    def __init__(self, root: Path, actor: str, tracking_uri: str | None):
        self.root, self.run_id = root, str(next(RUN_IDS))
        sha = run_tool(["git", "rev-parse", "HEAD"], root).stdout.strip()
        self.env = tool_env(root) | {
            "GITHUB_ACTIONS": "true", "GITHUB_ACTOR": actor, "GITHUB_SHA": sha, "GITHUB_RUN_ID": self.run_id,
            "GITHUB_SERVER_URL": SERVER_URL, "GITHUB_REPOSITORY": REPOSITORY,
        }  # fmt: skip
        if tracking_uri:
            self.env["MLFLOW_TRACKING_URI"] = tracking_uri
        self.steps = 0

    def make(self, target: str, expect: int = 0, **env: str) -> Step:
        """`make TARGET`, `make install` taken as done (this venv); it must exit `expect`."""
        self.steps += 1
        files = self.root.parent / f"run-{self.run_id}-step-{self.steps}"
        files.mkdir()
        output, summary = files / "output", files / "summary"
        output.touch()
        summary.touch()
        step_env = {"GITHUB_OUTPUT": str(output), "GITHUB_STEP_SUMMARY": str(summary), **env}
        done = subprocess.run(
            ["make", "-o", "install", target], cwd=self.root, env=self.env | step_env,
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        log = done.stdout + done.stderr
        assert done.returncode == expect, f"make {target} exited {done.returncode}:\n{log[-6000:]}"
        lines = output.read_text(encoding="utf-8").splitlines()
        return Step(done.returncode, dict(line.split("=", 1) for line in lines), summary.read_text(), log)

    def push(self) -> tuple[Step, Step]:
        """promote.yml's challenger job after its checkout and cache: run, register, challenger."""
        self.make("run")
        return self.make("register"), self.make("challenger")

    def champion(self, challenger: dict[str, str], expect: int = 0) -> Step:
        """promote.yml's champion job, given the challenger job's outputs."""
        assert step_env("promote.yml", "champion", "champion") == {
            "VERSION": "${{ needs.challenger.outputs.version }}",
            "EXPECT_CHAMPION": "${{ needs.challenger.outputs.champion }}",
            "REASON": "approved in production for commit ${{ github.sha }}",
        }
        return self.make(
            "champion", expect, VERSION=challenger["version"], EXPECT_CHAMPION=challenger["champion"],
            REASON=f"approved in production for commit {self.env['GITHUB_SHA']}",
        )  # fmt: skip


@pytest.mark.e2e
@pytest.mark.slow
def test_push_approve_push_again_new_version_and_rollback(mlflow_server, evaluated_pipeline, tmp_path):
    from mlflow.tracking import MlflowClient

    root = tmp_path / "repo"
    shutil.copytree(evaluated_pipeline[0], root, symlinks=True)
    name = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))["registry"]["model_name"]
    client = MlflowClient(tracking_uri=mlflow_server)

    def aliases() -> dict[str, str]:
        return dict(client.get_registered_model(name).aliases)

    def versions() -> list[str]:
        return sorted(v.version for v in client.search_model_versions(f"name = '{name}'"))

    # A push: the pipeline's model becomes a version, passes its gates and, approved, champion.
    job = Job(root, "pusher", mlflow_server)
    register, challenger = job.push()
    first = register.outputs["version"]
    assert register.outputs == {"version": first, "created": "true"}
    assert challenger.outputs == {"version": first, "champion": "none", "passed": "true", "approve": "true"}
    assert GATE_ROW.search(challenger.summary), challenger.summary
    assert aliases() == {"challenger": first}
    champion = job.champion(challenger.outputs)
    assert champion.outputs == {"version": first, "champion": "none", "passed": "true", "approve": "false"}
    assert versions() == [first]
    assert aliases() == {"champion": first}  # approving it removed `challenger`
    tags = client.get_model_version(name, first).tags
    assert tags["imgclf.champion.by"] == "pusher"
    assert tags["imgclf.champion.reason"] == f"approved in production for commit {job.env['GITHUB_SHA']}"
    assert tags["imgclf.champion.ci_run"] == f"{SERVER_URL}/{REPOSITORY}/actions/runs/{job.run_id}"

    # The same model again: nothing new, and no approval to ask for (the champion job's `if:`).
    register, challenger = Job(root, "pusher", mlflow_server).push()
    assert register.outputs == {"version": first, "created": "false"}
    assert challenger.outputs["approve"] == "false"
    assert (versions(), aliases()) == ([first], {"champion": first})

    # A pull request with another model (ci.yml's pipeline job: the runner's own store, no champion).
    run_tool(["git", "switch", "--quiet", "-c", "fewer-epochs"], root)
    run_tool(["imgclf", "params", *FEWER_EPOCHS], root)
    git_commit(root, "fewer epochs")
    pull_request = Job(root, "contributor", None)
    pull_request.make("run")
    gate = pull_request.make("gate")
    assert f"models/model.onnx (not registered) of {name} against the champion (none)" in gate.summary
    assert GATE_ROW.search(gate.summary), gate.summary
    assert step_env("ci.yml", "pipeline", "metrics-diff") == {"BASE": "origin/${{ github.base_ref }}"}
    diff = pull_request.make("metrics-diff", BASE="main").summary
    assert "### Metrics against main" in diff, diff
    assert re.search(r"^\| metrics/eval\.json\s+\| accuracy\s+\|", diff, re.MULTILINE), diff

    # Merged: a new version, gated against the champion, becomes champion; the old one `previous`.
    job = Job(root, "pusher", mlflow_server)
    register, challenger = job.push()
    second = register.outputs["version"]
    assert register.outputs == {"version": second, "created": "true"}
    assert challenger.outputs == {"version": second, "champion": first, "passed": "true", "approve": "true"}
    job.champion(challenger.outputs)
    assert versions() == sorted([first, second])
    assert aliases() == {"champion": second, "previous": first}

    # The same approval run again, once the champion has moved: exit 3 (make says Error 3), no move.
    again = job.champion(challenger.outputs, expect=2)
    assert f"the champion moved: expected version {first}, found version {second}" in again.log, again.log
    assert "Error 3" in again.log, again.log
    assert aliases() == {"champion": second, "previous": first}

    # A dispatched rollback, with the workflow's default `to` (previous) and a reason.
    assert step_env("promote.yml", "rollback", "rollback") == {
        "TO": "${{ inputs.to }}",
        "REASON": "${{ inputs.reason }}",
    }
    reason = "version 2 misreads sevens"
    rollback = Job(root, "oncall", mlflow_server).make("rollback", TO="previous", REASON=reason)
    assert aliases() == {"champion": first, "previous": second}
    tags = client.get_model_version(name, first).tags
    assert (tags["imgclf.champion.by"], tags["imgclf.champion.reason"]) == ("oncall", reason)
    assert reason in rollback.summary, rollback.summary


def test_the_approval_and_rollback_targets_refuse_to_run_without_their_inputs(tmp_path):
    """No server needed: the targets check their environment before calling imgclf (exit 2)."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "Makefile", root / "Makefile")
    git_commit(root, "the Makefile alone")
    job = Job(root, "oncall", "http://127.0.0.1:9")  # a port nothing listens on: never reached
    assert "make champion: set VERSION" in job.make("champion", expect=2).log
    assert "make rollback: set REASON" in job.make("rollback", expect=2).log
