"""fa2: FlashAttention-2 on CUDA cores, register-tiled, float32 math on float16 or float32 data.

- ``tiles``: the register tiles of each kernel (RegTiles), their shared-memory plans, the tables;
- ``regtile``: where a thread is, tile loads and the two tile products;
- ``forward``: FA2 Algorithm 1; ``backward``: FA2 Algorithm 2 (dK/dV with atomic dQ, and the
  deterministic dQ pass);
- ``plan``: what fa2 can run (``check``), its kernels for a set of constants (``spec``), the
  launch plan (``Fa2Plan``, cached by ``plan_for``).
"""
