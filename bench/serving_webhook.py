"""Serving follows the champion on MLflow's webhooks: how soon a moved alias is served.

A real `mlflow server` on a free 127.0.0.1 port (allowed to deliver webhooks over http to
loopback: MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https, MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true, and
MLFLOW_WEBHOOK_CACHE_TTL=1 so that the new webhook is used at once) holds two versions of a small
digits MLP (bench/serving_swap.py's, seeds 0 and 1), `champion` on version 1. `imgclf serve
--model models:/imgclf@champion --refresh 300` runs in its own process with
IMGCLF_WEBHOOK_SECRET set and an empty version cache; `imgclf webhook register` points the server's
webhook at it. The bench then moves `champion` between the versions --moves times, --dwell
seconds apart, and after each move posts one digit to /v1/predict in a closed loop until the
`X-Model-Version` header names the new version.

Reported: seconds from the alias move (MlflowClient.set_registered_model_alias called) to the
first answer from the new version: median and largest over the moves, and the first move alone
(it also downloads version 2; later moves load from the cache). With --refresh 300, a poll cannot
explain any of them: every swap is the webhook's.
"""

import argparse
import http.client
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import ROOT, BenchError, main_guard, row, write_result
from serving_swap import NAME, digits, multipart, png, register_versions, start_server

from tests.support.repo import VENV_BIN
from tests.support.servers import free_port, mlflow_server

SECRET = "bench-webhook-secret"
REFRESH_S = 300.0  # no poll in the bench's time: each swap is a webhook's
SERVER_ENV = {
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    "MLFLOW_WEBHOOK_CACHE_TTL": "1",
}
ANSWER_DEADLINE_S = 30.0


def register_webhook(store: str, url: str, folder: Path) -> str:
    """`imgclf webhook register --url URL`, as a user runs it; its output line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(ROOT / "src")}
    command = [str(VENV_BIN / "imgclf"), "webhook", "register", "--url", url]
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode:
        raise BenchError(f"`{' '.join(command)}` exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout.strip()


def time_to_new_version(port: int, body: bytes, alias, version: str) -> float:
    """Move `champion` to `version` (`alias`: an MlflowClient), then post `body` until that version
    answers; the seconds from the move."""
    headers = {"Content-Type": "multipart/form-data; boundary=imgclf-bench-boundary"}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        moved = time.monotonic()
        alias.set_registered_model_alias(NAME, "champion", version)
        while time.monotonic() - moved < ANSWER_DEADLINE_S:
            connection.request("POST", "/v1/predict", body, headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise BenchError(f"POST /v1/predict answered {response.status}")
            if response.getheader("X-Model-Version") == version:
                return time.monotonic() - moved
    finally:
        connection.close()
    raise BenchError(f"version {version} did not answer within {ANSWER_DEADLINE_S} s of the move")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=8, help="alias moves, alternately to 2 and 1")
    parser.add_argument("--dwell", type=float, default=1.0, help="seconds between moves")
    args = parser.parse_args()
    images, labels = digits()
    body = multipart(png(images[0]))
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-webhook-") as tmp:
        folder = Path(tmp)
        os.environ["XDG_CACHE_HOME"] = str(folder / "cache")  # the server starts with no version cached
        os.environ["IMGCLF_WEBHOOK_SECRET"] = SECRET  # read by the server and by `imgclf webhook`
        with mlflow_server(folder / "mlflow", env=SERVER_ENV) as store:
            print("training and registering two versions ...", flush=True)
            register_versions(store, images, labels)
            from mlflow import MlflowClient

            alias = MlflowClient(tracking_uri=store, registry_uri=store)
            port = free_port()
            server, log = start_server(store, REFRESH_S, port, folder)
            try:
                print(register_webhook(store, f"http://127.0.0.1:{port}/v1/webhooks/mlflow", folder))
                time.sleep(1.5)  # past MLFLOW_WEBHOOK_CACHE_TTL: the server lists the new webhook
                delays, version = [], "2"
                for _ in range(args.moves):
                    delays.append(time_to_new_version(port, body, alias, version))
                    time.sleep(args.dwell)
                    version = "1" if version == "2" else "2"
            finally:
                server.terminate()
                server.wait(timeout=30)
            text = log.read_text()
    swaps = text.count("now serving version")
    if swaps != args.moves:
        raise BenchError(f"the server logged {swaps} swaps for {args.moves} moves:\n{text[-3000:]}")
    rows = [
        row(
            f"alias move -> first answer from the new version (webhook), median of {args.moves}",
            round(statistics.median(delays), 3),
            "s",
            "<=",
            1.0,
        ),
        row("alias move -> first answer from the new version (webhook), largest", round(max(delays), 3), "s"),
        row("the first move (downloads the version)", round(delays[0], 3), "s"),
    ]
    details = {"args": vars(args), "refresh_s": REFRESH_S, "delays_s": [round(d, 4) for d in delays]}
    write_result("serving_webhook", rows, details)


if __name__ == "__main__":
    main_guard(main)
