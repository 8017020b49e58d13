"""DVC stage `download`: materialise data.name into data/raw/<name>/ with a SHA-256 manifest."""

from imgclf.data import watch
from imgclf.errors import run_or_exit
from imgclf.stages.args import stage_paths


def main() -> None:
    paths = stage_paths(__doc__, "params", "raw")
    current = watch.fingerprint(paths.params)
    if watch.is_current(paths.raw, current):
        print(f"download: {paths.raw} is up to date")
        return
    from imgclf.config.pipeline import load_pipeline
    from imgclf.data.download import download

    config = load_pipeline(paths.params)
    download(config.data, paths.raw, root=paths.params.parent)
    watch.record(paths.raw, current)
    print(f"download: {config.data.name} -> {paths.raw}")


if __name__ == "__main__":
    run_or_exit(main)
