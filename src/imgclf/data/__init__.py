"""Data: where it comes from (sources), how it lands on disk (download, normalize), how it is batched.

- sources/: the published data sets' catalog and their readers (IDX, CIFAR batches, image folders).
- download.py, fetch.py, archives.py: the download stage (HTTP with checksums, safe extraction).
- normalize.py: the normalize stage (uint8 arrays, stratified splits, the report).
- normalized.py: the reader of normalize's output (the card, the splits).
- datamodule.py, augment.py: Lightning's DataModule and the training split's augmentation.
- watch.py: whether the data a download would fetch has changed since the last one.

May import: the base, config.pipeline. Never tracking/, registry/, stages/, sweep/,
cli or mlflow (import-linter's contracts in pyproject.toml).
"""
