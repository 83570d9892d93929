"""fa1: FlashAttention as the paper writes it, Algorithms 1 (forward) and 4 (backward).

- ``tiles``: block sizes from M and d (Alg. 1 line 2), the kernels' shared-memory plans;
- ``blocks``: block loads and block skips, shared by the two kernels;
- ``forward``: Algorithm 1; ``backward``: Algorithm 4;
- ``plan``: what fa1 can run (``check``), its kernels' argument types (``spec``) and the
  launch plan (``Fa1Plan``).
"""
