"""The pipeline's tracking cost: `dvc repro` from scratch tracking into the repo's sqlite store,
and into a shared server as `make team-server` runs one (`mlflow server` on PostgreSQL, artifacts
proxied to S3).

Each run is in its own committed temporary copy of the work tree. The server is started before
the runs (its start-up is not counted) on 127.0.0.1: a private PostgreSQL cluster (fsync off)
and moto's S3, so the figures are MLflow's own cost with no network in between. Reported per
store: metrics/train.json's `tracking_seconds` (the epoch metrics written during the fit) and
`train_seconds` (the fit), and the wall time of each stage that tracks, from when DVC prints
"Running stage"; the train stage outside its fit is start-up plus the run's creation, params,
data set and artifacts. With --rounds N the stores alternate N times and each store's figures
are those of its fastest `dvc repro` (the round least disturbed by whatever else runs here).
"""

import argparse
import contextlib
import json
import logging
import tempfile
from pathlib import Path

from common import BenchError, main_guard, pipeline_metrics, row, timed_lines, write_result
from pipeline import TRACKING_SHARE, stage_seconds

from tests.support.repo import pipeline_env, repo_copy
from tests.support.servers import mlflow_server, postgres_server, s3_server

BUCKET = "imgclf-bench"
TRACKED_STAGES = ("train", "export", "evaluate")
SERVER = "mlflow server --workers 1 on PostgreSQL (fsync off), artifacts proxied to moto S3, on 127.0.0.1"


def tracked_repro(tracking_uri: str | None, keep: bool) -> dict:
    """`dvc repro` from scratch in a fresh copy, into `tracking_uri` (None: the copy's sqlite)."""
    with repo_copy(keep=keep) as copy:
        env = pipeline_env(copy) | ({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {})
        store = tracking_uri or f"sqlite:///{copy / 'mlflow.db'}"
        print(f"dvc repro from scratch in {copy}, tracking into {store} ...", flush=True)
        seconds, lines = timed_lines(["dvc", "repro"], copy, env)
        train = pipeline_metrics(copy, "train")
        made_by = json.loads((copy / "models" / "run.json").read_text(encoding="utf-8"))
        check_run(store, made_by["mlflow_run_id"])
    return {"repro_s": round(seconds, 2), "stage_s": stage_seconds(seconds, lines), "train": train}


def check_run(store: str, run_id: str) -> None:
    """The pipeline's run is in `store` and FINISHED: the figures measured the store they name."""
    from mlflow import MlflowClient

    status = MlflowClient(store).get_run(run_id).info.status
    if status != "FINISHED":
        raise BenchError(f"the pipeline's run {run_id} is {status} in {store}")


def rows_for(store: str, figures: dict) -> list[dict]:
    train, stages = figures["train"], figures["stage_s"]
    return [
        row(f"{store}: dvc repro from scratch", figures["repro_s"], "s"),
        *(row(f"{store}:   stage {name}", stages[name], "s") for name in TRACKED_STAGES),
        row(f"{store}: train fit", train["train_seconds"], "s"),
        row(f"{store}: train stage outside the fit", round(stages["train"] - train["train_seconds"], 2), "s"),
        row(f"{store}: train tracking_seconds", train["tracking_seconds"], "s"),
        row(
            f"{store}: MLflow writes, share of fit",
            round(train["tracking_seconds"] / train["train_seconds"], 4),
            "",
            "<=",
            TRACKING_SHARE,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="sqlite and server runs, alternating")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's line per request

    rounds: dict[str, list[dict]] = {"sqlite": [], "server": []}
    with contextlib.ExitStack() as stack:
        database = stack.enter_context(postgres_server("mlflow"))
        s3 = stack.enter_context(s3_server(BUCKET))
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imgclf-team-server-")))
        artifacts = f"s3://{BUCKET}/mlartifacts"
        url = stack.enter_context(
            mlflow_server(folder, backend_uri=database, artifacts_uri=artifacts, env=s3)
        )
        for _ in range(args.rounds):
            rounds["sqlite"].append(tracked_repro(None, args.keep))
            rounds["server"].append(tracked_repro(url, args.keep))
    best = {store: min(runs, key=lambda r: r["repro_s"]) for store, runs in rounds.items()}

    tracked = {store: round(sum(f["stage_s"][s] for s in TRACKED_STAGES), 2) for store, f in best.items()}
    rows = [
        *rows_for("sqlite", best["sqlite"]),
        *rows_for("server", best["server"]),
        row("tracking stages, server - sqlite", round(tracked["server"] - tracked["sqlite"], 2), "s"),
    ]
    details = {"server": SERVER, "tracked_stages_s": tracked, "best": best, "rounds": rounds}
    write_result("tracking", rows, details)


if __name__ == "__main__":
    main_guard(main)
