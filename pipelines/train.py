"""DVC stage `train`: fit the configured model; write models/model.ckpt and metrics/train.json."""

from imgclf.config.pipeline import validate_pipeline
from imgclf.config.validation import read_yaml
from imgclf.errors import run_or_exit
from imgclf.stages.args import stage_paths
from imgclf.stages.cpu import cap_cpu_isa
from imgclf.tracking.worker import Tracker, launched_as_rank_zero


def main() -> None:
    paths = stage_paths(
        __doc__,
        "params",
        "data",
        "raw",
        "checkpoint",
        "metrics",
        "curves",
        "curves_png",
        "run_record",
        "local_metrics",
    )
    params = read_yaml(paths.params)  # all of it is logged to the run, promote and sweep too
    config = validate_pipeline(params)  # before torch is imported: a bad value fails in a second
    cap_cpu_isa(config.trainer.cpu_isa)  # before torch is imported: each library reads its variable once
    # The tracking worker imports mlflow while this process imports torch and Lightning; under DDP
    # only global rank 0 tracks, so other ranks start it only if the launch environment hides their rank.
    with Tracker(config, params, start=launched_as_rank_zero(), plots=True) as tracker:
        from imgclf.stages.training.stage import TrainPaths, train

        metrics = train(config, TrainPaths(**vars(paths)), tracker)
    if metrics:
        print(f"train: val_acc {metrics['val_acc']:.4f} after {metrics['epochs']} epochs")


if __name__ == "__main__":
    run_or_exit(main, teardown=False)  # torch's teardown would add 1.3 s to every run
