"""Composing conf/ into params.yaml with Hydra, and finding where params.yaml drifted from conf/.

Used by `imgclf params`, `imgclf sweep` and the tests; no pipeline stage imports it.
"""

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from imgclf.config.operations import Config, validate
from imgclf.config.pipeline import PARAMS_FILE, flatten
from imgclf.errors import ConfigError
from imgclf.fileio import write_text

CONF_DIR = "conf"
OVERRIDES_MARK = "# overrides: "
PARAMS_HEADER = "# Composed from conf/ by `imgclf params`: edit conf/ or pass overrides, not this file.\n"


def compose(overrides: list[str] = (), conf_dir: str | os.PathLike = CONF_DIR) -> dict:
    """Compose conf/ with Hydra overrides into a plain dict, as `dvc exp run -S` does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    conf_dir = Path(conf_dir).resolve()
    if not (conf_dir / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {conf_dir}")
    try:
        with initialize_config_dir(str(conf_dir), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as error:
        # Hydra's advice for a key that conf/ lacks is `+key=value`, which the schema refuses.
        unknown = _unknown_key(list(overrides), conf_dir)
        if unknown:
            raise ConfigError(unknown) from None
        message = " ".join(str(error).split("Config search path")[0].split())
        raise ConfigError(f"cannot compose {list(overrides)}: {message}") from None


def group_choices(conf_dir: str | os.PathLike = CONF_DIR) -> dict[str, list[str]]:
    """The config groups of conf/ (its folders) and the choices of each (their .yaml files)."""
    return {
        folder.name: sorted(path.stem for path in folder.glob("*.yaml"))
        for folder in sorted(Path(conf_dir).iterdir())
        if folder.is_dir() and not folder.name.startswith((".", "_"))
    }


def _unknown_key(overrides: list[str], conf_dir: Path) -> str | None:
    """A line for the first `key=value` whose key is neither in conf/ nor a group, if there is one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return None
    groups = group_choices(conf_dir)
    chosen = [o.input_line for o in parsed if o.key_or_group in groups]
    keys = [o for o in parsed if o.type == OverrideType.CHANGE and o.key_or_group not in groups]
    if not keys:
        return None
    try:
        tree = compose(chosen, conf_dir)  # the keys that exist with these choices
    except ConfigError:
        return None
    for override in keys:
        node, parts = tree, override.key_or_group.split(".")
        for depth, part in enumerate(parts):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif depth == 0:
                return (
                    f"{override.input_line}: no key or group '{part}'; groups: {', '.join(groups)}; "
                    f"keys: {', '.join(Config.model_fields)}"
                )
            else:
                parent = ".".join(parts[:depth])
                allowed = ", ".join(map(str, node)) if isinstance(node, dict) else "none"
                return f"{override.input_line}: no key '{parent}.{part}'; keys in {parent}: {allowed}"
    return None


def render_params(params: dict, overrides: list[str]) -> str:
    """params.yaml text: a header recording the overrides, then the composition."""
    header = PARAMS_HEADER + OVERRIDES_MARK + json.dumps(list(overrides)) + "\n"
    return header + yaml.safe_dump(params, sort_keys=False, default_flow_style=None)


def recorded_overrides(params_path: str | os.PathLike = PARAMS_FILE) -> list[str] | None:
    """The overrides `imgclf params` recorded in params.yaml's header; None without a header
    (DVC writes params.yaml without one: `dvc exp run -S`, `dvc exp apply`)."""
    for line in Path(params_path).read_text(encoding="utf-8").splitlines():
        if line.startswith(OVERRIDES_MARK):
            return json.loads(line[len(OVERRIDES_MARK) :])
        if not line.startswith("#"):
            break
    return None


def inferred_overrides(params: dict, conf_dir: str | os.PathLike = CONF_DIR) -> list[str]:
    """Overrides that compose conf/ into `params`: each group's choice (its `name`), then every
    value that differs from that composition. For a params.yaml that DVC wrote, which keeps no
    record of the overrides it was composed with."""
    # A group whose choice is recorded in params.yaml: its section's `name` is one of its files.
    choices = [
        f"{group}={params[group]['name']}"
        for group, options in group_choices(conf_dir).items()
        if isinstance(params.get(group), dict) and params[group].get("name") in options
    ]
    base = _leaves(compose(choices, conf_dir))
    actual = _leaves(params)
    changed = [key for key in actual if key in base and actual[key] != base[key]]
    added = [key for key in actual if key not in base]
    return [
        *choices,
        *(f"{key}={_override_value(actual[key])}" for key in changed),
        *(f"+{key}={_override_value(actual[key])}" for key in added),
    ]


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to values, lists kept whole (as a Hydra override sets them)."""
    leaves: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            leaves |= _leaves(value, dotted + ".")
        else:
            leaves[dotted] = value
    return leaves


def _override_value(value: Any) -> str:
    """`value` in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_override_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_override_value(v)}" for k, v in value.items()) + "}"
    # Hydra reads a backslash as an escape only before a quote or at the end of the string; a
    # `${` would be an interpolation.
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, str(value))
    return "'" + text.replace("'", "\\'").replace("${", "\\${") + "'"


def write_params(
    overrides: list[str],
    conf_dir: str | os.PathLike = CONF_DIR,
    path: str | os.PathLike = PARAMS_FILE,
) -> Config:
    """Compose, validate, then write params.yaml; nothing is written if any step fails."""
    params = compose(overrides, conf_dir)
    config = validate(params)
    write_text(path, render_params(params, overrides))
    return config


def params_overrides(
    conf_dir: str | os.PathLike = CONF_DIR, path: str | os.PathLike = PARAMS_FILE
) -> list[str]:
    """The overrides params.yaml is composed with: recorded in its header by `imgclf params`,
    else inferred from its values (DVC wrote it)."""
    recorded = recorded_overrides(path)
    if recorded is not None:
        return recorded
    return inferred_overrides(yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}, conf_dir)


def params_drift(conf_dir: str | os.PathLike = CONF_DIR, path: str | os.PathLike = PARAMS_FILE) -> list[str]:
    """Keys whose value in params.yaml differs from conf/ composed with its overrides."""
    path = Path(path)
    if not path.is_file():
        return [f"{path} is missing"]
    expected = flatten(compose(params_overrides(conf_dir, path), conf_dir))
    actual = flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    missing = "<missing>"
    return [
        f"{key}: params.yaml has {actual.get(key, missing)!r}, conf/ gives {expected.get(key, missing)!r}"
        for key in sorted(expected.keys() | actual.keys())
        if expected.get(key, missing) != actual.get(key, missing)
    ]
