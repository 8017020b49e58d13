"""DVC stage `evaluate`: ONNX Runtime on the test split -> metrics/eval.json and the confusion matrix."""

from imgclf.config.pipeline import load_pipeline
from imgclf.errors import run_or_exit
from imgclf.stages.args import stage_paths
from imgclf.tracking.worker import Tracker


def main() -> None:
    paths = stage_paths(__doc__, "params", "onnx", "sidecar", "data", "metrics", "plots")
    config = load_pipeline(paths.params)
    with Tracker(config, plots=True) as tracker:  # imports mlflow in a side process while this one evaluates
        from imgclf.stages.evaluation import evaluate

        metrics = evaluate(
            config,
            model_path=paths.onnx,
            sidecar_path=paths.sidecar,
            data_dir=paths.data,
            metrics_out=paths.metrics,
            plots_dir=paths.plots,
            tracker=tracker,
        )
    print(
        f"evaluate: accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f} "
        f"on {metrics['n_test']} test images; batch-1 p50 {metrics['latency_ms_p50_b1']} ms"
    )


if __name__ == "__main__":
    run_or_exit(main)
