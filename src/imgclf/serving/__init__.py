"""The inference path: `imgclf predict` and `imgclf serve`.

onnxruntime, numpy and Pillow only (FastAPI and uvicorn for serve): nothing here imports torch,
lightning, hydra, pydantic-based config or mlflow (except to read a registry URI from a store
other than an `mlflow server`), so a prediction starts in well under a second. This package's
__init__ imports nothing on purpose.

- registry_reader.py: the registry, read over an `mlflow server`'s REST API, else MLflow's client.
- cache.py: registry versions downloaded once (imgclf's cache folder), verified by SHA-256.
- model.py: a model as served, from an ONNX file or a registry URI.
- predict.py: `imgclf predict`.
- follow.py: the served model, following a registry alias (polling, woken by webhook.py).
- limits.py, metrics.py, monitoring.py, capture.py: the request guard, /metrics, the drift monitor,
  the kept uploads.
- app.py (/v1/*, the page, /docs), v2.py (the Open Inference Protocol V2 REST routes), webhook.py
  (MLflow's signed alias webhooks), server.py: `imgclf serve`.
- replay.py: `imgclf drift`.
"""
