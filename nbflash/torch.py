"""nbflash inside a PyTorch model: attention with autograd.

    from nbflash.torch import attention
    o = attention(q, k, v, causal=True)     # q, k, v: torch CUDA tensors, (B, H, N, d)
    o.sum().backward()                      # q.grad, k.grad, v.grad from nbflash's backward

The forward saves q, k, v, o and lse; the backward recomputes P from them (nbflash's
attention_backward). Tensors pass to the kernels without copies and the kernels run on torch's
current stream: the first call with given shapes, dtypes and options goes through the checks
(tensors taken through DLPack); repeated ones go straight to the cached launch plan, which
allocates its outputs with torch (nbflash.api's fast path). Importing this module imports torch; the rest of nbflash never does.
"""

import torch

from . import api


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, impl, deterministic, masking):
        o, lse = api.attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                       impl=impl, **masking)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.options = dict(causal=causal, softmax_scale=softmax_scale, impl=impl,
                           deterministic=deterministic, **masking)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        # (the upstream gradient is often a broadcast view, e.g. of loss = o.sum(): one copy
        # here, and the call takes the fast path of contiguous tensors)
        dq, dk, dv = api.attention_backward(do.contiguous(), q, k, v, o, lse, **ctx.options)
        return dq, dk, dv, None, None, None, None, None


def attention(q, k, v, *, causal=False, softmax_scale=None, impl="auto", deterministic=False,
              dropout_p=0.0, seed=None, offset=0, key_lengths=None, block_mask=None,
              block_size=None):
    """softmax(τ q kᵀ) v for torch tensors, differentiable in q, k and v.

    Arguments as :func:`nbflash.attention_forward`; deterministic as
    :func:`nbflash.attention_backward`. With dropout_p > 0 and no seed, a seed is drawn from
    torch's default generator (so torch.manual_seed makes runs repeatable); the backward
    regenerates the forward's mask from it.
    """
    if dropout_p and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    masking = dict(dropout_p=dropout_p, seed=seed, offset=offset, key_lengths=key_lengths,
                   block_mask=block_mask, block_size=block_size)
    return _Attention.apply(q, k, v, causal, softmax_scale, impl, deterministic, masking)


__all__ = ["attention"]
