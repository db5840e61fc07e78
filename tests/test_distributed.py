"""One rule picks the device for work outside a Trainer, and one builder makes every Trainer."""

from __future__ import annotations

import torch

from das_lightning.attribution.features import CollectionDevice
from das_lightning.distributed import build_trainer, process_device


def test_the_device_rule_follows_the_accelerator_and_the_rank(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert {process_device(a) for a in ("cpu", "gpu", "auto")} == {torch.device("cpu")}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert process_device("gpu") == process_device("auto") == torch.device("cuda", 3)
    assert process_device("cpu") == torch.device("cpu")  # asked for the CPU: the CPU, even with a GPU there


def test_every_trainer_takes_the_run_placement_and_the_stage_options() -> None:
    trainer = build_trainer(CollectionDevice(enable_progress_bar=False), max_steps=3)
    assert trainer.max_steps == 3 and trainer.logger is None and not trainer.checkpoint_callbacks
    assert trainer.world_size == 1 and trainer.progress_bar_callback is None
