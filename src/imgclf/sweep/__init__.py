"""`imgclf sweep`: an Optuna study whose trials are DVC experiments and MLflow runs.

- study.py: the study, its trials as `dvc exp run` processes, pruning and publishing.

May import: the base, config, tracking/. No pipeline stage imports this package.
"""
