"""nbflash: FlashAttention as Numba CUDA kernels, with a naive CuPy baseline and experiments.

    import nbflash
    o = nbflash.attention(q, k, v, causal=True)
    o, lse = nbflash.attention_forward(q, k, v)
    dq, dk, dv = nbflash.attention_backward(do, q, k, v, o, lse)
    o = nbflash.attention(q, k, v, dropout_p=0.1, seed=0, key_lengths=lengths,
                          block_mask=nbflash.sparsity.butterfly(16), block_size=64)
    o = nbflash.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True)  # packed

The device mode (GPU or Numba's CUDA simulator) is decided at import from NBFLASH_DEVICE
(gpu | sim | auto | compile); see :mod:`nbflash._cuda`.
"""

from ._version import __version__  # noqa: E402, F401
from ._cuda import MODE, DeviceModeError  # noqa: E402  (decides the device mode first)
from . import sparsity  # noqa: E402
from .api import (attention, attention_backward, attention_forward, attention_varlen,  # noqa: E402
                  attention_varlen_backward, attention_varlen_forward, dropout_mask)
from .errors import InputError  # noqa: E402
from .info import info  # noqa: E402

__all__ = ["attention", "attention_forward", "attention_backward", "attention_varlen",
           "attention_varlen_forward", "attention_varlen_backward", "dropout_mask", "sparsity",
           "info", "InputError",
           "DeviceModeError", "MODE", "__version__"]
