"""A small local runner of GitHub Actions workflows: the jobs of .github/workflows run for real here.

GitHub runs each job on a fresh machine, in a fresh checkout, with the outputs of the jobs it
needs; this runner does the same on this machine, one job after another in `needs` order, for the
part of the workflow syntax that this repo's workflows use. Whatever it does not understand (an
expression, a context, an action, a key that would change how a job runs) it refuses with
WorkflowError instead of guessing, so a workflow that passes here does what it says on GitHub, as
far as its `run:` steps go. Permissions, concurrency and `runs-on` have nothing to act on here.
Caches (actions/cache) are kept in a folder that the runs of one test share, as a repository shares
them: scoped by ref as on GitHub, so a pull request's never reach main.
"""

import hashlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import yaml

PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
VENV = Path(sys.prefix)  # the venv running the tests (.venv of the checkout that installed it)
VENV_REPO = VENV.parent
# The artifacts of `make install` that a job reuses, as after actions/setup-python and a cached
# install: the venv (linked) and the plots page that `npm ci` builds (copied).
PLOTS_PAGE = ".dvc/plots/index.html"
# What `make install` rebuilds from; a clone's copies get the mtimes of the files the venv was
# installed from when their contents are equal (a cache keyed on them would hit), since a fresh
# clone's files are newer than .venv/.installed and make would rebuild the real venv through the link.
INSTALL_INPUTS = ("requirements.lock", "pyproject.toml", ".dvc/plots/package-lock.json")

GITHUB_KEYS = {"event_name", "sha", "ref", "actor", "repository", "run_id", "server_url", "base_ref"}
STATUS_FUNCTIONS = {"success", "failure", "always", "cancelled"}
FUNCTIONS = STATUS_FUNCTIONS | {"hashFiles"}
WORKFLOW_KEYS = {"name", "on", "permissions", "concurrency", "env", "jobs"}
JOB_KEYS = {"name", "runs-on", "timeout-minutes", "permissions", "environment", "concurrency",
            "outputs", "needs", "if", "env", "steps"}  # fmt: skip
STEP_KEYS = {"name", "id", "uses", "with", "run", "env", "if"}
CHECKOUT_INPUTS = {"persist-credentials", "fetch-depth"}
SETUP_PYTHON_INPUTS = {"python-version"}
# actions/cache and its two halves; fail-on-cache-miss, lookup-only and the rest are refused.
CACHE_INPUTS = {
    "actions/cache": {"path", "key", "restore-keys"},
    "actions/cache/restore": {"path", "key", "restore-keys"},
    "actions/cache/save": {"path", "key"},
}
DEFAULT_BRANCH = "main"  # the repository's: every run may restore the caches saved on it
DEFAULT_TIMEOUT_MINUTES = 360  # GitHub's
RUN_IDS = itertools.count(int(time.time()) % 10**6 * 1000)


class WorkflowError(Exception):
    """The workflow uses something this runner does not understand (never a failing step)."""


# --- expressions: ${{ ... }} --------------------------------------------------------------------

TOKEN = re.compile(
    r"\s*(?:(?P<string>'(?:[^']|'')*')|(?P<number>\d+(?:\.\d+)?)"
    r"|(?P<op>==|!=|&&|\|\||[!().,])|(?P<name>[A-Za-z_][A-Za-z0-9_-]*))"
)
LITERALS = {"true": True, "false": False, "null": None}


def tokenize(expression: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    expression = expression.rstrip()
    while position < len(expression):
        match = TOKEN.match(expression, position)
        if not match:
            raise WorkflowError(f"cannot read expression {expression!r} at {expression[position:]!r}")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


class Parser:
    """Recursive descent over literals, context paths, `!`, `==`, `!=`, `&&`, `||`, parentheses, the
    status functions and hashFiles(); the result is a small tuple tree that `evaluate_tree` walks."""

    def __init__(self, expression: str):
        self.expression = expression
        self.tokens = tokenize(expression)
        self.position = 0

    def parse(self):
        tree = self.either()
        if self.position != len(self.tokens):
            raise WorkflowError(f"unexpected {self.peek()[1]!r} in expression {self.expression!r}")
        return tree

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.position] if self.position < len(self.tokens) else ("end", "")

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token[0] == "end" or (value is not None and token[1] != value):
            raise WorkflowError(f"expected {value or 'more'} in expression {self.expression!r}")
        self.position += 1
        return token

    def either(self):
        tree = self.both()
        while self.peek() == ("op", "||"):
            self.take()
            tree = ("||", tree, self.both())
        return tree

    def both(self):
        tree = self.negation()
        while self.peek() == ("op", "&&"):
            self.take()
            tree = ("&&", tree, self.negation())
        return tree

    def negation(self):
        if self.peek() == ("op", "!"):
            self.take()
            return ("!", self.negation())
        return self.comparison()

    def comparison(self):
        tree = self.primary()
        if self.peek() in (("op", "=="), ("op", "!=")):
            operator = self.take()[1]
            tree = (operator, tree, self.primary())
        return tree

    def primary(self):
        kind, value = self.take()
        if kind == "string":
            return ("literal", value[1:-1].replace("''", "'"))
        if kind == "number":
            return ("literal", float(value) if "." in value else int(value))
        if (kind, value) == ("op", "("):
            tree = self.either()
            self.take(")")
            return tree
        if kind != "name":
            raise WorkflowError(f"unexpected {value!r} in expression {self.expression!r}")
        if value in LITERALS:
            return ("literal", LITERALS[value])
        if self.peek() == ("op", "("):
            if value not in FUNCTIONS:
                raise WorkflowError(f"function {value}() is not supported (in {self.expression!r})")
            self.take("(")
            if value in STATUS_FUNCTIONS:
                self.take(")")
                return ("status", value)
            arguments = [self.either()]
            while self.peek() == ("op", ","):
                self.take()
                arguments.append(self.either())
            self.take(")")
            return ("hashFiles", *arguments)
        path = [value]
        while self.peek() == ("op", "."):
            self.take()
            kind, value = self.take()
            if kind != "name":
                raise WorkflowError(f"expected a property name in expression {self.expression!r}")
            path.append(value)
        return ("context", tuple(path))


@dataclass
class Contexts:
    """The contexts an expression may read at its place in the workflow; None: not available there.

    Unset `vars`, `secrets`, `env` entries and outputs that were not written are '' (null on
    GitHub); names that cannot exist (an undeclared input, a job not in `needs`, a step id the job
    does not have, an unknown `github` property) are refused.
    """

    github: dict[str, str]
    inputs: dict[str, object]
    vars: dict[str, str]
    secrets: dict[str, str] | None = None
    needs: dict[str, dict] | None = None
    steps: dict[str, dict] | None = None
    env: dict[str, str] | None = None
    workspace: Path | None = None  # hashFiles() reads it: in a step's values only
    success: bool = True  # success(): every needed job (or every earlier step) succeeded
    failure: bool = False  # failure(): one of them failed

    def lookup(self, path: tuple[str, ...]) -> object:
        name, keys = path[0], path[1:]
        where = ".".join(path)
        if name == "github":
            if len(keys) != 1 or keys[0] not in GITHUB_KEYS:
                raise WorkflowError(f"unsupported context {where}")
            return self.github[keys[0]]
        if name == "inputs":
            if len(keys) != 1 or keys[0] not in self.inputs:
                raise WorkflowError(f"{where}: no such input declared")
            return self.inputs[keys[0]]
        if name in ("vars", "secrets", "env"):
            values = getattr(self, name)
            if values is None or len(keys) != 1:
                raise WorkflowError(f"{where} is not available here")
            return values.get(keys[0], "")
        if name in ("needs", "steps"):
            records = getattr(self, name)
            if records is None or len(keys) < 2:
                raise WorkflowError(f"{where} is not available here")
            if keys[0] not in records:
                raise WorkflowError(f"{where}: no {'needed job' if name == 'needs' else 'step'} {keys[0]}")
            record = records[keys[0]]
            if keys[1] == "outputs" and len(keys) == 3:
                return record["outputs"].get(keys[2], "")
            known = ("result",) if name == "needs" else ("outcome", "conclusion")
            if keys[1] in known and len(keys) == 2:
                return record[keys[1]]
            raise WorkflowError(f"unsupported context {where}")
        raise WorkflowError(f"unsupported context {where}")


def evaluate_tree(tree, contexts: Contexts) -> object:
    """Both sides of `&&` and `||` are evaluated (no side effects), so every name is checked."""
    kind = tree[0]
    if kind == "literal":
        return tree[1]
    if kind == "context":
        return contexts.lookup(tree[1])
    if kind == "status":
        return {"success": contexts.success, "failure": contexts.failure, "always": True}.get(tree[1], False)
    if kind == "hashFiles":
        if contexts.workspace is None:
            raise WorkflowError("hashFiles() is not available here (only in a step's values)")
        return hash_files(contexts.workspace, [evaluate_tree(argument, contexts) for argument in tree[1:]])
    if kind == "!":
        return not evaluate_tree(tree[1], contexts)
    left, right = evaluate_tree(tree[1], contexts), evaluate_tree(tree[2], contexts)
    if kind == "&&":
        return right if left else left
    if kind == "||":
        return left if left else right
    if type(left) is type(right):
        equal = left.casefold() == right.casefold() if isinstance(left, str) else left == right
    elif {left, right} & {None} and isinstance(left or right, str) and not is_number(left or right):
        equal = False  # null (e.g. an input on a push) against a word: GitHub's NaN, never equal
    else:  # GitHub coerces both sides to numbers; no workflow here means that
        raise WorkflowError(f"refusing to compare {left!r} with {right!r}")
    return equal if kind == "==" else not equal


def hash_files(workspace: Path, patterns: list) -> str:
    """hashFiles(): a SHA-256 over the SHA-256 of each file the glob patterns match in the
    workspace, '' when none does. Not GitHub's exact digest, only as stable; no `!` patterns."""
    files: list[Path] = []
    for pattern in patterns:
        plain = isinstance(pattern, str) and pattern and not pattern.startswith(("!", "/", "~"))
        if not plain or ".." in Path(pattern).parts:
            raise WorkflowError(f"hashFiles({pattern!r}): only plain patterns in the workspace are supported")
        files += sorted(path for path in workspace.glob(pattern) if path.is_file())
    digest = hashlib.sha256()
    for path in dict.fromkeys(files):
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest() if files else ""


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text.strip() == ""  # GitHub reads '' as 0
    return True


def uses_status(tree) -> bool:
    return tree[0] == "status" or any(isinstance(part, tuple) and uses_status(part) for part in tree[1:])


def evaluate(expression: str, contexts: Contexts) -> object:
    """The value of one expression (the text inside `${{ }}`)."""
    return evaluate_tree(Parser(expression).parse(), contexts)


def condition(value, contexts: Contexts) -> bool:
    """An `if:`: the whole value is one expression, `${{ }}` around it or not, and without a
    status function it means `success() && (...)`, as on GitHub.

    Text around a `${{ }}` makes GitHub read a non-empty string, always true: refused.
    """
    if value is None:
        value = "success()"
    if not isinstance(value, str):
        raise WorkflowError(f"if: {value!r} is not an expression")
    text = value.strip()
    if text.startswith("${{") and text.endswith("}}") and text.count("${{") == 1:
        text = text[3:-2]
    elif "${{" in text:
        raise WorkflowError(f"if: {value!r} is always true (text around ${{{{ }}}})")
    tree = Parser(text).parse()
    result = bool(evaluate_tree(tree, contexts))
    return result if uses_status(tree) else contexts.success and result


def as_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


TEMPLATE = re.compile(r"\$\{\{(.*?)\}\}", re.DOTALL)


def interpolate(value, contexts: Contexts):
    """A value of `env:`, `with:` or `outputs:` with each `${{ }}` replaced by its text."""
    if not isinstance(value, str):
        return value
    return TEMPLATE.sub(lambda match: as_text(evaluate(match.group(1), contexts)), value)


def interpolate_all(values: dict | None, contexts: Contexts) -> dict[str, str]:
    return {str(name): as_text(interpolate(value, contexts)) for name, value in (values or {}).items()}


# --- files the steps write: GITHUB_OUTPUT, GITHUB_ENV ------------------------------------------


def parse_command_file(text: str) -> dict[str, str]:
    """`name=value` lines and `name<<DELIMITER` ... `DELIMITER` blocks, as the runner reads them."""
    values, lines = {}, text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if not line.strip():
            continue
        equals, heredoc = line.find("="), line.find("<<")
        if heredoc != -1 and (equals == -1 or heredoc < equals):
            name, delimiter = line[:heredoc], line[heredoc + 2 :]
            end = next((i for i in range(index, len(lines)) if lines[i] == delimiter), None)
            if not delimiter or end is None:
                raise WorkflowError(f"{name}<<{delimiter}: no closing {delimiter!r} line")
            values[name] = "\n".join(lines[index:end])
            index = end + 1
        elif equals > 0:
            values[line[:equals]] = line[equals + 1 :]
        else:
            raise WorkflowError(f"cannot read line {line!r} (neither name=value nor name<<DELIMITER)")
    return values


# --- results -----------------------------------------------------------------------------------


@dataclass
class StepResult:
    name: str
    outcome: str  # success, failure or skipped
    outputs: dict[str, str] = field(default_factory=dict)
    log: str = ""
    id: str | None = None


@dataclass
class JobResult:
    name: str
    result: str  # success, failure, skipped, or waiting (its environment was not approved)
    outputs: dict[str, str] = field(default_factory=dict)
    steps: list[StepResult] = field(default_factory=list)
    summary: str = ""  # GITHUB_STEP_SUMMARY of its steps, in order
    workdir: Path | None = None

    def log(self) -> str:
        return "\n".join(f"--- {step.name}: {step.outcome}\n{step.log}" for step in self.steps)

    def step(self, step_id: str) -> StepResult:
        return next(step for step in self.steps if step.id == step_id)


@dataclass
class Run:
    event: str
    run_id: str
    jobs: dict[str, JobResult]

    def result(self, job: str) -> str:
        return self.jobs[job].result


# --- the workflow ------------------------------------------------------------------------------


def git(args: list[str], cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise WorkflowError(f"git {' '.join(args)} in {cwd}: {done.stderr.strip()}")
    return done.stdout.strip()


def load_workflow(path: Path) -> dict:
    workflow = yaml.safe_load(path.read_text(encoding="utf-8"))
    if True in workflow:  # YAML 1.1 reads the key `on` as true
        workflow["on"] = workflow.pop(True)
    unknown = set(workflow) - WORKFLOW_KEYS
    if unknown:
        raise WorkflowError(f"{path.name}: unsupported workflow keys {sorted(unknown)}")
    triggers = workflow["on"]
    if isinstance(triggers, str):
        triggers = [triggers]
    if isinstance(triggers, list):
        triggers = dict.fromkeys(triggers)
    workflow["on"] = {event: config or {} for event, config in triggers.items()}
    return workflow


def event_inputs(workflow: dict, event: str, given: dict[str, str]) -> dict[str, object]:
    """The `inputs` context: the dispatch's inputs checked against their declarations and defaults
    filled in; on other events every declared input is null."""
    declared = workflow["on"].get("workflow_dispatch", {}).get("inputs") or {}
    if event != "workflow_dispatch":
        if given:
            raise WorkflowError(f"inputs are given with a {event} event")
        return dict.fromkeys(declared)
    unknown = set(given) - set(declared)
    if unknown:
        raise WorkflowError(f"undeclared inputs {sorted(unknown)}")
    inputs = {}
    for name, spec in declared.items():
        value = given.get(name, spec.get("default", ""))
        if spec.get("required") and value in (None, ""):
            raise WorkflowError(f"input {name} is required")
        if spec.get("type") == "choice" and value not in spec["options"]:
            raise WorkflowError(f"input {name}={value!r} is not one of {spec['options']}")
        inputs[name] = value
    return inputs


def job_order(jobs: dict) -> list[str]:
    """Job ids in `needs` order (file order among independent jobs)."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(job: str) -> None:
        if job in order:
            return
        if job in visiting or job not in jobs:
            raise WorkflowError(f"needs: {job} is unknown or in a cycle")
        visiting.add(job)
        for need in needs_of(jobs[job]):
            visit(need)
        order.append(job)

    for job in jobs:
        visit(job)
    return order


def needs_of(job: dict) -> list[str]:
    needs = job.get("needs") or []
    return [needs] if isinstance(needs, str) else list(needs)


def base_environment() -> dict[str, str]:
    """This machine's environment without what would point a job at the tests' own state."""
    drop = ("GITHUB_", "RUNNER_", "MLFLOW_", "DVC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(name, None)
    return env


def run_workflow(
    path: Path,
    source: Path,
    event: str,
    workdir: Path,
    *,
    inputs: dict[str, str] | None = None,
    vars: dict[str, str] | None = None,
    secrets: dict[str, str] | None = None,
    environments: tuple[str, ...] = (),
    actor: str = "imgclf-tests",
    base: str | None = None,
    only: tuple[str, ...] | None = None,
    cache: Path | None = None,
) -> Run:
    """Run the jobs of workflow `path` for `event` (push, pull_request or workflow_dispatch) on the
    commit checked out in git repo `source`, each job in a fresh folder under `workdir`.

    A job in an environment not listed in `environments` waits for an approval that never comes
    here: it ends as `waiting`, and the jobs that need it are skipped. A pull_request is from the
    branch checked out in `source` into its branch `base`; its jobs check out the head commit
    (GitHub's merge commit would differ only if `base` moved on). `only`: run these jobs alone
    (the others end as `unselected`), e.g. not ci.yml's `make test` from inside the tests.
    `cache`: the repository's Actions cache (default: beside the jobs in `workdir`); runs that share
    it see each other's saves, as the runs of one repository do.
    """
    if event not in ("push", "pull_request", "workflow_dispatch"):
        raise WorkflowError(f"unsupported event {event}")
    if (event == "pull_request") != (base is not None):
        raise WorkflowError("a pull_request, and only a pull_request, needs its base branch")
    workflow = load_workflow(path)
    if event not in workflow["on"]:
        raise WorkflowError(f"{path.name} does not run on {event}")
    branch = git(["symbolic-ref", "--short", "HEAD"], source)
    branches = workflow["on"][event].get("branches")
    if branches is not None:  # a pull request's filter names its base branch
        if any(set(pattern) & set("*?[!") for pattern in branches):
            raise WorkflowError(f"branch patterns are not supported: {branches}")
        if (base or branch) not in branches:
            raise WorkflowError(f"{path.name} does not run on a {event} to {base or branch}")
    run_id = str(next(RUN_IDS))
    github = {
        "event_name": event,
        "sha": git(["rev-parse", "HEAD"], source),
        "ref": "refs/pull/1/merge" if base else f"refs/heads/{branch}",
        "actor": actor,
        "repository": f"local/{source.name}",
        "run_id": run_id,
        "server_url": "https://github.invalid",
        "base_ref": base or "",
    }
    context = Contexts(github, event_inputs(workflow, event, inputs or {}), dict(vars or {}))
    workflow_env = interpolate_all(
        workflow.get("env"), Contexts(github, context.inputs, context.vars, dict(secrets or {}))
    )
    results: dict[str, JobResult] = {}
    for job_id in job_order(workflow["jobs"]):
        if only is not None and job_id not in only:
            results[job_id] = JobResult(job_id, "unselected")
            continue
        job = Job(job_id, workflow["jobs"][job_id], github, context, dict(secrets or {}), workflow_env,
                  ActionsCache(cache or workdir / "actions-cache"))  # fmt: skip
        results[job_id] = job.run(source, workdir / f"{run_id}-{job_id}", results, environments)
    return Run(event, run_id, results)


@dataclass
class Job:
    job_id: str
    spec: dict
    github: dict[str, str]
    workflow_context: Contexts
    secrets: dict[str, str]
    workflow_env: dict[str, str]
    cache: "ActionsCache"

    def run(self, source: Path, workdir: Path, done: dict[str, JobResult], environments) -> JobResult:
        unknown = set(self.spec) - JOB_KEYS
        if unknown:
            raise WorkflowError(f"job {self.job_id}: unsupported keys {sorted(unknown)}")
        if not str(self.spec.get("runs-on", "")).startswith("ubuntu-"):
            raise WorkflowError(f"job {self.job_id}: runs-on {self.spec.get('runs-on')!r} is not Linux")
        needed = {name: done[name] for name in needs_of(self.spec)}
        needs = {name: {"outputs": job.outputs, "result": job.result} for name, job in needed.items()}
        base = self.workflow_context
        context = Contexts(
            self.github, base.inputs, base.vars, needs=needs,
            success=all(job.result == "success" for job in needed.values()),
            failure=any(job.result == "failure" for job in needed.values()),
        )  # fmt: skip
        result = JobResult(self.spec.get("name", self.job_id), "skipped")
        if not condition(self.spec.get("if"), context):
            return result
        environment = self.spec.get("environment")
        if isinstance(environment, dict):
            environment = environment.get("name")
        if environment is not None and interpolate(environment, context) not in environments:
            result.result = "waiting"
            return result
        context.secrets = self.secrets
        job_env = self.workflow_env | interpolate_all(self.spec.get("env"), context)
        context.steps = {}
        ids = [step["id"] for step in self.spec["steps"] if "id" in step]
        if len(ids) != len(set(ids)):
            raise WorkflowError(f"job {self.job_id}: a step id is used twice: {ids}")
        workdir.mkdir(parents=True)
        temp = workdir.with_name(workdir.name + "-temp")
        temp.mkdir()
        added_env: dict[str, str] = {}  # GITHUB_ENV, and what the stand-in actions set
        posts: list[tuple[str, object]] = []  # the actions' post steps: (name, what they do)
        context.workspace = workdir
        deadline = time.monotonic() + 60 * self.spec.get("timeout-minutes", DEFAULT_TIMEOUT_MINUTES)
        for index, step in enumerate(self.spec["steps"]):
            unknown = set(step) - STEP_KEYS
            if unknown or ("run" in step) == ("uses" in step):
                raise WorkflowError(
                    f"job {self.job_id} step {index}: needs one of run/uses, got {sorted(step)}"
                )
            if "${{" in step.get("run", ""):
                raise WorkflowError(f"job {self.job_id}: ${{{{ }}}} in run: (template injection); use env:")
            outcomes = [record.outcome for record in result.steps]
            context.success = all(outcome != "failure" for outcome in outcomes)
            context.failure = not context.success
            context.env = job_env | added_env
            name = step.get("name") or step.get("run") or step["uses"]
            if not condition(step.get("if"), context):
                record = StepResult(name, "skipped")
            else:
                env = job_env | added_env | interpolate_all(step.get("env"), context)
                if "uses" in step:
                    inputs = interpolate_all(step.get("with"), context)
                    record = use_action(step["uses"], inputs, source, self.github, workdir, added_env,
                                        name, self.cache, posts)  # fmt: skip
                else:
                    record = self.run_step(name, step["run"], env, added_env, workdir, temp, index, deadline)
                    result.summary += (temp / f"summary-{index}.md").read_text(encoding="utf-8")
            record.id = step.get("id")
            result.steps.append(record)
            if "id" in step:
                context.steps[step["id"]] = {
                    "outputs": record.outputs, "outcome": record.outcome, "conclusion": record.outcome,
                }  # fmt: skip
        # Post steps, last first, each under its `post-if: success()` (the only one the stand-ins have).
        for post_name, post in reversed(posts):
            succeeded = all(record.outcome != "failure" for record in result.steps)
            result.steps.append(post() if succeeded else StepResult(post_name, "skipped"))
        context.workspace = None
        context.success = all(record.outcome != "failure" for record in result.steps)
        result.result = "success" if context.success else "failure"
        result.outputs = interpolate_all(self.spec.get("outputs"), context)
        result.workdir = workdir
        return result

    def run_step(self, name, script, env, added_env, workdir, temp, index, deadline) -> StepResult:
        """`bash -e` on the script, GitHub's default shell, with the runner's variables and files."""
        files = {kind: temp / f"{kind}-{index}" for kind in ("output", "env", "summary", "script")}
        files["summary"] = files["summary"].with_suffix(".md")
        for kind in ("output", "env", "summary"):
            files[kind].write_text("")
        files["script"].write_text(script)
        env = base_environment() | env | {
            "CI": "true",
            "GITHUB_ACTIONS": "true",
            "GITHUB_ACTOR": self.github["actor"],
            "GITHUB_SHA": self.github["sha"],
            "GITHUB_REF": self.github["ref"],
            "GITHUB_RUN_ID": self.github["run_id"],
            "GITHUB_RUN_ATTEMPT": "1",
            "GITHUB_SERVER_URL": self.github["server_url"],
            "GITHUB_REPOSITORY": self.github["repository"],
            "GITHUB_EVENT_NAME": self.github["event_name"],
            "GITHUB_BASE_REF": self.github["base_ref"],
            "GITHUB_JOB": self.job_id,
            "GITHUB_WORKSPACE": str(workdir),
            "GITHUB_OUTPUT": str(files["output"]),
            "GITHUB_ENV": str(files["env"]),
            "GITHUB_STEP_SUMMARY": str(files["summary"]),
            "RUNNER_TEMP": str(temp),
        }  # fmt: skip
        log_path = temp / f"log-{index}"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                ["bash", "-e", str(files["script"])], cwd=workdir, env=env,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            try:
                code = process.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                code = "timeout"
        text = log_path.read_text(encoding="utf-8", errors="replace")
        if code != 0:
            return StepResult(name, "failure", log=f"{text}\n[exit {code}]")
        exported = parse_command_file(files["env"].read_text(encoding="utf-8"))
        for variable in exported:
            if variable.startswith(("GITHUB_", "RUNNER_")):
                raise WorkflowError(f"GITHUB_ENV may not set {variable}")
        added_env.update(exported)
        outputs = parse_command_file(files["output"].read_text(encoding="utf-8"))
        return StepResult(name, "success", outputs, text)


# --- the allowed actions: stand-ins that do here what the real ones do on GitHub ---------------


def use_action(uses, inputs, source, github, workdir, added_env, name, cache, posts) -> StepResult:
    """actions/checkout, actions/setup-python and actions/cache (with its restore and save halves),
    pinned by commit SHA; any other action is refused. `posts` gets the post steps they add."""
    action, _, ref = uses.partition("@")
    if not re.fullmatch(r"[0-9a-f]{40}", ref):
        raise WorkflowError(f"{uses}: not pinned by a full commit SHA")
    if action == "actions/checkout":
        return checkout(inputs, source, github["sha"], workdir, name)
    if action == "actions/setup-python":
        return setup_python(inputs, workdir, added_env, name)
    if action in CACHE_INPUTS:
        return cache_action(action, inputs, cache_scopes(github), workdir, name, cache, posts)
    raise WorkflowError(f"action {action} is not one this runner can stand in for")


def checkout(inputs, source, sha, workdir, name) -> StepResult:
    """A fresh clone of `source` at `sha`; shallow unless fetch-depth is 0, as the action does."""
    unknown = set(inputs) - CHECKOUT_INPUTS
    if unknown:
        raise WorkflowError(f"actions/checkout: unsupported inputs {sorted(unknown)}")
    depth = int(inputs.get("fetch-depth", "1"))
    shallow = ["--depth", str(depth)] if depth else []
    git(["clone", "--quiet", *shallow, source.resolve().as_uri(), str(workdir)], workdir.parent)
    head = git(["rev-parse", "HEAD"], workdir)
    if head != sha:
        raise WorkflowError(f"checkout: {source} moved to {head} during the run (was {sha})")
    return StepResult(name, "success", log=f"cloned {source} at {sha}")


def setup_python(inputs, workdir, added_env, name) -> StepResult:
    """What actions/setup-python and a cached `make install` leave: this interpreter's venv linked
    at .venv, the plots page, and `make install` a no-op. The venv's editable install points at
    the venv's own checkout, so the job's sources go first on PYTHONPATH, as the job's own
    `pip install -e .` would have done.
    """
    unknown = set(inputs) - SETUP_PYTHON_INPUTS
    if unknown:
        raise WorkflowError(f"actions/setup-python: unsupported inputs {sorted(unknown)}")
    if inputs.get("python-version") != PYTHON_VERSION:
        raise WorkflowError(f"python-version {inputs.get('python-version')!r}: this venv is {PYTHON_VERSION}")
    if not (workdir / "Makefile").is_file():
        raise WorkflowError("setup-python stand-in: no checkout here (it runs after actions/checkout)")
    for relative in INSTALL_INPUTS:
        ours, installed = workdir / relative, VENV_REPO / relative
        if ours.read_bytes() != installed.read_bytes():
            raise WorkflowError(f"{relative} differs from the one {VENV} was installed from: no cache hit")
        shutil.copystat(installed, ours)
    (workdir / ".venv").symlink_to(VENV, target_is_directory=True)
    shutil.copy2(VENV_REPO / PLOTS_PAGE, workdir / PLOTS_PAGE)
    # The check that matters: were install not a no-op, make would rebuild the real venv.
    done = subprocess.run(["make", "-q", "install"], cwd=workdir, capture_output=True, text=True)
    if done.returncode:
        raise WorkflowError(f"`make install` would run in {workdir}:\n{done.stdout}{done.stderr}")
    added_env["PYTHONPATH"] = str(workdir / "src")
    return StepResult(name, "success", log=f"linked {VENV}; make install is up to date")


# --- actions/cache: a repository's cache in a folder --------------------------------------------


def cache_scopes(github: dict[str, str]) -> list[str]:
    """The refs whose caches a run may restore, its own first: GitHub's isolation, by which a pull
    request (refs/pull/N/merge) reads its base branch's caches but saves only into its own ref."""
    scopes = [github["ref"]]
    if github["base_ref"]:
        scopes.append(f"refs/heads/{github['base_ref']}")
    scopes.append(f"refs/heads/{DEFAULT_BRANCH}")
    return list(dict.fromkeys(scopes))


@dataclass
class ActionsCache:
    """Cache entries under `folder`/<ref>/<sha256 of path and key>/: `key`, `saved` (ns) and
    `content` (a copy of the cached path). An entry is found only for the path it was saved from
    (GitHub's cache version) and is immutable: the first save of a key and path in a ref wins."""

    folder: Path

    def entry(self, scope: str, path: str, key: str) -> Path:
        return self.folder / quote(scope, safe="") / hashlib.sha256(f"{path}\n{key}".encode()).hexdigest()

    def entries(self, scope: str, path: str) -> list[tuple[int, str, Path]]:
        """(saved, key, entry folder) of the complete entries of `path` in ref `scope`, newest first."""
        found = []
        for entry in (self.folder / quote(scope, safe="")).glob("[0-9a-f]*"):
            key = (entry / "key").read_text()
            if entry == self.entry(scope, path, key):
                found.append((int((entry / "saved").read_text()), key, entry))
        return sorted(found, reverse=True)

    def find(self, scopes: list[str], path: str, key: str, restore_keys: list[str]) -> tuple | None:
        """(the key found, its entry folder), looked up as GitHub does: in each ref in turn, the key
        exactly, then the newest entry whose key starts with the key, then with each restore key."""
        for scope in scopes:
            entries = self.entries(scope, path)
            exact = [entry for _, saved_key, entry in entries if saved_key == key]
            if exact:
                return key, exact[0]
            for prefix in (key, *restore_keys):
                for _, saved_key, entry in entries:
                    if saved_key.startswith(prefix):
                        return saved_key, entry
        return None

    def save(self, scope: str, path: str, key: str, workdir: Path) -> str:
        """Copy `path` (in `workdir`) into a new entry of ref `scope`, atomically; the log line."""
        if not (workdir / path).exists():
            return f"warning: {path} does not exist: no cache saved"
        entry = self.entry(scope, path, key)
        if entry.exists():
            return f"warning: a cache of {path} with key {key} exists in {scope} already: not saved"
        entry.parent.mkdir(parents=True, exist_ok=True)
        temp = entry.with_name(f".saving-{os.getpid()}-{time.time_ns()}")
        copy_path(workdir / path, temp / "content")
        (temp / "key").write_text(key)
        (temp / "saved").write_text(str(time.time_ns()))
        temp.rename(entry)
        return f"cache of {path} saved with key {key} in {scope}"


def copy_path(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
    else:
        shutil.copy2(source, target)


def cache_action(action, inputs, scopes, workdir, name, cache: ActionsCache, posts) -> StepResult:
    """Restore (actions/cache, actions/cache/restore) the entry of `key`, or else of the newest key
    that starts with one of `restore-keys`, into `path`; save (actions/cache/save, and actions/cache
    in its post step when the job succeeded and the key was not an exact hit) `path` under `key`."""
    unknown = set(inputs) - CACHE_INPUTS[action]
    if unknown:
        raise WorkflowError(f"{action}: unsupported inputs {sorted(unknown)}")
    paths = [Path(line.strip()) for line in inputs.get("path", "").splitlines() if line.strip()]
    plain = len(paths) == 1 and not set(str(paths[0])) & set("*?[!~") and not paths[0].is_absolute()
    if not plain or ".." in paths[0].parts:
        raise WorkflowError(f"{action}: path {inputs.get('path')!r}: only one path in the workspace")
    path = str(paths[0])
    key = inputs.get("key", "")
    if not key or "," in key or len(key) > 512:
        raise WorkflowError(f"{action}: key {key!r} is empty, has a comma or is over 512 characters")
    if action == "actions/cache/save":
        return StepResult(name, "success", log=cache.save(scopes[0], path, key, workdir))
    restore_keys = [line.strip() for line in inputs.get("restore-keys", "").splitlines() if line.strip()]
    if any("," in restore_key for restore_key in restore_keys):
        raise WorkflowError(f"{action}: a restore key has a comma: {restore_keys}")
    found = cache.find(scopes, path, key, restore_keys)
    outputs = {"cache-primary-key": key} if action == "actions/cache/restore" else {}
    if found is None:  # cache-hit is left unset on a miss, as the action does
        log = f"cache not found for keys {', '.join([key, *restore_keys])}"
    else:
        matched, entry = found
        copy_path(entry / "content", workdir / path)
        outputs["cache-hit"] = as_text(matched == key)
        if action == "actions/cache/restore":
            outputs["cache-matched-key"] = matched
        log = f"cache restored from key {matched}"
    if action == "actions/cache":
        post_name = f"Post {name}"

        def save() -> StepResult:
            if found is not None and found[0] == key:
                return StepResult(post_name, "success", log=f"cache hit on the key {key}: not saving")
            return StepResult(post_name, "success", log=cache.save(scopes[0], path, key, workdir))

        posts.append((post_name, save))
    return StepResult(name, "success", outputs, log)
