"""The operations' schema: what `imgclf promote` and `imgclf sweep` read, and the whole of params.yaml.

No pipeline stage imports this file: editing a gate or a search space re-runs no stage.
"""

import os
import re
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from imgclf.config.pipeline import PARAMS_FILE, PipelineConfig, PositiveFloat, PositiveInt, Section
from imgclf.config.validation import read_yaml, validate_against

Share = Annotated[float, Field(ge=0, le=1)]


class PromoteConfig(Section):
    """The gates of `imgclf promote` (conf/promote/); read by no pipeline stage."""

    name: Annotated[str, Field(min_length=1)]  # the conf/promote/ file it came from
    metric: Literal["accuracy", "macro_f1"]
    min_value: Share
    min_improvement: Annotated[float, Field(ge=-1, le=1)]
    max_class_recall_drop: Share
    max_latency_ms_p99: PositiveFloat
    max_parity_diff: PositiveFloat
    require_clean_commit: bool
    allow_duplicates: bool
    lock_timeout_s: Annotated[float, Field(ge=0)]
    lock_expiry_s: PositiveFloat


class PruningConfig(Section):
    enabled: bool  # stop a trial whose epochs trail the median of the other trials at the same epoch
    startup_trials: Annotated[int, Field(ge=0)]  # finished trials in the study before any is pruned
    warmup_epochs: Annotated[int, Field(ge=0)]  # the first epochs of a trial are never pruned


class SearchSpace(Section):
    """One dimension of a sweep: a range (ints if `low` and `high` both are) or a list of choices.

    Which keys may go together is checked by SweepConfig, which knows the dimension's name."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False  # sample evenly on a log scale (learning rates)
    choices: list[Any] | None = None

    @classmethod
    def problem(cls, key: Any, space: Any) -> str | None:
        """A line naming `sweep.params.<key>` and what is wrong with `space`; None if it is fine."""
        where = f"sweep.params.{key}"
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", key):
            return f"{where}: not a dotted config key or group (train.lr, model.hidden, model)"
        shape = "{low, high} (log: true for a log scale) or {choices: [...]}"
        if not isinstance(space, dict):
            return f"{where}={space!r}: expected {shape}"
        unknown = [name for name in space if name not in cls.model_fields]
        if unknown:
            return f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(cls.model_fields)}"
        if "choices" in space:
            choices = space["choices"]
            if set(space) != {"choices"}:
                return f"{where}: choices or a range (low, high, log), not both"
            if not isinstance(choices, list) or not choices:
                return f"{where}.choices={choices!r}: expected a list of at least one value"
            return None
        for bound in ("low", "high"):
            value = space.get(bound)
            if isinstance(value, bool) or not isinstance(value, int | float):
                given = f"={value!r}" if bound in space else " is missing"
                return f"{where}.{bound}{given}: expected a number ({shape})"
        if not space["low"] < space["high"]:
            return f"{where}: low {space['low']!r} must be below high {space['high']!r}"
        if space.get("log", False) not in (True, False):
            return f"{where}.log={space['log']!r}: expected true or false"
        if space.get("log") and space["low"] <= 0:
            return f"{where}: a log scale needs low > 0, got low {space['low']!r}"
        return None


# metrics/train.json's numbers on the validation split, and which way is better.
SWEEP_METRICS = {"val_loss": "minimize", "val_acc": "maximize"}


class SweepConfig(Section):
    """The search of `imgclf sweep` (conf/sweep/); read by no pipeline stage."""

    name: Annotated[str, Field(min_length=1)]  # the conf/sweep/ file it came from
    # Part of each trial's experiment name (sweep-<study>-<trial>), a git ref. None: <data>-<model>.
    study: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", max_length=100)] | None
    # Recipes are chosen on the validation split: the test split's accuracy, which the promotion
    # gates compare, would be an optimistic estimate if it had picked the winner.
    metric: Literal["val_loss", "val_acc"]
    direction: Literal["minimize", "maximize"]
    n_trials: PositiveInt  # per worker
    pruning: PruningConfig
    params: dict[str, SearchSpace]  # a dotted key of this config, or a group, -> its search space

    @field_validator("params", mode="before")
    @classmethod
    def spaces_are_well_formed(cls, params: Any) -> Any:
        if not isinstance(params, dict):
            raise ValueError("expected a mapping of dotted keys to search spaces")
        if not params:
            raise ValueError("sweep.params is empty: name at least one key to search, e.g. train.lr")
        for key, space in params.items():
            problem = SearchSpace.problem(key, space)
            if problem:
                raise ValueError(problem)
        return params

    @model_validator(mode="after")
    def direction_fits_metric(self) -> "SweepConfig":
        better = SWEEP_METRICS[self.metric]
        if self.direction != better:
            raise ValueError(f"sweep.direction={self.direction!r}: {self.metric} is searched with {better}")
        return self


class Config(PipelineConfig):
    """All of params.yaml: the pipeline's sections and the operations'; no other key is allowed."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    promote: PromoteConfig
    sweep: SweepConfig


def validate(raw: Any) -> Config:
    """Validate a plain dict against the whole schema; raise ConfigError naming the first bad key."""
    return validate_against(Config, raw)


def load_params(path: str | os.PathLike = PARAMS_FILE) -> Config:
    """Read and validate all of params.yaml."""
    return validate(read_yaml(path))
