"""`make run` on a clean clone gives back the committed dvc.lock and metrics/ byte for byte, and a
clean `git status`: a commit with a stale dvc.lock, or a result that differs between runs, fails
here (CI runs it through `make test`)."""

import re
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, tool_env
from tests.support.repo import copy_repo
from tests.support.reproduce import reproduce

pytestmark = pytest.mark.e2e
STALE = "deadbeef" * 4  # an md5 of another model (not all digits: YAML would read a number)


def test_make_run_on_a_clean_copy_reproduces_the_committed_results(tmp_path):
    code, differences = reproduce(REPO, tmp_path / "clone")
    assert code == 0, differences
    assert differences == [], "\n".join(differences)


@pytest.mark.slow  # a second `make run`; CI runs it
def test_a_stale_dvc_lock_is_reported_by_file_and_line(tmp_path):
    stale = copy_repo(tmp_path / "stale", REPO, with_lock=True)
    lock_path = stale / "dvc.lock"
    lock = lock_path.read_text(encoding="utf-8")
    onnx = next(
        out for out in yaml.safe_load(lock)["stages"]["export"]["outs"] if out["path"] == "models/model.onnx"
    )
    lock_path.write_text(lock.replace(onnx["md5"], STALE), encoding="utf-8")  # a lock from another model
    line = 1 + lock[: lock.index(onnx["md5"])].count("\n")

    done = subprocess.run(
        [sys.executable, "-m", "tests.support.reproduce", str(stale)],
        cwd=REPO,
        env=tool_env(REPO),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    reported = [row for row in done.stderr.splitlines() if row.startswith("reproduce: dvc.lock:")]
    assert reported == [
        f"reproduce: dvc.lock:{line}: committed 'md5: {STALE}', reproduced 'md5: {onnx['md5']}'"
    ]
    assert re.search(r"1 file\(s\) differ", done.stderr)
