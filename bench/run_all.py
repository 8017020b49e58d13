"""Run the benchmarks in order, each in its own process, then print one summary table.

Exit code 1 if a benchmark failed to run; a missed target is reported, not an error,
unless --strict.
"""

import argparse
import json
import subprocess
import sys
import time

from common import RESULTS_DIR, ROOT, format_rows

BENCHMARKS = [
    "pipeline",
    "accuracy",
    "polarity",
    "lightning_vs_plain",
    "onnx_vs_torch",
    "imagefolder",
    "mnist_recipe",
    "serving",
    "serving_peers",
    "serving_swap",
    "serving_webhook",
    "serving_monitor",
    "drift",
    "registry",
    "registry_cli",
    "remote",
    "tracking",
    "ddp",
    "sweep",
    "isa",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"some of {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--strict", action="store_true", help="exit 1 on a missed target too")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")

    failed, summary = [], []
    for name in args.names or BENCHMARKS:
        result_path = RESULTS_DIR / f"{name}.json"
        result_path.unlink(missing_ok=True)  # no stale result if this run fails
        print(f"\n=== {name} ===", flush=True)
        started = time.perf_counter()
        code = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py")]).returncode
        print(f"({name}: {time.perf_counter() - started:.1f} s)", flush=True)
        if code or not result_path.is_file():
            failed.append(f"{name} (exit code {code})")
            continue
        rows = json.loads(result_path.read_text(encoding="utf-8"))["rows"]
        summary += [{"bench": name, **r} for r in rows]

    print("\n=== summary ===")
    print(format_rows(summary))
    missed = [r["metric"] for r in summary if r["ok"] is False]
    checked = sum(r["ok"] is not None for r in summary)
    print(f"\ntargets met: {checked - len(missed)}/{checked}")
    if failed:
        print(f"FAILED to run: {', '.join(failed)}")
    return 1 if failed or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
