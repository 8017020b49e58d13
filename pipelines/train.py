"""DVC stage `train`: fit the configured model; write models/model.ckpt and metrics/train.json."""

from pathlib import Path

from imgclf.config import load_params
from imgclf.errors import run_or_exit


def main() -> None:
    config = load_params()  # validated before torch is imported: a bad value fails in a second
    from imgclf.training import train

    metrics = train(
        config,
        data_dir=Path("data/normalized"),
        raw_dir=Path("data/raw") / config.data.name,
        checkpoint_out=Path("models/model.ckpt"),
        metrics_out=Path("metrics/train.json"),
        curves_out=Path("plots/train_curves.csv"),
        curves_png=Path("plots/train_curves.png"),
    )
    if metrics:
        print(f"train: val_acc {metrics['val_acc']:.4f} after {metrics['epochs']} epochs")


if __name__ == "__main__":
    run_or_exit(main)
