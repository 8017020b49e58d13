"""The MLflow Model Registry: registering, gating, promoting and rolling back versions.

- client.py: MLflow registry access (versions, aliases, tags) and the lock.
- promotion.py: register, gates, champion scoring and the promote and rollback flows.

May import: the base, config, tracking/, stages.evaluation (to score a champion). Never training.
No pipeline stage imports this package: editing it re-runs no stage.
"""
