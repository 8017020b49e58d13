"""DDP on CPU: two processes share each training epoch instead of both training on all of it."""

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, tool_env

SCRIPT = """
import sys
from pathlib import Path
import lightning as L
from imgclf.config import compose, validate
from imgclf.data.datamodule import ImageDataModule
from imgclf.data.normalized import load_card
from imgclf.models import build_model
from imgclf.training import ImageClassifier


class Recording(ImageClassifier):
    def on_train_epoch_start(self):
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen += batch[1].tolist()
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self):
        print(f"rank {self.global_rank} saw {len(self.seen)} images", flush=True)


if __name__ == "__main__":
    config = validate(compose(["model.hidden=[16]", "train.batch_size=64"], sys.argv[2]))
    datamodule = ImageDataModule(sys.argv[1], batch_size=64, seed=0, augment=config.train.augment)
    net = build_model(config.model, load_card(Path(sys.argv[1])))
    module = Recording(net, config.train)
    L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ).fit(module, datamodule=datamodule)
"""


@pytest.mark.e2e
def test_two_cpu_processes_each_train_on_half_the_epoch(digits_dirs, tmp_path):
    from imgclf.data.normalized import load_split

    _, normalized = digits_dirs
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(normalized), str(REPO / "conf")],
        cwd=tmp_path,
        env=tool_env(REPO),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    n_train = len(load_split(normalized, "train")[1])
    # Two processes write to one pipe: their lines may run together, so match, don't split.
    seen = sorted(re.findall(r"rank (\d) saw (\d+) images", done.stdout))
    # Without sharding each would see all n_train; which images is the unit tests' business.
    assert seen == [("0", str(n_train // 2)), ("1", str(n_train // 2))]
