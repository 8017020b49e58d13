"""MLflow tracking: one run per pipeline execution, opened by train, continued by export and evaluate.

The store defaults to sqlite:///<repo root>/mlflow.db. Inside DVC, the repo root is DVC_ROOT,
which DVC points at the main workspace even for queued and temporary experiments, so every
experiment lands in the same store.
"""

import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from imgclf.config.pipeline import PipelineConfig, flatten
from imgclf.errors import ImgclfError
from imgclf.tracking.store import ARTIFACTS_DIR, prepare_store, resolve_tracking_uri

NOT_CODE = ("dvc.lock", "params.yaml", "metrics", "plots")
# The MLflow UI opens an experiment of this kind on its runs table (not the GenAI overview).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
ONNX_SHA256_TAG = "imgclf.onnx_sha256"  # on the run that logged the model


def tracking_uri(config: PipelineConfig) -> str:
    """MLFLOW_TRACKING_URI, else tracking.uri, else the repo's sqlite store (absolute path)."""
    return resolve_tracking_uri(config.tracking.uri)


def git_state(root: Path) -> dict[str, str]:
    """The commit and whether the work tree differs from it; 'unknown' outside a git repo."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    # "Dirty" means the code differs from the commit. The pipeline itself rewrites dvc.lock and
    # its metrics and plots as stages finish, and `dvc exp run -S` rewrites params.yaml (the
    # experiment is recorded by its own tag, dvc.exp_name, and the params by the run's params).
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":!{p}" for p in NOT_CODE))
    return {
        "git.commit": commit or "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status)).lower(),
    }


def folder_hash(folder: Path) -> str:
    """SHA-256 over the relative paths and contents of every file in `folder`, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def lineage(config: PipelineConfig, data_dir: Path, raw_dir: Path) -> dict[str, str]:
    """What a model can be traced back to: code (git), data (hashes) and the DVC experiment."""
    # The stage's own checkout: a queued or --temp experiment runs in a copy of its own, while
    # DVC_ROOT names the main workspace.
    tags = git_state(Path.cwd())
    tags["data.name"] = config.data.name
    tags["data.raw_sha256"] = folder_hash(raw_dir) if raw_dir.is_dir() else "unknown"
    tags["data.normalized_sha256"] = folder_hash(data_dir)
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def client(config: PipelineConfig):
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(config)
    prepare_store(uri)
    return MlflowClient(tracking_uri=uri)


def use_store(config: PipelineConfig) -> None:
    """Point MLflow's fluent API (mlflow.start_run, mlflow.onnx.log_model) at the config's store.

    Only where the fluent API is needed: it also sets MLFLOW_TRACKING_URI for the whole process.
    """
    import mlflow

    prepare_store(tracking_uri(config))
    mlflow.set_tracking_uri(tracking_uri(config))


def start_run(config: PipelineConfig, tags: dict[str, str], params: dict | None = None) -> str:
    """Create the pipeline's run with `params` (default: the whole config) flattened as its
    params; return its id."""
    from mlflow.entities import Param

    mlflow_client = client(config)
    run = mlflow_client.create_run(experiment_id(config), tags=tags, run_name=run_name(config, tags))
    params = [Param(key, str(value)) for key, value in flatten(config if params is None else params).items()]
    for start in range(0, len(params), 100):  # MLflow's per-request limit on params
        mlflow_client.log_batch(run.info.run_id, params=params[start : start + 100])
    return run.info.run_id


def experiment_id(config: PipelineConfig, name: str | None = None) -> str:
    """The id of experiment `name` (default `tracking.experiment`), created on first use (by
    whichever process comes first)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(config)
    name = name or config.tracking.experiment
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        # Beside a sqlite store, artifacts go to <store folder>/mlartifacts: an absolute place, where
        # MLflow would otherwise pick ./mlruns under whichever (temporary) folder a stage runs in.
        uri = tracking_uri(config)
        store = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        location = (store.parent / ARTIFACTS_DIR).as_uri() if store else None
        try:
            return mlflow_client.create_experiment(name, location, tags=EXPERIMENT_TAGS)
        except MlflowException:
            experiment = mlflow_client.get_experiment_by_name(name)  # a queued sibling won the race
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise ImgclfError(
            f"MLflow experiment {name!r} is deleted in {tracking_uri(config)}: restore it in the MLflow "
            "UI, or set tracking.experiment (registry.model_name for the registry's history) to another name"
        )
    if experiment.tags.get("mlflow.experimentKind") is None:
        for key, value in EXPERIMENT_TAGS.items():
            mlflow_client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def run_name(config: PipelineConfig, tags: dict[str, str]) -> str:
    """The DVC experiment's name, else `<data>-<model>-<UTC time>`: distinct and telling."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return tags.get("dvc.exp_name") or f"{config.data.name}-{config.model.name}-{stamp}"


@contextmanager
def run_status(config: PipelineConfig, run_id: str, finish: bool) -> Iterator[None]:
    """End the run as KILLED (Ctrl-C, SIGTERM) or FAILED if the block raises; FINISHED after it
    when `finish`. A run never stays RUNNING because its stage died."""
    try:
        yield
    except BaseException as error:
        end_run(config, run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    if finish:
        end_run(config, run_id, "FINISHED")


def end_run(config: PipelineConfig, run_id: str, status: str) -> None:
    """End the run as FINISHED, FAILED or KILLED."""
    client(config).set_terminated(run_id, status)


def open_run(config: PipelineConfig, params: dict | None, data_dir: Path, raw_dir: Path, report: Path) -> str:
    """A new pipeline run: lineage tags, `params` (default: the config), the data set and its
    report; its id."""
    tags = lineage(config, data_dir, raw_dir)
    run_id = start_run(config, tags, params)
    log_dataset(config, run_id, tags, report)
    log_data_report(config, run_id, report)
    return run_id


def adopt_run(
    config: PipelineConfig, params: dict | None, run_id: str | None, data_dir: Path, raw_dir: Path
) -> dict:
    """Run `run_id` if the store still has it, else a new run (outputs restored by DVC name a run
    the store lost): {"run_id", "lineage"}."""
    tags = lineage(config, data_dir, raw_dir)
    if not (run_id and existing_run(config, run_id)):
        run_id = start_run(config, tags, params)
    return {"run_id": run_id, "lineage": tags}


def metric_key(text: str) -> str:
    """`text` as MLflow accepts it in a metric key (letters, digits, _ - . / and space)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text)


def log_dataset(config: PipelineConfig, run_id: str, tags: dict[str, str], report_path: Path) -> None:
    """The normalized data set as the run's input: the MLflow UI's Dataset column and run page."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    report = json.loads(report_path.read_text(encoding="utf-8"))
    source = {"data.name": config.data.name, "data.raw_sha256": tags.get("data.raw_sha256")}
    source |= {
        key: getattr(config.data, key)
        for key in ("path", "url", "mirrors")
        if getattr(config.data, key, None)
    }
    dataset = Dataset(
        name=config.data.name,
        digest=tags.get("data.normalized_sha256", "unknown")[:16],
        source_type="dvc",
        source=json.dumps(source),
        profile=json.dumps({"n_images": report.get("n_images"), "shape": report.get("shape")}),
    )
    context = InputTag(key="mlflow.data.context", value="training")
    client(config).log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[context])])


def model_run(config: PipelineConfig, run_id: str | None, onnx_sha256: str) -> str | None:
    """The run of an ONNX file: `run_id` if the store still has it, else the newest active run that
    logged a file with this SHA-256 (identical trainings make identical files), else None."""
    if run_id and existing_run(config, run_id):
        return run_id
    runs = client(config).search_runs(
        [experiment_id(config)],
        filter_string=f"tags.`{ONNX_SHA256_TAG}` = '{onnx_sha256}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def existing_run(config: PipelineConfig, run_id: str) -> str | None:
    """`run_id` if the store still has it, not deleted (a restored DVC cache may point at a run
    that is gone, or one deleted in the MLflow UI)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client(config).get_run(run_id)
    except MlflowException:
        return None
    return run_id if run.info.lifecycle_stage == "active" else None


def log_metrics(config: PipelineConfig, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    log_metric_history(config, run_id, [(key, value, step) for key, value in metrics.items()])


def log_metric_history(config: PipelineConfig, run_id: str, points: list[tuple[str, float, int]]) -> None:
    """Log (key, value, step) points in as few requests as MLflow allows."""

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, step) for key, value, step in points]
    mlflow_client = client(config)
    for start in range(0, len(metrics), 1000):  # MLflow's per-request limit on metrics
        mlflow_client.log_batch(run_id, metrics=metrics[start : start + 1000])


def log_data_report(config: PipelineConfig, run_id: str, report_path: Path) -> None:
    """The normalize stage's data checks: the report as an artifact, its counts as metrics."""
    report = json.loads(report_path.read_text(encoding="utf-8"))
    counts = {f"data.n_{split}": n for split, n in report.get("n_images", {}).items()}
    counts |= {f"data.duplicates.{pair}": n for pair, n in report.get("duplicates_across_splits", {}).items()}
    counts["data.bad_files"] = len(report.get("bad_files", []))
    log_metrics(config, run_id, counts)
    log_artifacts(config, run_id, [report_path], "data")


def log_artifacts(
    config: PipelineConfig, run_id: str, paths: list[Path], artifact_path: str | None = None
) -> None:
    mlflow_client = client(config)
    for path in paths:
        if path.exists():
            mlflow_client.log_artifact(run_id, str(path), artifact_path)


def prepare_model_logging() -> None:
    """What `log_onnx_model` would spend 1.5 s on first: its imports, and the map of installed
    packages that MLflow builds to check the model's pip requirements (a scan of every installed
    distribution's files). MLflow keeps that map for the process; without it, nothing is lost."""
    import mlflow.onnx  # noqa: F401
    from mlflow.models import infer_signature  # noqa: F401
    from mlflow.utils import requirements_utils

    warm = getattr(requirements_utils, "_init_packages_to_modules_map", None)  # private: may go
    if warm:
        warm()


def log_onnx_model(
    config: PipelineConfig, run_id: str, onnx_path: Path, example: list, parity: dict, sidecar_path: Path
) -> None:
    """The exported ONNX model as the run's MLflow model (what the registry registers), with its
    signature and input example, the parity figures and the sidecar JSON."""
    import mlflow
    import mlflow.onnx
    import numpy as np
    import onnx
    import onnxruntime
    from mlflow.models import infer_signature

    proto = onnx.load(onnx_path)
    example_input = np.asarray(example, dtype=np.uint8)
    # A plain session for two images, not imgclf.runtime's: every stage that tracks would then
    # depend on runtime.py, and a change to how evaluate builds sessions would retrain.
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs()[0].name, session.get_outputs()[0].name
    probabilities = session.run([outputs], {inputs: example_input})[0]
    use_store(config)
    with mlflow.start_run(run_id=run_id):
        mlflow.onnx.log_model(
            proto,
            name="model",
            signature=infer_signature(example_input, probabilities),
            input_example=example_input,
            pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
            save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],
        )
        mlflow.log_metrics(parity)
        mlflow.log_artifact(str(sidecar_path))
        # How a model restored by DVC, with no models/run.json of its own, finds its run again.
        mlflow.set_tag(ONNX_SHA256_TAG, hashlib.sha256(onnx_path.read_bytes()).hexdigest())
