"""DVC stage `export`: models/model.ckpt -> models/model.onnx (parity-gated) and models/model.json."""

from imgclf.config.pipeline import load_pipeline
from imgclf.errors import run_or_exit
from imgclf.stages.args import stage_paths
from imgclf.tracking.worker import Tracker


def main() -> None:
    paths = stage_paths(__doc__, "params", "checkpoint", "data", "raw", "onnx", "sidecar")
    config = load_pipeline(paths.params)
    with Tracker(config, model=True) as tracker:  # imports mlflow in a side process, this one torch
        from imgclf.stages.export import export

        sidecar = export(
            config,
            checkpoint=paths.checkpoint,
            data_dir=paths.data,
            raw_dir=paths.raw,
            onnx_out=paths.onnx,
            sidecar_out=paths.sidecar,
            tracker=tracker,
        )
    parity = sidecar["export"]
    print(
        f"export: {paths.onnx}, parity max |Δp| {parity['parity_max_abs_diff']:.1e} "
        f"on {parity['parity_n']} test images"
    )


if __name__ == "__main__":
    run_or_exit(main, teardown=False)  # torch's teardown would add 1.3 s to every run
