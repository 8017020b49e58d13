"""The DVC stages' library code: pipelines/<stage>.py reads params.yaml and calls one function here.

- args.py: the paths each stage's `cmd:` in dvc.yaml hands it.
- cpu.py: the cap on torch's CPU instruction set (trainer.cpu_isa), set before torch is imported.
- training/: the Lightning module, its callbacks, the DDP launch checks, the Trainer and the train stage.
- export.py: the checkpoint to models/model.onnx, parity-gated against torch.
- evaluation.py: ONNX Runtime on the test split: metrics and plots.

May import: the base, config.pipeline, data/, models/, tracking/. Never registry/, sweep/ or cli.
dvc.yaml lists exactly the files each stage imports (tests/code/test_dvc_deps.py).
"""
