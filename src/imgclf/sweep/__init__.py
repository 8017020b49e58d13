"""`imgclf sweep`: an Optuna study whose trials are DVC experiments and MLflow runs.

- study.py: the worker (`sweep`): its plan (config, storage, remote), the Optuna study, each trial
  asked, run, told, and the summary; the pruner fed epoch by epoch.
- space.py: the search space: every bound checked up front, a trial's values as the config takes them.
- trials.py: one trial's `dvc exp run --temp` as a child process, its epochs read from the JSON-lines
  file the train stage writes ($IMGCLF_EPOCH_LOG); git and DVC in the worker's clone.
- signals.py: Ctrl-C and SIGTERM: a flag, passed on to the running experiment.
- publish.py: what a trial leaves for others: its MLflow run tagged, its experiment pushed.

May import: the base, config/, tracking/. Never the stages or the registry: a trial runs the
pipeline as DVC does, in another process. No pipeline stage imports this package.
"""
