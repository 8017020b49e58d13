"""Serving follows the champion: how soon a moved alias is served, and what the swap costs clients.

`imgclf serve --model models:/imgclf@champion --refresh R` runs in its own process against a
sqlite MLflow store built in a temporary folder: two versions of a small MLP trained here with
plain PyTorch on scikit-learn's 8x8 digits (seeds 0 and 1), registered as the pipeline registers
them (the ONNX logged by mlflow.onnx.log_model in a run, then a version made from the logged
model), `champion` on version 1. --clients client processes each post one 8x8 digit PNG per
request on a keep-alive connection, in a closed loop, recording for every request when it was
sent and answered, its status and the `X-Model-Version` that answered it. The bench moves
`champion` between the two versions --moves times, --dwell seconds apart.

Reported: seconds from an alias move to the first answer from the new version (median and
largest over the moves; about R/2 for the poll plus the download and load); the largest latency
of a request sent in a swap window (from the move to 1 s after the first new answer) beside the
p99 latency outside those windows; requests that failed (must be 0).
"""

import argparse
import http.client
import io
import multiprocessing
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, BenchError, main_guard, row, write_result

from tests.support.repo import VENV_BIN
from tests.support.servers import free_port

NAME = "imgclf"
URI = f"models:/{NAME}@champion"
BOUNDARY = "imgclf-bench-boundary"
SWAP_MARGIN_S = 1.0  # a swap window lasts until this long after the first answer from the new version
EPOCHS = 30


# --- two registered versions ------------------------------------------------------------------


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as the pipeline's digits source gives them: uint8 (N, 1, 8, 8), labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return np.rint(data.images * (255 / 16)).astype(np.uint8)[:, None], data.target.astype(np.int64)


def train_mlp(images: np.ndarray, labels: np.ndarray, seed: int):
    """A 64-32-10 MLP behind the pipeline's Normalize layer, trained with Adam: (model, card)."""
    import torch
    from torch import nn
    from torch.nn import functional

    from imgclf.card import InputSpec, ModelCard, Normalization
    from imgclf.data.normalize import ChannelStats
    from imgclf.models.normalization import Normalize
    from imgclf.stages.export import Probabilities

    stats = ChannelStats()
    stats.update(images)
    card = ModelCard(
        tuple(map(str, range(10))), InputSpec.for_shape((1, 8, 8), "stretch"), Normalization(**stats.result())
    )
    torch.manual_seed(seed)
    net = nn.Sequential(
        Normalize(card.normalization.mean, card.normalization.std),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    for _ in range(EPOCHS):
        for batch in torch.randperm(len(x)).split(64):
            loss = functional.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return Probabilities(net).eval(), card


def register_versions(store: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Versions 1 and 2 of NAME in `store`'s registry (two seeds of the MLP), `champion` on 1."""
    import mlflow
    import mlflow.onnx
    import torch
    from mlflow import MlflowClient

    from imgclf.stages.export import to_onnx

    mlflow.set_tracking_uri(store)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    client.create_registered_model(NAME)
    for seed in (0, 1):
        model, card = train_mlp(images, labels, seed)
        proto = to_onnx(model, torch.from_numpy(images[:2]), card)
        with mlflow.start_run(experiment_id="0") as run:
            info = mlflow.onnx.log_model(proto, name="model", save_as_external_data=False)
        client.create_model_version(
            NAME, source=f"models:/{info.model_id}", run_id=run.info.run_id, model_id=info.model_id
        )
    client.set_registered_model_alias(NAME, "champion", "1")


def build_store(folder: Path, images: np.ndarray, labels: np.ndarray) -> str:
    """A sqlite store with versions 1 and 2 of NAME and `champion` on 1; its URI."""
    from imgclf.tracking.store import prepare_store

    store = f"sqlite:///{folder / 'mlflow.db'}"
    prepare_store(store)
    register_versions(store, images, labels)
    return store


# --- the server and its clients ---------------------------------------------------------------


def start_server(store: str, refresh: float, port: int, folder: Path) -> tuple[subprocess.Popen, Path]:
    command = [str(VENV_BIN / "imgclf"), "serve", "--model", URI, "--refresh", str(refresh)]
    command += ["--port", str(port), "--threads", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    env.pop("IMGCLF_TOKEN", None)
    log = folder / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise BenchError(f"`{' '.join(command)}` exited: {log.read_text()[-2000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return server, log
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise BenchError(f"the server did not answer /health within 120 s: {log.read_text()[-2000:]}")


def multipart(png: bytes) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="digit.png"\r\n'
    head += "Content-Type: image/png\r\n\r\n"
    return head.encode() + png + f"\r\n--{BOUNDARY}--\r\n".encode()


def client(port: int, pngs: list[bytes], first: int, stop, results) -> None:
    """A closed loop of POST /v1/predict on one keep-alive connection until `stop`; the records go
    to `results`: (sent, answered, status, version) per request, on the system's monotonic clock."""
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    bodies = [multipart(png) for png in pngs]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    records, index = [], first
    while not stop.is_set():
        sent = time.monotonic()
        try:
            connection.request("POST", "/v1/predict", bodies[index % len(bodies)], headers)
            response = connection.getresponse()
            response.read()
            status, version = response.status, response.getheader("X-Model-Version")
        except (OSError, http.client.HTTPException):
            status, version = 0, None  # a failed request: counted, then a fresh connection
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        records.append((sent, time.monotonic(), status, version))
        index += 1
    results.put(records)


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[0], "L").save(buffer, format="PNG")
    return buffer.getvalue()


def run_moves(
    store: str, args: argparse.Namespace, pngs: list[bytes], folder: Path
) -> tuple[list, list, str]:
    """Serve, load, move the alias; (moves as (time, version), request records, server log)."""
    from mlflow import MlflowClient

    alias = MlflowClient(tracking_uri=store, registry_uri=store)
    port = free_port()
    server, log = start_server(store, args.refresh, port, folder)
    spawn = multiprocessing.get_context("spawn")
    stop, results = spawn.Event(), spawn.Queue()
    clients = [
        spawn.Process(target=client, args=(port, pngs, k * 97, stop, results)) for k in range(args.clients)
    ]
    try:
        for process in clients:
            process.start()
        time.sleep(args.warmup)
        moves, version = [], "2"
        for _ in range(args.moves):
            moved = time.monotonic()
            alias.set_registered_model_alias(NAME, "champion", version)
            moves.append((moved, version))
            time.sleep(args.dwell)
            version = "1" if version == "2" else "2"
        stop.set()
        records = [record for _ in clients for record in results.get(timeout=60)]
        for process in clients:
            process.join(timeout=30)
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=30)
    return moves, sorted(records), log.read_text()


def analyse(moves: list, records: list, refresh: float) -> tuple[list[dict], dict]:
    delays, windows = [], []
    for moved, version in moves:
        answers = [answered for sent, answered, status, v in records if answered >= moved and v == version]
        if not answers:
            raise BenchError(f"no answer from version {version} after the move at {moved:.1f}")
        delays.append(min(answers) - moved)
        windows.append((moved, min(answers) + SWAP_MARGIN_S))
    in_window = [r for r in records if any(start <= r[0] <= end for start, end in windows)]
    outside = [r for r in records if not any(start <= r[0] <= end for start, end in windows)]
    failed = sum(status != 200 for _, _, status, _ in records)
    latency_ms = lambda rs: np.array([answered - sent for sent, answered, _, _ in rs]) * 1000  # noqa: E731
    swap_max = float(latency_ms(in_window).max())
    steady = latency_ms(outside)
    rows = [
        row(
            f"alias move -> first answer from the new version, median of {len(moves)}",
            round(statistics.median(delays), 3),
            "s",
            "<=",
            refresh + 1.0,
        ),
        row("alias move -> first answer from the new version, largest", round(max(delays), 3), "s"),
        row("largest request latency in a swap window", round(swap_max, 1), "ms"),
        row("p99 request latency outside swap windows", round(float(np.percentile(steady, 99)), 1), "ms"),
        row("requests failed", failed, "", "<=", 0),
    ]
    details = {
        "delays_s": [round(d, 4) for d in delays],
        "requests": len(records),
        "requests_in_swap_windows": len(in_window),
        "steady_p50_ms": round(float(np.percentile(steady, 50)), 2),
        "steady_max_ms": round(float(steady.max()), 1),
        "swap_window_p99_ms": round(float(np.percentile(latency_ms(in_window), 99)), 1),
    }
    return rows, details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refresh", type=float, default=1.0, help="imgclf serve --refresh R, seconds")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--moves", type=int, default=6, help="alias moves, alternately to 2 and 1")
    parser.add_argument("--dwell", type=float, default=4.0, help="seconds between moves")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the first move")
    args = parser.parse_args()
    if args.dwell <= args.refresh + SWAP_MARGIN_S:
        raise BenchError(f"--dwell {args.dwell}: must exceed --refresh plus {SWAP_MARGIN_S} s")
    images, labels = digits()
    pngs = [png(image) for image in images[:64]]
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-swap-") as tmp:
        folder = Path(tmp)
        print("training and registering two versions ...", flush=True)
        store = build_store(folder, images, labels)
        print(
            f"serving {URI} --refresh {args.refresh:g}, {args.clients} clients, {args.moves} moves ...",
            flush=True,
        )
        moves, records, log = run_moves(store, args, pngs, folder)
    swaps = log.count("now serving version")
    if swaps != len(moves):
        raise BenchError(f"the server logged {swaps} swaps for {len(moves)} moves:\n{log[-3000:]}")
    rows, details = analyse(moves, records, args.refresh)
    write_result("serving_swap", rows, {"args": vars(args), **details})


if __name__ == "__main__":
    main_guard(main)
