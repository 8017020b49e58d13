"""What the benchmarks share beyond the test infrastructure: timing, result rows and their report.

Copies of the repo and servers are tests/support's (the tests use them too).
"""

import json
import operator
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as `python bench/NAME.py`, a benchmark has bench/ on sys.path, not the repo root that
# `tests.support` is imported from.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.repo import SetupError, run  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
OPS = {"<=": operator.le, ">=": operator.ge}


class BenchError(Exception):
    """A benchmark cannot run; the message says why (printed without a traceback)."""


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    """Wall seconds of one successful run of `cmd`."""
    started = time.perf_counter()
    run(cmd, cwd, env)
    return time.perf_counter() - started


def timed_lines(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None
) -> tuple[float, list[tuple[float, str]]]:
    """Wall seconds of `cmd`, and each output line with the second it arrived (from the start)."""
    started = time.perf_counter()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            lines.append((time.perf_counter() - started, line.rstrip("\n")))
    seconds = time.perf_counter() - started
    if process.returncode:
        tail = "\n".join(line for _, line in lines)[-3000:]
        raise BenchError(f"`{' '.join(cmd)}` failed with exit code {process.returncode}:\n{tail}")
    return seconds, lines


def row(
    metric: str, value: float, unit: str = "", op: str | None = None, target: float | None = None
) -> dict:
    """One result line; with `op` and `target` it also says whether the target is met."""
    ok = None if op is None else bool(OPS[op](value, target))
    return {"metric": metric, "value": value, "unit": unit, "op": op, "target": target, "ok": ok}


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of result rows; a "bench" column first when the rows have one."""
    table = []
    for r in rows:
        target = f"{r['op']} {r['target']:g}" if r["op"] else ""
        status = {None: "", True: "ok", False: "MISSED"}[r["ok"]]
        value = r["value"]
        if isinstance(value, float):
            value = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
        cells = [r["metric"], f"{value} {r['unit']}".strip(), target, status]
        table.append([r["bench"], *cells] if "bench" in r else cells)
    if not table:
        return ""
    widths = [max(len(cells[i]) for cells in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in table]
    return "\n".join(line.rstrip() for line in lines)


def write_result(name: str, rows: list[dict], details: dict | None = None) -> Path:
    """Print the rows and write bench/results/<name>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    result = {
        "name": name,
        "rows": rows,
        "details": details or {},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "python": sys.version.split()[0],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(format_rows(rows))
    print(f"-> {path.relative_to(ROOT)}")
    return path


def main_guard(main) -> None:
    """Run `main`; a BenchError, or a command or server that failed, ends the script with its
    message and exit code 1."""
    try:
        main()
    except (BenchError, SetupError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def add_override_option(parser) -> None:
    """`--set OVERRIDE` (repeatable): an extra `imgclf params` override for a quick run."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="extra `imgclf params` override for a quick run, e.g. train.max_epochs=2",
    )


def pipeline_metrics(root: Path, stage: str) -> dict:
    """metrics/<stage>.json (git-tracked: what every run gives) with metrics/local/<stage>.json
    (this machine's timings, git-ignored) when the stage wrote one."""
    metrics = json.loads((root / "metrics" / f"{stage}.json").read_text(encoding="utf-8"))
    local = root / "metrics" / "local" / f"{stage}.json"
    return metrics | (json.loads(local.read_text(encoding="utf-8")) if local.is_file() else {})
