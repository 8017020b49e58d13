"""DVC stage `train`: fit the configured model; write models/model.ckpt and metrics/train.json."""

from imgclf.config import load_params
from imgclf.cpu import cap_cpu_isa
from imgclf.errors import run_or_exit
from imgclf.stage import stage_paths
from imgclf.tracker import Tracker, launched_as_rank_zero


def main() -> None:
    paths = stage_paths(__doc__, "params", "data", "raw", "checkpoint", "metrics", "curves", "curves_png")
    config = load_params(paths.params)  # validated before torch is imported: a bad value fails in a second
    cap_cpu_isa(config.trainer.cpu_isa)  # before torch is imported: each library reads its variable once
    # The side process imports mlflow while this one imports torch and Lightning; under DDP only
    # global rank 0 tracks, so other ranks start it only if the launch environment hides their rank.
    with Tracker(config, start=launched_as_rank_zero(), plots=True) as tracker:
        from imgclf.training import train

        metrics = train(
            config,
            data_dir=paths.data,
            raw_dir=paths.raw,
            params_file=paths.params,
            checkpoint_out=paths.checkpoint,
            metrics_out=paths.metrics,
            curves_out=paths.curves,
            curves_png=paths.curves_png,
            tracker=tracker,
        )
    if metrics:
        print(f"train: val_acc {metrics['val_acc']:.4f} after {metrics['epochs']} epochs")


if __name__ == "__main__":
    run_or_exit(main, teardown=False)  # torch's teardown would add 1.3 s to every run
