"""A model as served: the ONNX file and what it says about itself (classes, input spec, lineage).

MODEL is a path to an `.onnx` file (its sidecar `<stem>.json` beside it, when present, adds the
name and lineage) or a registry URI `models:/<name>@<alias>` / `models:/<name>/<version>`.
Everything needed to use the file comes from its own metadata, written by the export stage, so
nothing here is specific to a data set. One ONNX Runtime session is created and shared: its
`run` is thread-safe and releases the GIL. The registry's reader and cache are imported by the
first `Registry`: a server of a local file never pays for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from imgclf.card import ModelCard
from imgclf.errors import ImgclfError
from imgclf.images import MAX_PIXELS, SourceInfo, decode_image, decode_image_with_info
from imgclf.runtime import inference_session
from imgclf.tracking.local import RUN_FILE, read_record
from imgclf.tracking.store import StoreError, prepare_store, repo_root, resolve_tracking_uri

if TYPE_CHECKING:
    from imgclf.serving.cache import VersionCache
    from imgclf.serving.registry_reader import VersionRecord

REGISTRY_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[0-9]+))")
CARD_METADATA = "imgclf.card"  # written by the export stage (imgclf.stages.export.CARD_METADATA)
SHA256_TAG = "imgclf.sha256"  # the ONNX file's, on a version made by `imgclf register` (registry.evidence)
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
    def load(cls, model: str, threads: int = 0, max_pixels: int = MAX_PIXELS) -> ServedModel:
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

    def decode(
        self, data: bytes | str | os.PathLike, max_pixels: int | None = None
    ) -> tuple[np.ndarray, SourceInfo]:
        """`preprocess`, and what the file was: its mode and its size as displayed, before resizing."""
        return decode_image_with_info(data, self.card.input, max_pixels or self.max_pixels)

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
            # float32 for a file exported before the card said: the only kind there was then
            "quantization": self.card.quantization.to_json()
            if self.card.quantization
            else {"scheme": "none"},
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
    lineage = dict(sidecar.get("lineage") or {})
    if registry is None:  # the pipeline's file: its run and commit, if this checkout made it
        lineage |= read_record(path.with_name(RUN_FILE), onnx_sha256=sha256)
    return ServedModel(
        session=session,
        name=str(name),
        version=str(registry["version"]) if registry else f"sha256:{sha256[:12]}",
        source=source,
        sha256=sha256,
        card=card,
        lineage=lineage,
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
    every few seconds and pay for a download only when the answer changes. A version's files are
    downloaded once, into imgclf's cache (cache.py); an `mlflow server` is read over its REST API,
    and only another store (a sqlite file) pays for importing mlflow (registry_reader.py).
    """

    def __init__(self, uri: str, cache: VersionCache | None = None):
        from imgclf.serving.cache import VersionCache
        from imgclf.serving.registry_reader import registry_reader

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
        self.reader = registry_reader(self.store)
        self.cache = cache or VersionCache()
        self._resolved: VersionRecord | None = None  # what the last resolve() answered

    def resolve(self) -> str:
        """The version the URI names now: one registry call; RegistryUnavailable if it fails."""
        from imgclf.serving.registry_reader import RegistryReadError

        try:
            if self.alias:
                record = self.reader.version_by_alias(self.name, self.alias)
            else:
                record = self.reader.version(self.name, self.version)
        except RegistryReadError as error:
            raise RegistryUnavailable(f"model {self.uri!r}: {error} (store {self.store})") from None
        self._resolved = record
        return record.version

    def load(self, version: str, threads: int, max_pixels: int) -> ServedModel:
        """Load `version`, from the cache or downloaded into it: RegistryUnavailable if the download
        fails, ModelError if the files are not a servable model."""
        from imgclf.serving.cache import CacheUnwritable
        from imgclf.serving.registry_reader import RegistryReadError

        fixed = f"models:/{self.name}/{version}"  # what errors name: the exact artifact
        where = f"model {fixed!r}"
        try:
            record = self._resolved if self._resolved and self._resolved.version == version else None
            record = record or self.reader.version(self.name, version)
            folder = self.cache.lookup(self.store, record)
            if folder is None:
                try:
                    folder = self.cache.add(self.store, record, lambda work: self._download(record, work))
                except CacheUnwritable:  # a read-only home: no cache, then
                    with tempfile.TemporaryDirectory(prefix="imgclf-model-") as tmp:
                        self._download(record, Path(tmp))
                        return self._from_folder(Path(tmp), record, threads, max_pixels)
        except RegistryReadError as error:
            raise RegistryUnavailable(f"{where}: {error} (store {self.store})") from None
        return self._from_folder(folder, record, threads, max_pixels)

    def _download(self, record: VersionRecord, work: Path) -> None:
        """The version's files into work/files, its run's model.json into work/sidecar.json; the
        ONNX file checked against the SHA-256 that `imgclf register` recorded, if it did."""
        from imgclf.serving.registry_reader import RegistryReadError

        self.reader.download_version(record.name, record.version, work / "files")
        registered = record.tags.get(SHA256_TAG)
        if registered:
            found = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (work / "files").rglob("*.onnx")}
            if registered not in found:
                raise RegistryReadError(
                    f"the downloaded files hold no ONNX file with the SHA-256 the version was registered "
                    f"with ({registered[:12]}…): an incomplete or altered download"
                )
        if record.run_id:
            sidecar = self.reader.download_run_file(record.run_id, "model.json", work / "run")
            if sidecar is not None:
                os.replace(sidecar, work / "sidecar.json")
            shutil.rmtree(work / "run", ignore_errors=True)

    def _from_folder(self, folder: Path, record: VersionRecord, threads: int, max_pixels: int) -> ServedModel:
        fixed = f"models:/{self.name}/{record.version}"
        onnx_files = sorted((folder / "files").rglob("*.onnx"))
        if not onnx_files:
            raise ModelError(f"model {fixed!r}: holds no .onnx file")
        registry = {
            "name": self.name,
            "version": record.version,
            "alias": self.alias,
            "run_id": record.run_id or None,
            "tracking_uri": self.store,
        }
        sidecar = _read_sidecar(folder / "sidecar.json")
        # The session has read the file (and any external data) when this returns.
        model = from_file(onnx_files[0], fixed, sidecar, registry, threads, max_pixels)
        return replace(model, source=self.uri)
