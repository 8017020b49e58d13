"""DVC stage `export`: models/model.ckpt -> models/model.onnx (parity-gated) and models/model.json."""

from imgclf.config.pipeline import validate_pipeline
from imgclf.config.validation import read_yaml
from imgclf.errors import run_or_exit
from imgclf.stages.args import stage_paths
from imgclf.tracking.worker import Tracker


def main() -> None:
    paths = stage_paths(
        __doc__, "params", "checkpoint", "data", "raw", "onnx", "sidecar", "run_record", "local_metrics"
    )
    params = read_yaml(paths.params)  # logged to a new run if the store lost the train stage's
    config = validate_pipeline(params)
    with Tracker(config, params, model=True) as tracker:  # the worker imports mlflow, this process torch
        from imgclf.stages.export import ExportPaths, export

        _, parity = export(config, ExportPaths(**vars(paths)), tracker)
    line = (
        f"export: {paths.onnx}, parity max |Δp| {parity['parity_max_abs_diff']:.1e} "
        f"on {parity['parity_n']} test images"
    )
    if "int8_agreement" in parity:
        line += (
            f"; int8 agrees with float32 on {parity['int8_agreement']:.2%}, "
            f"|Δp| max {parity['int8_max_abs_diff']:.1e}, mean {parity['int8_mean_abs_diff']:.1e}"
        )
    print(line)


if __name__ == "__main__":
    run_or_exit(main, teardown=False)  # torch's teardown would add 1.3 s to every run
