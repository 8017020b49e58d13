"""The LightningModule: cross-entropy on uint8 batches, metrics summed on the device."""

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

from imgclf.config.pipeline import TrainConfig


class ImageClassifier(L.LightningModule):
    """Cross-entropy training of a network that eats raw uint8 pixels.

    Loss and accuracy are summed in tensors on the device and logged once per epoch:
    a `self.log` per step costs more than the step itself on small images.
    """

    def __init__(self, net: nn.Module, train_config: TrainConfig, record: dict | None = None):
        super().__init__()
        self.net = net
        self.train_config = train_config
        # What export needs to rebuild the network (imgclf.models.checkpoint_record): the checkpoint keeps it.
        self.record = record or {}
        self.sums = {"train": torch.zeros(3), "val": torch.zeros(3)}  # loss * n, correct, n

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        images, labels = batch
        if self.train_config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = self(images)
        log_probs = F.log_softmax(logits.float(), dim=1)  # float: bf16 autocast leaves bf16 logits
        loss = F.nll_loss(log_probs, labels)  # plain cross-entropy, the loss the curves report
        with torch.no_grad():
            n = labels.new_tensor(len(labels), dtype=torch.float32)
            correct = (logits.argmax(dim=1) == labels).sum().float()
            self.sums[split] += torch.stack([loss.detach() * n, correct, n])
        smoothing = self.train_config.label_smoothing
        if split == "train" and smoothing:
            # The target keeps 1 - smoothing on the label and spreads `smoothing` over all classes,
            # as F.cross_entropy(label_smoothing=...) does.
            return (1 - smoothing) * loss - smoothing * log_probs.mean(dim=1).mean()
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def setup(self, stage: str) -> None:
        if self.train_config.channels_last:  # before the optimizer is made: its state follows the weights
            self.net.to(memory_format=torch.channels_last)

    def on_fit_start(self) -> None:
        self.sums = {split: torch.zeros(3, device=self.device) for split in self.sums}

    def _log_epoch(self, split: str) -> None:
        loss_sum, correct, n = self.sums[split].tolist()
        self.sums[split].zero_()
        if n:
            self.log(f"{split}_loss", loss_sum / n, prog_bar=True, sync_dist=True)
            self.log(f"{split}_acc", correct / n, prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        # The epoch's training batches are done when validation ends: log both splits here so
        # early stopping, checkpointing and the curves all see one epoch's numbers.
        if self.trainer.sanity_checking:
            self.sums["val"].zero_()
            return
        self._log_epoch("train")
        self._log_epoch("val")
        self.log("lr", self.optimizers().param_groups[0]["lr"], sync_dist=True)

    def configure_optimizers(self):
        cfg = self.train_config
        if cfg.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.SGD(
                self.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        if cfg.scheduler == "none":
            return optimizer
        if cfg.scheduler == "onecycle":
            # Smith and Topin (2019): up to `lr` in the first 30 % of the steps, then down to lr / 25e4;
            # Adam's beta1 (SGD's momentum) moves between 0.95 and 0.85 the other way.
            steps = self.trainer.estimated_stepping_batches
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if cfg.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.max_epochs)
        else:
            step = max(1, cfg.max_epochs // 3)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["imgclf"] = self.record
