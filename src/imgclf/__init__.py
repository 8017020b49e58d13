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
