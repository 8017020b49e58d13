"""The wiring of ci.yml and promote.yml, read as YAML: what actionlint and zizmor do not know
about this repository. No expression is evaluated; each is matched as text.

Every `run:` is one existing Makefile target; every job or step output that is read is declared
and written by the imgclf command of a make target; permissions are least privilege; actions are
pinned by commit SHA; registry writes wait for `production` and never run two at a time; secrets
reach steps through `env:` only. Each rule is shown to fail on a copy with one defect put in.
"""

import argparse
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / ".github" / "workflows"
MAKEFILE = REPO / "Makefile"

MAKE_RUN = re.compile(r"make ([\w-]+)")
PINNED = re.compile(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}")
NEEDS_OUTPUT = re.compile(r"needs\.([\w-]+)\.outputs\.([\w-]+)")
STEP_OUTPUT = re.compile(r"steps\.([\w-]+)\.outputs\.([\w-]+)")
JOB_PERMISSIONS = {"contents": "read"}  # every job checks out the code; none needs more
ENVIRONMENTS = {"promote.yml": {"challenger": "registry", "champion": "production", "rollback": "production"}}
CONCURRENCY = {"promote.yml": {"group": "registry", "cancel-in-progress": False}}


def make_recipes(makefile: str) -> dict[str, str]:
    """Each target of the Makefile and its recipe (the tab-indented lines under it)."""
    recipes = {}
    for match in re.finditer(r"^([\w-]+):(?!=)[^\n]*\n((?:\t[^\n]*\n)*)", makefile, re.MULTILINE):
        recipes[match[1]] = match[2]
    return recipes


def documented_outputs(command: str) -> set[str]:
    """The output names that `imgclf COMMAND --outputs FILE` writes, as its --help lists them
    (test_promote_targets.py checks that the written file has exactly these)."""
    from imgclf.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    action = commands.choices[command]._option_string_actions.get("--outputs")
    if action is None:
        return set()
    return {item.split("=")[0].strip() for item in action.help.rsplit(": ", 1)[1].split(",")}


def strings(node, path=()):
    """(path, text) of every string in a parsed workflow."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from strings(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from strings(value, (*path, str(index)))
    elif isinstance(node, str):
        yield path, node


def step_output_problems(job_id: str, job: dict, recipes: dict[str, str]) -> list[str]:
    problems = []
    steps = {step["id"]: step for step in job.get("steps", []) if "id" in step}
    for _, text in strings(job):
        for step_id, name in STEP_OUTPUT.findall(text):
            where = f"{job_id}: steps.{step_id}.outputs.{name}"
            run = MAKE_RUN.fullmatch(steps.get(step_id, {}).get("run", "").strip())
            if step_id not in steps or not run:
                problems.append(f"{where}: no step {step_id} that runs a make target")
                continue
            recipe = recipes.get(run[1], "")
            command = re.search(r"imgclf (\w+)", recipe)
            if "$(OUTPUTS)" not in recipe or not command:
                problems.append(f"{where}: make {run[1]} writes no outputs")
            elif name not in documented_outputs(command[1]):
                problems.append(f"{where}: imgclf {command[1]} (make {run[1]}) does not write {name}")
    return problems


def problems(name: str, workflow: dict, makefile: str) -> list[str]:
    """What in `workflow` (the file `name`, parsed) breaks the contract; [] when nothing does."""
    found = []
    recipes = make_recipes(makefile)
    jobs = workflow["jobs"]
    if workflow.get("permissions") != {}:
        found.append(f"top-level permissions {workflow.get('permissions')!r}: want {{}}")
    if name in CONCURRENCY and workflow.get("concurrency") != CONCURRENCY[name]:
        found.append(f"concurrency {workflow.get('concurrency')!r}: want {CONCURRENCY[name]}")
    for path, text in strings(workflow):
        if "secrets." in text and (len(path) < 2 or path[-2] != "env"):
            found.append(f"{'.'.join(path)}: a secret outside env:")
    for job_id, job in jobs.items():
        if job.get("permissions") != JOB_PERMISSIONS:
            found.append(f"{job_id}: permissions {job.get('permissions')!r}: want {JOB_PERMISSIONS}")
        wanted = ENVIRONMENTS.get(name, {}).get(job_id)
        if wanted and job.get("environment") != wanted:
            found.append(f"{job_id}: environment {job.get('environment')!r}: want {wanted}")
        for step in job["steps"]:
            if "run" in step:
                run = MAKE_RUN.fullmatch(step["run"].strip())
                if not run:
                    found.append(f"{job_id}: run {step['run']!r} is not `make TARGET`")
                elif run[1] not in recipes:
                    found.append(f"{job_id}: run {step['run']!r}: no such Makefile target")
            if "uses" in step and not PINNED.fullmatch(step["uses"]):
                found.append(f"{job_id}: uses {step['uses']} is not pinned by a commit SHA")
        needs = job.get("needs", [])
        needs = [needs] if isinstance(needs, str) else needs
        for _, text in strings(job):
            for other, output in NEEDS_OUTPUT.findall(text):
                if other not in needs:
                    found.append(f"{job_id}: reads needs.{other} but does not need {other}")
                elif output not in jobs[other].get("outputs", {}):
                    found.append(f"{job_id}: needs.{other}.outputs.{output} is not among {other}'s outputs")
        found += step_output_problems(job_id, job, recipes)
    return found


def load(name: str, text: str | None = None) -> dict:
    return yaml.safe_load(text if text is not None else (WORKFLOWS / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["ci.yml", "promote.yml"])
def test_our_workflows_keep_the_contract(name):
    assert problems(name, load(name), MAKEFILE.read_text(encoding="utf-8")) == []


def test_the_promotion_outputs_are_read_from_the_make_targets_that_write_them():
    """Not vacuous: promote.yml passes outputs from a step to a job to the next job."""
    jobs = load("promote.yml")["jobs"]
    assert set(jobs["challenger"]["outputs"]) == {"version", "champion", "passed", "approve"}
    assert jobs["champion"]["if"] == "needs.challenger.outputs.approve == 'true'"
    assert documented_outputs("register") == {"version", "created"}


# A defect put into a copy of a workflow (the first occurrence of the text), and what must be said.
DEFECTS = {
    "a command that is not a make target": (
        "ci.yml", "- run: make test", "- run: pytest", "test: run 'pytest' is not `make TARGET`"),
    "a make target that does not exist": (
        "ci.yml", "- run: make gate", "- run: make gates", "pipeline: run 'make gates': no such"),
    "an action pinned by tag": (
        "promote.yml", "actions/checkout@3d3c42e5aac5ba805825da76410c181273ba90b1", "actions/checkout@v7",
        "challenger: uses actions/checkout@v7 is not pinned"),
    "a secret in run:": (
        "promote.yml", "- run: make pull", "- run: make pull KEY=${{ secrets.AWS_ACCESS_KEY_ID }}",
        "jobs.challenger.steps.3.run: a secret outside env:"),
    "a secret in with:": (
        "promote.yml", "persist-credentials: false", "token: ${{ secrets.DEPLOY_TOKEN }}",
        "jobs.challenger.steps.0.with.token: a secret outside env:"),
    "top-level permissions": (
        "ci.yml", "permissions: {}", "permissions:\n  contents: read", "top-level permissions"),
    "a job that may write": (
        "promote.yml", "contents: read # to check out the code", "contents: write",
        "challenger: permissions {'contents': 'write'}"),
    "an approval without production": (
        "promote.yml", "environment: production", "environment: registry",
        "champion: environment 'registry'"),
    "registry writes that cancel each other": (
        "promote.yml", "cancel-in-progress: false", "cancel-in-progress: true", "concurrency"),
    "registry writes in a group per ref": (
        "promote.yml", "group: registry", "group: registry-${{ github.ref }}", "concurrency"),
    "a job output nobody declared": (
        "promote.yml", "needs.challenger.outputs.champion }}", "needs.challenger.outputs.previous }}",
        "champion: needs.challenger.outputs.previous is not among challenger's outputs"),
    "a needs output of a job not needed": (
        "promote.yml", "    needs: challenger\n", "", "champion: reads needs.challenger but does not need"),
    "an output the command does not write": (
        "promote.yml", "steps.challenger.outputs.passed", "steps.challenger.outputs.created",
        "steps.challenger.outputs.created: imgclf promote (make challenger) does not write created"),
    "an output of a step that is not there": (
        "promote.yml", "steps.challenger.outputs.passed", "steps.gate.outputs.passed", "no step gate"),
    "an output of a target that writes none": (
        "promote.yml", "run: make challenger", "run: make gate", "make gate writes no outputs"),
}  # fmt: skip


@pytest.mark.parametrize("defect", DEFECTS)
def test_the_contract_fails_on_a_defect(defect):
    name, old, new, expected = DEFECTS[defect]
    text = (WORKFLOWS / name).read_text(encoding="utf-8")
    assert old in text
    found = problems(name, load(name, text.replace(old, new, 1)), MAKEFILE.read_text(encoding="utf-8"))
    assert any(expected in problem for problem in found), found
