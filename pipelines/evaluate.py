"""DVC stage `evaluate`: ONNX Runtime on the test split -> metrics/eval.json and the confusion matrix."""

from imgclf.config.pipeline import load_pipeline
from imgclf.errors import run_or_exit
from imgclf.stages.args import stage_paths
from imgclf.tracking.worker import Tracker


def main() -> None:
    paths = stage_paths(
        __doc__, "params", "onnx", "sidecar", "data", "metrics", "plots", "run_record", "local_metrics"
    )
    config = load_pipeline(paths.params)
    with Tracker(config, plots=True) as tracker:  # the worker imports mlflow while this process evaluates
        from imgclf.stages.evaluation import EvalPaths, evaluate

        metrics = evaluate(config, EvalPaths(**vars(paths)), tracker)
    print(
        f"evaluate: accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f} "
        f"on {metrics['n_test']} test images; batch-1 p50 {metrics['latency_ms_p50_b1']} ms"
    )


if __name__ == "__main__":
    run_or_exit(main)
