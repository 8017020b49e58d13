"""What `make run` prints at the end: the test accuracy, where the model is, how to look closer;
and what `make ui` prints first: where in the MLflow UI the runs, models and their history are."""

import os
import sys
from pathlib import Path

from imgclf.errors import ImgclfError, run_or_exit
from imgclf.fileio import read_json
from imgclf.tracking.local import file_sha256, read_record


def summary(root: Path = Path()) -> str:
    onnx = root / "models/model.onnx"
    try:
        metrics = read_json(root / "metrics/eval.json")
        card = read_json(root / "models/model.json")
        sha256 = file_sha256(onnx)
    except FileNotFoundError as missing:
        raise ImgclfError(f"{missing.filename} is missing: run `dvc repro` first") from None
    # This machine's numbers and the run, where this checkout made this very file (tracking.local).
    speed = read_record(root / "metrics/local/eval.json", onnx_sha256=sha256)
    run = read_record(root / "models/run.json", onnx_sha256=sha256)
    timed = read_record(root / "metrics/local/train.json", checkpoint_sha256=run.get("checkpoint_sha256"))
    latency = (
        f"p50 {speed['latency_ms_p50_b1']} ms, p99 {speed['latency_ms_p99_b1']} ms"
        if speed
        else "not measured here (outputs from DVC's cache): `dvc repro -f evaluate`"
    )
    fit = f"{timed['train_seconds']} s, {timed['train_images_per_s']:,.0f} images/s" if timed else None
    return "\n".join(
        [
            "",
            f"imgclf: {card['name']} ({card['model']['name']}) on {card['lineage']['data.name']}",
            f"  test accuracy   {metrics['accuracy']:.4f}   macro F1 {metrics['macro_f1']:.4f}"
            f"   ({metrics['n_test']} test images, ONNX Runtime)",
            f"  latency (b=1)   {latency}   (metrics/local/: this machine's timings, not in git)",
            *([f"  training        {fit}"] if fit else []),
            f"  ONNX model      {onnx.resolve()}",
            f"  MLflow run      {run_line(run.get('mlflow_run_id'), run.get('tracking_uri'))}",
            "  browse runs     make ui   ->  http://127.0.0.1:5000",
            "  metrics, plots  dvc metrics show; dvc plots show",
            "  serve it        make serve  ->  http://127.0.0.1:8000",
            "  register it     imgclf register; imgclf promote   (README: Promoting models)",
        ]
    )


def ui_guide(url: str, root: Path = Path()) -> str:
    """Links into the MLflow UI (it opens on a GenAI overview otherwise): the pipeline's runs,
    the registered model, and the registry's history."""
    from imgclf.config.pipeline import load_pipeline
    from imgclf.tracking.store import resolve_tracking_uri

    config = load_pipeline(root / "params.yaml")
    uri = resolve_tracking_uri(config.tracking.uri)
    name = config.registry.model_name
    lines = [f"MLflow UI on {url} for {uri} (Ctrl-C stops it)"]
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return "\n".join([*lines, "  no store yet: `make run` first"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for label, experiment, what in (
        ("runs   ", config.tracking.experiment, "one run per pipeline execution"),
        ("history", f"{name} registry", "who moved which alias, when and why"),
    ):
        found = client.get_experiment_by_name(experiment)
        where = f"{url}/#/experiments/{found.experiment_id}" if found else "(none yet)"
        lines.append(f"  {label}  {where}   experiment {experiment!r}: {what}")
    lines.insert(
        2, f"  models   {url}/#/models/{name}   versions, aliases, the model card (`imgclf register`)"
    )
    return "\n".join(lines)


def append_step_summary(text: str) -> None:
    """In GitHub Actions, the summary goes to the job's page too."""
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as f:
            f.write(f"### Pipeline\n\n```\n{text.strip()}\n```\n\n")


def main() -> None:
    if sys.argv[1:2] == ["--ui"]:
        print(ui_guide(sys.argv[2]))
        return
    text = summary()
    print(text)
    append_step_summary(text)


def run_line(run_id: str | None, uri: str | None) -> str:
    """The run, or why there is none: outputs restored from DVC's run cache outlive their store."""
    if not (run_id and uri):
        return "unknown (these outputs came from DVC's cache): `dvc repro --force` runs and logs it again"
    if run_exists(run_id, uri):
        return f"{run_id}  ({uri})"
    return (
        f"none: run {run_id} is not in {uri} (these outputs came from DVC's run cache); "
        "`dvc repro --force` runs the pipeline again and logs it"
    )


def run_exists(run_id: str, uri: str) -> bool:
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return False
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException:
        return False
    return True


if __name__ == "__main__":
    run_or_exit(main)
