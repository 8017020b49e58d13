"""The pipeline's schema: the sections of params.yaml that the DVC stages read.

Every stage depends on this file (dvc.yaml), so it holds nothing else: the operations' sections
(promote, sweep) live in imgclf.config.operations, and editing them re-runs no stage.

Default values live in conf/ alone: the schema says what is allowed, never what is chosen, so
a test that builds a config composes conf/ (imgclf.config.compose) and gets what a user gets.
"""

import os
import urllib.parse
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from imgclf.config.validation import read_yaml, validate_against

PARAMS_FILE = "params.yaml"

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
    # labelled folders (FOLDER/<class>/<image>) whose images join the training split only;
    # relative to the repository root (imgclf.data.extra_train)
    extra_train: list[Annotated[str, Field(min_length=1)]]


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
    devices: PositiveInt | Literal["auto"]  # per node; `auto`: imgclf.stages.training.launch
    num_nodes: PositiveInt  # machines, each started with its own NODE_RANK (README: Scaling out)
    strategy: Literal["auto", "ddp"]  # not ddp_spawn: the epoch curves live in the main process
    precision: Literal["32-true", "16-mixed", "bf16-mixed"]
    deterministic: bool
    # caps the CPU kernels (imgclf.stages.cpu)
    cpu_isa: Literal["native", "portable", "avx2", "avx512", "compatible"]

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


class ExportConfig(Section):
    """What the export stage ships: the float32 graph, or its static int8 quantization
    (imgclf.stages.quantize), refused unless it agrees with the float32 graph on the test split."""

    quantize: Literal["none", "int8"]
    calibration_images: PositiveInt  # a seeded sample of the training split sets the int8 scales
    min_agreement: Annotated[float, Field(gt=0, le=1)]  # share of test images with the float32 argmax


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


class PipelineConfig(Section):
    """What the stages read. Sections of params.yaml that no stage reads (promote, sweep) are
    ignored here and checked by imgclf.config.operations.Config, which `imgclf params` validates."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    seed: Annotated[int, Field(ge=0)]
    data: DataChoice
    model: ModelConfig
    trainer: TrainerConfig
    train: TrainConfig
    export: ExportConfig
    evaluate: EvaluateConfig
    tracking: TrackingConfig
    registry: RegistryConfig  # model_name: the name in the exported model's card


def validate_pipeline(raw: Any) -> PipelineConfig:
    """Validate the stages' sections of a plain dict; raise ConfigError naming the first bad key."""
    return validate_against(PipelineConfig, raw)


def load_pipeline(path: str | os.PathLike = PARAMS_FILE) -> PipelineConfig:
    """Read params.yaml and validate the sections that the stages read."""
    return validate_pipeline(read_yaml(path))


def flatten(config: BaseModel | dict) -> dict[str, Any]:
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
