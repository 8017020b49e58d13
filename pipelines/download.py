"""DVC stage `download`: materialise data.name into data/raw/<name>/ with a SHA-256 manifest."""

from pathlib import Path

from imgclf.config import load_params
from imgclf.data.download import download
from imgclf.errors import run_or_exit


def main() -> None:
    config = load_params()
    target = download(config.data, Path("data/raw"))
    print(f"download: {config.data.name} -> {target}")


if __name__ == "__main__":
    run_or_exit(main)
