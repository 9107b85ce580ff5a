"""``trainer.precision: auto``: the fastest precision that keeps results, and the attention kernel that goes with it.

bf16 autocast is chosen where the hardware computes bf16 natively: a CUDA GPU with bf16 (Ampere and newer), or a CPU
with AVX512-BF16 or AMX (oneDNN's bf16 kernels). Elsewhere bf16 is emulated and slower than fp32, so ``auto`` keeps
``32-true``. fp16 is never chosen: it needs loss scaling and overflows in attention logits.

On the CPU under bf16, PyTorch's fused scaled-dot-product attention (timm's default) has a slow backward: measured
on an AVX512-BF16 CPU, 4x slower than fp32 for ViT-S/16, while the unfused ``softmax(q k^T) v`` gains from bf16
like every other matmul. :func:`configure_attention` therefore switches timm's ``fused_attn`` off there; on a GPU
fused attention (flash / memory-efficient kernels) is the fast one and stays on.
"""

from __future__ import annotations

import torch
from torch import nn

AUTO = "auto"


def bf16_supported(device_type: str) -> bool:
    """Native bf16 arithmetic on this device type (``cuda`` or ``cpu``)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return (
        device_type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def device_type(accelerator: str) -> str:
    """The device Lightning's ``accelerator`` setting trains on here: ``cuda`` or ``cpu``."""
    if accelerator in ("auto", "gpu", "cuda"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def resolve_precision(precision: str | int, accelerator: str = "auto") -> str:
    """``auto`` -> ``bf16-mixed`` where :func:`bf16_supported`, else ``32-true``; any other value is returned as
    Lightning's string (``32`` -> ``32-true``)."""
    if str(precision) != AUTO:
        return {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}.get(
            str(precision), str(precision)
        )
    return "bf16-mixed" if bf16_supported(device_type(accelerator)) else "32-true"


def configure_attention(model: nn.Module, precision: str, device: str) -> int:
    """Turn timm's fused attention off on the CPU under bf16 (see the module docstring); returns how many attention
    modules were switched. Idempotent, and a no-op elsewhere."""
    if device != "cpu" or not precision.startswith("bf16"):
        return 0
    switched = 0
    for module in model.modules():
        if getattr(module, "fused_attn", False) is True:
            module.fused_attn = False
            switched += 1
    return switched


def apply_precision(trainer_cfg, model: nn.Module) -> str:
    """The Lightning precision a run's ``trainer`` config resolves to here, with ``model``'s attention set for it
    (what every entry point hands to ``Trainer(precision=...)``)."""
    precision = resolve_precision(trainer_cfg.precision, trainer_cfg.accelerator)
    configure_attention(model, precision, device_type(trainer_cfg.accelerator))
    return precision
