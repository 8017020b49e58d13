"""What the drift monitor (on by default) costs `imgclf serve`: the same model served twice, side by side.

`imgclf serve --model models/model.onnx` as a user starts it (windows of 200) and the same with
`--monitor-window 0`, each in its own process group on a free 127.0.0.1 port; the load is
serving_peers' (--clients keep-alive `http.client` processes, one 8x8 digit PNG per request as the
raw body), --rounds rounds, each loading both servers one after the other in alternating order.
Reported: the median requests/s of each and the median of the per-round ratios (target: the
monitor keeps at least 95 % of the requests/s). serving_peers.py has the same pair among its six
targets in three rounds; on a shared 2-core machine single rounds swing by 10-20 %, so this one
takes more rounds of just the two.
"""

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

from common import main_guard, row, write_result
from serving import image_png, pipeline_copy
from serving_peers import load

from tests.support.repo import pipeline_env
from tests.support.servers import free_port, server_group

RATIO_TARGET = 0.95
SERVERS = {"monitor on (window 200)": [], "monitor off (--monitor-window 0)": ["--monitor-window", "0"]}


def measure(copy: Path, args: argparse.Namespace, folder: Path) -> tuple[list[dict], dict]:
    model = copy / "models" / "model.onnx"
    png = image_png(model, folder).read_bytes()
    env = pipeline_env(copy)
    env.pop("IMGCLF_TOKEN", None)
    imgclf = str(Path(sys.prefix) / "bin" / "imgclf")
    rounds: dict[str, list[float]] = {name: [] for name in SERVERS}
    with contextlib.ExitStack() as started:
        targets = {}
        for index, (name, options) in enumerate(SERVERS.items()):
            port = free_port()
            command = [imgclf, "serve", "--model", str(model), *options, "--port", str(port)]
            health = f"http://127.0.0.1:{port}/health"
            started.enter_context(server_group(name, command, copy, env, health, folder / f"{index}.log"))
            headers = {"Content-Type": "image/png"}
            targets[name] = {
                "name": name,
                "port": port,
                "path": "/v1/predict",
                "body": png,
                "headers": headers,
            }
        names = list(SERVERS)
        for index in range(args.rounds):
            for name in names if index % 2 == 0 else names[::-1]:
                rounds[name].append(load(targets[name], args)["requests_per_s"])
            print(
                f"round {index + 1}: " + ", ".join(f"{n} {r[-1]:.0f}/s" for n, r in rounds.items()),
                flush=True,
            )
    on, off = rounds.values()
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    rows = [
        row(f"{name}: throughput", statistics.median(figures), "req/s") for name, figures in rounds.items()
    ]
    rows.append(
        row("monitor on / off, requests/s", round(statistics.median(ratios), 3), "x", ">=", RATIO_TARGET)
    )
    return rows, {"rounds": rounds, "ratios": [round(r, 3) for r in ratios]}


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
    parser.add_argument("--rounds", type=int, default=8, help="rounds over the two servers (medians)")
    args = parser.parse_args()
    details = {"args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-monitor-") as tmp, pipeline_copy(args.copy) as copy:
        rows, measured = measure(copy, args, Path(tmp))
    write_result("serving_monitor", rows, details | measured)


if __name__ == "__main__":
    main_guard(main)
