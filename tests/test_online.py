"""Online probes: they log representation quality and never touch the pre-training gradients."""

import warnings
from types import SimpleNamespace

import lightning as L
import torch

from mimzoo.callbacks import ReconstructionPanels
from mimzoo.data import MIMDataModule
from mimzoo.eval.online import OnlineKNN, OnlineLinearProbe


def test_linear_probe_step_leaves_pretraining_gradients_alone(tiny_mae):
    tiny_mae.train()
    probe = OnlineLinearProbe(lr=1e-2)
    probe.setup(SimpleNamespace(datamodule=SimpleNamespace(num_classes=10)), tiny_mae, "fit")
    probe.on_fit_start(None, tiny_mae)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    tiny_mae(images).loss.backward()
    grads = {n: p.grad.clone() for n, p in tiny_mae.named_parameters() if p.grad is not None}
    head_before = [p.clone() for p in probe.head.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        probe.on_train_batch_end(None, tiny_mae, None, (images, labels), 0)
    assert all(torch.equal(grads[n], p.grad) for n, p in tiny_mae.named_parameters() if p.grad is not None)
    assert not any(torch.equal(a, b) for a, b in zip(head_before, probe.head.parameters()))  # the head learned
    assert tiny_mae.training  # put back in train mode after the eval-mode feature pass


def test_probes_and_panels_log_through_a_trainer(tiny_mae, tmp_path):
    tiny_mae.train()
    dm = MIMDataModule(name="fake", image_size=32, batch_size=8, num_workers=0, fake_size=32, num_classes=4)
    panels = ReconstructionPanels(str(tmp_path / "recon"), num_images=4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[OnlineKNN(k=3), OnlineLinearProbe(), panels],
    )
    trainer.fit(tiny_mae, datamodule=dm)
    metrics = trainer.callback_metrics
    assert 0 <= float(metrics["probe/knn_top1"]) <= 1 and 0 <= float(metrics["probe/linear_top1"]) <= 1
    assert panels.last_path is not None and panels.last_path.exists()
