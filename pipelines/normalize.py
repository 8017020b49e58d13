"""DVC stage `normalize`: split data/raw/<name>/ into canonical uint8 arrays in data/normalized/."""

from pathlib import Path

from imgclf.config import load_params
from imgclf.data.normalize import normalize
from imgclf.errors import run_or_exit


def main() -> None:
    config = load_params()
    raw_dir = Path("data/raw") / config.data.name
    report = normalize(config.data, config.seed, raw_dir, Path("data/normalized"))
    bad = f", {len(report['bad_files'])} bad files skipped (see report.json)" if report["bad_files"] else ""
    print(
        f"normalize: {report['n_images']} images, cross-split duplicates "
        f"{report['duplicates_across_splits']}{bad}"
    )


if __name__ == "__main__":
    run_or_exit(main)
