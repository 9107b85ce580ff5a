"""Cheap checks of tests/reference_simmim.py itself (it was also checked once, outside the suite, against
the official microsoft/SimMIM modules: same keys, same loss, x_rec and gradients to 0.0, same masks)."""

import numpy as np
import pytest
import torch

import reference_simmim as ref

IMG, P, D, DEPTH, HEADS = 32, 4, 32, 2, 2


def random_official_state_dict(seed=0):
    """Random weights under the official keys (tiny ViT: shared relative bias, layer scale, no abs pos)."""
    g = torch.Generator().manual_seed(seed)
    grid = IMG // P
    shapes = {
        "cls_token": (1, 1, D),
        "mask_token": (1, 1, D),
        "patch_embed.proj.weight": (D, 3, P, P),
        "relative_position_bias_table": ((2 * grid - 1) ** 2 + 3, HEADS),
        "qkv.weight": (3 * D, D),
        "attn.proj.weight": (D, D),
        "fc1.weight": (4 * D, D),
        "fc1.bias": (4 * D,),
        "fc2.weight": (D, 4 * D),
        "decoder.0.weight": (P * P * 3, D, 1, 1),
        "decoder.0.bias": (P * P * 3,),
    }
    sd = {}
    for key in ref.official_simmim_keys(DEPTH):
        if key.endswith("relative_position_index"):
            sd[key] = ref.official_relative_position_index((grid, grid))
            continue
        shape = next((s for k, s in shapes.items() if key.endswith(k)), (D,))
        sd[key] = torch.randn(shape, generator=g) * 0.2 + (1.0 if key.endswith("norm1.weight") else 0.0)
    return sd


def test_loss_runs_and_is_the_masked_mean_abs_error():
    sd = random_official_state_dict()
    images = torch.randn(2, 3, IMG, IMG)
    rs = np.random.RandomState(0)
    mask = torch.from_numpy(np.stack([ref.official_mask_generator(IMG, 8, P, 0.6, rs) for _ in range(2)]))
    loss, x_rec = ref.official_simmim_loss(sd, images, mask, num_heads=HEADS, return_rec=True)
    assert x_rec.shape == images.shape and torch.isfinite(loss)
    pixels = ref.official_upsample_mask(mask, P).expand_as(images).bool()
    assert torch.allclose(loss, (images - x_rec).abs()[pixels].mean(), rtol=1e-4)
    assert torch.allclose(loss, ref.official_simmim_loss(sd, images, mask.bool(), num_heads=HEADS))


def test_relative_position_index_with_cls_rows_and_cols():
    expected = torch.tensor([[11, 9, 9, 9, 9], [10, 4, 3, 1, 0], [10, 5, 4, 2, 1], [10, 7, 6, 4, 3], [10, 8, 7, 5, 4]])
    assert torch.equal(ref.official_relative_position_index((2, 2)), expected)


@pytest.mark.parametrize(
    "inp,mask_p,model_p,ratio,count",
    [(224, 32, 16, 0.6, 30), (192, 32, 4, 0.6, 22), (32, 8, 4, 0.6, 10), (320, 32, 16, 0.07, 8)],
)
def test_mask_generator_shape_count_and_seeding(inp, mask_p, model_p, ratio, count):
    m = ref.official_mask_generator(inp, mask_p, model_p, ratio, np.random.RandomState(3))
    scale = mask_p // model_p
    assert m.shape == (inp // model_p,) * 2 and m.dtype == int
    assert ref.official_mask_count(inp, mask_p, ratio) == count and m.sum() == count * scale**2
    blocks = m.reshape(inp // mask_p, scale, inp // mask_p, scale)  # constant on each mask patch
    assert (blocks == blocks[:, :1, :, :1]).all()
    np.random.seed(3)
    assert np.array_equal(m, ref.official_mask_generator(inp, mask_p, model_p, ratio))
