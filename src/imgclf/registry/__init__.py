"""The MLflow Model Registry: registering, gating, promoting and rolling back versions.

- client.py: MLflow registry access (versions, aliases, tags, the history of moves); every write
  passes its `fence`.
- lock.py: the registry lock, one holder at a time: generations `<name>.lock.<n>`, each taken by an
  atomic create, and the fencing check a holder makes before each write.
- evidence.py: what a version says about itself: the evaluate stage's files and the `Evidence`
  tags that the gates read.
- gates.py: the gates, pure functions of two `Evidence` records and the `promote` config group.
- scoring.py: the champion on the challenger's test split (downloaded and scored if need be).
- report.py: the model and version cards, the gate tables, the rows of `imgclf models`.
- flows.py: register, promote and rollback: slow work first, then a short critical section.
- webhooks.py: `imgclf webhook`: the tracking server's alias webhooks that wake `imgclf serve`.

Each module imports only those listed above it. The package may import: the base, config,
tracking/, serving.registry_reader (client.py: reads without mlflow), and stages.evaluation (in
scoring.py only, to score a champion); never training. No pipeline stage imports this package:
editing it re-runs no stage.
"""
