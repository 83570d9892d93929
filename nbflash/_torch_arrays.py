"""torch behind the few array calls the launch plans make, so that a call with torch tensors
allocates its outputs and scratch as torch tensors (on torch's caching allocator and current
stream) and passes the tensors to the kernels directly, without a DLPack round trip.

A plan's forward and backward take an array module `xp` and call ``xp.empty``, ``xp.zeros``,
``xp.ascontiguousarray`` and ``xp.astype`` and compare dtypes with ``xp.float32`` and the like;
:func:`arrays_on` gives the object that answers those with torch for one CUDA device. Only
nbflash.api's fast path for torch tensors uses it (imported when a torch tensor arrives).
"""

import functools

import torch


class TorchArrays:
    """The array-module calls of nbflash's launch plans, answered by torch on one device."""

    float16, float32, bfloat16 = torch.float16, torch.float32, torch.bfloat16
    uint16, int32, uint8 = torch.uint16, torch.int32, torch.uint8

    def __init__(self, device):
        self.device = torch.device("cuda", device)

    @staticmethod
    def _dtype(dtype):
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype

    def empty(self, shape, dtype):
        return torch.empty(shape, dtype=self._dtype(dtype), device=self.device)

    def zeros(self, shape, dtype):
        return torch.zeros(shape, dtype=self._dtype(dtype), device=self.device)

    @staticmethod
    def ascontiguousarray(x):
        return x.contiguous()

    def astype(self, x, dtype):
        return x.to(self._dtype(dtype))


@functools.lru_cache(maxsize=None)
def arrays_on(device):
    """The TorchArrays of CUDA device number `device`."""
    return TorchArrays(device)


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream(device):
    """torch's current stream on `device`, as the CUstream handle (an int)."""
    if _raw_stream is not None:
        return _raw_stream(device)
    return torch.cuda.current_stream(device).cuda_stream
