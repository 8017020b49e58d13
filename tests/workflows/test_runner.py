"""The local workflow runner itself: what it evaluates, what it refuses, how jobs pass results on.

Fast (no MLflow, no pipeline): the workflows here are written for the test, in a bare git repo.
"""

import hashlib
import subprocess
import sys

import pytest

from tests.workflows.runner import (
    Contexts,
    WorkflowError,
    condition,
    evaluate,
    interpolate,
    parse_command_file,
    run_workflow,
)

GITHUB = {
    "event_name": "push",
    "sha": "0" * 40,
    "ref": "refs/heads/main",
    "actor": "someone",
    "repository": "local/repo",
    "run_id": "1",
    "server_url": "https://github.invalid",
    "base_ref": "",
}


def contexts(**overrides) -> Contexts:
    values = {
        "github": GITHUB,
        "inputs": {"action": None},
        "vars": {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5001"},
        "needs": {"challenger": {"outputs": {"passed": "true", "version": "3"}, "result": "success"}},
    }
    return Contexts(**(values | overrides))


def test_expressions_of_the_workflows_evaluate_as_on_github():
    assert evaluate("needs.challenger.outputs.passed == 'true'", contexts()) is True
    assert evaluate("needs.challenger.outputs.passed == 'TRUE'", contexts()) is True  # case-blind
    assert evaluate("needs.challenger.outputs.missing", contexts()) == ""
    # On a push, a dispatch input is null, never equal to a word.
    assert (
        evaluate("github.event_name == 'workflow_dispatch' && inputs.action == 'rollback'", contexts())
        is False
    )
    assert evaluate("!(github.event_name != 'push') || false", contexts()) is True
    assert evaluate("vars.UNSET", contexts()) == ""
    assert interpolate("v${{ needs.challenger.outputs.version }}-${{ github.sha }}", contexts()) == (
        f"v3-{GITHUB['sha']}"
    )


@pytest.mark.parametrize(
    "expression",
    [
        "contains(github.ref, 'main')",  # a function it does not implement
        "github.event.pull_request.title",  # a github property it does not know
        "github['ref']",  # index syntax
        "runner.os == 'Linux'",  # a context it does not provide
        "needs.other.outputs.passed",  # a job that is not needed
        "secrets.TOKEN",  # secrets are not available in this place
        "needs.challenger.outputs.version == 3",  # GitHub would coerce to numbers
        "inputs.undeclared",
        "github.ref < 'b'",
        "github.event_name ==",
    ],
)
def test_expressions_it_does_not_understand_are_refused(expression):
    with pytest.raises(WorkflowError):
        evaluate(expression, contexts())


def test_if_conditions():
    failed = contexts(success=False, failure=True)
    assert condition(None, contexts()) and not condition(None, failed)  # default success()
    # Without a status function, `success() &&` is implied: a failed need skips the job.
    assert not condition("needs.challenger.outputs.passed == 'true'", failed)
    assert condition("${{ always() }}", failed) and condition("failure()", failed)
    with pytest.raises(WorkflowError, match="always true"):
        condition("${{ github.event_name == 'pull_request' }} && true", contexts())


def test_output_files_name_value_and_heredoc_lines():
    text = "version=3\nurl=http://x/?a=b\n\nsummary<<EOF\n| a | b |\nline = two\nEOF\nchampion=none\n"
    assert parse_command_file(text) == {
        "version": "3",
        "url": "http://x/?a=b",
        "summary": "| a | b |\nline = two",
        "champion": "none",
    }
    with pytest.raises(WorkflowError, match="closing"):
        parse_command_file("summary<<EOF\nno end\n")
    with pytest.raises(WorkflowError):
        parse_command_file("just words\n")


def git_repo(folder):
    folder.mkdir()
    for args in (["init", "-q", "-b", "main"], ["commit", "-q", "--allow-empty", "-m", "start"]):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", *args], cwd=folder, check=True
        )
    return folder


WORKFLOW = """
name: test
on:
  push:
    branches: [main]
  workflow_dispatch:
    inputs:
      reason: {type: string, required: true}
permissions: {}
env:
  WHO: ${{ github.actor }}
jobs:
  first:
    runs-on: ubuntu-24.04
    outputs:
      note: ${{ steps.write.outputs.note }}
      after: ${{ steps.after.outputs.x }}
    steps:
      - id: write
        run: |
          printf 'note<<END\\nby %s\\non %s\\nEND\\n' "$WHO" "$GITHUB_EVENT_NAME" >> "$GITHUB_OUTPUT"
          echo "FROM_ENV_FILE=yes" >> "$GITHUB_ENV"
          echo "| gate | pass |" >> "$GITHUB_STEP_SUMMARY"
      - run: test "$FROM_ENV_FILE" = yes && test "$CI" = true && exit "$FAIL"
        env:
          FAIL: ${{ vars.FAIL }}
      - id: after
        run: echo "x=ran" >> "$GITHUB_OUTPUT"
      - if: failure()
        run: echo "cleaning up"
  second:
    needs: first
    runs-on: ubuntu-24.04
    steps:
      - run: test "$NOTE" = "$(printf 'by someone\\non push')"
        env:
          NOTE: ${{ needs.first.outputs.note }}
  approval:
    needs: first
    if: always()
    environment: production
    runs-on: ubuntu-24.04
    steps:
      - run: echo approved
"""


def test_jobs_pass_outputs_and_a_failing_step_skips_the_rest(tmp_path):
    source = git_repo(tmp_path / "source")
    path = tmp_path / "test.yml"
    path.write_text(WORKFLOW)

    run = run_workflow(path, source, "push", tmp_path / "runs", vars={"FAIL": "0"}, actor="someone")
    assert {job: result.result for job, result in run.jobs.items()} == {
        "first": "success",
        "second": "success",
        "approval": "waiting",  # nobody approved `production`
    }
    assert run.jobs["first"].outputs == {"note": "by someone\non push", "after": "ran"}
    assert run.jobs["first"].summary == "| gate | pass |\n"

    run = run_workflow(
        path, source, "push", tmp_path / "runs", vars={"FAIL": "1"}, environments=("production",)
    )
    first = run.jobs["first"]
    assert first.result == "failure"
    assert [step.outcome for step in first.steps] == ["success", "failure", "skipped", "success"]
    assert first.outputs == {"note": "by imgclf-tests\non push", "after": ""}  # outputs of steps that ran
    assert run.result("second") == "skipped"  # needs a failed job
    assert run.result("approval") == "success"  # if: always(), and approved


def test_what_the_runner_refuses(tmp_path):
    source = git_repo(tmp_path / "source")
    path = tmp_path / "test.yml"
    cases = {
        "run: echo ${{ github.actor }}": "template injection",
        "uses: someone/action@" + "a" * 40: "not one this runner",
        "uses: actions/checkout@v7": "full commit SHA",
        "shell: sh\n        run: true": "run/uses",
    }
    for step, message in cases.items():
        path.write_text(f"on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n      - {step}\n")
        with pytest.raises(WorkflowError, match=message):
            run_workflow(path, source, "push", tmp_path / "runs")
    path.write_text(WORKFLOW)
    with pytest.raises(WorkflowError, match="reason is required"):
        run_workflow(path, source, "workflow_dispatch", tmp_path / "runs")
    with pytest.raises(WorkflowError, match="unsupported event"):
        run_workflow(path, source, "release", tmp_path / "runs")
    with pytest.raises(WorkflowError, match="does not run on pull_request"):
        run_workflow(path, source, "pull_request", tmp_path / "runs", base="main")


CHECKOUT = """
on: push
jobs:
  a:
    runs-on: ubuntu-24.04
    steps:
      - uses: actions/checkout@3d3c42e5aac5ba805825da76410c181273ba90b1
      - uses: actions/setup-python@5fda3b95a4ea91299a34e894583c3862153e4b97
        with:
          python-version: "{version}"
      - run: python -c "import imgclf, sys; print(imgclf.__file__)" > imported
      - run: make -q install
"""


def test_checkout_and_setup_python_make_install_a_no_op_on_the_jobs_own_code(tmp_path):
    """The stand-ins leave a fresh clone whose `make install` does nothing (it would otherwise
    rebuild the tests' own venv through the link) and whose `imgclf` is the clone's code."""
    from bench.common import copy_repo

    source = copy_repo(tmp_path / "source")
    path = tmp_path / "test.yml"
    path.write_text(CHECKOUT.format(version=f"{sys.version_info.major}.{sys.version_info.minor}"))
    run = run_workflow(path, source, "push", tmp_path / "runs")
    job = run.jobs["a"]
    assert job.result == "success", job.log()
    assert (job.workdir / "imported").read_text().strip() == str(
        job.workdir / "src" / "imgclf" / "__init__.py"
    )

    path.write_text(CHECKOUT.format(version="3.10"))
    with pytest.raises(WorkflowError, match="python-version"):
        run_workflow(path, source, "push", tmp_path / "runs")


CACHE = """
on: [push, pull_request]
jobs:
  build:
    runs-on: ubuntu-24.04
    steps:
      - uses: actions/checkout@3d3c42e5aac5ba805825da76410c181273ba90b1
      - id: cache
        uses: actions/cache@27d5ce7f107fe9357f9df03efb73ab90386fccae
        with:
          path: .cache/stages
          key: stages-${{ hashFiles('input.txt', 'absent.txt') }}
          restore-keys: |
            stages-
      - id: build
        run: |
          mkdir -p .cache/stages
          echo "restored=$(ls .cache/stages | tr '\\n' ' ')" >> "$GITHUB_OUTPUT"
          cp input.txt ".cache/stages/$(cat input.txt)"
      - run: exit "$FAIL"
        env:
          FAIL: ${{ vars.FAIL }}
"""


def commit_input(source, word: str, branch: str = "main") -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid"]
    if subprocess.run([*git, "checkout", "-q", branch], cwd=source, capture_output=True).returncode:
        subprocess.run([*git, "checkout", "-q", "-b", branch], cwd=source, check=True)
    (source / "input.txt").write_text(word)
    subprocess.run([*git, "add", "input.txt"], cwd=source, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", word], cwd=source, check=True)


def test_the_cache_restores_by_key_and_prefix_saves_after_success_and_keeps_refs_apart(tmp_path):
    """actions/cache as GitHub runs it: restored before the next steps (the key exactly, else the
    newest entry that starts with a restore key), saved in the post step of a successful job that
    did not hit its key, and a pull request's save never restored on main."""
    source = git_repo(tmp_path / "source")
    path = tmp_path / "test.yml"
    path.write_text(CACHE)
    cache = tmp_path / "cache"

    def build(word: str, event: str = "push", fail: str = "0", branch: str = "main") -> tuple[str, str]:
        if word:
            commit_input(source, word, branch)
        base = "main" if event == "pull_request" else None
        run = run_workflow(
            path, source, event, tmp_path / "runs", vars={"FAIL": fail}, base=base, cache=cache
        )  # fmt: skip
        job = run.jobs["build"]
        assert job.result == ("success" if fail == "0" else "failure"), job.log()
        return job.step("cache").outputs.get("cache-hit", "unset"), job.step("build").outputs.get("restored")

    assert build("a") == ("unset", "")  # a miss leaves cache-hit unset, as the action does
    assert build("") == ("true", "a ")  # the same key: restored, and not saved again
    assert build("b") == ("false", "a ")  # a restore key: the newest entry; then saved under b's key
    assert build("c", fail="1") == ("false", "a b ")  # the post step skipped: nothing saved
    assert build("") == ("false", "a b ")
    assert build("d", "pull_request", branch="feature") == ("false", "a b c ")  # main's, saved in its ref
    assert build("", "pull_request", branch="feature") == ("true", "a b c d ")  # its own ref's
    assert build("d") == ("false", "a b c ")  # main, its input as merged: the pull request's save is not seen


SPLIT_CACHE = """
on: push
jobs:
  build:
    runs-on: ubuntu-24.04
    steps:
      - uses: actions/checkout@3d3c42e5aac5ba805825da76410c181273ba90b1
      - id: restore
        uses: actions/cache/restore@27d5ce7f107fe9357f9df03efb73ab90386fccae
        with:
          path: .cache
          key: k-${{ hashFiles('input.txt') }}
          restore-keys: k-
      - run: mkdir -p .cache && cp input.txt ".cache/$(cat input.txt)"
      - if: vars.SAVE == 'yes'
        uses: actions/cache/save@27d5ce7f107fe9357f9df03efb73ab90386fccae
        with:
          path: .cache
          key: ${{ steps.restore.outputs.cache-primary-key }}
"""


def test_the_restore_half_never_saves_and_the_save_half_saves_where_it_is_used(tmp_path):
    source = git_repo(tmp_path / "source")
    path = tmp_path / "test.yml"
    path.write_text(SPLIT_CACHE)

    def build(word: str, save: str) -> dict[str, str]:
        commit_input(source, word)
        run = run_workflow(path, source, "push", tmp_path / "runs", vars={"SAVE": save})
        assert run.jobs["build"].result == "success", run.jobs["build"].log()
        return run.jobs["build"].step("restore").outputs

    key = "k-" + hashlib.sha256(hashlib.sha256(b"a").digest()).hexdigest()
    assert build("a", save="no") == {"cache-primary-key": key}  # restored nothing, saved nothing
    assert build("a", save="no") == {"cache-primary-key": key}
    build("a", save="yes")
    assert build("b", save="no")["cache-matched-key"] == key


def test_the_cache_refuses_what_it_does_not_implement(tmp_path):
    source = git_repo(tmp_path / "source")
    path = tmp_path / "test.yml"
    step = "      - uses: actions/cache@27d5ce7f107fe9357f9df03efb73ab90386fccae\n        with:\n"
    cases = {
        "          path: .cache\n          key: k\n          lookup-only: true\n": "unsupported inputs",
        "          path: /tmp/x\n          key: k\n": "only one path",
        "          path: |\n            a\n            b\n          key: k\n": "only one path",
        "          path: .cache\n          key: k-${{ hashFiles('!a') }}\n": "hashFiles",
        "          path: .cache\n          key: a,b\n": "comma",
    }
    for inputs, message in cases.items():
        path.write_text(f"on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n{step}{inputs}")
        with pytest.raises(WorkflowError, match=message):
            run_workflow(path, source, "push", tmp_path / "runs")
    path.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    if: hashFiles('a') == ''\n"
                    "    steps:\n      - run: true\n")  # fmt: skip
    with pytest.raises(WorkflowError, match="not available here"):
        run_workflow(path, source, "push", tmp_path / "runs")
