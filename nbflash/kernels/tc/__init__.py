"""tc: FlashAttention-2 on tensor cores (mma.sync, ldmatrix, cp.async through inline PTX), for
float16 and bfloat16 data.

- ``tiles``: warps, m-tiles and stages of each kernel (TcTiles), shared-memory plans, the tables;
- ``fragments``: mma fragments, tile loads by cp.async, fragment stores and masks;
- ``forward``: FA2 Algorithm 1; ``backward``: FA2 Algorithm 2 (dK/dV with atomic dQ, and the
  conversion of dQ to 16 bits);
- ``plan``: what tc can run (``check``), its kernels (``spec``), the launch plan (``TcPlan``,
  cached by ``plan_for``).
"""
