"""The inference path: `imgclf predict` and `imgclf serve`.

onnxruntime, numpy and Pillow only (FastAPI and uvicorn for serve): nothing here imports torch,
lightning, hydra, pydantic-based config or mlflow (except to resolve a registry URI), so a
prediction starts in well under a second. This package's __init__ imports nothing on purpose.
"""
