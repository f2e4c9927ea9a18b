"""BEiT block-wise masking: exact count, block structure, reproducibility, config plumbing."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from morphcache.errors import ConfigError
from morphcache.schemas.specs import RunConfig
from morphcache.train.masking import BlockMaskGenerator, build_block_mask_generator, scaled_num_masked


def _boundary_edges(mask_2d: np.ndarray) -> int:
    """Number of 4-neighbour pairs where one patch is masked and the other is not."""
    return int((mask_2d[1:] != mask_2d[:-1]).sum() + (mask_2d[:, 1:] != mask_2d[:, :-1]).sum())


def test_scaled_num_masked_keeps_the_beit_ratio():
    assert scaled_num_masked(75, (14, 14)) == 75
    assert scaled_num_masked(75, (16, 16)) == 98
    assert scaled_num_masked(75, (7, 7)) == 19


@settings(max_examples=40, deadline=None)
@given(h=st.integers(2, 16), w=st.integers(2, 16), frac=st.floats(0.0, 1.0), min_block=st.integers(1, 20),
       seed=st.integers(0, 2**32 - 1))
def test_exactly_num_masked(h, w, frac, min_block, seed):
    num = int(round(frac * h * w))
    gen = BlockMaskGenerator((h, w), num, min_block=min_block)
    mask = gen(seed)
    assert mask.dtype == torch.bool and mask.shape == (h * w,)
    assert int(mask.sum()) == num


def test_masks_are_blocks_not_scattered_patches():
    gen = BlockMaskGenerator((14, 14), 75)
    rng = np.random.default_rng(3)
    block = np.mean([_boundary_edges(gen.generate(rng).reshape(14, 14)) for _ in range(30)])
    scattered = []
    for _ in range(30):
        m = np.zeros(196, dtype=bool)
        m[rng.choice(196, 75, replace=False)] = True
        scattered.append(_boundary_edges(m.reshape(14, 14)))
    # measured: about 41 for block masks, about 173 for uniformly scattered ones
    assert block < 90 < np.mean(scattered)


def test_reproducible_from_seed_numpy_and_torch_generators():
    gen = BlockMaskGenerator((14, 14), 75)
    assert torch.equal(gen(123), gen(123))
    assert torch.equal(gen(np.random.default_rng(5)), gen(np.random.default_rng(5)))
    a = gen(torch.Generator().manual_seed(9))
    b = gen(torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert not torch.equal(gen(1), gen(2))


def test_batch_shape_independent_rows_and_reproducible():
    gen = BlockMaskGenerator((16, 16), 98)
    m1 = gen.batch(6, 42)
    m2 = gen.batch(6, 42)
    assert m1.shape == (6, 256) and m1.dtype == torch.bool
    assert torch.equal(m1, m2)
    assert (m1.sum(dim=1) == 98).all()
    assert len({tuple(row.tolist()) for row in m1}) == 6
    assert gen.batch(0, 1).shape == (0, 256)


def test_zero_and_full_masks():
    assert int(BlockMaskGenerator((4, 4), 0)(0).sum()) == 0
    assert bool(BlockMaskGenerator((4, 4), 16)(0).all())


@pytest.mark.parametrize("kwargs", [dict(num_masked=200), dict(num_masked=-1), dict(num_masked=5, min_block=0),
                                    dict(num_masked=5, aspect=(2.0, 1.0))])
def test_invalid_arguments_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        BlockMaskGenerator((14, 14), **kwargs)


def test_generator_from_run_config_scales_to_grid():
    cfg = RunConfig(store="s", mask_patches=75, mask_min_block=16)
    gen = build_block_mask_generator(cfg, (16, 16))
    assert gen.num_masked == 98 and gen.min_block == 16
    assert int(gen(0).sum()) == 98


def test_mask_block_knobs_scale_with_the_grid_and_cap_blocks():
    cfg = RunConfig(store="s", mask_patches=75, mask_min_block=16, mask_max_block=40, mask_scale_blocks=True)
    gen = build_block_mask_generator(cfg, (8, 8))
    assert (gen.num_masked, gen.min_block, gen.max_block) == (24, 5, 13)  # x 64/196
    fixed = build_block_mask_generator(cfg.model_copy(update={"mask_scale_blocks": False}), (8, 8))
    assert (fixed.min_block, fixed.max_block) == (16, 40)
    # the largest block bounds every placed rectangle: with max 4 a 14x14 mask needs many separate blocks
    small = BlockMaskGenerator((14, 14), 75, min_block=1, max_block=4)
    big = BlockMaskGenerator((14, 14), 75, min_block=16)
    rng_s, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    assert int(small.generate(rng_s).sum()) == 75
    added_small = [small._place_block(np.zeros((14, 14), bool), 4, rng_s) for _ in range(50)]
    assert max(added_small) <= 4
    assert max(big._place_block(np.zeros((14, 14), bool), 75, rng_b) for _ in range(50)) > 16
