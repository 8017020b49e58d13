"""Serving throughput beside its peers: `imgclf serve`, `mlflow models serve`, LitServe, a bare ASGI app.

The digits MLP comes from `dvc repro` in a committed temporary copy of the work tree (or --copy,
a folder where the pipeline already ran); the export stage logged it to the copy's MLflow store.
Four servers run side by side on 127.0.0.1, each on a free port in its own process group
(stopped as a group at the end):

- `imgclf serve --model models/model.onnx`, as a user starts it (default options), loaded twice:
  with the PNG as multipart field `file` (`curl -F`), and with the PNG as the body,
  `Content-Type: image/png` (`curl --data-binary`);
- `mlflow models serve -m models:/<logged model id> --env-manager local` on the same ONNX model;
  its request is the image as a JSON tensor (uint8 (1, 1, 8, 8)), so it decodes no PNG;
- LitServe (`litserve`, pinned in requirements.lock; it installs and runs offline): a LitAPI
  (LITSERVE_APP) that reads the same multipart body as imgclf's, decodes the PNG with imgclf's
  decode and runs the same ONNX file in ONNX Runtime with one intra-op thread, as `imgclf serve`
  does; LitServer on the CPU with its defaults (one inference worker process, one API server
  process) and `fast_queue=True` (ZeroMQ between them, its faster queue). It takes no raw image
  body: its requests are a form or JSON;
- a bare ASGI app under uvicorn with imgclf's uvicorn settings, that reads the same multipart body
  as imgclf's and answers a constant: the ceiling of a Python ASGI server on this machine;
- `imgclf serve --monitor-window 0` with the raw body: what the drift monitor (on by default)
  costs. Multipart is FastAPI's own parsing: no target against the bare app, which parses nothing.

Load generator: --clients Python client processes (multiprocessing, spawned), each one keep-alive
connection (http.client) posting one 8x8 digit image per request in a closed loop: --warmup
seconds unmeasured, then --seconds measured. Every answer's status is checked, and before the
load every server's probabilities for the image are checked against imgclf's. Each round loads
the six targets one after another (in a rotated order), so they share the machine's state;
reported: the median over --rounds of requests/s and p99 latency, and of the per-round ratios.
The 1-minute load average before each round is kept in the result (the machine may be shared).
"""

import argparse
import contextlib
import http.client
import json
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import BenchError, main_guard, row, write_result
from serving import image_png, pipeline_copy

from tests.support.repo import pipeline_env
from tests.support.servers import free_port, server_group

MLFLOW_RATIO_TARGET = 2.0  # imgclf serve's requests/s with a raw body over mlflow models serve's
LITSERVE_RATIO_TARGET = 1.0  # the same over LitServe's
# The drift monitor (on by default) costs at most 5 % of the raw body's requests/s: against a
# second `imgclf serve --monitor-window 0` in the same rounds.
MONITOR_RATIO_TARGET = 0.95
CLIENT_GRACE_S = 60  # for clients to start, connect and report, beyond the load itself
IMGCLF, MLFLOW, LITSERVE, BARE = "imgclf serve", "mlflow models serve", "LitServe", "bare ASGI"
IMGCLF_FORM, IMGCLF_RAW = f"{IMGCLF}, multipart", f"{IMGCLF}, raw body"
IMGCLF_UNWATCHED = f"{IMGCLF} --monitor-window 0"
IMGCLF_RAW_UNWATCHED = f"{IMGCLF_UNWATCHED}, raw body"
COMPARISONS = [  # (ours, theirs, target of the requests/s ratio or None)
    (IMGCLF_RAW, MLFLOW, MLFLOW_RATIO_TARGET),
    (IMGCLF_RAW, LITSERVE, LITSERVE_RATIO_TARGET),
    (IMGCLF_FORM, MLFLOW, None),
    (IMGCLF_FORM, LITSERVE, None),
    (IMGCLF_FORM, BARE, None),
    (IMGCLF_RAW, BARE, None),
    (IMGCLF_RAW, IMGCLF_FORM, None),
    (IMGCLF_RAW, IMGCLF_RAW_UNWATCHED, MONITOR_RATIO_TARGET),
]
BOUNDARY = "imgclf-bench-boundary"
MLFLOW_OPTIONS = ["--env-manager", "local", "--host", "127.0.0.1", "--port"]  # the port follows
# The bare app: uvicorn as `imgclf serve` runs it (uvloop and httptools when installed, no access
# log, no websockets), reading the whole body and answering a constant JSON.
BARE_APP = """
import sys, uvicorn
ANSWER = b'{"predictions":[]}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), ws="none", lifespan="off",
            access_log=False, log_level="warning", server_header=False)
"""
# LitServe: run as `python litserve_app.py MODEL PORT` (a file: its worker processes import it).
LITSERVE_APP = """
import sys
import litserve as ls


class ImageClassifier(ls.LitAPI):
    def __init__(self, model_path):
        super().__init__()
        self.model_path = model_path

    def setup(self, device):
        from imgclf.serving.model import ServedModel

        self.model = ServedModel.load(self.model_path, threads=1)

    def decode_request(self, request):
        return request["file"].file.read()  # the multipart field `file`, as imgclf's

    def predict(self, data):
        return self.model.predict(self.model.preprocess(data)[None])[0]

    def encode_response(self, probabilities):
        classes = self.model.card.classes
        best = classes[int(probabilities.argmax())]
        return {"predictions": [{"label": best, "probabilities": dict(zip(classes, probabilities.tolist()))}]}


if __name__ == "__main__":
    server = ls.LitServer(ImageClassifier(sys.argv[1]), accelerator="cpu", fast_queue=True)
    server.run(host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", generate_client_file=False)
"""


def logged_model_id(copy: Path, store: str) -> str:
    """The id of the ONNX model the export stage logged in the pipeline's run (`models:/<id>`)."""
    from mlflow import MlflowClient

    run_id = json.loads((copy / "models" / "run.json").read_text(encoding="utf-8"))["mlflow_run_id"]
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    for output in run.outputs.model_outputs if run.outputs else []:
        if client.get_logged_model(output.model_id).name == "model":
            return output.model_id
    raise BenchError(f"run {run_id} in {store} has no logged model named `model`")


def multipart(png: bytes) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="digit.png"\r\n'
    head += "Content-Type: image/png\r\n\r\n"
    return head.encode() + png + f"\r\n--{BOUNDARY}--\r\n".encode()


def client(port: int, path: str, body: bytes, headers: dict, times: tuple, barrier, results) -> None:
    """One keep-alive connection in a closed loop: after the barrier, `times[0]` s of warm-up, then
    `times[1]` s measured; sends the latencies of the measured requests (or an error) to `results`."""
    warmup, seconds = times
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.connect()
    barrier.wait()
    measured_from = time.perf_counter() + warmup
    until = measured_from + seconds
    latencies = []
    try:
        while True:
            sent = time.perf_counter()
            if sent >= until:
                break
            connection.request("POST", path, body, headers)
            response = connection.getresponse()
            answer = response.read()
            answered = time.perf_counter()
            if response.status != 200:
                raise BenchError(f"{response.status} from 127.0.0.1:{port}{path}: {answer[:300]!r}")
            if sent >= measured_from and answered <= until:
                latencies.append(answered - sent)
    except Exception as error:  # the parent reports it: a failed request spoils the figure
        results.put(f"{type(error).__name__}: {error}")
        return
    results.put(latencies)


def load(target: dict, args: argparse.Namespace) -> dict:
    """--clients processes against one server: requests/s and latency percentiles."""
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(args.clients), spawn.Queue()
    work = (target["port"], target["path"], target["body"], target["headers"], (args.warmup, args.seconds))
    processes = [spawn.Process(target=client, args=(*work, barrier, results)) for _ in range(args.clients)]
    for process in processes:
        process.start()
    answers: list = []
    deadline = time.monotonic() + args.warmup + args.seconds + CLIENT_GRACE_S
    try:
        while len(answers) < len(processes):
            try:
                answers.append(results.get(timeout=1))
            except queue.Empty:
                crashed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if crashed or time.monotonic() > deadline:
                    raise BenchError(
                        f"{target['name']}: a client crashed or hung (exit codes {crashed})"
                    ) from None
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
    errors = [answer for answer in answers if isinstance(answer, str)]
    if errors:
        raise BenchError(f"{target['name']}: {errors[0]}")
    milliseconds = np.array([latency for answer in answers for latency in answer]) * 1000
    return {
        "requests_per_s": round(len(milliseconds) / args.seconds, 1),
        "p50_ms": round(float(np.percentile(milliseconds, 50)), 3),
        "p99_ms": round(float(np.percentile(milliseconds, 99)), 3),
        "requests": len(milliseconds),
    }


def one_answer(target: dict) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", target["port"], timeout=30)
    connection.request("POST", target["path"], target["body"], target["headers"])
    response = connection.getresponse()
    answer = response.read()
    if response.status != 200:
        raise BenchError(f"{target['name']}: {response.status} {answer[:300]!r}")
    return answer


def check_same_model(loads: dict[str, dict]) -> None:
    """Every target but the bare app answers imgclf's probabilities for the image: the same model."""
    answers = {
        name: json.loads(one_answer(loads[name]))
        for name in (IMGCLF_FORM, IMGCLF_RAW, IMGCLF_RAW_UNWATCHED, LITSERVE)
    }
    probabilities = {name: list(a["predictions"][0]["probabilities"].values()) for name, a in answers.items()}
    probabilities[MLFLOW] = json.loads(one_answer(loads[MLFLOW]))["predictions"]["probabilities"][0]
    ours = probabilities[IMGCLF_FORM]
    for name, theirs in probabilities.items():
        if not np.allclose(ours, theirs, atol=1e-6):
            raise BenchError(f"the servers disagree: {IMGCLF_FORM} {ours}, {name} {theirs}")


def measure(copy: Path, args: argparse.Namespace, folder: Path) -> tuple[list[dict], dict]:
    from imgclf.serving.model import ServedModel

    model = copy / "models" / "model.onnx"
    store = f"sqlite:///{copy / 'mlflow.db'}"
    model_id = logged_model_id(copy, store)
    png = image_png(model, folder).read_bytes()
    pixels = ServedModel.load(str(model)).preprocess(png)[None]  # what imgclf feeds the model
    litserve_app = folder / "litserve_app.py"
    litserve_app.write_text(LITSERVE_APP, encoding="utf-8")
    bin_dir = Path(sys.prefix) / "bin"
    mlflow = [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{model_id}", *MLFLOW_OPTIONS]
    servers = {  # name: (command, to which the port is appended; health check path)
        IMGCLF: ([str(bin_dir / "imgclf"), "serve", "--model", str(model), "--port"], "/health"),
        IMGCLF_UNWATCHED: (
            [str(bin_dir / "imgclf"), "serve", "--model", str(model), "--monitor-window", "0", "--port"],
            "/health",
        ),
        MLFLOW: (mlflow, "/ping"),
        LITSERVE: ([sys.executable, str(litserve_app), str(model)], "/health"),
        BARE: ([sys.executable, "-c", BARE_APP], "/health"),
    }
    form = {"body": multipart(png), "headers": {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}}
    loads = {  # what the clients send to each target
        IMGCLF_FORM: form | {"server": IMGCLF, "path": "/v1/predict"},
        IMGCLF_RAW: {
            "server": IMGCLF,
            "path": "/v1/predict",
            "body": png,
            "headers": {"Content-Type": "image/png"},
        },
        IMGCLF_RAW_UNWATCHED: {
            "server": IMGCLF_UNWATCHED,
            "path": "/v1/predict",
            "body": png,
            "headers": {"Content-Type": "image/png"},
        },
        MLFLOW: {
            "server": MLFLOW,
            "path": "/invocations",
            "body": json.dumps({"inputs": pixels.tolist()}).encode(),
            "headers": {"Content-Type": "application/json"},
        },
        LITSERVE: form | {"server": LITSERVE, "path": "/predict"},
        BARE: form | {"server": BARE, "path": "/v1/predict"},
    }
    env = pipeline_env(copy) | {"MLFLOW_TRACKING_URI": store, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    env.pop("IMGCLF_TOKEN", None)
    rounds: dict[str, list[dict]] = {name: [] for name in loads}
    load_average = []
    with contextlib.ExitStack() as started:
        ports = {}
        for name, (command, health_path) in servers.items():
            ports[name] = free_port()
            health = f"http://127.0.0.1:{ports[name]}{health_path}"
            log = folder / f"{name.replace(' ', '_')}.log"
            started.enter_context(server_group(name, [*command, str(ports[name])], copy, env, health, log))
            print(f"{name}: up", flush=True)
        for name, target in loads.items():
            target |= {"name": name, "port": ports[target["server"]]}
        check_same_model(loads)
        names = list(loads)
        for index in range(args.rounds):
            load_average.append(round(os.getloadavg()[0], 2))
            print(f"round {index + 1}: load average {load_average[-1]} before it", flush=True)
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                rounds[name].append(load(loads[name], args))
                print(f"  round {index + 1}, {name}: {rounds[name][-1]}", flush=True)
    details = {"model_id": model_id, "load_average_1min_before_rounds": load_average, "rounds": rounds}
    return summarize(rounds, args.clients), details


def ratio(ours: list[dict], theirs: list[dict]) -> float:
    """The median over rounds of the requests/s ratio, each round's figures taken side by side."""
    ratios = [a["requests_per_s"] / b["requests_per_s"] for a, b in zip(ours, theirs, strict=True)]
    return round(statistics.median(ratios), 2)


def summarize(rounds: dict[str, list[dict]], clients: int) -> list[dict]:
    rows = []
    for name, figures in rounds.items():
        throughput = statistics.median(f["requests_per_s"] for f in figures)
        rows.append(row(f"{name}: throughput, {clients} clients", throughput, "req/s"))
        rows.append(
            row(f"{name}: p99, {clients} clients", statistics.median(f["p99_ms"] for f in figures), "ms")
        )
    for ours, theirs, target in COMPARISONS:
        goal = (">=", target) if target is not None else ()
        rows.append(row(f"{ours} / {theirs}, requests/s", ratio(rounds[ours], rounds[theirs]), "x", *goal))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--copy", type=Path, help="a copy of the repo where `dvc repro` ran (default: a fresh one)"
    )
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per server per round")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds before each measurement"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the six targets (medians)")
    args = parser.parse_args()
    details = {"args": {k: str(v) for k, v in vars(args).items()}, "load_generator": "http.client processes"}
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-peers-") as tmp, pipeline_copy(args.copy) as copy:
        rows, measured = measure(copy, args, Path(tmp))
    write_result("serving_peers", rows, details | measured)


if __name__ == "__main__":
    main_guard(main)
