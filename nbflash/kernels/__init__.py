"""Numba CUDA kernels. ``fa1``: the FlashAttention paper's Algorithms 1 and 4.

Kernels are built by the cached factory in :mod:`nbflash.kernels.launch`, never at import time.
"""
