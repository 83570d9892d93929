"""fa3: FlashAttention-3's building blocks put together on Hopper (sm_90a), in progress (issue 15).

- ``forward``: a first forward (:func:`forward.make_forward`): one warpgroup per 64 query rows,
  Q_i and K_j, V_j by TMA (nbflash.kernels.common.tma) through a ring of mbarrier-guarded
  stages, S = Q_i K_jᵀ and O += P̃ V_j by wgmma (nbflash.kernels.common.wgmma; P̃ from
  registers), the online softmax on the S fragments. No producer warp, no second consumer
  warpgroup, no register reallocation yet: FlashAttention-3's warp specialisation and ping-pong
  are the next steps (docs/fa3.md).
- ``tiles``: keys per step and pipeline stages per head dim; ``plan``: the launch plan.

Not registered as an impl yet: nothing of it has run on a GPU.
"""
