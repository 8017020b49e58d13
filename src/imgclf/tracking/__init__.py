"""MLflow runs: what the stages record, and where.

- store.py: which store (MLFLOW_TRACKING_URI, tracking.uri, or the repo's sqlite file); no mlflow import.
- client.py: each MLflow call a stage makes, written once (imports mlflow).
- worker.py: the Tracker, a one-worker process pool that makes those calls and draws the plots
  in order, while the stage works, so that no stage imports mlflow.
- plots.py: the PNGs of the curves and the confusion matrix (matplotlib).
- summary.py: what `make run` prints at the end.

May import: the base, config.pipeline. Never stages/, registry/, sweep/ or cli.
"""
