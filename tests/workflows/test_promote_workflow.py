"""promote.yml, run for real: its jobs run here (tests/workflows/runner.py), each in a fresh clone
of a copy of this repo, against a real `mlflow server` as vars.MLFLOW_TRACKING_URI.

A push registers the pipeline's model, gates it and makes it `challenger`; the approved champion
job makes it `champion`. A push that changes no model registers nothing and asks for no
approval. A push with another model moves `previous`; a dispatched rollback moves `champion`
back, and only once `production` approves it.

The runs share one Actions cache, as a repository's do: a push restores the DVC cache that the
push before saved, and the pull request restores main's, so the stages that DVC's run cache holds
do not run again. Each test also passes alone, from a cold cache (slower).
"""

import re

import pytest
import yaml

from bench.common import copy_repo, git_commit
from tests.conftest import run as run_tool
from tests.workflows.runner import JobResult, Run, StepResult, run_workflow

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

APPROVED = ("registry", "production")  # the environments whose reviewers said yes
# Another model, quick to train; the pull request trains the same one as the third push, so after
# that push it can restore its stages from the cache.
FEWER_EPOCHS = "train.max_epochs=10"
GATE_ROW = re.compile(r"^\| .+ \| (pass|n/a|\*\*FAIL\*\*) \|$", re.MULTILINE)


def results(run: Run) -> dict[str, str]:
    return {job: result.result for job, result in run.jobs.items()}


@pytest.fixture(scope="module")
def actions_cache(tmp_path_factory):
    """The repository's Actions cache, shared by this module's runs."""
    return tmp_path_factory.mktemp("actions-cache")


def cache_step(job: JobResult) -> StepResult:
    return next(step for step in job.steps if step.name.startswith("actions/cache"))


def check(run: Run, expected: dict[str, str]) -> None:
    """The jobs ended as expected; if not, the logs of those that did not say why."""
    logs = "\n".join(
        f"=== {job}\n{run.jobs[job].log()[-6000:]}" for job in expected if run.result(job) != expected[job]
    )
    assert results(run) == expected, logs


def test_push_promotes_and_a_dispatch_rolls_back(mlflow_server, actions_cache, tmp_path):
    from mlflow.tracking import MlflowClient

    source = copy_repo(tmp_path / "repo")
    workflow = source / ".github" / "workflows" / "promote.yml"
    name = yaml.safe_load((source / "params.yaml").read_text(encoding="utf-8"))["registry"]["model_name"]
    client = MlflowClient(tracking_uri=mlflow_server)

    def push() -> Run:
        return run_workflow(
            workflow, source, "push", tmp_path / "runs",
            vars={"MLFLOW_TRACKING_URI": mlflow_server}, environments=APPROVED, actor="pusher",
            cache=actions_cache,
        )  # fmt: skip

    def aliases() -> dict[str, str]:
        return dict(client.get_registered_model(name).aliases)

    def versions() -> list[str]:
        return sorted(v.version for v in client.search_model_versions(f"name = '{name}'"))

    # A push: the pipeline's model becomes version 1, passes its gates and, approved, champion.
    run = push()
    check(run, {"challenger": "success", "champion": "success", "rollback": "skipped"})
    challenger = run.jobs["challenger"]
    first = challenger.outputs["version"]
    assert challenger.step("register").outputs == {"version": first, "created": "true"}
    assert challenger.outputs == {"version": first, "champion": "none", "passed": "true", "approve": "true"}
    assert GATE_ROW.search(challenger.summary), challenger.summary
    assert versions() == [first]
    assert aliases() == {"champion": first}  # approving it removed `challenger`
    tags = client.get_model_version(name, first).tags
    assert tags["imgclf.champion.by"] == "pusher"
    assert tags["imgclf.champion.reason"] == f"approved in production for commit {run_sha(source)}"
    assert tags["imgclf.champion.ci_run"] == f"https://github.invalid/local/repo/actions/runs/{run.run_id}"

    # The same commit again: its cache key hits, and the same model file comes back, so nothing new,
    # and no approval to ask for.
    run = push()
    check(run, {"challenger": "success", "champion": "skipped", "rollback": "skipped"})
    assert cache_step(run.jobs["challenger"]).outputs == {"cache-hit": "true"}
    assert run.jobs["challenger"].step("register").outputs == {"version": first, "created": "false"}
    assert run.jobs["challenger"].outputs["approve"] == "false"
    assert versions() == [first]
    assert aliases() == {"champion": first}

    # Another model: fewer epochs. The test is about the aliases, not about which model is better,
    # so the same commit lets the gates accept a slightly worse one.
    overrides = [FEWER_EPOCHS, "promote.min_improvement=-0.05", "promote.max_class_recall_drop=0.2"]
    run_tool(["imgclf", "params", *overrides], source)
    git_commit(source, "fewer epochs")
    run = push()
    check(run, {"challenger": "success", "champion": "success", "rollback": "skipped"})
    second = run.jobs["challenger"].outputs["version"]
    assert run.jobs["challenger"].step("register").outputs == {"version": second, "created": "true"}
    assert run.jobs["challenger"].outputs["champion"] == first
    assert versions() == sorted([first, second])
    assert aliases() == {"champion": second, "previous": first}

    # A rollback waits for `production`'s reviewers: without their approval nothing moves.
    reason = "version 2 misreads sevens"
    dispatch = {"action": "rollback", "reason": reason}
    run = run_workflow(
        workflow, source, "workflow_dispatch", tmp_path / "runs", inputs=dispatch,
        vars={"MLFLOW_TRACKING_URI": mlflow_server}, environments=("registry",), actor="oncall",
        cache=actions_cache,
    )  # fmt: skip
    check(run, {"challenger": "skipped", "champion": "skipped", "rollback": "waiting"})
    assert aliases() == {"champion": second, "previous": first}

    run = run_workflow(
        workflow, source, "workflow_dispatch", tmp_path / "runs", inputs=dispatch,
        vars={"MLFLOW_TRACKING_URI": mlflow_server}, environments=APPROVED, actor="oncall",
        cache=actions_cache,
    )  # fmt: skip
    check(run, {"challenger": "skipped", "champion": "skipped", "rollback": "success"})
    assert aliases() == {"champion": first, "previous": second}
    tags = client.get_model_version(name, first).tags
    assert (tags["imgclf.champion.by"], tags["imgclf.champion.reason"]) == ("oncall", reason)
    assert reason in run.jobs["rollback"].summary


def test_a_pull_request_runs_the_pipeline_the_gates_and_the_metrics_diff(actions_cache, tmp_path):
    """ci.yml's `pipeline` job: on a branch that changes training, a dry run of the gates (the
    runner's own store has no champion) and the metrics against the base branch, in the summary."""
    source = copy_repo(tmp_path / "repo")
    run_tool(["git", "checkout", "--quiet", "-b", "fewer-epochs"], source)
    run_tool(["imgclf", "params", FEWER_EPOCHS], source)
    git_commit(source, "fewer epochs")
    workflow = source / ".github" / "workflows" / "ci.yml"
    run = run_workflow(
        workflow, source, "pull_request", tmp_path / "runs", base="main", only=("pipeline",),
        cache=actions_cache,
    )  # fmt: skip
    check(run, {"test": "unselected", "pipeline": "success"})
    summary = run.jobs["pipeline"].summary
    assert "models/model.onnx (not registered) of imgclf against the champion (none)" in summary, summary
    assert GATE_ROW.search(summary), summary
    # dvc metrics diff --md: a row per changed metric, with the base's value and the new one.
    assert "### Metrics against origin/main" in summary, summary
    assert re.search(r"^\| metrics/eval\.json\s+\| accuracy\s+\|", summary, re.MULTILINE), summary


def run_sha(source) -> str:
    from bench.common import run

    return run(["git", "rev-parse", "HEAD"], source).strip()
