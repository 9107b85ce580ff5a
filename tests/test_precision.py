"""``trainer.precision: auto`` (mimzoo/precision.py): bf16 autocast where the hardware has bf16, fp32 elsewhere, and
unfused attention on the CPU under bf16."""

import pytest
import torch
from timm.layers import Attention

from mimzoo import precision
from mimzoo.precision import configure_attention, resolve_precision


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_picks_bf16_only_where_native(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "bf16_supported", lambda device: native)
    assert resolve_precision("auto", "auto") == expected
    assert resolve_precision("auto", "cpu") == expected


@pytest.mark.parametrize(
    "given, expected",
    [
        ("32-true", "32-true"),
        (32, "32-true"),
        ("bf16", "bf16-mixed"),
        ("16-mixed", "16-mixed"),
        ("bf16-mixed", "bf16-mixed"),
    ],
)
def test_explicit_precision_is_kept(monkeypatch, given, expected):
    monkeypatch.setattr(precision, "bf16_supported", lambda device: True)
    assert resolve_precision(given, "auto") == expected


def test_cpu_bf16_detection_agrees_with_onednn():
    assert precision.bf16_supported("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.parametrize(
    "prec, device, fused", [("bf16-mixed", "cpu", False), ("32-true", "cpu", True), ("bf16-mixed", "cuda", True)]
)
def test_attention_kernel_follows_device_and_precision(tiny_mae, prec, device, fused):
    attentions = [m for m in tiny_mae.modules() if isinstance(m, Attention)]
    for m in attentions:
        m.fused_attn = True
    switched = configure_attention(tiny_mae, prec, device)
    assert attentions and all(m.fused_attn is fused for m in attentions)
    assert switched == (0 if fused else len(attentions))


def test_unfused_attention_gives_the_same_loss(tiny_mae):
    """The switch changes the kernel, not the method: the loss is the same up to bf16 rounding."""
    x = torch.randn(4, 3, 32, 32)
    mask = tiny_mae.draw_mask(4, torch.Generator().manual_seed(0))
    losses = []
    for prec in ("32-true", "bf16-mixed"):
        configure_attention(tiny_mae, prec, "cpu")
        with torch.no_grad():
            losses.append(tiny_mae(x, mask).loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
