"""The package's layers (import-linter contracts in pyproject.toml) hold; breaking one fails `make lint`.

Each case adds one import that a contract forbids to a copy of the source, and lint-imports must
name that contract and the offending import: a contract that nothing can break checks nothing.
"""

import ast
import shutil
import subprocess

import pytest

from tests.conftest import BIN, REPO, copy_repo, tool_env

# (file, the line added, words of the contract that must break)
FORBIDDEN = [
    ("src/imgclf/images.py", "import torch", "The inference path"),
    ("src/imgclf/serving/predict.py", "import mlflow", "The inference path"),
    ("src/imgclf/data/normalized.py", "from imgclf.tracking import client", "Data and networks"),
    ("src/imgclf/models/mlp.py", "from imgclf.stages import export", "Data and networks"),
    ("src/imgclf/registry/client.py", "from imgclf.stages.training import stage", "never imports training"),
    (
        "src/imgclf/stages/export.py",
        "from imgclf.config import operations",
        "operations edits re-run no stage",
    ),
    ("src/imgclf/tracking/store.py", "from imgclf.sweep import study", "Layers"),
]


def lint_imports(root) -> subprocess.CompletedProcess:
    env = tool_env(root) | {"COLUMNS": "250"}  # one line per contract name
    return subprocess.run(
        [BIN / "lint-imports", "--no-cache"], cwd=root, env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers")
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_contracts_hold_on_this_tree(source_copy):
    done = lint_imports(source_copy)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(("path", "line", "contract"), FORBIDDEN, ids=[case[0] for case in FORBIDDEN])
def test_a_forbidden_import_breaks_its_contract(source_copy, path, line, contract):
    target = source_copy / path
    original = target.read_text(encoding="utf-8")
    target.write_text(f"{original}\n{line}  # noqa\n", encoding="utf-8")
    try:
        done = lint_imports(source_copy)
    finally:
        target.write_text(original, encoding="utf-8")
    assert done.returncode != 0
    broken = done.stdout.split("Broken contracts")[-1]
    assert contract in broken, done.stdout[-3000:]
    module = path.removeprefix("src/").removesuffix(".py").replace("/", ".")
    assert module in broken  # the report names the importer


@pytest.mark.e2e
def test_make_lint_fails_on_a_forbidden_import(tmp_path):
    root = copy_repo(tmp_path / "repo")
    target = root / "src/imgclf/images.py"
    target.write_text(target.read_text(encoding="utf-8") + "\n\nimport torch  # noqa: E402, F401\n")
    # `-o install`: the copy uses this checkout's .venv (tool_env), not one of its own.
    done = subprocess.run(
        ["make", "-o", "install", "lint"], cwd=root, env=tool_env(root), capture_output=True, text=True
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "lint-imports" in output and "imgclf.images -> torch" in output, output[-3000:]


def test_tests_never_import_the_benchmarks():
    # Test infrastructure lives in tests/support/; benchmarks may use it, never the other way.
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == "bench"]
    assert offenders == []
