"""`dvc push` and `dvc pull` of the pipeline's data and models through an S3 remote (moto's server).

In a committed temporary copy of the work tree: `dvc repro` (with the `--set` overrides, e.g. a
data set), then the remote set up as `make remote` does and `dvc push --run-cache` timed; then,
in a fresh `git clone` of that copy (no DVC cache, no data, no models), `dvc pull --run-cache`
timed, the pulled model compared byte for byte, and a `dvc repro` there that must run no stage.
MB/s is the bytes in the bucket after the push (1 MB = 10^6 bytes) over the command's wall time,
DVC's start-up included: what a user waits for.
"""

import argparse
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

import yaml
from common import BenchError, add_override_option, main_guard, row, timed, timed_lines, write_result

from tests.support.repo import git_commit, pipeline_env, repo_copy, run
from tests.support.servers import s3_server

BUCKET = "imgclf"
URL = f"s3://{BUCKET}/imgclf"
NOTHING_TO_DO = {"download": ["always changed"]}  # download runs on every repro, by design


def bucket_bytes(env: dict[str, str]) -> tuple[int, int]:
    """(objects, bytes) in the bucket, read directly from the server."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    sizes = [item["Size"] for page in pages for item in page.get("Contents", [])]
    return len(sizes), sum(sizes)


def without_local_paths(overrides: list[str]) -> list[str]:
    """The overrides as recorded in the result: a file:// mirror names a folder of this machine."""
    return [re.sub(r"file://[^,\]]*", "file://...", override) for override in overrides]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_override_option(parser)
    parser.add_argument("--name", default="remote", help="result name: bench/results/NAME.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy and clone")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request

    clone = Path(tempfile.mkdtemp(prefix="imgclf-bench-clone-")) / "repo"
    try:
        with repo_copy(keep=args.keep) as copy, s3_server(BUCKET) as s3:
            env = pipeline_env(copy)
            if args.set:
                run(["imgclf", "params", *args.set], copy, env)
            data_name = yaml.safe_load((copy / "params.yaml").read_text(encoding="utf-8"))["data"]["name"]
            print(f"dvc repro in {copy} ...", flush=True)
            repro = timed(["dvc", "repro"], copy, env)
            run(["dvc", "remote", "add", "--default", "--force", "storage", URL], copy, env)
            git_commit(copy, f"pipeline ran with {without_local_paths(args.set)}, remote {URL}")

            print("dvc push --run-cache ...", flush=True)
            push = timed(["dvc", "push", "--run-cache"], copy, env | s3)
            objects, pushed = bucket_bytes(s3)

            run(["git", "clone", "--quiet", str(copy), str(clone)], clone.parent)
            clone_env = pipeline_env(clone) | s3
            print("dvc pull --run-cache in a fresh clone ...", flush=True)
            pull = timed(["dvc", "pull", "--run-cache"], clone, clone_env)
            if (clone / "models/model.onnx").read_bytes() != (copy / "models/model.onnx").read_bytes():
                raise BenchError("the pulled models/model.onnx differs from the pushed one")
            status = json.loads(run(["dvc", "status", "--json"], clone, clone_env))
            if status != NOTHING_TO_DO:
                raise BenchError(f"`dvc status` in the pulled clone is not clean: {status}")
            noop, lines = timed_lines(["dvc", "repro"], clone, clone_env)
            ran = [m.group(1) for _, line in lines if (m := re.match(r"Running stage '([^']+)'", line))]
            if ran != ["download"]:
                raise BenchError(f"`dvc repro` in the pulled clone ran {ran}, not only download's check")
            if not any(line.endswith(" is up to date") for _, line in lines):
                raise BenchError("the download stage in the pulled clone fetched its data again")
    finally:
        if args.keep:
            print(f"kept the clone at {clone}")
        else:
            shutil.rmtree(clone.parent, ignore_errors=True)

    megabytes = pushed / 1e6
    rows = [
        row(f"dvc repro ({data_name}, from scratch)", round(repro, 1), "s"),
        row("pushed: objects in the bucket", objects),
        row("pushed: size", round(megabytes, 2), "MB"),
        row("dvc push --run-cache", round(push, 2), "s"),
        row("dvc push throughput", round(megabytes / push, 2), "MB/s"),
        row("dvc pull --run-cache (fresh clone)", round(pull, 2), "s"),
        row("dvc pull throughput", round(megabytes / pull, 2), "MB/s"),
        row("dvc repro after the pull (no stage runs)", round(noop, 2), "s"),
    ]
    details = {
        "data": data_name,
        "overrides": without_local_paths(args.set),
        "remote": URL + " (moto server on 127.0.0.1)",
        "repro_s": repro,
        "push_s": push,
        "pull_s": pull,
        "pushed_bytes": pushed,
        "pushed_objects": objects,
        "repro_after_pull_s": noop,
    }
    write_result(args.name, rows, details)


if __name__ == "__main__":
    main_guard(main)
