"""DVC stage `export`: models/model.ckpt -> models/model.onnx (parity-gated) and models/model.json."""

from pathlib import Path

from imgclf.config import load_params
from imgclf.errors import run_or_exit


def main() -> None:
    config = load_params()
    from imgclf.export import export

    sidecar = export(
        config,
        checkpoint=Path("models/model.ckpt"),
        data_dir=Path("data/normalized"),
        onnx_out=Path("models/model.onnx"),
        sidecar_out=Path("models/model.json"),
    )
    parity = sidecar["export"]
    print(
        f"export: models/model.onnx, parity max |Δp| {parity['parity_max_abs_diff']:.1e} "
        f"on {parity['parity_n']} test images"
    )


if __name__ == "__main__":
    run_or_exit(main)
