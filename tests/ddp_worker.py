"""Run by test_ddp.py and test_sgmae.py: a method through the ``trainer=ddp`` config on 2 CPU processes
(gloo). Arguments: output dir, the tiny preset (``mae`` or ``ibot``), then extra Hydra overrides.

Lightning re-launches this script for rank 1. Each rank saves its final weights and the labels of
its first batch, so the test can check that ranks saw different data yet ended identical.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mimzoo.precision import apply_precision
from mimzoo.train import CONFIG_DIR, build_datamodule, build_model

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY, TINY_IBOT  # noqa: E402


class DumpRankState(L.Callback):
    def __init__(self, out: Path):
        self.out, self.first_labels = out, None

    def on_train_start(self, trainer, pl_module):
        self.initial = {k: v.detach().clone().cpu() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_labels is None:
            self.first_labels = batch[1].cpu()

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save(
            {"state": state, "initial": self.initial, "labels": self.first_labels, "world_size": trainer.world_size},
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main(out: Path, preset: str, extra: list[str]):
    overrides = [
        *(TINY_IBOT if preset == "ibot" else TINY),
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=0",
        "logger=csv",
        "data.batch_size=16",
        *extra,
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    L.seed_everything(cfg.seed, workers=True)
    model = build_model(cfg)
    trainer = instantiate(
        cfg.trainer,
        precision=apply_precision(cfg.trainer, model),
        callbacks=[DumpRankState(out)],
        logger=False,
        enable_checkpointing=False,
        default_root_dir=str(out),
    )
    trainer.fit(model, datamodule=build_datamodule(cfg, model))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "mae", sys.argv[3:])
