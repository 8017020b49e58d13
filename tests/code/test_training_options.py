"""train.scheduler=onecycle, train.label_smoothing and train.channels_last, as a fit sees them."""

import itertools

import lightning as L
import pytest
import torch
from torch.nn import functional as F

from imgclf.config.compose import compose
from imgclf.config.operations import validate
from imgclf.data.datamodule import TensorBatches
from imgclf.errors import ConfigError
from imgclf.models import build_model
from imgclf.stages.training.module import ImageClassifier
from tests.conftest import REPO, make_card


def tiny_data(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 10, (n,), generator=generator)


class StepRecorder(L.Callback):
    """The learning rate before each optimizer step, and the layout of the conv weights."""

    def __init__(self):
        self.lrs: list[float] = []
        self.channels_last: list[bool] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
        self.channels_last.append(conv.weight.is_contiguous(memory_format=torch.channels_last))


def fit(overrides: list[str], epochs: int = 2) -> tuple[ImageClassifier, StepRecorder]:
    config = validate(compose(["model=cnn", "model.channels=[4]", *overrides], REPO / "conf"))
    torch.manual_seed(0)
    module = ImageClassifier(build_model(config.model, make_card((1, 8, 8))), config.train)
    recorder = StepRecorder()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    images, labels = tiny_data()
    trainer.fit(
        module,
        TensorBatches(images, labels, 32, shuffle=True),
        TensorBatches(images, labels, 32, shuffle=False),
    )
    return module, recorder


def test_onecycle_warms_up_to_train_lr_then_anneals_every_step():
    _, recorder = fit(["train.scheduler=onecycle", "train.lr=0.01"], epochs=4)
    lrs = recorder.lrs
    assert len(lrs) == 4 * 3  # one value per step: 96 images in batches of 32, 4 epochs
    assert lrs[0] == pytest.approx(0.01 / 25)  # OneCycleLR's start: peak / div_factor
    peak = lrs.index(max(lrs))
    assert 0 < peak < len(lrs) - 1
    assert max(lrs) == pytest.approx(0.01, rel=0.05)
    assert all(a < b for a, b in itertools.pairwise(lrs[: peak + 1]))  # warm-up
    assert all(a > b for a, b in itertools.pairwise(lrs[peak:]))  # annealing
    assert lrs[-1] < 0.01 / 10


def test_label_smoothing_changes_the_objective_but_not_the_reported_loss():
    images, labels = tiny_data(32)
    losses = {}
    for smoothing in (0.0, 0.2):
        config = validate(compose([f"train.label_smoothing={smoothing}"], REPO / "conf"))
        torch.manual_seed(0)
        module = ImageClassifier(build_model(config.model, make_card((1, 8, 8))), config.train).eval()
        objective = module._step((images, labels), "train")
        reported, _, n = module.sums["train"].tolist()
        with torch.no_grad():
            logits = module(images)
        assert reported / n == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
        expected = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        assert objective.item() == pytest.approx(expected.item(), rel=1e-5)
        losses[smoothing] = objective.item()
    assert losses[0.2] != losses[0.0]


def test_channels_last_trains_nhwc_weights_that_load_into_a_plain_network():
    module, recorder = fit(["train.channels_last=true"], epochs=1)
    assert recorder.channels_last and all(recorder.channels_last)
    plain = build_model(
        validate(compose(["model=cnn", "model.channels=[4]"], REPO / "conf")).model, make_card()
    )
    plain.load_state_dict(module.net.state_dict())  # what export does with the checkpoint
    images, _ = tiny_data(16)
    module.net.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            plain(images), module.net(images.contiguous(memory_format=torch.channels_last))
        )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.scheduler=cyclic", "train.scheduler"),
        ("train.label_smoothing=1.0", "train.label_smoothing"),
        ("train.label_smoothing=-0.1", "train.label_smoothing"),
        ("train.channels_last=maybe", "train.channels_last"),
    ],
)
def test_bad_training_options_name_the_key(override, expected):
    with pytest.raises(ConfigError) as error:
        validate(compose([override], REPO / "conf"))
    assert expected in str(error.value)
    assert error.value.exit_code == 2
