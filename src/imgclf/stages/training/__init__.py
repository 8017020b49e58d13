"""The train stage's library code (torch and Lightning).

- module.py: ImageClassifier, the LightningModule.
- callbacks.py: the model line, epoch lines (for people), curves, the JSON-lines epoch file named by
  $IMGCLF_EPOCH_LOG (for programs: the sweep's pruner), and the batches of epoch metrics sent to MLflow.
- launch.py: processes per node, and the check that the launch environment agrees with the config.
- trainer.py: the Trainer factory and the fit.
- stage.py: `train`, what pipelines/train.py calls.
"""
