"""A model as served: the ONNX file and what it says about itself (classes, input spec, lineage).

MODEL is a path to an `.onnx` file (its sidecar `<stem>.json` beside it, when present, adds the
name and lineage) or a registry URI `models:/<name>@<alias>` / `models:/<name>/<version>`.
Everything needed to use the file comes from its own metadata, written by the export stage, so
nothing here is specific to a data set. One ONNX Runtime session is created and shared: its
`run` is thread-safe and releases the GIL.
"""

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from imgclf.card import ModelCard
from imgclf.errors import ImgclfError
from imgclf.images import MAX_PIXELS, decode_image
from imgclf.runtime import inference_session
from imgclf.tracking.store import StoreError, prepare_store, repo_root, resolve_tracking_uri

REGISTRY_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[0-9]+))")
CARD_METADATA = "imgclf.card"  # written by the export stage (imgclf.stages.export.CARD_METADATA)
# What ONNX Runtime raises for a file it cannot load (they derive from Exception, not one base).
LOAD_ERRORS = (
    ort_errors.Fail,
    ort_errors.InvalidArgument,
    ort_errors.InvalidGraph,
    ort_errors.InvalidProtobuf,
    ort_errors.NoModel,
    ort_errors.NotImplemented,
    ort_errors.RuntimeException,
)


class ModelError(ImgclfError):
    """MODEL is not a usable imgclf model: missing, not ONNX, or without the export's metadata."""

    exit_code = 2  # MODEL is a command-line argument: a usage error


@dataclass(frozen=True)
class ServedModel:
    session: ort.InferenceSession
    name: str
    version: str  # the registry version, or "sha256:<first 12 hex digits>" of the file
    source: str  # MODEL as given
    sha256: str
    card: ModelCard
    lineage: dict
    registry: dict | None
    max_pixels: int
    input_name: str
    output_name: str

    @classmethod
    def load(cls, model: str, threads: int = 0, max_pixels: int = MAX_PIXELS) -> "ServedModel":
        """Load MODEL (a path or a models:/ URI); ModelError in one line if it cannot be served."""
        if model.startswith("models:/"):
            registry = Registry(model)
            return registry.load(registry.resolve(), threads, max_pixels)
        path = Path(model)
        sidecar = _read_sidecar(path.with_suffix(".json")) if path.suffix == ".onnx" else None
        return from_file(path, model, sidecar, None, threads, max_pixels)

    def preprocess(self, data: bytes | str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
        """An image file (bytes or path) -> uint8 (C, H, W) for this model; BadImage if it cannot be,
        or if it holds more than max_pixels (default: the server's limit)."""
        return decode_image(data, self.card.input, max_pixels or self.max_pixels)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) -> float32 probabilities (N, classes)."""
        return self.session.run([self.output_name], {self.input_name: images})[0]

    def describe(self) -> dict:
        """What GET /v1/model answers; these keys are the web page's contract."""
        return {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "sha256": self.sha256,
            "classes": list(self.card.classes),
            "input": {"name": self.input_name, **self.card.input.to_json()},
            "normalization": self.card.normalization.to_json(),
            "lineage": self.lineage,
            "registry": self.registry,
        }


def from_file(
    path: Path,
    source: str,
    sidecar: dict | None,
    registry: dict | None,
    threads: int,
    max_pixels: int,
) -> ServedModel:
    """The session and metadata of one ONNX file (tensors in external files beside it load too).

    Its name: the sidecar's, else the registered model's, else the file's stem."""
    try:
        model_bytes = path.read_bytes()
    except OSError as error:
        raise ModelError(f"model {source!r}: cannot read it: {error.strerror or error}") from None
    session = _session(str(path), source, threads)
    metadata = session.get_modelmeta().custom_metadata_map
    if CARD_METADATA not in metadata:
        raise ModelError(
            f"model {source!r}: not an imgclf model, its ONNX metadata lacks {CARD_METADATA} "
            "(export it with the pipeline's export stage)"
        )
    try:
        card = ModelCard.from_json(json.loads(metadata[CARD_METADATA]))
    except (ValueError, KeyError, TypeError) as error:
        raise ModelError(f"model {source!r}: bad {CARD_METADATA} metadata: {error!r}") from None
    input_name, output_name = _check_signature(session, source, card)
    sha256 = hashlib.sha256(model_bytes).hexdigest()
    sidecar = sidecar or {}
    name = sidecar.get("name") or (registry or {}).get("name") or path.stem
    return ServedModel(
        session=session,
        name=str(name),
        version=str(registry["version"]) if registry else f"sha256:{sha256[:12]}",
        source=source,
        sha256=sha256,
        card=card,
        lineage=dict(sidecar.get("lineage") or {}),
        registry=registry,
        max_pixels=max_pixels,
        input_name=input_name,
        output_name=output_name,
    )


def _session(path: str, source: str, threads: int) -> ort.InferenceSession:
    try:
        return inference_session(path, threads, spin=False)
    except LOAD_ERRORS as error:
        reason = " ".join(str(error).split())
        raise ModelError(f"model {source!r}: not an ONNX model ONNX Runtime can load: {reason}") from None


def _check_signature(session, source: str, card: ModelCard) -> tuple[str, str]:
    """One uint8 (N, C, H, W) input matching the card, float probabilities (N, classes) out."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    n_classes = len(card.classes)
    expected = ["batch", *card.input.shape]
    if len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or list(inputs[0].shape)[1:] != expected[1:]:
        got = [(i.name, i.type, i.shape) for i in inputs]
        raise ModelError(f"model {source!r}: expected one uint8 input of shape {expected}, got {got}")
    output = outputs[0]
    width = output.shape[-1] if output.shape else None
    wrong_width = isinstance(width, int) and width != n_classes  # a named dimension is not checked
    if output.type != "tensor(float)" or len(output.shape) != 2 or wrong_width:
        raise ModelError(
            f"model {source!r}: expected float probabilities (batch, {n_classes}), "
            f"got {output.name} {output.type} {output.shape}"
        )
    return inputs[0].name, output.name


def _read_sidecar(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError(f"model sidecar {str(path)!r}: unreadable: {error}") from None
    if not isinstance(sidecar, dict):
        raise ModelError(f"model sidecar {str(path)!r}: expected a JSON object")
    return sidecar


def tracking_uri() -> str:
    """The pipeline's store: MLFLOW_TRACKING_URI, else params.yaml's tracking.uri, else mlflow.db."""
    return resolve_tracking_uri(_configured_tracking_uri(repo_root() / "params.yaml"))


def _configured_tracking_uri(params: Path) -> str | None:
    """tracking.uri of the repo's params.yaml, read as plain YAML: the schema is for the stages."""
    import yaml

    try:
        tree = yaml.safe_load(params.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    tracking = tree.get("tracking") if isinstance(tree, dict) else None
    uri = tracking.get("uri") if isinstance(tracking, dict) else None
    return uri if isinstance(uri, str) and uri else None


class RegistryUnavailable(ModelError):
    """The store did not answer, or has no such alias or version: worth asking again later."""


class Registry:
    """The registry a models:/ URI points into: resolve it (one call), then load a known version.

    Two steps, so that a server following an alias can ask the cheap question (which version?)
    every few seconds and pay for a download only when the answer changes. mlflow takes seconds
    to import: only a registry URI pays for it, here.
    """

    def __init__(self, uri: str):
        match = REGISTRY_URI.fullmatch(uri)
        if not match:
            raise ModelError(f"model {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
        self.uri, self.name, self.alias, self.version = uri, match["name"], match["alias"], match["version"]
        self.store = tracking_uri()
        if self.store.startswith("sqlite:///") and not Path(self.store.removeprefix("sqlite:///")).is_file():
            raise ModelError(
                f"model {uri!r}: no MLflow store at {self.store} (run `make run`, or set MLFLOW_TRACKING_URI)"
            )
        try:
            prepare_store(self.store)
        except StoreError as error:
            raise ModelError(f"model {uri!r}: {error}") from None
        # Progress bars would garble `imgclf predict --json` output on a terminal.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.store, registry_uri=self.store)

    def resolve(self) -> str:
        """The version the URI names now: one registry call; RegistryUnavailable if it fails."""
        from mlflow.exceptions import MlflowException

        try:
            if self.alias:
                return str(self.client.get_model_version_by_alias(self.name, self.alias).version)
            return str(self.client.get_model_version(self.name, self.version).version)
        except MlflowException as error:
            raise RegistryUnavailable(
                f"model {self.uri!r}: {_one_line(error)} (store {self.store})"
            ) from None

    def load(self, version: str, threads: int, max_pixels: int) -> ServedModel:
        """Download `version` and load it: RegistryUnavailable if the download fails, ModelError
        if the files are not a servable model."""
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        fixed = f"models:/{self.name}/{version}"  # what errors name: the exact artifact
        where = f"model {fixed!r}"
        with tempfile.TemporaryDirectory(prefix="imgclf-model-") as tmp:
            try:
                entry = self.client.get_model_version(self.name, version)
                # The version's own location, not `fixed`: MLflow resolves a models:/ URI against
                # the process-wide registry URI, whatever store it is given.
                location = self.client.get_model_version_download_uri(self.name, version)
                folder = mlflow.artifacts.download_artifacts(
                    artifact_uri=location, dst_path=tmp, tracking_uri=self.store
                )
            except (MlflowException, OSError) as error:
                raise RegistryUnavailable(f"{where}: {_one_line(error)} (store {self.store})") from None
            onnx_files = sorted(Path(folder).rglob("*.onnx"))
            if not onnx_files:
                raise ModelError(f"{where}: holds no .onnx file")
            sidecar = _registered_sidecar(entry.run_id, tmp, self.store)
            registry = {
                "name": self.name,
                "version": str(version),
                "alias": self.alias,
                "run_id": entry.run_id,
                "tracking_uri": self.store,
            }
            # The session has read the file (and any external data) when this returns.
            model = from_file(onnx_files[0], fixed, sidecar, registry, threads, max_pixels)
        return replace(model, source=self.uri)


def _one_line(error: Exception) -> str:
    return " ".join(str(getattr(error, "message", None) or error).split())


def _registered_sidecar(run_id: str | None, tmp: str, store: str) -> dict | None:
    """The export stage's model.json, logged beside the model in its run; None if absent."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="model.json", dst_path=str(Path(tmp) / "run"), tracking_uri=store
        )
    except (MlflowException, OSError):
        return None
    return _read_sidecar(Path(path))
