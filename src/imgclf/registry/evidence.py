"""What a registered version says about itself: the evaluate stage's files (`Outputs`) and the
facts the gates read (`Evidence`), kept as tags on the version so that a later job, on another
machine without the pipeline's outputs, can gate and approve it.

Reads files and tags only: no MLflow call, no lock.
"""

import csv
import hashlib
import json
import shlex
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

import yaml

from imgclf.card import NO_QUANTIZATION, ModelCard
from imgclf.data.watch import dvc_md5
from imgclf.errors import ImgclfError
from imgclf.fileio import read_json
from imgclf.registry.client import TAG, RegistryError
from imgclf.tracking.local import file_sha256, read_record

HEADLINE = ("accuracy", "macro_f1", "latency_ms_p50_b1", "latency_ms_p99_b1")


class NotEvaluated(ImgclfError):
    """models/model.onnx is missing, or not the file the evaluate stage measured: run dvc repro."""

    exit_code = 2


@dataclass(frozen=True)
class Outputs:
    """The evaluate stage's inputs and outputs, named by its `cmd:` line in dvc.yaml."""

    onnx: Path
    sidecar: Path
    data: Path
    metrics: Path
    per_class: Path
    run: Path | None = None  # models/run.json: the run and the commit, if this checkout made the model
    speed: Path | None = None  # metrics/local/eval.json: the latency measured on this machine
    parity: Path | None = None  # metrics/local/export.json: the exact parity difference

    def local(self, path: Path | None) -> dict:
        """A git-ignored record of this checkout's last run (tracking.local) if it describes this
        very ONNX file; else {} (a model restored by DVC, or made elsewhere)."""
        return read_record(path, onnx_sha256=file_sha256(self.onnx)) if path else {}

    def lineage(self) -> dict:
        """models/model.json's lineage (the data), with the run and the commit where known."""
        return read_json(self.sidecar)["lineage"] | self.local(self.run)

    @classmethod
    def of_pipeline(cls, root: Path, check: bool = True) -> "Outputs":
        """The files `dvc repro` evaluated last; NotEvaluated (with `check`) unless dvc.lock says
        these are the files the evaluate stage measured."""
        stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]

        def flags(stage: str) -> dict[str, str]:
            words = shlex.split(stages[stage]["cmd"])
            return {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--")}

        flag, export = flags("evaluate"), flags("export")
        outputs = cls(
            onnx=root / flag["--onnx"],
            sidecar=root / flag["--sidecar"],
            data=root / flag["--data"],
            metrics=root / flag["--metrics"],
            per_class=root / flag["--plots"] / "per_class.csv",
            run=root / flag["--run-record"] if "--run-record" in flag else None,
            speed=root / flag["--local-metrics"] if "--local-metrics" in flag else None,
            parity=root / export["--local-metrics"] if "--local-metrics" in export else None,
        )
        if check:
            outputs.check_evaluated(root)
        return outputs

    def check_evaluated(self, root: Path) -> None:
        """The ONNX file and metrics are those of the evaluate stage's last run in dvc.lock."""
        for path in (self.onnx, self.sidecar, self.metrics, self.per_class, self.data):
            if not path.exists():
                raise NotEvaluated(
                    f"{path.relative_to(root)} is missing: run `dvc repro` (or `make run`) first"
                )
        lock_path = root / "dvc.lock"
        lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) if lock_path.is_file() else {}
        stage = (lock or {}).get("stages", {}).get("evaluate", {})
        recorded = {
            entry["path"]: entry.get("md5") for entry in stage.get("deps", []) + stage.get("outs", [])
        }
        for path in (self.onnx, self.metrics):
            name = path.relative_to(root).as_posix()
            if recorded.get(name) != dvc_md5(path):
                raise NotEvaluated(
                    f"{name} is not what the evaluate stage last measured (dvc.lock): run `dvc repro` first"
                )


@dataclass(frozen=True)
class Evidence:
    """The facts the gates read about one model, kept as tags on its registered version."""

    sha256: str
    commit: str
    dirty: str  # true, false or unknown
    data_name: str
    data_sha256: str  # the normalized data set (all splits)
    test_sha256: str  # the test split alone: what the metrics were measured on
    duplicates: int  # images in both the train and the test split
    classes: tuple[str, ...]
    input: dict  # the card's input spec (imgclf.card.InputSpec.to_json)
    metrics: dict  # accuracy, macro_f1, latency_ms_p50_b1, latency_ms_p99_b1 (metrics/eval.json)
    recall: tuple[float, ...]  # per class, in class order
    parity_max_abs_diff: float
    parity_argmax_mismatches: int
    run_id: str
    # The card's quantization; for int8, with the export's agreement gate (`int8` in model.json's
    # export section, and the exact differences where this machine exported it). Versions
    # registered before quantization existed are float32.
    quantization: dict = field(default_factory=NO_QUANTIZATION.to_json)

    def to_tags(self) -> dict[str, str]:
        fields = asdict(self)
        fields["classes"], fields["recall"] = list(self.classes), list(self.recall)
        tags = {
            f"{TAG}{key}": value if isinstance(value, str) else json.dumps(value)
            for key, value in fields.items()
        }
        # The headline numbers once more, one tag each, to read at a glance in the MLflow UI.
        tags |= {f"{TAG}metric.{key}": str(value) for key, value in self.metrics.items()}
        return tags

    @classmethod
    def from_tags(cls, tags: dict[str, str], version: str) -> "Evidence":
        fields = {}
        for name, kind in cls.__annotations__.items():
            text = tags.get(TAG + name)
            if text is None and cls.__dataclass_fields__[name].default_factory is not MISSING:
                continue
            try:
                fields[name] = text if kind is str else json.loads(text)
            except (TypeError, ValueError):
                raise RegistryError(
                    f"version {version} was not registered by `imgclf register` (tag {TAG}{name} is "
                    f"{'missing' if text is None else 'unreadable'}): it cannot be gated"
                ) from None
        fields["classes"], fields["recall"] = tuple(fields["classes"]), tuple(fields["recall"])
        return cls(**fields)

    @classmethod
    def from_outputs(cls, outputs: Outputs, speed: dict) -> "Evidence":
        """`speed`: the latency on this machine (imgclf.registry.scoring.challenger_evidence)."""
        sidecar = read_json(outputs.sidecar)
        lineage, export = outputs.lineage(), sidecar["export"]
        card = ModelCard.from_json(sidecar)
        metrics = read_json(outputs.metrics) | speed
        # Without this machine's figure, the bound the export stage enforced.
        parity = outputs.local(outputs.parity).get("parity_max_abs_diff", export.get("parity_atol"))
        report = read_json(outputs.data / "report.json")
        return cls(
            sha256=file_sha256(outputs.onnx),
            commit=lineage.get("git.commit", "unknown"),
            dirty=lineage.get("git.dirty", "unknown"),
            data_name=lineage.get("data.name", "unknown"),
            data_sha256=lineage.get("data.normalized_sha256", "unknown"),
            test_sha256=test_split_sha256(outputs.data),
            duplicates=int(report["duplicates_across_splits"].get("train-test", 0)),
            classes=tuple(card.classes),
            input=card.input.to_json(),
            metrics={key: metrics[key] for key in HEADLINE if key in metrics},
            recall=tuple(_recalls(outputs.per_class, card.classes)),
            parity_max_abs_diff=float(parity),
            parity_argmax_mismatches=int(export["parity_argmax_mismatches"]),
            run_id=lineage.get("mlflow_run_id", ""),
            quantization=_quantization(outputs, sidecar, card),
        )


def _quantization(outputs: Outputs, sidecar: dict, card: ModelCard) -> dict:
    """The card's quantization (float32 for a file exported before cards had one), and for int8
    the export's agreement gate with this machine's exact differences where it made the file."""
    record = (card.quantization or NO_QUANTIZATION).to_json()
    gate = sidecar["export"].get("int8")
    if record["scheme"] != "int8" or gate is None:
        return record
    local = outputs.local(outputs.parity)
    differences = {k: local[f"int8_{k}"] for k in ("max_abs_diff", "mean_abs_diff") if f"int8_{k}" in local}
    return record | {"agreement": gate["agreement"], "min_agreement": gate["min_agreement"]} | differences


def quantization_line(quantization: dict) -> str:
    """A version's quantization (Evidence.quantization) in one line: `int8, 99.97% agreement`."""
    if quantization.get("scheme") != "int8":
        return "none (float32)"
    agreement = quantization.get("agreement")
    return "int8" if agreement is None else f"int8, {agreement:.2%} agreement"


def test_split_sha256(data_dir: Path) -> str:
    """SHA-256 of the test split's image and label files: same hash, same test."""
    digest = hashlib.sha256()
    for name in ("images.npy", "labels.npy"):
        digest.update((data_dir / "test" / name).read_bytes())
    return digest.hexdigest()


def _recalls(per_class_csv: Path, classes: tuple[str, ...]) -> list[float]:
    with per_class_csv.open(newline="", encoding="utf-8") as f:
        rows = {row["class"]: float(row["recall"]) for row in csv.DictReader(f)}
    return [rows[name] for name in classes]


def input_line(spec: dict) -> str:
    """An input spec (imgclf.card.InputSpec.to_json) in one line: `L 8x8 uint8 HWC, stretch`."""
    size = "x".join(str(n) for n in spec.get("size", []))
    return f"{spec.get('mode')} {size} {spec.get('dtype')} {spec.get('layout')}, {spec.get('resize')}"
