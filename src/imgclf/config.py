"""The configuration: a typed schema for params.yaml, and its composition from conf/ with Hydra.

Stages read params.yaml only (one truth at run time) and validate it here before any work,
so a bad key or value stops a stage with exit code 2 and a line that names the key.

Default values live in conf/ alone: the schema says what is allowed, never what is chosen, so
a test that builds a config composes conf/ (`compose`) and gets what a user gets.
"""

import json
import os
import re
import types
import typing
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imgclf.errors import ConfigError
from imgclf.fileio import write_text

PARAMS_FILE = "params.yaml"
CONF_DIR = "conf"
OVERRIDES_MARK = "# overrides: "
PARAMS_HEADER = "# Composed from conf/ by `imgclf params`: edit conf/ or pass overrides, not this file.\n"

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataConfig(Section):
    """What every data set has; `data.name` picks the source and its own keys."""

    name: str
    mirrors: list[str]
    cache_dir: str  # verified downloads, shared by every checkout
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)]
    test_fraction: Annotated[float, Field(gt=0, lt=0.5)]
    min_class_count: PositiveInt  # fewer images in any class of any split fails normalize


class PublishedData(DataConfig):
    """A published data set with fixed files and checksums (imgclf.data.sources registers each)."""

    name: Literal["digits", "mnist", "fashion_mnist", "cifar10"]


URL_SCHEMES = ("http", "https", "file")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class ImageFolderData(DataConfig):
    """The user's own images: class-named subfolders in a local folder or an archive at a URL."""

    name: Literal["imagefolder"]
    path: str | None
    url: str | None
    # of the archive at `url`: verified, then cached; None trusts the download as is, uncached
    sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")] | None
    image_size: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]  # H, W
    mode: Literal["L", "RGB"]
    resize: Literal["stretch", "crop"]  # crop: shorter side to size, then centre crop
    on_bad_image: Literal["skip", "fail"]
    max_image_pixels: PositiveInt  # larger images are decompression bombs
    max_archive_bytes: PositiveInt  # total uncompressed size an archive may expand to
    workers: Annotated[int, Field(ge=0)]  # decode processes; 0: one per CPU core

    @field_validator("url")
    @classmethod
    def url_names_an_archive(cls, url: str | None) -> str | None:
        if url is None:
            return url
        scheme = urllib.parse.urlparse(url).scheme
        if scheme not in URL_SCHEMES:
            allowed = ", ".join(f"{name}://" for name in URL_SCHEMES)
            raise ValueError(f"scheme {scheme!r} is not supported; use {allowed}")
        if not urllib.parse.urlparse(url).path.lower().endswith(ARCHIVE_SUFFIXES):
            raise ValueError(f"must end with the archive's file name: {', '.join(ARCHIVE_SUFFIXES)}")
        return url

    @model_validator(mode="after")
    def path_or_url(self) -> "ImageFolderData":
        if (self.path is None) == (self.url is None):
            given = "both are set" if self.path is not None else "neither is set"
            raise ValueError(
                f"data.path and data.url: set exactly one ({given}): a local folder with one "
                "subfolder per class, or the http(s):// or file:// URL of a .zip or .tar archive of one"
            )
        return self


DataChoice = Annotated[PublishedData | ImageFolderData, Field(discriminator="name")]


class MLPConfig(Section):
    name: Literal["mlp"]
    hidden: list[PositiveInt]
    activation: Literal["relu", "sigmoid", "tanh"]
    dropout: Fraction


class CNNConfig(Section):
    name: Literal["cnn"]
    channels: Annotated[list[PositiveInt], Field(min_length=1)]
    hidden: PositiveInt
    dropout: Fraction


class ResNetConfig(Section):
    """A CIFAR-style ResNet (He et al. 2016, section 4.2): depth 6n+2, three stages of n blocks."""

    name: Literal["resnet"]
    depth: PositiveInt
    width: PositiveInt  # channels of the first stage; the others have 2x and 4x

    @field_validator("depth")
    @classmethod
    def depth_is_6n_plus_2(cls, depth: int) -> int:
        if depth < 8 or (depth - 2) % 6:
            raise ValueError("must be 6n+2 with n >= 1: 8, 14, 20, 32, 44, 56, 110")
        return depth


ModelConfig = Annotated[MLPConfig | CNNConfig | ResNetConfig, Field(discriminator="name")]


class TrainerConfig(Section):
    name: Annotated[str, Field(min_length=1)]  # the conf/trainer/ file it came from
    accelerator: Literal["cpu", "gpu", "mps", "auto"]
    devices: PositiveInt | Literal["auto"]  # processes per node; `auto`: imgclf.training.processes_per_node
    num_nodes: PositiveInt  # machines, each started with its own NODE_RANK (README: Scaling out)
    strategy: Literal["auto", "ddp"]  # not ddp_spawn: the epoch curves live in the main process
    precision: Literal["32-true", "16-mixed", "bf16-mixed"]
    deterministic: bool
    cpu_isa: Literal["native", "avx2", "avx512", "compatible"]  # caps the CPU kernels (imgclf.cpu)

    @model_validator(mode="after")
    def nodes_agree_on_devices(self) -> "TrainerConfig":
        # `auto` counts this machine's devices: nodes that count differently disagree on the world size.
        if self.num_nodes > 1 and self.devices == "auto":
            raise ValueError(
                f"trainer.devices='auto' with trainer.num_nodes={self.num_nodes}: set trainer.devices "
                "to the number of processes on each node (the same on every node)"
            )
        return self


class AugmentConfig(Section):
    """Seeded random changes to each training batch, on the device; validation and test see none."""

    crop_padding: Annotated[int, Field(ge=0)]  # pad with this many zero pixels, crop back at random
    hflip: bool  # mirror half the images left-right: not for digits, whose mirror images differ
    invert: bool  # 255 - pixels for half the images: ink of either polarity (dark on light, light on dark)


class TrainConfig(Section):
    max_epochs: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    optimizer: Literal["adam", "sgd"]
    momentum: Fraction
    weight_decay: Annotated[float, Field(ge=0)]
    scheduler: Literal["onecycle", "cosine", "step", "none"]  # onecycle: per step, `lr` is the peak
    label_smoothing: Fraction  # of the training objective only: reported losses are plain cross-entropy
    channels_last: bool  # weights and batches in NHWC: oneDNN's and cuDNN's fast convolutions
    early_stopping_patience: PositiveInt
    augment: AugmentConfig


class EvaluateConfig(Section):
    latency_runs: PositiveInt
    throughput_batch: PositiveInt


class TrackingConfig(Section):
    uri: str | None
    experiment: Annotated[str, Field(min_length=1)]
    flush_seconds: Annotated[float, Field(ge=0)]  # per-epoch metrics reach MLflow this often


class RegistryConfig(Section):
    model_name: Annotated[str, Field(min_length=1)]


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


class Config(Section):
    seed: Annotated[int, Field(ge=0)]
    data: DataChoice
    model: ModelConfig
    trainer: TrainerConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    tracking: TrackingConfig
    registry: RegistryConfig
    promote: PromoteConfig
    sweep: SweepConfig


def validate(raw: Any) -> Config:
    """Validate a plain dict against the schema; raise ConfigError naming the first bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the configuration must be a mapping, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def load_params(path: str | os.PathLike = PARAMS_FILE) -> Config:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run `imgclf params` to compose it") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}".replace("\n", " ")) from None
    return validate(raw)


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


def flatten(config: Config | dict) -> dict[str, Any]:
    """The config as dotted keys; lists expand to one key per item (`model.hidden.0`)."""
    tree = config.model_dump() if isinstance(config, BaseModel) else config

    def walk(node: Any, prefix: str) -> dict[str, Any]:
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, list) and node:
            items = enumerate(node)
        else:
            return {prefix: node}
        flat: dict[str, Any] = {}
        for key, value in items:
            flat.update(walk(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat

    return walk(tree, "")


def _describe(error: ValidationError) -> str:
    """One line for the first schema error: the dotted key, the bad value, what is allowed."""
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    section, parent, path = Config, None, []
    for part in loc:
        before = section
        section, skipped = _descend(section, part)
        # Inside a plain union (`int | Literal["auto"]`) pydantic adds one loc part per member.
        skipped = skipped or (
            before is not None
            and not _is_section(before)
            and not part.isdigit()
            and not _union_members(before)
        )
        if not skipped:
            path.append(part)
            parent = before
    key = ".".join(path)
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(parent.model_fields) if _is_section(parent) else "none"
        return f"unknown key '{key}'; allowed here: {allowed}{more}"
    if first["type"] == "union_tag_invalid":
        expected = first["ctx"]["expected_tags"]
        return f"{key}.name={first['ctx']['tag']!r}: unknown choice; allowed: {expected}{more}"
    if first["type"] == "missing":
        return f"missing key '{key}'{more}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error" and isinstance(first.get("input"), dict):
        return f"{message}{more}"  # a check across keys (a model validator) names them itself
    return f"{key}={first.get('input')!r}: {message}{more}"


def _is_section(node: Any) -> bool:
    return isinstance(node, type) and issubclass(node, BaseModel)


def _descend(section: Any, part: str) -> tuple[Any, bool]:
    """Step from a schema node into `part`; report whether `part` was a union tag, not a key."""
    if _is_section(section):
        field = section.model_fields.get(part)
        return (field.annotation if field else None), False
    for member in _union_members(section):
        if part in typing.get_args(member.model_fields["name"].annotation):
            return member, True
    return None, False


def _union_members(annotation: Any) -> list[type[BaseModel]]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Annotated:
        return _union_members(args[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    return []
