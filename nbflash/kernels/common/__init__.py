"""What every kernel family shares; no family reaches into another.

- ``softmax``: the online-softmax update, base-2 scores and their constants, the backward's row
  statistics (lse, D = rowsum(dO ∘ O)).
- ``masks``: Algorithm 2's MASK, key padding, Algorithm 5's block mask, tile skips, the tile walk.
- ``dropout``: Philox keep bits drawn inside the kernels, the keep-bit tiles, the mask export.
- ``options``: the options as compile-time features and as arguments (host side).
- ``primitives``: vector loads, cp.async, warp-shuffle row reductions (and simulator versions).
- ``warp``: the tensor-core primitives (ldmatrix, mma.sync, packing) through inline PTX.
- ``smem``: a kernel's shared memory as a plan of named regions.
- ``arguments``: the argument layout of the FlashAttention-2-structured kernels (fa2, tc).
- ``factory``: the cached kernel factory; ``fastlaunch``: launching with little host overhead.
"""
