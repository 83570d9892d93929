"""The public functions: check the inputs once (nbflash.inputs), look the implementation up in
the registry (nbflash.impls) and run its plan.

Shapes are (batch, heads, seqlen, head_dim), as in torch's scaled_dot_product_attention. q has Nq
rows, k and v have Nk rows; neither needs to be a multiple of any block size. In memory an array
may be C-contiguous or the (B, H, N, d) view of a C-contiguous (B, N, H, d) array
(``x.transpose(1, 2)``, the layout FlashAttention and Hugging Face models use): fa2 and tc read
and write both in place (nbflash.kernels.common.layouts), outputs in their inputs' layout;
other layouts, and the other impls, get contiguous copies.

Causal masking is bottom-right aligned, as in FlashAttention 2: query i sees key j when
j <= i + Nk - Nq. With Nq > Nk the first Nq - Nk queries see no key at all; their output is 0,
their lse is -inf and their gradients are 0 (no NaN anywhere).

Packed variable-length batches (FlashAttention's varlen functions) have their own three,
:func:`attention_varlen_forward`, :func:`attention_varlen` and :func:`attention_varlen_backward`:
q (total_q, H, d), k and v (total_k, H_kv, d), the sequences' offsets in cu_seqlens; the kernels
read them as one (1, H, total, d) batch (nbflash.kernels.common.packed).
"""

import sys

from . import impls, inputs
from ._cuda import ON_GPU
from .kernels.common.dropout import dropout_mask as _dropout_mask
from .kernels.common.layouts import BHND, BNHD, unbatch_view

#: plans of calls that passed the checks, by what the checks depend on (see _fast_key);
#: emptied when it reaches _CHECKED_MAX entries (e.g. a model with many sequence lengths)
_CHECKED = {}
_CHECKED_MAX = 1024
_CUPY = []
_TORCH_ARRAYS = []


def _fast_key(arrays, options):
    """For CuPy arrays or torch CUDA tensors on the GPU that need no copy (in one of the
    layouts of nbflash.kernels.common.layouts, the query-shaped ones in one and the key-shaped
    ones in one, 16-byte aligned, on the current device): a key of everything the input checks
    look at (kinds, shapes, dtypes, devices, options, and last the two layouts). A call whose
    key was seen before passed the same checks, so it can go straight to its cached plan; this
    keeps the host time of repeated calls small. None where the fast path does not apply."""
    if not ON_GPU:
        return None
    first = arrays[0]
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(first, torch.Tensor):
        return _torch_key(torch, arrays, options)
    if not _CUPY:
        import cupy  # noqa: PLC0415
        _CUPY.append(cupy)
    cupy = _CUPY[0]
    key, lays = [cupy.cuda.runtime.getDevice(), *options], []
    for x in arrays:
        if type(x) is not cupy.ndarray or x.data.ptr % 16 \
                or x.dtype.name == "bfloat16":   # (newer CuPy holds ml_dtypes' bfloat16)
            return None
        lays.append(BHND if x.flags.c_contiguous else
                    BNHD if x.ndim == 4 and x.swapaxes(1, 2).flags.c_contiguous else None)
        key += (x.shape, x.dtype, x.data.device_id)
    return _with_layouts(key, lays)


def _with_layouts(key, lays):
    """The key with the call's (query-side, key-side) layouts last; None unless q, do and o
    share one, k and v one, and lse is contiguous (arrays: q, k, v or do, q, k, v, o, lse)."""
    if len(lays) == 3:
        lq, lk, lv = lays
        same = lv == lk
    else:
        ldo, lq, lk, lv, lo, llse = lays
        same = ldo == lq == lo and lv == lk and llse == BHND
    if not same or lq is None or lk is None:
        return None
    return _hashable((*key, (lq, lk)))


def _torch_key(torch, arrays, options):
    """_fast_key for torch tensors: ("torch", current device, options, then each tensor's
    shape, dtype and device); None unless all are contiguous, 16-byte aligned CUDA tensors on
    the current device."""
    here = torch.cuda.current_device()
    key, lays = ["torch", here, *options], []
    takes = (torch.float16, torch.bfloat16, torch.float32)
    for x in arrays:   # (other dtypes, uint16 bits say, go through the checks: their outputs
        if not isinstance(x, torch.Tensor) or x.dtype not in takes \
                or not x.is_cuda \
                or x.data_ptr() % 16 or x.get_device() != here:   # come back as bfloat16)
            return None
        lays.append(BHND if x.is_contiguous() else
                    BNHD if x.dim() == 4 and x.transpose(1, 2).is_contiguous() else None)
        key += (x.shape, x.dtype)
    return _with_layouts(key, lays)


def _hashable(key):
    try:
        hash(key)
    except TypeError:   # an unhashable option: the checks will say what is wrong with it
        return None
    return key


def _fast_call(key):
    """(array module, stream) for a call on the fast path: CuPy and its current stream, or for
    torch tensors (nbflash._torch_arrays) torch on the current device and its current stream."""
    if key[0] == "torch":
        if not _TORCH_ARRAYS:   # (imported once: an import statement costs a call's µs)
            from . import _torch_arrays  # noqa: PLC0415
            _TORCH_ARRAYS.append(_torch_arrays)
        ta = _TORCH_ARRAYS[0]
        return ta.arrays_on(key[1]), ta.current_stream(key[1])
    return _CUPY[0], _stream()


def _remember(key, plan):
    """Cache a checked call's plan under its key; for torch tensors only the plans whose calls
    take torch's array calls (nbflash._torch_arrays: fa2's and tc's launch plans say so with
    TAKES_TORCH), so that fa1 and the naive baseline go through the checks and DLPack; and
    only where the plan reads the arrays in the layouts they came in (the checks copied none:
    a plan without layouts takes contiguous arrays)."""
    if key is None or (key[0] == "torch" and not getattr(plan, "TAKES_TORCH", False)):
        return
    if key[-1] != (getattr(plan, "q_layout", BHND), getattr(plan, "k_layout", BHND)):
        return
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED[key] = plan


def _stream():
    return _CUPY[0].cuda.get_current_stream().ptr


def _plan_call(prob, deterministic=False):
    """The registered impl's plan of a checked problem, and the call's option arguments."""
    layout, args = prob.options()
    return impls.get(prob.impl).plan(prob, layout, deterministic), args


def _plain(masking):
    """True when no array option is given: only then does a call take the fast path (an array's
    contents are not part of the key)."""
    return masking["key_lengths"] is None and masking["block_mask"] is None \
        and masking["alibi_slopes"] is None


def attention_forward(q, k, v, *, causal=False, softmax_scale=None, impl="auto", M=None,
                      block_rule=None, dropout_p=0.0, seed=None, offset=0, key_lengths=None,
                      block_mask=None, block_size=None, softcap=0.0, window_size=(-1, -1),
                      alibi_slopes=None):
    """Attention forward: returns (o, lse).

    q: (B, H, Nq, d); k, v: (B, H_kv, Nk, d) with H_kv = H, or fewer heads dividing H
    (grouped-query and multi-query attention: query head h reads key/value head
    h // (H / H_kv); naive, fa2 and tc take them, fa1 refuses); float16, float32 or
    bfloat16 (math in float32; bfloat16 as torch.bfloat16 tensors, ml_dtypes.bfloat16 NumPy
    arrays or uint16 arrays of its bits, the outputs in the same form): CuPy arrays or torch
    CUDA tensors on the GPU, NumPy arrays (or torch CPU tensors) in the simulator; torch inputs
    give torch outputs, computed on torch's current stream. o has q's shape and dtype;
    lse = m + log ℓ per query row, float32 of shape (B, H, Nq), -inf for a row that sees no key.

    causal: mask keys after the query, bottom-right aligned (key j visible to query i when
    j <= i + Nk - Nq). softmax_scale (τ): default 1/sqrt(d).
    impl: "fa2" (FlashAttention-2 structure, register-tiled, float32 math on CUDA cores), "tc"
    (the same structure on tensor cores, through inline PTX: float16 or bfloat16, every
    head_dim up to 256; the fast one for 16-bit inputs), "fa1" (the FlashAttention paper's
    Algorithm 1, as written), "naive" (plain array operations), or "auto" (the default: the
    first of nbflash.impls.AUTO that takes the inputs: tc for float16 and bfloat16, fa2 for
    float32; a backward with deterministic=True runs the first whose dq can be).
    M, block_rule (fa1 only): on-chip memory in elements (default: the largest whose kernel fits
    the shared memory a block gets; the forward and backward kernels differ in size) and
    the block-size rule, "paper" (Bc = ceil(M/4d), Br = min(Bc, d)) or "seed" (the reverse).

    Every impl takes these options, and the backward needs the same ones:

    dropout_p, seed, offset: drop each entry of the attention matrix P with probability
    dropout_p and scale the kept ones by 1/(1 - dropout_p) (the FlashAttention paper's
    Algorithm 2). The mask is a pure function of seed (an integer in [0, 2**64), required when
    dropout_p > 0), offset (in [0, 2**32)) and the entry's (batch, head, query, key)
    coordinates (nbflash.rng; the query head's, with grouped-query heads), so the backward
    draws it again instead of storing it; lse is the softmax's, before dropout.
    :func:`dropout_mask` returns the mask itself.
    key_lengths: integers of shape (B,): keys from key_lengths[b] on are ignored for batch entry
    b (a key-padding mask; every query is kept). With causal, both masks apply (the causal one
    aligned to Nq and Nk as above).
    block_mask, block_size: block-sparse attention (the paper's Algorithm 5). block_mask is
    boolean of shape (ceil(Nq/bq), ceil(Nk/bk)), or with leading axes (H,) or (B, H) (1 where
    shared; H the query heads), for block_size = bq = bk or (bq, bk) query and key positions
    per block: queries of block i see keys of block j only where block_mask[..., i, j]. The
    kernels skip the tiles whose mask blocks are all off (nothing is loaded or computed there);
    any block size works, and sizes that are multiples of the kernels' tiles (64 for fa2 on the
    H200) skip exactly the masked blocks. nbflash.sparsity builds the paper's patterns.

    A row that sees no key (masked by any of these) gets o = 0 and lse = -inf.

    softcap (naive, fa2, tc): 0 (off), or a positive number: the scores become
    softcap·tanh(τ q·kᵀ / softcap) before the masks and the softmax (Gemma 2's softcapping),
    and the backward takes the factor 1 - tanh² of its derivative.
    window_size (naive, fa2, tc): a sliding window (left, right), FlashAttention's: query i
    sees key j only when i + Nk - Nq - left <= j <= i + Nk - Nq + right, a side of -1
    unbounded (the default (-1, -1): no window); with causal both apply (the window's right
    side is then 0). Mistral's window of W keys with causal masking is (W - 1, 0). The
    kernels skip the tiles outside every row's window, as they skip the causal mask's.
    alibi_slopes (naive, fa2, tc): ALiBi, numbers of shape (H,) or (B, H) (float32 in the
    kernels): the bias -slope[b, h]·|i + Nk - Nq - j| is added to the scores after the
    softcap (FlashAttention's alibi_slopes; the ALiBi paper's slopes are 2^(-8 (h + 1) / H)
    for H a power of two).
    Raises nbflash.InputError, naming the problem, before any kernel runs.
    """
    masking = dict(dropout_p=dropout_p, seed=seed, offset=offset, key_lengths=key_lengths,
                   block_mask=block_mask, block_size=block_size, softcap=softcap,
                   window_size=window_size, alibi_slopes=alibi_slopes)
    key = _fast_key((q, k, v), ("fwd", causal, softmax_scale, impl, M, block_rule, dropout_p,
                                block_size, softcap, window_size)) if _plain(masking) else None
    plan = _CHECKED.get(key) if key is not None else None
    if plan is not None:   # the cached checks saw dropout_p; seed and offset are checked here
        _, seed, offset = inputs.check_dropout(dropout_p, seed, offset)
        xp, stream = _fast_call(key)
        return plan.forward(xp, q, k, v, stream, seed=seed, offset=offset)
    prob, (q, k, v) = inputs.check_forward(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                           impl=impl, M=M, block_rule=block_rule, **masking)
    with prob.stream_context():
        plan, args = _plan_call(prob)
        out = plan.forward(prob.xp, q, k, v, prob.stream, *args)
        _remember(key, plan)
    return prob.outputs(out)


def attention(q, k, v, *, causal=False, softmax_scale=None, impl="auto", M=None,
              block_rule=None, **options):
    """Attention output softmax(τ q kᵀ) v; see :func:`attention_forward` for the arguments
    (`options`: dropout_p, seed, offset, key_lengths, block_mask, block_size, softcap,
    window_size, alibi_slopes)."""
    return attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale, impl=impl,
                             M=M, block_rule=block_rule, **options)[0]


def attention_backward(do, q, k, v, o, lse, *, causal=False, softmax_scale=None, impl="auto",
                       M=None, block_rule=None, deterministic=False, dropout_p=0.0, seed=None,
                       offset=0, key_lengths=None, block_mask=None, block_size=None,
                       softcap=0.0, window_size=(-1, -1), alibi_slopes=None):
    """Attention backward: returns (dq, dk, dv) for upstream gradient do = dL/do.

    o and lse are what :func:`attention_forward` returned for the same q, k, v and options
    (dropout with the same seed and offset: its mask is drawn again, not stored).
    P is recomputed from q, k and lse instead of being stored (fa1: the paper's Algorithm 4;
    fa2: FlashAttention-2's Algorithm 2). Gradients have the dtypes and shapes of q, k, v: with
    grouped-query heads (k, v of H_kv heads) dk and dv have H_kv heads, each the sum over the
    query heads of its group (fa2 and tc sum them in registers, without atomics); rows that see
    no key get zero gradients, and so do keys that no query sees.

    deterministic (fa2, tc): compute dq in a separate pass, so that it is bitwise reproducible;
    by default fa2 adds each block's share of dq with atomics, which is faster but leaves the
    order of the additions, and so the last bits of dq, to the GPU. tc computes dq in its own
    pass by default where that is the faster (nbflash.kernels.tc.tiles.DQ_PASS: every head dim
    on the GPU). fa1 and naive are always deterministic.
    """
    masking = dict(dropout_p=dropout_p, seed=seed, offset=offset, key_lengths=key_lengths,
                   block_mask=block_mask, block_size=block_size, softcap=softcap,
                   window_size=window_size, alibi_slopes=alibi_slopes)
    key = _fast_key((do, q, k, v, o, lse),
                    ("bwd", causal, softmax_scale, impl, M, block_rule, deterministic, dropout_p,
                     block_size, softcap, window_size)) if _plain(masking) else None
    plan = _CHECKED.get(key) if key is not None else None
    if plan is not None:   # the cached checks saw dropout_p; seed and offset are checked here
        _, seed, offset = inputs.check_dropout(dropout_p, seed, offset)
        xp, stream = _fast_call(key)
        return plan.backward(xp, do, q, k, v, o, lse, stream, seed=seed, offset=offset)
    prob, arrays = inputs.check_backward(do, q, k, v, o, lse, causal=causal,
                                         softmax_scale=softmax_scale, impl=impl, M=M,
                                         block_rule=block_rule, deterministic=deterministic,
                                         **masking)
    with prob.stream_context():
        plan, args = _plan_call(prob, deterministic)
        out = plan.backward(prob.xp, *arrays, prob.stream, *args)
        _remember(key, plan)
    return prob.outputs(out)


def dropout_mask(B, H, Nq, Nk, dropout_p, seed, offset=0):
    """The dropout keep mask the kernels use for these sizes and options: bool (B, H, Nq, Nk),
    True where an entry of P is kept (a CuPy array on the GPU, NumPy in the simulator).

    Drawn by a kernel that calls the kernels' own generator (nbflash.kernels.common.dropout), for
    debugging and for tests that feed it to a reference (nbflash.naive's `keep`).
    """
    for name, n in (("B", B), ("H", H), ("Nq", Nq), ("Nk", Nk)):
        if not inputs._is_int(n) or n < 1:
            raise inputs.InputError(f"{name} must be a positive integer; got {n!r}")
    if inputs.MODE == "compile":
        raise inputs.InputError("NBFLASH_DEVICE=compile cannot run kernels; use gpu or sim")
    p, seed, offset = inputs.check_dropout(dropout_p, seed, offset)
    if inputs.MODE == "gpu":
        import cupy as xp  # noqa: PLC0415
        stream = xp.cuda.get_current_stream().ptr
    else:
        import numpy as xp  # noqa: PLC0415
        stream = 0
    return _dropout_mask(xp, B, H, Nq, Nk, p, seed, offset, stream)


def _no_rows_forward(xp, q, v):
    """(o, lse) of a packed batch without a query or without a key (total_q or total_k 0; no
    kernel runs): o = 0, lse = -inf."""
    return (xp.zeros(q.shape[:-1] + v.shape[-1:], q.dtype),
            xp.full(q.shape[:-1], -float("inf"), xp.float32))


def _no_rows_backward(xp, q, k, v):
    """(dq, dk, dv) of such a batch: zeros."""
    return tuple(xp.zeros(x.shape, x.dtype) for x in (q, k, v))


def attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                             max_seqlen_k=None, *, causal=False, softmax_scale=None,
                             impl="auto", dropout_p=0.0, seed=None, offset=0, softcap=0.0,
                             window_size=(-1, -1), alibi_slopes=None):
    """Attention forward over a packed batch of variable-length sequences (FlashAttention's
    flash_attn_varlen_func): returns (o, lse).

    q: (total_q, H, d); k, v: (total_k, H_kv, d) (H_kv dividing H, as in
    :func:`attention_forward`); sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b+1] - 1
    of q and cu_seqlens_k[b] .. cu_seqlens_k[b+1] - 1 of k and v. cu_seqlens_q and
    cu_seqlens_k: integers of shape (B + 1,), 0 first, nondecreasing, ending at total_q and
    total_k (a sequence of length 0 is allowed; FlashAttention's int32 cu_seqlens, on the
    device or the host). max_seqlen_q, max_seqlen_k: the longest sequences' lengths, or larger
    (the grids cover that many rows, so a fixed bound keeps one launch plan across batches);
    None: read from cu_seqlens. o: (total_q, H, d) in q's dtype; lse: float32 (H, total_q).

    Each sequence attends to its own keys only, as a batch entry of
    :func:`attention_forward` would: the causal mask and the window bottom-right aligned to
    its lengths, ALiBi's slopes (H,) or (B, H) (row b for sequence b), dropout's mask that of
    batch entry b of a batch of B sequences. No work is spent on padding: the kernels' grids
    cover the longest sequence, and the blocks past a shorter one's end return at once.
    naive, fa2 and tc take it (impl="auto": tc for 16-bit inputs, fa2 for float32); fa1
    refuses. Checking cu_seqlens reads them back to the host once per call.
    """
    masking = dict(dropout_p=dropout_p, seed=seed, offset=offset, softcap=softcap,
                   window_size=window_size, alibi_slopes=alibi_slopes)
    prob, (q, k, v) = inputs.check_varlen_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
        softmax_scale=softmax_scale, impl=impl, **masking)
    with prob.stream_context():
        if prob.Nq == 0 or prob.Nk == 0:
            out = _no_rows_forward(prob.xp, q, v)
        else:
            plan, args = _plan_call(prob)
            out = plan.forward(prob.xp, q, k, v, prob.stream, *args)
    o, lse = prob.outputs(out)
    return unbatch_view(o), lse[0]


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                     **options):
    """The output o of :func:`attention_varlen_forward` (same arguments)."""
    return attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, **options)[0]


def attention_varlen_backward(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k,
                              max_seqlen_q=None, max_seqlen_k=None, *, causal=False,
                              softmax_scale=None, impl="auto", deterministic=False,
                              dropout_p=0.0, seed=None, offset=0, softcap=0.0,
                              window_size=(-1, -1), alibi_slopes=None):
    """The backward of :func:`attention_varlen_forward`: (dq, dk, dv) of q's and k's shapes
    for upstream gradient do (total_q, H, d), o and lse (H, total_q) as the forward returned
    them with the same options (:func:`attention_backward` says the rest; deterministic too).
    Keys of a sequence without queries, and rows without keys, get zero gradients."""
    masking = dict(dropout_p=dropout_p, seed=seed, offset=offset, softcap=softcap,
                   window_size=window_size, alibi_slopes=alibi_slopes)
    prob, arrays = inputs.check_varlen_backward(
        do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal=causal, softmax_scale=softmax_scale, impl=impl, deterministic=deterministic,
        **masking)
    with prob.stream_context():
        if prob.Nq == 0 or prob.Nk == 0:
            out = _no_rows_backward(prob.xp, *arrays[1:4])
        else:
            plan, args = _plan_call(prob, deterministic)
            out = plan.backward(prob.xp, *arrays, prob.stream, *args)
    return tuple(map(unbatch_view, prob.outputs(out)))
