"""The export stage: checkpoint -> ONNX, checked in full and gated on parity with PyTorch.

The graph takes raw pixels (`image`, uint8, (N, C, H, W), N dynamic) and returns softmax
`probabilities` (float32, (N, classes)); the normalisation is inside it. Only values that follow
from the training (the model card: classes, input spec, normalisation) go into the file, so
identical training gives an identical file; run-specific values (run id, commit, time) go into
the sidecar JSON. The drift reference (imgclf.drift.reference: what the exported model does on
the validation split) goes into the file too, under `imgclf.reference`, and into the sidecar.

With `export.quantize: int8` the parity-checked float32 graph is quantized (imgclf.stages.quantize)
and the int8 graph ships instead, gated on agreeing with the float32 one on the test split; the
card says which one the file is, and the drift reference is the int8 model's.
"""

import hashlib
import io
import json
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import torch
from torch import nn

from imgclf.card import NO_QUANTIZATION, ModelCard
from imgclf.config.pipeline import PipelineConfig
from imgclf.data.normalized import load_sizes, load_split
from imgclf.drift.reference import METADATA_KEY as REFERENCE_METADATA
from imgclf.drift.reference import Reference, build_reference
from imgclf.errors import ImgclfError
from imgclf.fileio import atomic_path, write_json
from imgclf.models import Checkpoint, load_checkpoint
from imgclf.runtime import inference_session, predict_probabilities
from imgclf.stages import quantize
from imgclf.tracking import client as tracking
from imgclf.tracking.local import file_sha256, read_record, write_record
from imgclf.tracking.worker import Tracker

DATA = "data."  # the lineage tags of the data (its name, hashes): the same for the same data
CARD_METADATA = "imgclf.card"  # the ONNX metadata key that holds ModelCard.to_json()
OPSET = 17  # pinned: a new exporter default must not silently change the served graph
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
PARITY_ATOL = 1e-4
EXAMPLE_BATCH = 2  # a batch of 1 would let the exporter specialise the batch dimension to 1


class ParityError(ImgclfError):
    """ONNX Runtime disagrees with PyTorch beyond tolerance."""


class Probabilities(nn.Module):
    """The served function: uint8 pixels -> class probabilities."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(image), dim=1)


def to_onnx(model: Probabilities, example: torch.Tensor, card: ModelCard) -> onnx.ModelProto:
    """Export with the TorchScript exporter at a pinned opset; strip what would vary between runs.

    The TorchScript exporter (`dynamo=False`) is pinned because it exports these networks in
    0.1 s where the dynamo exporter takes 5 s, with the same graph semantics and parity.
    """
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation notice, not actionable
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    _strip_debug_info(proto)
    del proto.metadata_props[:]
    # What a server needs to use the file alone: classes, input spec, normalisation.
    proto.metadata_props.add(key=CARD_METADATA, value=json.dumps(card.to_json()))
    proto.producer_name = "imgclf"
    return proto


def _strip_debug_info(proto: onnx.ModelProto) -> None:
    """Drop per-node stack traces and doc strings: they embed source paths of this checkout."""

    def strip_graph(graph: onnx.GraphProto) -> None:
        graph.doc_string = ""
        for node in graph.node:
            node.doc_string = ""
            del node.metadata_props[:]
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    strip_graph(attribute.g)
        for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
            del value.metadata_props[:]
        del graph.metadata_props[:]

    proto.doc_string = ""
    strip_graph(proto.graph)
    for function in proto.functions:
        for node in function.node:
            node.doc_string = ""
            del node.metadata_props[:]


def check_parity(model: Probabilities, proto: onnx.ModelProto, images: np.ndarray, batch: int = 256) -> dict:
    """Max |Δprobability| and argmax agreement of ONNX Runtime against PyTorch on `images`."""
    runtime = inference_session(proto.SerializeToString())
    max_diff, mismatches = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            chunk = np.ascontiguousarray(images[start : start + batch])
            expected = model(torch.from_numpy(chunk)).numpy()
            actual = runtime.run([OUTPUT_NAME], {INPUT_NAME: chunk})[0]
            max_diff = max(max_diff, float(np.abs(expected - actual).max()))
            mismatches += int((expected.argmax(1) != actual.argmax(1)).sum())
    return {
        "parity_max_abs_diff": max_diff,
        "parity_argmax_mismatches": mismatches,
        "parity_n": len(images),
    }


def drift_reference(
    proto: onnx.ModelProto, images: np.ndarray, sizes: np.ndarray | None = None, split: str = "val"
) -> Reference:
    """The drift reference: what ONNX Runtime, running the exported graph, does on a held-out split
    (with the split's image sizes before resizing, when data/normalized records them)."""
    session = inference_session(proto.SerializeToString())
    return build_reference(images, predict_probabilities(session, images), split, sizes)


def ship_int8(
    config: PipelineConfig, proto: onnx.ModelProto, card: ModelCard, train: np.ndarray, test: np.ndarray
) -> tuple[onnx.ModelProto, ModelCard, dict]:
    """The int8 graph of the float32 `proto`, calibrated on a seeded sample of the `train` images,
    with its card; and how it agrees with `proto` on the `test` images. AgreementError (the export
    fails, nothing is written) if it picks the float32 graph's class less often than required."""
    sample = quantize.calibration_sample(train, config.export.calibration_images, config.seed)
    int8 = quantize.quantize_int8(proto, sample)
    card = replace(card, quantization=quantize.int8_quantization(len(sample)))
    int8.metadata_props.add(key=CARD_METADATA, value=json.dumps(card.to_json()))
    onnx.checker.check_model(int8, full_check=True)
    agreement = quantize.check_agreement(proto, int8, test)
    quantize.gate_agreement(agreement, config.export.min_agreement)
    return int8, card, agreement


def int8_gate(config: PipelineConfig, figures: dict) -> dict:
    """The sidecar's record of how an int8 graph was calibrated and gated ({} for float32). The
    probability differences depend on the CPU's kernels: metrics/local/export.json has them."""
    if config.export.quantize != "int8":
        return {}
    return {
        "int8": {
            "calibration": {"split": "train", "seed": config.seed, "method": "minmax"},
            "min_agreement": config.export.min_agreement,
            "agreement": figures["int8_agreement"],
            "n": figures["int8_n"],
        }
    }


@dataclass(frozen=True)
class ExportPaths:
    """What the export stage reads and writes: its `cmd:` in dvc.yaml names each."""

    params: Path
    checkpoint: Path  # models/model.ckpt
    data: Path  # data/normalized: the test split checks parity, the val split gives the drift reference
    raw: Path  # data/raw/<name>: hashed into the lineage of a run made afresh
    onnx: Path
    sidecar: Path  # models/model.json: what the same checkpoint always gives (DVC-tracked)
    run_record: Path | None = None  # models/run.json: the MLflow run and the commit (git-ignored)
    local_metrics: Path | None = None  # metrics/local/export.json: this machine's parity figure (git-ignored)


class Exported(NamedTuple):
    sidecar: dict  # models/model.json
    parity: dict  # the parity check's figures on this machine, and the int8 agreement's (int8_*)


def export(config: PipelineConfig, paths: ExportPaths, tracker: Tracker) -> Exported:
    """Write models/model.onnx and models/model.json, or fail without touching them; log the
    model to the train stage's MLflow run (a fresh run if the store lost it, or the checkpoint is
    not the one that run made)."""
    trained = load_checkpoint(paths.checkpoint)
    checkpoint_sha256 = file_sha256(paths.checkpoint)
    made_by = read_record(paths.run_record, checkpoint_sha256=checkpoint_sha256) if paths.run_record else {}
    # Answered by the time it is read: {"run_id", "lineage"}.
    run = tracker.follow(
        tracking.adopt_run, tracker.params, made_by.get("mlflow_run_id"), paths.data, paths.raw
    )
    with tracker.run_status():
        exported = _export(config, paths, tracker, trained, run)
    if paths.run_record:
        answer = run.result()
        onnx_sha256 = exported.sidecar["lineage"]["onnx_sha256"]
        write_record(
            paths.run_record,
            {
                "mlflow_run_id": answer["run_id"],
                "tracking_uri": tracking.tracking_uri(config),
                "checkpoint_sha256": checkpoint_sha256,
                "onnx_sha256": onnx_sha256,
                **{key: value for key, value in answer["lineage"].items() if not key.startswith(DATA)},
            },
        )
        if paths.local_metrics:
            write_record(paths.local_metrics, {**exported.parity, "onnx_sha256": onnx_sha256})
    return exported


def _export(config, paths: ExportPaths, tracker: Tracker, trained: Checkpoint, run: Future) -> Exported:
    model, card = Probabilities(trained.net).eval(), replace(trained.card, quantization=NO_QUANTIZATION)
    test_images, _ = load_split(paths.data, "test")
    proto = to_onnx(model, torch.from_numpy(np.ascontiguousarray(test_images[:EXAMPLE_BATCH])), card)
    onnx.checker.check_model(proto, full_check=True)
    parity = check_parity(model, proto, test_images)
    if parity["parity_max_abs_diff"] > PARITY_ATOL or parity["parity_argmax_mismatches"]:
        raise ParityError(
            f"ONNX Runtime disagrees with PyTorch on the test split: max |Δp| "
            f"{parity['parity_max_abs_diff']:.2e} (limit {PARITY_ATOL:.0e}), "
            f"{parity['parity_argmax_mismatches']} argmax mismatches"
        )
    if config.export.quantize == "int8":
        proto, card, agreement = ship_int8(
            config, proto, card, load_split(paths.data, "train")[0], test_images
        )
        parity |= agreement
    reference = drift_reference(proto, load_split(paths.data, "val")[0], load_sizes(paths.data, "val"))
    proto.metadata_props.add(key=REFERENCE_METADATA, value=json.dumps(reference.to_json()))
    model_bytes = proto.SerializeToString()
    lineage = run.result()["lineage"]
    sidecar = {
        "name": config.registry.model_name,
        **card.to_json(),
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", len(card.classes)]},
        "model": trained.model.model_dump(),
        "export": {
            "opset": OPSET,
            "exporter": "torch.onnx (torchscript)",
            "torch": torch.__version__,
            # The exact difference depends on the CPU's kernels: metrics/local/export.json has it.
            "parity_atol": PARITY_ATOL,
            "parity_argmax_mismatches": parity["parity_argmax_mismatches"],
            "parity_n": parity["parity_n"],
            **int8_gate(config, parity),
        },
        "reference": reference.to_json(),
        # What the same checkpoint and data always give; the run and the commit: models/run.json.
        "lineage": {
            "onnx_sha256": hashlib.sha256(model_bytes).hexdigest(),
            **{key: value for key, value in lineage.items() if key.startswith(DATA)},
        },
    }
    with atomic_path(paths.onnx) as tmp:
        tmp.write_bytes(model_bytes)
        write_json(paths.sidecar, sidecar)
    tracker.log(
        tracking.log_onnx_model, paths.onnx, test_images[:EXAMPLE_BATCH].tolist(), parity, paths.sidecar
    )
    return Exported(sidecar, parity)
