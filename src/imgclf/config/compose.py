"""Composing conf/ into params.yaml with Hydra, and finding where params.yaml drifted from conf/.

Used by `imgclf params`, `imgclf sweep` and the tests; no pipeline stage imports it.
"""

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from imgclf.config.operations import Config, validate
from imgclf.config.pipeline import PARAMS_FILE, flatten
from imgclf.config.validation import read_yaml
from imgclf.errors import ConfigError
from imgclf.fileio import write_text

CONF_DIR = "conf"
OVERRIDES_MARK = "# overrides: "
PARAMS_HEADER = "# Composed from conf/ by `imgclf params`: edit conf/ or pass overrides, not this file.\n"
OVERRIDE_FORMS = "KEY=VALUE, GROUP=CHOICE, +NEWKEY=VALUE or ~KEY"


def compose(overrides: list[str] = (), conf_dir: str | os.PathLike = CONF_DIR) -> dict:
    """Compose conf/ with Hydra overrides into a plain dict, as `dvc exp run -S` does. An override
    that cannot apply is a ConfigError: one line that names it and what to write instead."""
    return _compose(list(overrides), Path(conf_dir).resolve())[0]


def group_choices(conf_dir: str | os.PathLike = CONF_DIR) -> dict[str, list[str]]:
    """The config groups of conf/ (its folders) and the choices of each (their .yaml files)."""
    return {
        folder.name: sorted(path.stem for path in folder.glob("*.yaml"))
        for folder in sorted(Path(conf_dir).iterdir())
        if folder.is_dir() and not folder.name.startswith((".", "_"))
    }


def _compose(overrides: list[str], conf_dir: Path) -> tuple[dict, dict[str, str | None]]:
    """The composition, and the choice it made for each group of conf/'s defaults list."""
    if not (conf_dir / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {conf_dir}")
    try:
        composed = _hydra_compose(overrides, conf_dir)
    except _compose_errors() as error:
        raise ConfigError(_refusal(overrides, conf_dir) or _failing(overrides, conf_dir, error)) from None
    # Hydra lets `~data` drop a group; the section it fills is then half there, or missing.
    deletes = any(o.lstrip().startswith("~") for o in overrides)
    refused = _refusal(overrides, conf_dir, deletions_only=True) if deletes else None
    if refused:
        raise ConfigError(refused)
    return composed


def _hydra_compose(overrides: list[str], conf_dir: Path) -> tuple[dict, dict[str, str | None]]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    with initialize_config_dir(str(conf_dir), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    choices = {g: c for g, c in cfg.hydra.runtime.choices.items() if not g.startswith("hydra/")}
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True), choices


def _compose_errors() -> tuple[type[Exception], ...]:
    """What Hydra raises for an override or a conf/ file it cannot use (ValueError: `model=null`)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return HydraException, OmegaConfBaseException, ValueError


# --- one line for each override that cannot apply ------------------------------------------------


def _refusal(overrides: list[str], conf_dir: Path, deletions_only: bool = False) -> str | None:
    """A line for the first override that cannot apply to conf/, naming it and what to write
    instead; None if each one can (the trouble is then in conf/ or in their combination).
    deletions_only: check the `~` overrides only (Hydra composed them all)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    parser, parsed = OverridesParser.create(), []
    for line in overrides:
        try:
            parsed += parser.parse_overrides([line])
        except HydraException as error:
            detail = [
                text.strip()
                for text in str(error).splitlines()
                if text.strip() and not text.startswith(("Error parsing override", "See https://"))
            ]
            return f"{line}: not an override ({'; '.join(detail)}); write {OVERRIDE_FORMS}"
    for override in parsed:
        if not override.key_or_group:
            return f"{override.input_line}: not an override (no key); write {OVERRIDE_FORMS}"
    groups = group_choices(conf_dir)
    choosing = [
        o.input_line
        for o in parsed
        if o.key_or_group in groups
        and o.type == OverrideType.CHANGE
        and o.package is None
        and o.value() in groups[o.key_or_group]
    ]
    try:
        _, defaults = _hydra_compose([], conf_dir)
        tree, chosen = _hydra_compose(choosing, conf_dir)  # the keys there are with these choices
    except _compose_errors():
        return None
    for override in parsed:
        if deletions_only and not override.is_delete():
            continue
        if override.is_sweep_override():
            problem = (
                "several values, a sweep: write one value, [a,b] for a list or 'a,b' for a string "
                "(sweeps: `dvc exp run --queue -S`, `imgclf sweep`)"
            )
        elif override.package is not None or override.key_or_group.split("/")[0].split(".")[0] == "hydra":
            problem = None  # `group@package=…` and Hydra's own settings: Hydra's message says it
        elif override.key_or_group in groups:
            problem = _group_problem(override, groups, defaults, chosen)
        else:
            problem = _key_problem(override, tree, groups)
        if problem:
            return f"{override.input_line}: {problem}"
    return None


def _group_problem(override, groups: dict, defaults: dict, chosen: dict) -> str | None:
    """What is wrong with `GROUP=CHOICE`, `+GROUP=…`, `++GROUP=…` or `~GROUP` here, if anything."""
    from hydra.core.override_parser.types import OverrideType

    group, value = override.key_or_group, override.value()
    listed = group in defaults  # conf/config.yaml's defaults list names it
    choices = ", ".join(groups[group])
    if override.is_delete():
        if defaults.get(group) is not None:
            return (
                f"every configuration needs a choice of '{group}'; write {group}=CHOICE instead ({choices})"
            )
        if value is not None and value != chosen.get(group):
            return f"'{group}' is {chosen.get(group) or 'none'} here, not {value}"
        return None
    bare = f"{group}={override.get_value_element_as_str()}"
    if override.type in (OverrideType.ADD, OverrideType.FORCE_ADD) and listed:
        default = defaults[group] or "none"
        plus = "+" if override.type == OverrideType.ADD else "++"
        return (
            f"the group '{group}' already has a value (default: {default}); write {bare}, without the {plus}"
        )
    if override.type == OverrideType.FORCE_ADD:
        return f"++ does not add a group; write +{bare}"
    if not (isinstance(value, str) and value in groups[group]):
        return f"'{group}' has no choice {override.get_value_element_as_str()}; choices: {choices}"
    if override.type == OverrideType.CHANGE and not listed:
        return f"the group '{group}' is not in conf/config.yaml's defaults; write +{bare} to add it"
    return None


def _key_problem(override, tree: dict, groups: dict) -> str | None:
    """What is wrong with `KEY=VALUE`, `+KEY=VALUE` or `~KEY` in `tree`, if anything."""
    from hydra.core.override_parser.types import OverrideType

    key = override.key_or_group
    missing = _missing_key(tree, key, groups)
    if override.type == OverrideType.ADD and missing is None:
        return f"'{key}' already exists; write {key}={override.get_value_element_as_str()}, without the +"
    if override.type in (OverrideType.CHANGE, OverrideType.DEL):
        return missing
    return None


def _missing_key(tree: dict, key: str, groups: dict) -> str | None:
    """Why the dotted `key` is not in `tree` (naming what is there), or None if it is."""
    node, parts = tree, key.split(".")
    for depth, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif depth == 0:
            keys = ", ".join(Config.model_fields)
            return f"no key or group '{part}'; groups: {', '.join(groups)}; keys: {keys}"
        else:
            parent = ".".join(parts[:depth])
            if isinstance(node, list):
                return f"no key '{parent}.{part}'; {parent} is a list of {len(node)} (indices from 0)"
            allowed = ", ".join(map(str, node)) if isinstance(node, dict) else "none"
            return f"no key '{parent}.{part}'; keys in {parent}: {allowed}"
    return None


def _failing(overrides: list[str], conf_dir: Path, error: Exception) -> str:
    """Hydra's own first line, after the first override that does not compose with those before it."""
    message = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    for count in range(1, len(overrides) + 1):
        try:
            _hydra_compose(overrides[:count], conf_dir)
        except _compose_errors():
            return f"{overrides[count - 1]}: {message}"
    return f"{' '.join(overrides)}: {message}" if overrides else f"conf/ does not compose: {message}"


# --- params.yaml: its header of overrides, and drift from conf/ -----------------------------------


def render_params(params: dict, overrides: list[str]) -> str:
    """params.yaml text: a header recording the overrides, then the composition."""
    header = PARAMS_HEADER + OVERRIDES_MARK + json.dumps(list(overrides)) + "\n"
    return header + yaml.safe_dump(params, sort_keys=False, default_flow_style=None)


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


def recorded_overrides(params_path: str | os.PathLike = PARAMS_FILE) -> list[str] | None:
    """The overrides `imgclf params` recorded in params.yaml's header; None without a header
    (DVC writes params.yaml without one: `dvc exp run -S`, `dvc exp apply`)."""
    for line in Path(params_path).read_text(encoding="utf-8").splitlines():
        if line.startswith(OVERRIDES_MARK):
            try:
                recorded = json.loads(line[len(OVERRIDES_MARK) :])
            except json.JSONDecodeError:
                recorded = None
            if not (isinstance(recorded, list) and all(isinstance(o, str) for o in recorded)):
                raise ConfigError(
                    f"{params_path}: unreadable header {line!r}: run `imgclf params` to rewrite it"
                )
            return recorded
        if not line.startswith("#"):
            break
    return None


def params_overrides(
    conf_dir: str | os.PathLike = CONF_DIR, path: str | os.PathLike = PARAMS_FILE
) -> list[str]:
    """The overrides params.yaml is composed with: recorded in its header by `imgclf params`,
    else inferred from its values (DVC wrote it)."""
    recorded = recorded_overrides(path)
    if recorded is not None:
        return recorded
    return inferred_overrides(_read_params(path), conf_dir)


@dataclass(frozen=True)
class ParamsCheck:
    """params.yaml against conf/: what `imgclf params --check` reports."""

    overrides: list[str]  # recorded in its header; else (DVC wrote it) the shortest that give its values
    recorded: bool  # imgclf params wrote it, with its header
    drift: list[str]  # a line per key whose value differs from conf/ composed with `overrides`
    keep: list[str] | None  # on drift, the shortest overrides that give back its values (None: none can)


def check_params(
    conf_dir: str | os.PathLike = CONF_DIR, path: str | os.PathLike = PARAMS_FILE
) -> ParamsCheck:
    """Compare params.yaml with conf/ composed with its overrides."""
    params = _read_params(path)
    recorded = recorded_overrides(path)
    overrides = recorded if recorded is not None else inferred_overrides(params, conf_dir)
    drift = _drift(compose(overrides, conf_dir), params)
    return ParamsCheck(overrides, recorded is not None, drift, _keep(params, conf_dir) if drift else None)


def _keep(params: dict, conf_dir: str | os.PathLike) -> list[str] | None:
    """The shortest overrides that give back `params` and pass the schema; None if there are none."""
    try:
        overrides = inferred_overrides(params, conf_dir)
        composed = compose(overrides, conf_dir)
        validate(composed)
    except ConfigError:
        return None
    return None if _drift(composed, params) else overrides


def params_drift(conf_dir: str | os.PathLike = CONF_DIR, path: str | os.PathLike = PARAMS_FILE) -> list[str]:
    """Keys whose value in params.yaml differs from conf/ composed with its overrides."""
    if not Path(path).is_file():
        return [f"{path} is missing"]
    return check_params(conf_dir, path).drift


def _read_params(path: str | os.PathLike) -> dict:
    params = read_yaml(path)
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must be a mapping of keys, got {type(params).__name__}")
    return params


def _drift(expected: dict, actual: dict) -> list[str]:
    expected, actual, missing = flatten(expected), flatten(actual), "<missing>"
    return [
        f"{key}: params.yaml has {actual.get(key, missing)!r}, conf/ gives {expected.get(key, missing)!r}"
        for key in sorted(expected.keys() | actual.keys(), key=str)
        if not _same(expected.get(key, missing), actual.get(key, missing))
    ]


def _same(a: Any, b: Any) -> bool:
    """Equal, and of one type throughout: 1, 1.0 and true are three values in params.yaml."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


# --- the shortest overrides that give a params.yaml ------------------------------------------------


def inferred_overrides(params: dict, conf_dir: str | os.PathLike = CONF_DIR) -> list[str]:
    """The shortest overrides that compose conf/ into `params`: each group choice that differs from
    conf/'s defaults, then each value that differs from what those choices compose. For a
    params.yaml that DVC wrote, which keeps no record of the overrides it was composed with."""
    conf_dir = Path(conf_dir).resolve()
    composed: dict[tuple[str, ...], tuple[dict, dict]] = {}

    def compose_once(overrides: tuple[str, ...]) -> tuple[dict, dict]:
        if overrides not in composed:
            composed[overrides] = _compose(list(overrides), conf_dir)
        return composed[overrides]

    groups = group_choices(conf_dir)
    # A group whose section names its choice (model.name: cnn) takes it. A group that names none
    # (a recipe of conf/experiment/ sets values in many sections) tries each choice, and keeps the
    # one that leaves the fewest overrides: none, when no recipe saves any (it costs one itself).
    named = {
        group: params[group]["name"]
        for group, options in groups.items()
        if isinstance(params.get(group), dict) and params[group].get("name") in options
    }
    picks: dict[str, str] = {}
    best = _overrides_with(params, named, picks, compose_once)
    for group in (g for g in groups if g not in named):
        if len(best) < 2:
            break  # a recipe is an override itself: it cannot beat fewer than two
        for choice in groups[group]:
            tried = picks | {group: choice}
            try:
                overrides = _overrides_with(params, named, tried, compose_once, bound=len(best))
            except ConfigError:
                continue  # a recipe that does not compose with these choices
            if overrides is not None and len(overrides) < len(best):
                best, picks = overrides, tried
    return best


def _overrides_with(params: dict, named: dict, picks: dict, compose_once, bound: int | None = None):
    """The overrides that give `params` with these group choices, leaving out every choice conf/
    makes anyway (a default, or what a picked recipe selects itself); None if they cannot be
    fewer than `bound`."""
    _, defaults = compose_once(())
    recipes = tuple(_choice(g, c, defaults) for g, c in picks.items() if defaults.get(g) != c)
    # Every named choice listed composes the same as only those the recipes do not make.
    base, _ = compose_once(recipes + tuple(_choice(g, c, defaults) for g, c in named.items()))
    values = _value_overrides(base, params)
    if bound is not None and len(recipes) + len(values) >= bound:
        return None
    _, implied = compose_once(recipes)
    choices = recipes + tuple(_choice(g, c, defaults) for g, c in named.items() if implied.get(g) != c)
    return [*choices, *values]


def _choice(group: str, choice: str, defaults: dict) -> str:
    return f"{group}={choice}" if group in defaults else f"+{group}={choice}"


# A key that a dotted path can name (Hydra's grammar): `sweep.params` has keys such as `train.lr`.
_PATH_KEY = re.compile(r"[A-Za-z_$][\w$-]*|\d+")


def _value_overrides(base: dict, actual: dict, prefix: str = "") -> list[str]:
    """The overrides that turn `base` into `actual`: each value that differs (a list whole),
    +KEY for a key `base` lacks, ~KEY for one that `actual` lacks."""
    if prefix and not all(isinstance(key, str) and _PATH_KEY.fullmatch(key) for key in (*base, *actual)):
        return _section_override(base, actual, prefix.removesuffix("."))
    overrides = []
    for key, value in actual.items():
        path = f"{prefix}{key}"
        if key not in base:
            overrides.append(f"+{path}={_override_value(value, bare=True)}")
        elif _same(base[key], value):
            continue
        elif isinstance(value, dict) and isinstance(base[key], dict):
            overrides += _value_overrides(base[key], value, f"{path}.")
        elif isinstance(value, dict) or isinstance(base[key], dict):  # a section became a value, or back
            overrides += [f"~{path}", f"+{path}={_override_value(value, bare=True)}"]
        else:
            overrides.append(f"{path}={_override_value(value, bare=True)}")
    return overrides + [f"~{prefix}{key}" for key in base if key not in actual]


def _section_override(base: dict, actual: dict, path: str) -> list[str]:
    """A section whose keys no dotted path can name: its changed entries as one mapping, which
    Hydra merges in (`++` adds keys too), or the whole section anew if a merge cannot give it."""
    changed = {key: value for key, value in actual.items() if key not in base or not _same(base[key], value)}
    if all(key in actual for key in base) and all(_merges_to(base.get(k), v) for k, v in changed.items()):
        return [f"++{path}={_override_value(changed, bare=True)}"]
    return [f"~{path}", f"+{path}={_override_value(actual, bare=True)}"]


def _merges_to(old: Any, new: Any) -> bool:
    """Whether merging `new` over `old` gives `new`: a mapping keeps the keys that `new` lacks."""
    if isinstance(old, dict) and isinstance(new, dict):
        return all(key in new and _merges_to(value, new[key]) for key, value in old.items())
    return not isinstance(old, dict)


def _dict_key(key: Any) -> str:
    """A mapping's key in the override grammar: unquoted, so its special characters take a backslash."""
    return re.sub(r"([][(){}:=, \t\\])", r"\\\1", str(key))


# A string Hydra reads back as itself without quotes: a word, not null, a boolean or a float.
_BARE_WORD = re.compile(r"[A-Za-z_][\w\-./:]*")
_KEYWORDS = {"null", "true", "false", "nan", "inf"}


def _override_value(value: Any, bare: bool = False) -> str:
    """`value` in Hydra's override grammar; bare: words unquoted (`relu`, not `'relu'`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_override_value(item, bare) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{_dict_key(k)}:{_override_value(v, bare)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    text = str(value)
    if bare and _BARE_WORD.fullmatch(text) and text.lower() not in _KEYWORDS:
        return text
    # Hydra reads a backslash as an escape only before a quote or at the end of the string; a
    # `${` would be an interpolation.
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'").replace("${", "\\${") + "'"
