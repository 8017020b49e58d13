"""DVC stage `normalize`: split data/raw/<name>/ into canonical uint8 arrays in data/normalized/."""

from imgclf.config.pipeline import load_pipeline
from imgclf.data.normalize import normalize
from imgclf.errors import run_or_exit
from imgclf.stages.args import stage_paths


def main() -> None:
    paths = stage_paths(__doc__, "params", "raw", "out")
    config = load_pipeline(paths.params)
    report = normalize(config.data, config.seed, paths.raw, paths.out)
    bad = f", {len(report['bad_files'])} bad files skipped (see report.json)" if report["bad_files"] else ""
    extra = sum(n for per_class in report.get("extra_train", {}).values() for n in per_class.values())
    added = f" (train: {extra} from data.extra_train)" if config.data.extra_train else ""
    print(
        f"normalize: {report['n_images']} images{added}, cross-split duplicates "
        f"{report['duplicates_across_splits']}{bad}"
    )


if __name__ == "__main__":
    run_or_exit(main)
