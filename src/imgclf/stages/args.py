"""What the DVC stage scripts in pipelines/ share: their paths come from their `cmd:` lines.

dvc.yaml is the one place that names the pipeline's files: each stage's `cmd:` passes every path
the stage reads or writes as `--name PATH`, and the library functions take them as arguments.
"""

import argparse
from pathlib import Path


def stage_paths(description: str, *names: str) -> argparse.Namespace:
    """Parse `--<name> PATH` for each of `names` (all required; `_` in a name is `-` on the line)."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    for name in names:
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, dest=name, type=Path, required=True, metavar="PATH")
    return parser.parse_args()
