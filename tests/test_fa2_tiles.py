"""fa2 with tile shapes other than the simulator's default, through the kernels' host functions:
16 lanes per row (as the GPU tiles have), one score column per thread, several output chunks per
thread, and a dK/dV pass with more query rows than key rows; against the float64 reference with
the tolerance rule. Also the checks RegTiles makes of its shape."""

import numpy as np
import pytest

from nbflash import naive
from nbflash.kernels.fa2 import plan as fa2_plan, tiles as fa2_tiles
from support import assert_close, make_inputs, reference, xp

SHAPES = [
    # (R, C, tm, tn[, stages]) for all kernels, d
    ((4, 16, 2, 1), 40),     # 16 lanes, 2 row groups, d < 4 * lanes: one padded chunk
    ((8, 8, 4, 2), 72),      # 4 lanes, 5 chunks of 4 output columns per thread
    ((4, 8, 1, 2), 12),      # one row per thread; dK/dV: 8 query rows per 4 key rows
    ((8, 8, 2, 2, 2), 16),   # double-buffered K, V (the asynchronous copies' path)
    ((8, 8, 2, 2, 2), 6),    # double-buffered, d not a multiple of 4 (synchronous copies)
]


def _run(tiles, q, k, v, do, causal, deterministic):
    scale = 1.0 / np.sqrt(q.shape[-1])
    o, lse = fa2_plan.run_forward(xp, q, k, v, causal=causal, scale=scale, tiles=tiles)
    dq, dk, dv = fa2_plan.run_backward(xp, do, q, k, v, o, lse, causal=causal, scale=scale,
                                       deterministic=deterministic,
                                       tiles={"dkdv": tiles, "dq": tiles})
    return dict(zip(("o", "lse", "dq", "dk", "dv"), (np.asarray(x) for x in
                                                      (o, lse, dq, dk, dv))))


@pytest.mark.skipif(xp is not np, reason="host functions take the simulator's NumPy arrays")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape,d", SHAPES, ids=[str(s) for s, _ in SHAPES])
def test_other_tiles(shape, d, causal):
    tiles = fa2_tiles.RegTiles(shape[0], shape[1], d, *shape[2:])
    rng = np.random.default_rng(7)
    q, k, v, do = make_inputs(rng, 1, 1, 19, 27, d, np.float32)
    ref = reference(q, k, v, do, causal)
    got = _run(tiles, q, k, v, do, causal, deterministic=causal)
    o, lse = naive.attention_forward(q, k, v, causal=causal)
    base = dict(zip(("o", "lse", "dq", "dk", "dv"),
                    (o, lse, *naive.attention_backward(do, q, k, v, o, lse, causal=causal))))
    assert_close(got, base, ref, np.float32, f"{tiles} causal={causal}")


@pytest.mark.parametrize("args,problem", [
    ((8, 8, 3, 2), "tm must divide R"),
    ((8, 24, 2, 4), "power of two"),
    ((6, 8, 2, 2), "multiples of 4"),
    ((16, 4, 1, 1), "R/tm must divide C"),
])
def test_bad_tiles_are_refused(args, problem):
    R, C, tm, tn = args
    with pytest.raises(ValueError, match=problem):
        fa2_tiles.RegTiles(R, C, 8, tm, tn)
