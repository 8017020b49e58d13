"""The configuration: conf/ (Hydra groups) composed into params.yaml, and the typed schema of it.

- pipeline.py: the sections the DVC stages read (data, model, trainer, train, evaluate, tracking,
  registry); every stage depends on it.
- operations.py: the sections only the operations read (promote, sweep), and `Config`, the whole file.
- compose.py: Hydra composition, params.yaml's header of overrides, drift between the two.
- validation.py: YAML in, one line naming the bad key out.

May import: imgclf.errors, imgclf.fileio, pydantic, yaml, and Hydra (compose.py, lazily).
Stages import pipeline.py and validation.py only.
"""
