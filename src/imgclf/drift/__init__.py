"""Drift: does what a served model sees still look like its held-out data?

numpy only (it is on the inference path): it imports no torch, lightning, mlflow or scipy, and
nothing of imgclf but the inference-safe base.

- stats.py: the tests: chi-square upper tail, chi-square test of homogeneity, two-sample
  Kolmogorov-Smirnov.
- reference.py: the reference, computed by the export stage on the validation split and stored in
  the ONNX file's metadata (`imgclf.reference`): predicted-class counts, top-1 confidence, and
  per-image brightness and contrast.
- monitor.py: windows of N images tested against a reference (WindowTest), and the thread-safe
  windowed monitor `imgclf serve` feeds (DriftMonitor).
"""
