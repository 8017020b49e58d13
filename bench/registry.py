"""`imgclf register` + `imgclf promote` against a real `mlflow server`, after `dvc repro`.

In a committed temporary copy of the work tree, the pipeline runs once, tracking into a server
started on 127.0.0.1 (as in CI). Then `register` and `promote` run as a user runs them, each in a
fresh process, and each is timed three ways: the whole process (wall), its imports (until the
command starts), and its round trips to the server (every MLflow REST call, counted and timed).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import main_guard, row, write_result

from tests.support.repo import pipeline_env, repo_copy, run
from tests.support.servers import mlflow_server

TARGET_S = 10.0

# Runs in the child process: imports timed, then every MLflow REST call counted, then the command.
CHILD = """
import json, sys, time
started = time.perf_counter()
import mlflow.utils.rest_utils as rest
from imgclf import cli
from imgclf.registry import client as registry, flows  # what the command imports, before it starts
imported = time.perf_counter()
calls = []
real = rest.http_request
def counted(*args, **kwargs):
    t = time.perf_counter()
    try:
        return real(*args, **kwargs)
    finally:
        calls.append(time.perf_counter() - t)
rest.http_request = counted
code = 0
try:
    cli.main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code or 0
done = time.perf_counter()
print(json.dumps({"import_s": imported - started, "command_s": done - imported, "requests": len(calls),
                  "request_s": sum(calls), "code": code}), file=sys.stderr)
"""


def timed_command(args: list[str], copy: Path, env: dict) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args], cwd=copy, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    figures = json.loads(done.stderr.strip().splitlines()[-1])
    if figures["code"]:
        raise SystemExit(f"imgclf {' '.join(args)} exited {figures['code']}:\n{done.stdout}\n{done.stderr}")
    print(done.stdout.strip())
    return {"wall_s": round(wall, 3), **{k: round(v, 3) for k, v in figures.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="imgclf-server-") as folder,
        mlflow_server(Path(folder)) as url,
        repo_copy(keep=args.keep) as copy,
    ):
        env = pipeline_env(copy) | {"MLFLOW_TRACKING_URI": url}
        print(f"dvc repro in {copy}, tracking into {url} ...", flush=True)
        run(["dvc", "repro"], copy, env)
        register = timed_command(["register"], copy, env)
        promote = timed_command(["promote"], copy, env)
    total = register["wall_s"] + promote["wall_s"]
    rows = [
        row("register + promote (wall)", total, "s", "<=", TARGET_S),
        row("  of which imports", register["import_s"] + promote["import_s"], "s"),
        row("  of which server round trips", register["request_s"] + promote["request_s"], "s"),
        row("  round trips", register["requests"] + promote["requests"], ""),
        row("register (wall)", register["wall_s"], "s"),
        row("promote (wall)", promote["wall_s"], "s"),
    ]
    write_result(
        "registry", rows, {"register": register, "promote": promote, "server": "mlflow server, sqlite"}
    )


if __name__ == "__main__":
    main_guard(main)
