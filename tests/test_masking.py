"""Every registered strategy: exact count, seed reproducibility, the shape its name promises."""

import pytest
import torch

from mimzoo import masking
from mimzoo.masking import mask_to_ids, num_masked
from mimzoo.masking import registry as mask_registry

GRID = (8, 8)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


EXACT = [name for name in masking.available() if masking.build(name, ratio=0.5).exact_count]


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_exact_count_dtype_shape(name, ratio):
    mask = masking.build(name, ratio=ratio)(16, GRID, generator=gen())
    assert mask.dtype == torch.bool and mask.shape == (16, 64)
    assert (mask.sum(1) == num_masked(ratio, 64)).all()


def test_variable_count_strategies_say_so_and_token_dropping_methods_refuse_them(tiny_mae):
    assert set(masking.available()) - set(EXACT) == {"ibot"}
    assert not masking.build("block", ratio=0.4, exact=False).exact_count
    mask = masking.build("ibot", ratio=0.3)(16, GRID, generator=gen())
    assert mask.dtype == torch.bool and mask.shape == (16, 64) and len(set(mask.sum(1).tolist())) > 1
    with pytest.raises(ValueError, match="same masked count in every sample"):
        tiny_mae(torch.randn(16, 3, 32, 32), mask=mask)


@pytest.mark.parametrize(
    "mask",
    [
        {"name": "ibot"},
        {"name": "block", "exact": False},
        {"name": "multiscale", "base": {"name": "block", "exact": False}},
    ],
)
def test_token_dropping_methods_refuse_inexact_strategies_when_built(mask):
    from conftest import TINY_MAE
    from mimzoo.methods import MAE, ConvMAE

    with pytest.raises(ValueError, match="drops masked tokens.*exact counts"):
        MAE(**TINY_MAE, mask=mask)
    with pytest.raises(ValueError, match="drops masked tokens"):
        ConvMAE(
            encoder=dict(img_size=32, patch_size=[1, 2, 2], embed_dim=[8, 8, 16], depth=[1, 1, 1], num_heads=2),
            decoder=TINY_MAE["decoder"],
            mask=mask,
        )


@pytest.mark.parametrize("name", sorted(set(EXACT) - {"self_guided"}))  # self_guided ranks single patches
def test_cells_mask_whole_groups_of_patches_with_the_exact_count(name):
    strategy = masking.build(name, ratio=0.5, cell=2)
    mask = strategy(8, (8, 8), generator=gen(1))
    cells = mask.view(8, 4, 2, 4, 2)
    assert bool((cells == cells[:, :, :1, :, :1]).all())
    assert mask.sum(1).tolist() == [masking.num_masked(0.5, 16) * 4] * 8


@pytest.mark.parametrize("name", masking.available())
def test_seed_reproduces_mask(name):
    strategy = masking.build(name, ratio=0.6)
    a, b = strategy(8, (14, 14), generator=gen(3)), strategy(8, (14, 14), generator=gen(3))
    assert torch.equal(a, b)
    if name != "center":  # the centred block is deterministic by design
        assert not torch.equal(a, strategy(8, (14, 14), generator=gen(4)))


def test_registry_lists_and_builds():
    assert {"random", "block", "grid", "center"} <= set(masking.available())
    with pytest.raises(KeyError, match="known strategies: .*block.*random"):
        masking.build("nope", ratio=0.5)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_interval_is_an_error(ratio):
    with pytest.raises(ValueError, match=r"mask ratio must lie in \(0, 1\)"):
        masking.build("random", ratio=ratio)


@pytest.fixture
def restore_registry():
    """Strategies a test registers are gone afterwards, so no other test (e.g. the one listing every
    strategy) sees them, whatever the order."""
    saved = dict(mask_registry._REGISTRY)
    yield
    mask_registry._REGISTRY.clear()
    mask_registry._REGISTRY.update(saved)


def test_register_custom_strategy(restore_registry):
    @masking.register_mask("_test_first_k")
    class FirstK(masking.MaskStrategy):
        def sample(self, batch_size, h, w, k, generator):
            m = torch.zeros(batch_size, h * w, dtype=torch.bool)
            m[:, :k] = True
            return m

    assert "_test_first_k" in masking.available()
    assert masking.build("_test_first_k", ratio=0.5)(2, GRID)[0, :32].all()
    with pytest.raises(ValueError, match="registered twice"):
        masking.register_mask("_test_first_k")(FirstK)


def test_random_is_uniform_over_positions():
    mask = masking.build("random", ratio=0.75)(20000, GRID, generator=gen())
    freq = mask.float().mean(0)
    assert (freq - 0.75).abs().max() < 0.02  # binomial sd ~0.003 per position
    # Different samples get different masks (per-sample shuffle, not one shared mask).
    assert len({tuple(m.tolist()) for m in mask[:100]}) == 100


def test_random_matches_mae_shuffle_convention():
    """Same noise as MAE's random_masking -> same mask: the first L_keep of argsort(noise) are kept."""
    g = gen(7)
    mask = masking.build("random", ratio=0.75)(4, GRID, generator=g)
    noise = torch.rand(4, 64, generator=gen(7))
    keep = torch.argsort(noise, dim=1)[:, :16]
    expected = torch.ones(4, 64, dtype=torch.bool).scatter(1, keep, False)
    assert torch.equal(mask, expected)


def _components(grid: torch.Tensor) -> int:
    """Number of 4-connected components of True cells."""
    seen, count = set(), 0
    cells = {tuple(x) for x in grid.nonzero().tolist()}
    for start in cells:
        if start in seen:
            continue
        count += 1
        stack = [start]
        while stack:
            r, c = stack.pop()
            if (r, c) in seen:
                continue
            seen.add((r, c))
            stack += [n for n in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)) if n in cells]
    return count


def test_center_is_one_contiguous_centred_block():
    for ratio in (0.1, 0.3, 0.5, 0.8):
        mask = masking.build("center", ratio=ratio)(2, (14, 14))
        grid = mask[0].view(14, 14)
        assert _components(grid) == 1
        rows, cols = grid.nonzero().float().T
        assert abs(rows.mean() - 6.5) <= 1.5 and abs(cols.mean() - 6.5) <= 1.5
    moved = masking.build("center", ratio=0.2, random_position=True)(16, (14, 14), generator=gen())
    assert all(_components(m.view(14, 14)) == 1 for m in moved)
    assert len({tuple(m.tolist()) for m in moved}) > 1


def test_grid_is_periodic():
    mask = masking.build("grid", ratio=0.75)(32, GRID, generator=gen()).view(32, 8, 8)
    # Exactly one visible patch per 2x2 cell, at the same phase in every cell.
    assert torch.equal(mask, torch.roll(mask, shifts=(2, 2), dims=(1, 2)))
    cells = (~mask).view(32, 4, 2, 4, 2).sum(dim=(2, 4))
    assert (cells == 1).all()


def test_block_masks_are_made_of_large_blocks():
    """With exact=False the raw BEiT output: few components, each at least min_num_patches large
    unless merged; the count never exceeds the target."""
    strategy = masking.build("block", ratio=75 / 196, exact=False)
    masks = strategy(200, (14, 14), generator=gen())
    counts = masks.sum(1)
    assert (counts <= 75).all() and counts.float().mean() > 65
    comps = [_components(m.view(14, 14)) for m in masks]
    assert sum(comps) / len(comps) < 5  # blocks, not scattered patches (random would give dozens)


def test_block_exact_tops_up_to_the_count():
    mask = masking.build("block", ratio=0.75)(50, (14, 14), generator=gen())
    assert (mask.sum(1) == 147).all()


def test_mask_to_ids_round_trip():
    mask = masking.build("random", ratio=0.75)(5, GRID, generator=gen())
    ids_keep, ids_restore = mask_to_ids(mask)
    assert ids_keep.shape == (5, 16)
    assert not mask.gather(1, ids_keep).any()  # kept ids are all visible
    seq = torch.cat([ids_keep, torch.argsort(mask.int(), dim=1, stable=True)[:, 16:]], 1)
    assert torch.equal(seq.gather(1, ids_restore), torch.arange(64).expand(5, -1))
    bad = mask.clone()
    bad[0, ~mask[0]] = True
    with pytest.raises(ValueError, match="same masked count"):
        mask_to_ids(bad)


def test_mask_to_ids_with_a_known_count_reads_nothing_back_and_checks_it_on_the_device():
    """Given the count (as the strategy that drew the mask knows it), ``mask_to_ids`` reads nothing back
    to the host (on the meta device, where tensors hold no data, any read fails) and checks the count
    with a device-side assert; ``restore_ids`` needs no count at all."""
    mask = masking.build("random", ratio=0.75)(5, GRID, generator=gen())
    ids_keep, ids_restore = mask_to_ids(mask, num_masked=48)
    expected = mask_to_ids(mask)
    assert torch.equal(ids_keep, expected[0]) and torch.equal(ids_restore, expected[1])
    assert torch.equal(masking.restore_ids(mask), expected[1])
    keep, restore = mask_to_ids(mask.to("meta"), num_masked=48)
    assert keep.shape == (5, 16) and restore.shape == (5, 64) and masking.restore_ids(mask.to("meta")).is_meta
    with pytest.raises(RuntimeError, match="meta"):
        mask_to_ids(mask.to("meta"))  # without the count it has to read the mask
    with pytest.raises(RuntimeError, match="must mask 40 patches"):
        mask_to_ids(mask, num_masked=40)


@pytest.mark.parametrize(
    ("name", "cell"),
    [(name, cell) for name in ("random", "block", "grid", "center") for cell in (1, 2)] + [("self_guided", 1)],
)  # single patches only
def test_strategies_state_their_exact_count_without_drawing(name, cell):
    """``strategy.count(grid)`` is what every drawn row masks (None where counts vary): what token-dropping
    encoders use instead of reading the mask back."""
    params = {"ratio": 0.6} if name == "self_guided" else {"ratio": 0.6, "cell": cell}
    strategy = masking.build(name, **params)
    mask = strategy(6, GRID, generator=gen())
    assert strategy.count(GRID) == int(mask.sum(1)[0]) and (mask.sum(1) == strategy.count(GRID)).all()
    assert masking.build("multiscale", base={"name": name, **params}).count(GRID) == strategy.count(GRID)
    assert masking.build("block", ratio=0.4, exact=False).count(GRID) is None
    assert masking.build("ibot").count(GRID) is None


def test_block_shapes_follow_beit_bounds():
    """BEiT's generator on 14x14 with 75 patches: block areas in [16, 75] and aspect ratios in
    [0.3, 1/0.3], log-uniform (up to rounding to whole patches)."""
    strategy = masking.build("block", ratio=75 / 196)
    g = gen()
    shapes = [strategy.block_shape(75, g) for _ in range(5000)]
    areas = torch.tensor([h * w for h, w in shapes], dtype=torch.float)
    aspects = torch.tensor([h / w for h, w in shapes])
    assert areas.min() >= 9 and areas.max() <= 90  # 16..75 before rounding each side
    assert (areas >= 14).float().mean() > 0.95 and (areas <= 80).float().mean() > 0.95
    assert aspects.min() >= 0.3 / 1.5 and aspects.max() <= 1.5 / 0.3
    log_aspect = aspects.log()
    assert abs(float(log_aspect.median())) < 0.15  # symmetric around 1 in log space
    assert float((aspects < 0.5).float().mean()) > 0.15 and float((aspects > 2).float().mean()) > 0.15
    counts = strategy.__class__(ratio=75 / 196, exact=False)(500, (14, 14), generator=gen(1)).sum(1)
    assert counts.max() == 75 and counts.float().mean() > 70  # at most the target, nearly always reached
