"""The inference path: `imgclf predict` and `imgclf serve`.

onnxruntime, numpy and Pillow only (FastAPI and uvicorn for serve): nothing here imports torch,
lightning, hydra, pydantic-based config or mlflow (except to read a registry URI from a store
other than an `mlflow server`), so a prediction starts in well under a second. This package's
__init__ imports nothing on purpose.

- registry_reader.py: the registry, read over an `mlflow server`'s REST API, else MLflow's client.
- cache.py: registry versions downloaded once (imgclf's cache folder), verified by SHA-256.
- model.py: a model as served, from an ONNX file or a registry URI.
- predict.py: `imgclf predict`.
- follow.py, limits.py, metrics.py, app.py, fastpath.py, server.py: `imgclf serve`.
"""
