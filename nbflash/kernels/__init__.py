"""The Numba CUDA kernels, one folder per family, and what the families share.

- ``fa1/``: the FlashAttention paper's Algorithms 1 and 4, as written;
- ``fa2/``: FlashAttention-2 on CUDA cores, register-tiled;
- ``tc/``: FlashAttention-2 on tensor cores;
- ``common/``: the online softmax, masks, dropout, the options, the PTX primitives, shared-memory
  plans and the cached kernel factory.

Each family has ``tiles.py`` (its tile shapes, tables and shared-memory plans), its kernels
(``forward.py``, ``backward.py``) and ``plan.py`` (its own input checks, its kernels for a set
of compile-time constants, and the launch plan of a call). nbflash.impls registers each one.
Kernels are built by the cached factory (nbflash.kernels.common.factory), never at import time.
"""
