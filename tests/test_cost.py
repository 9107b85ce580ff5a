"""RunCost charges every epoch its own step cost: a method whose step changes between epochs (SG-MAE after its
switch) reports the average over the run, not the first step's count."""

import json

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mimzoo.callbacks import RunCost


class StepCostByEpoch(pl.LightningModule):
    """A linear layer applied ``repeats[epoch]`` times per step: the step's FLOPs change with the epoch."""

    has_features = False

    def __init__(self, repeats):
        super().__init__()
        self.repeats, self.layer = repeats, nn.Linear(16, 16)

    def training_step(self, batch, batch_idx):
        x = batch[0]
        for _ in range(self.repeats[self.current_epoch]):
            x = self.layer(x)
        return x.square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def gflops(tmp_path, repeats):
    path = tmp_path / f"cost_{'_'.join(map(str, repeats))}.json"
    trainer = pl.Trainer(
        max_epochs=len(repeats),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RunCost(path)],
        default_root_dir=tmp_path,
    )
    data = DataLoader(TensorDataset(torch.randn(32, 16)), batch_size=8)
    trainer.fit(StepCostByEpoch(repeats), data)
    cost = json.loads(path.read_text())
    assert cost["images_seen"] == 32 * len(repeats)
    return cost["gflops_per_image"]


def test_flops_are_counted_per_epoch_and_averaged_over_images(tmp_path):
    one, three = gflops(tmp_path, [1]), gflops(tmp_path, [3])
    assert three > 2 * one > 0
    assert gflops(tmp_path, [1, 3]) == float(f"{(one + three) / 2:.6g}")
    assert gflops(tmp_path, [1, 1, 1, 3]) == float(f"{(3 * one + three) / 4:.6g}")


def test_checkpoint_that_counted_one_step_keeps_its_average():
    cost = RunCost("unused.json")
    cost.load_state_dict({"wall_clock_s": 1.0, "train_time_s": 1.0, "images_seen": 100, "flops_per_image": 5.0})
    assert cost.state["flops"] == 500.0
