"""imgclf: train, export and serve image classifiers with a reproducible pipeline."""

__version__ = "0.1.0"
