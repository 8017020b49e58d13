"""The search space (sweep.params): every bound and choice checked up front; a trial's values."""

from pathlib import Path
from typing import Any

from imgclf.config import compose as configuration
from imgclf.config.operations import SearchSpace, validate
from imgclf.errors import ConfigError

FLOAT_DIGITS = 6  # significant digits of a sampled float, as the trial's experiment gets it
override_value = configuration._override_value  # a value in Hydra's override grammar: one home


def check_search_space(root: Path, overrides: list[str], params: dict[str, SearchSpace]) -> None:
    """Compose every bound and choice into the config once, before any trial: a key the config
    lacks, or a value its schema refuses, stops the sweep with a line naming the key."""
    conf_dir = root / configuration.CONF_DIR
    for key, space in params.items():
        for value in probes(space):
            override = f"{key}={override_value(value)}"
            try:
                validate(configuration.compose([*overrides, override], conf_dir))
            except ConfigError as error:
                raise ConfigError(f"sweep.params.{key}: {override} does not compose: {error}") from None


def probes(space: SearchSpace) -> list[Any]:
    if space.choices is not None:
        return list(space.choices)
    return [space.low, space.high]


def suggest(trial, params: dict[str, SearchSpace]) -> dict[str, Any]:
    """The trial's value for each key, as the config takes it."""
    values = {}
    for key, space in params.items():
        if space.choices is not None:
            # Optuna stores scalars only: a list choice ([256, 128]) travels as its override text.
            encoded = {encode_choice(choice): choice for choice in space.choices}
            values[key] = encoded[trial.suggest_categorical(key, list(encoded))]
        elif isinstance(space.low, int) and isinstance(space.high, int):
            values[key] = trial.suggest_int(key, space.low, space.high, log=space.log)
        else:
            value = trial.suggest_float(key, float(space.low), float(space.high), log=space.log)
            # DVC reads and rewrites params.yaml and dvc.lock with ruamel.yaml, which changes the last
            # digit of some floats written with 16 (1.902357760267601e-05 comes back ...600e-05): the
            # lock then disagrees with params.yaml and a clone re-runs the stage. 6 digits survive.
            values[key] = float(f"{value:.{FLOAT_DIGITS}g}")
    return values


def encode_choice(choice: Any) -> Any:
    if choice is None or isinstance(choice, bool | int | float | str):
        return choice
    return override_value(choice)


def shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else override_value(value).strip("'")
