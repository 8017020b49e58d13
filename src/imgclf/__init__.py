"""imgclf: train, export and serve image classifiers with a reproducible pipeline."""
