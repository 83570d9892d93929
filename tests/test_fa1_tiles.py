"""fa1's block sizes: the paper's rule, the seed notes' rule, and the default M."""

import pytest

from nbflash.kernels.fa1 import tiles


def test_paper_and_seed_rules():
    assert tiles.block_sizes(1024, 64, "paper") == (4, 4)
    assert tiles.block_sizes(4096, 8, "paper") == (8, 128)      # Bc = M/4d, Br = min(Bc, d)
    assert tiles.block_sizes(4096, 8, "seed") == (128, 8)       # Br = M/4d, Bc = min(Br, d)
    assert tiles.block_sizes(1000, 64, "paper") == (4, 4)       # ceil(1000 / 256) = 4
    with pytest.raises(ValueError, match="block_rule"):
        tiles.block_sizes(1024, 64, "other")


@pytest.mark.parametrize("rule", tiles.RULES)
@pytest.mark.parametrize("d", [1, 7, 64, 128, 256])
def test_block_product_fits_a_quarter(d, rule):
    for M in (256, 1000, 4096, 12288):
        Br, Bc = tiles.block_sizes(M, d, rule)
        assert (Br if rule == "paper" else Bc) <= d
        assert Br * Bc <= M / 4 + d  # a quarter of M, up to the rounding of ceil(M / 4d)


@pytest.mark.parametrize("pass_", ["forward", "backward"])
@pytest.mark.parametrize("d", [1, 16, 64, 100, 128, 256])
def test_default_M_is_the_largest_that_fits(d, pass_):
    M = tiles.default_M(d, pass_)
    limit = tiles.STATIC_SMEM_BYTES
    assert tiles.tiles_for(M, d, "paper", 128).smem_bytes(pass_) <= limit
    if M < limit // tiles.TILE_ITEMSIZE:  # else M is capped: all of shared memory as tiles
        assert tiles.tiles_for(M + 1, d, "paper", 128).smem_bytes(pass_) > limit
