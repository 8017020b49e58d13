"""dvc.yaml's code `deps:` are exactly the project files each stage runs.

A stage that runs a file it does not list keeps a stale cache when that file changes (a
correctness bug); one that lists a file it does not run re-runs for nothing (a retrain, for
train). The files a stage runs are found by following every import statement, those inside
functions included (the stage scripts import lazily), from the stage's script through the
project's modules.
"""

import ast
from pathlib import Path

import pytest
import yaml

from imgclf.data import watch
from tests.conftest import REPO

SRC = REPO / "src"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
# Packages that import all their modules themselves (pkgutil), so that a new one registers itself.
DISCOVERING = "pkgutil.iter_modules(__path__)"


def module_file(name: str) -> Path | None:
    """The file of project module `name` (`imgclf.data.normalized`), or None if it is not one."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def package_of(path: Path) -> str:
    """The package a module file belongs to (for a package's __init__.py: that package)."""
    return ".".join(path.relative_to(SRC).parts[:-1])


def imported_modules(path: Path) -> set[str]:
    """Every project module an import statement in `path` names, wherever the statement is."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = package_of(path).split(".")
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # submodules imported by name
    return {name for name in names if name.split(".")[0] == "imgclf" and module_file(name)}


def files_run(script: Path) -> set[Path]:
    """The script and every project file its imports reach, parent packages' __init__ included."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        modules = imported_modules(path)
        if path.name == "__init__.py" and DISCOVERING in path.read_text(encoding="utf-8"):
            package = package_of(path)
            modules |= {f"{package}.{p.stem}" for p in path.parent.glob("*.py") if p.stem != "__init__"}
        for name in modules:
            parts = name.split(".")
            todo += [module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1)]
    return seen


def has_code(path: Path) -> bool:
    """False for a module that is only a docstring: it cannot change what a stage does."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def script_of(stage: dict) -> Path:
    words = stage["cmd"].split()
    assert words[:2] == ["python", words[1]] and words[1].startswith("pipelines/"), stage["cmd"]
    return REPO / words[1]


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_deps_are_exactly_the_code_it_runs(name):
    stage = STAGES[name]
    run = {path for path in files_run(script_of(stage)) if has_code(path)}
    listed = set(watch.code_deps(REPO, name))  # what download's fast path also reads
    rel = lambda paths: sorted(str(p.relative_to(REPO)) for p in paths)  # noqa: E731
    assert rel(run - listed) == [], f"stage {name} runs these files but dvc.yaml does not list them"
    assert rel(listed - files_run(script_of(stage))) == [], f"stage {name} lists files it does not run"


def test_the_import_follower_sees_lazy_imports_and_parent_packages():
    # train.py imports imgclf.stages.training.stage inside main(); the follower must reach it and its models.
    run = files_run(REPO / "pipelines/train.py")
    assert SRC / "imgclf/stages/training/stage.py" in run
    assert SRC / "imgclf/models/resnet.py" in run  # through the package's own discovery
    assert SRC / "imgclf/data/__init__.py" in run
    # evaluate runs no training code: editing the network must not re-run it.
    assert not any("models" in p.parts for p in files_run(REPO / "pipelines/evaluate.py"))
