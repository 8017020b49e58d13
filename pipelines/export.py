"""DVC stage `export`: models/model.ckpt -> models/model.onnx (parity-gated) and models/model.json."""

from imgclf.config import load_params
from imgclf.errors import run_or_exit
from imgclf.stage import stage_paths
from imgclf.tracker import Tracker


def main() -> None:
    paths = stage_paths(__doc__, "params", "checkpoint", "data", "raw", "onnx", "sidecar")
    config = load_params(paths.params)
    with Tracker(config, model=True) as tracker:  # imports mlflow in a side process, this one torch
        from imgclf.export import export

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
