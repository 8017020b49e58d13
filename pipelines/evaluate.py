"""DVC stage `evaluate`: ONNX Runtime on the test split -> metrics/eval.json and the confusion matrix."""

from pathlib import Path

from imgclf.config import load_params
from imgclf.errors import run_or_exit
from imgclf.evaluation import evaluate


def main() -> None:
    config = load_params()
    metrics = evaluate(
        config,
        model_path=Path("models/model.onnx"),
        sidecar_path=Path("models/model.json"),
        data_dir=Path("data/normalized"),
        metrics_out=Path("metrics/eval.json"),
        plots_dir=Path("plots"),
    )
    print(
        f"evaluate: accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f} "
        f"on {metrics['n_test']} test images; batch-1 p50 {metrics['latency_ms_p50_b1']} ms"
    )


if __name__ == "__main__":
    run_or_exit(main)
