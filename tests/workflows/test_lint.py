"""The workflow linters that `make lint` runs pass on .github/workflows, and fail where they should.

Each failing case is a copy of one of our workflows with one defect put in, and the linter must
name exactly that defect: so the pass on the real files means something.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / ".github" / "workflows"
BIN = Path(sys.executable).parent
ACTIONLINT = [str(BIN / "actionlint")]
# --offline: no GitHub API; auditor: zizmor's strictest persona. The same as the Makefile's.
ZIZMOR = [str(BIN / "zizmor"), "--offline", "--persona", "auditor"]


def lint(command: list[str], *paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *map(str, paths)], capture_output=True, text=True, timeout=120)


def test_make_lint_runs_the_same_commands():
    recipe = (REPO / "Makefile").read_text(encoding="utf-8").split("\nlint: install\n")[1].split("\n\n")[0]
    assert "\tactionlint\n" in recipe + "\n"
    assert "\tzizmor --offline --persona auditor .github/workflows" in recipe


def test_our_workflows_pass_both_linters():
    workflows = sorted(WORKFLOWS.glob("*.yml"))
    assert [path.name for path in workflows] == ["ci.yml", "promote.yml"]
    done = lint(ACTIONLINT, *workflows)
    assert done.returncode == 0, done.stdout + done.stderr
    done = lint(ZIZMOR, *workflows)
    assert done.returncode == 0, done.stdout + done.stderr


def defective_copy(tmp_path: Path, name: str, old: str, new: str) -> Path:
    """A copy of workflow `name` with `old` (which must be in it once) replaced by `new`."""
    text = (WORKFLOWS / name).read_text(encoding="utf-8")
    assert text.count(old) == 1
    folder = tmp_path / ".github" / "workflows"
    folder.mkdir(parents=True)
    path = folder / name
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


def test_actionlint_fails_on_an_if_that_is_always_true(tmp_path):
    """Text around `${{ }}` in `if:` makes the whole value a non-empty string: the job always runs."""
    path = defective_copy(
        tmp_path,
        "ci.yml",
        "if: github.event_name == 'pull_request'",
        "if: ${{ github.event_name == 'pull_request' }} && true",
    )
    done = lint([*ACTIONLINT, "-format", "{{json .}}"], path)
    assert done.returncode == 1, done.stdout + done.stderr
    findings = json.loads(done.stdout)
    assert [(f["kind"], "always evaluated to true" in f["message"]) for f in findings] == [("if-cond", True)]


def test_zizmor_fails_on_a_template_injection(tmp_path):
    """A pull request's title interpolated into a script runs as code of the attacker's choosing."""
    path = defective_copy(
        tmp_path,
        "ci.yml",
        "      - run: make gate\n",
        '      - run: echo "${{ github.event.pull_request.title }}"\n',
    )
    done = lint([*ZIZMOR, "--format", "json"], path)
    assert done.returncode != 0, done.stdout + done.stderr
    assert {finding["ident"] for finding in json.loads(done.stdout)} == {"template-injection"}
