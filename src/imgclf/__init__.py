"""imgclf: train, export and serve image classifiers with a reproducible pipeline.

The package is layered; each layer may import the ones below it, never above (import-linter's
contracts in pyproject.toml, checked by `make lint`):

- cli.py: the `imgclf` command; imports each subsystem lazily, per command.
- sweep/, registry/: operations (Optuna studies; the MLflow Model Registry and promotion).
- stages/: the DVC stages' library code (training, export, evaluation).
- tracking/: MLflow runs, the worker process that makes a stage's MLflow calls, plots, the summary.
- serving/: the inference path (`imgclf predict`, `imgclf serve`): no torch, lightning or mlflow.
- data/, models/: data sets and networks; they know nothing of tracking, registry or stages.
- drift/: the drift reference (computed by export) and the windowed tests `imgclf serve` and
  `imgclf drift` run: numpy only, on the inference path.
- config/: conf/ composed into params.yaml, and its schema.
- The inference-safe base, at the top: card.py (what a model expects and answers), images.py
  (decoding uploads and files), runtime.py (ONNX Runtime sessions), errors.py, fileio.py
  (atomic writes). These import no torch, lightning or mlflow.
- supervisor.py, beside them: runs the make targets' servers so that stopping one leaves no process.
"""

import os

# Dependencies' usage reporting is off unless the user set the variable: here, because every entry
# point (the CLI, each stage, the tracking worker it spawns) imports this package before
# onnxruntime or mlflow, and ONNX Runtime reads its switch once, when it is imported. Left on,
# ONNX Runtime writes a device id and a usage database under ~/.cache/Microsoft and a `.ses` file
# in the temporary folder, and MLflow an installation id in ~/.config/mlflow, and both upload.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
