"""What a pipeline run keeps beside its outputs, out of git and DVC: what differs between runs.

dvc.lock records the hash of every output, and git tracks dvc.lock and metrics/: for `make run` on
a clean clone to rewrite them byte for byte, the outputs hold only what the same code, data and
config always give. What changes from one run or machine to the next is written here instead,
git-ignored, and to the MLflow run:

- the run file (models/run.json): the MLflow run that made the model (its id, the store, the
  commit), with the SHA-256 of the checkpoint and of the ONNX file it belongs to. A file that DVC
  restored (another run's model) does not match, and is ignored.
- the machine's numbers (metrics/local/<stage>.json): timings, throughput, the exact ONNX parity
  difference, each with the SHA-256 of the file it was measured on.

No mlflow, no torch: the registry, the summary and the server read these files too.
"""

import hashlib
from pathlib import Path

from imgclf.fileio import read_json, write_json

RUN_FILE = "run.json"  # beside models/model.onnx (dvc.yaml passes the path to the stages)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_record(path: Path, record: dict) -> None:
    """Write the run file or a stage's machine numbers (creating metrics/local/ on first use)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)


def read_record(path: Path, **expected: str) -> dict:
    """The record at `path` if every `expected` key has that value there (the file it describes is
    the one at hand); else {} (missing, unreadable, or another run's)."""
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or any(record.get(key) != value for key, value in expected.items()):
        return {}
    return record
