"""nbflash inside a PyTorch model: attention as torch custom ops, with autograd and torch.compile.

    from nbflash.torch import attention
    o = attention(q, k, v, causal=True)     # q, k, v: torch CUDA tensors, (B, H, N, d)
    o.sum().backward()                      # q.grad, k.grad, v.grad from nbflash's backward
    o, lse = attention(q, k, v, return_lse=True)

Two custom ops (torch.library) carry the calls: ``nbflash::attention_forward`` returns (o, lse)
and ``nbflash::attention_backward`` returns (dq, dk, dv). Each has a fake (meta) implementation
giving its outputs' shapes, dtypes and strides, and the forward's autograd formula calls the
backward op, so ``torch.compile(fn, fullgraph=True)`` traces through nbflash without a graph
break and AOT autograd puts the backward op in the backward graph. The forward saves q, k, v,
o and lse; the backward recomputes P from them (nbflash's attention_backward). Eager calls on
plain tensors run the same functions and formula without the dispatcher (`_Eager`: a custom
op's autograd dispatch cost more host time than the rest of the call), and without autograd
where nothing needs a gradient.

Tensors pass to the kernels without copies and the kernels run on torch's current stream: the
first call with given shapes, dtypes and options goes through the checks (tensors taken through
DLPack); repeated ones go straight to the cached launch plan, which allocates its outputs with
torch (nbflash.api's fast path). That holds for both memory layouts the fa2 and tc kernels read
and write in place (nbflash.kernels.common.layouts): contiguous (B, H, N, d), and (B, N, H, d)
(:func:`flash_attn_func`'s, and the (B, H, N, d) views of transformers' projections, nbflash.hf),
whose outputs are (B, N, H, d) too; tensors in other layouts are copied by the checks.

Beside :func:`attention`, shims with the signatures models already call: :func:`sdpa`
(torch's scaled_dot_product_attention) and :func:`flash_attn_func` (FlashAttention's); each
docstring says what differs from the original. Importing this module imports torch; the rest
of nbflash never does.
"""

import numbers
from typing import List, Optional, Tuple

import torch

from . import api, impls, inputs
from .kernels.common.layouts import in_place, layout_of
from .errors import InputError

#: the orders of the ops' tensor dimensions: (batch, heads, seqlen, head_dim), nbflash's and
#: SDPA's, and (batch, seqlen, heads, head_dim), FlashAttention's (the tensors' memory may be in
#: either layout with either: nbflash.kernels.common.layouts)
LAYOUTS = ("bhnd", "bnhd")


# -- layouts ---------------------------------------------------------------------------------

def _to_kernel(x, layout):
    """x, its dimensions in `layout`'s order, as the (B, H, N, d) view the API takes (no copy:
    the kernels read it in place where its memory allows, nbflash.inputs copies it otherwise)."""
    return x.transpose(1, 2) if layout == "bnhd" else x


def _from_kernel(x, layout):
    """A (B, H, N, d) output as a view in `layout`'s order (no copy)."""
    return x.transpose(1, 2) if layout == "bnhd" else x


def _memory_layout(x, impl):
    """The layout (nbflash.kernels.common.layouts) in which the call reads the (B, H, N, d)
    view x, and so writes the outputs of x's side: what nbflash.inputs decides (x's own where
    the impl takes layouts and x's rows and heads start at 16-byte boundaries, else "bhnd"),
    for the fake implementations, which see no data."""
    if impl != "auto" and not impls.get(impl).layouts:
        return "bhnd"
    size = x.element_size()
    return in_place(x, size, (x.storage_offset() * size) % 16 == 0) or "bhnd"


def _kv_layout(k, v, impl):
    """The layout of the key side: k's and v's where they share one, else "bhnd"."""
    lk = _memory_layout(k, impl)
    return lk if _memory_layout(v, impl) == lk else "bhnd"


def _empty_kernel(like, memory, dtype=None, d=None):
    """An empty (B, H, N, d) tensor shaped like `like` (with d columns: like's by default) in
    the `memory` layout: the outputs of the fake implementations, with the strides the real
    ones have."""
    B, H, N, d0 = like.shape
    d = d0 if d is None else d
    dtype = dtype or like.dtype
    if memory == "bnhd":
        return like.new_empty((B, N, H, d), dtype=dtype).transpose(1, 2)
    return like.new_empty((B, H, N, d), dtype=dtype)


def _out_dtype(dtype):
    """The output dtype of a torch input dtype: the same, except uint16 (bfloat16 bits), whose
    outputs come back as torch.bfloat16 (nbflash.inputs)."""
    return torch.bfloat16 if dtype == torch.uint16 else dtype


# -- the custom ops --------------------------------------------------------------------------
#
# Options that are not tensors are op arguments of schema types (bool, float, int, str, int[]);
# key_lengths, block_mask, the dropout seed and (last) ALiBi's slopes are tensors or None. The
# seed travels as an int64
# tensor holding the uint64 seed's bits (_seed_tensor), so that a seed drawn from torch's
# generator inside a compiled function stays in the graph.

def _varlen_masking(seed, dropout_p, offset, softcap, window_size, alibi_slopes):
    """The API's keyword arguments for the options a padded and a packed batch share, from the
    ops' arguments."""
    return dict(dropout_p=dropout_p, seed=None if seed is None else int(seed.item()) % 2**64,
                offset=offset, softcap=softcap,
                window_size=(-1, -1) if window_size is None else tuple(window_size),
                alibi_slopes=alibi_slopes)


def _masking(key_lengths, block_mask, seed, dropout_p, offset, block_size, softcap,
             window_size, alibi_slopes):
    """The API's masking keyword arguments from the ops' arguments."""
    if block_size is not None:
        block_size = block_size[0] if len(block_size) == 1 else tuple(block_size)
    return dict(_varlen_masking(seed, dropout_p, offset, softcap, window_size, alibi_slopes),
                key_lengths=key_lengths, block_mask=block_mask, block_size=block_size)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             key_lengths: Optional[torch.Tensor], block_mask: Optional[torch.Tensor],
             seed: Optional[torch.Tensor], causal: bool, softmax_scale: Optional[float],
             impl: str, deterministic: bool, dropout_p: float, offset: int,
             block_size: Optional[List[int]], layout: str, softcap: float = 0.0,
             window_size: Optional[List[int]] = None,
             alibi_slopes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of nbflash.attention_forward; o in `layout`, lse float32 (B, H, Nq).
    `deterministic` is the backward's (the autograd formula passes it on)."""
    o, lse = api.attention_forward(
        *(_to_kernel(x, layout) for x in (q, k, v)), causal=causal,
        softmax_scale=softmax_scale, impl=impl,
        **_masking(key_lengths, block_mask, seed, dropout_p, offset, block_size, softcap,
                   window_size, alibi_slopes))
    return _from_kernel(o, layout), lse


attention_forward_op = torch.library.custom_op("nbflash::attention_forward", _forward,
                                               mutates_args=())


@attention_forward_op.register_fake
def _(q, k, v, key_lengths, block_mask, seed, causal, softmax_scale, impl, deterministic,
      dropout_p, offset, block_size, layout, softcap=0.0, window_size=None, alibi_slopes=None):
    q = _to_kernel(q, layout)
    o = _empty_kernel(q, _memory_layout(q, impl), _out_dtype(q.dtype), v.shape[-1])
    B, H, Nq, _ = q.shape
    return _from_kernel(o, layout), q.new_empty((B, H, Nq), dtype=torch.float32)


def _backward_grads(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    o: torch.Tensor, lse: torch.Tensor, key_lengths: Optional[torch.Tensor],
                    block_mask: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                    causal: bool, softmax_scale: Optional[float], impl: str,
                    deterministic: bool, dropout_p: float, offset: int,
                    block_size: Optional[List[int]], layout: str, softcap: float = 0.0,
                    window_size: Optional[List[int]] = None,
                    alibi_slopes: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of nbflash.attention_backward, in `layout`. An upstream gradient in
    another memory layout than o's (a broadcast view, of loss = o.sum() say) is copied into
    o's once here, so that the call takes the fast path."""
    lay = layout_of(_to_kernel(do, layout))
    if lay is None or lay != layout_of(_to_kernel(o, layout)) or do.data_ptr() % 16:
        do = torch.empty_like(o).copy_(do)
    grads = api.attention_backward(
        *(_to_kernel(x, layout) for x in (do, q, k, v, o)), lse.contiguous(), causal=causal,
        softmax_scale=softmax_scale, impl=impl, deterministic=deterministic,
        **_masking(key_lengths, block_mask, seed, dropout_p, offset, block_size, softcap,
                   window_size, alibi_slopes))
    return tuple(_from_kernel(g, layout) for g in grads)


attention_backward_op = torch.library.custom_op("nbflash::attention_backward", _backward_grads,
                                                mutates_args=())


@attention_backward_op.register_fake
def _(do, q, k, v, o, lse, key_lengths, block_mask, seed, causal, softmax_scale, impl,
      deterministic, dropout_p, offset, block_size, layout, softcap=0.0, window_size=None,
      alibi_slopes=None):
    q, k, v = (_to_kernel(x, layout) for x in (q, k, v))
    lk = _kv_layout(k, v, impl)
    return (_from_kernel(_empty_kernel(q, _memory_layout(q, impl)), layout),
            *(_from_kernel(_empty_kernel(x, lk), layout) for x in (k, v)))


def _setup_context(ctx, inputs, output):
    q, k, v, key_lengths, block_mask, seed, *options, alibi_slopes = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_lengths, block_mask, seed, alibi_slopes)
    ctx.options = options
    # lse comes out for the caller to read; no gradient flows back through it (as in
    # FlashAttention: the backward kernels take dO only)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, key_lengths, block_mask, seed, alibi_slopes = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(do, q, k, v, o, lse, key_lengths, block_mask, seed,
                                       *ctx.options, alibi_slopes)
    return (dq, dk, dv) + (None,) * (4 + len(ctx.options))


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The forward op's autograd formula for eager calls, without the dispatcher: the same
    functions behind the ops (_forward, _backward_grads) on the same arguments, so the same
    kernels and results; a custom op's autograd dispatch costs more host time than the rest of
    a call (on a 2-core CPU, 2026-12-01: 62 µs of 88 per forward with the kernels stubbed
    out). :func:`_attention` takes it for plain tensors outside torch.compile and dispatch
    modes, the ops otherwise (traced graphs, fake and other tensor subclasses). Its
    forward takes ctx (no setup_context: with one, each apply binds the arguments through
    inspect.signature, tens of µs)."""

    @staticmethod
    def forward(ctx, q, k, v, key_lengths, block_mask, seed, *options):
        out = _forward(q, k, v, key_lengths, block_mask, seed, *options)
        _setup_context(ctx, (q, k, v, key_lengths, block_mask, seed, *options), out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable   # (as the op: a double backward raises)
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, key_lengths, block_mask, seed, alibi_slopes = ctx.saved_tensors
        dq, dk, dv = _backward_grads(do, q, k, v, o, lse, key_lengths, block_mask, seed,
                                     *ctx.options, alibi_slopes)
        return (dq, dk, dv) + (None,) * (4 + len(ctx.options))


_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)


def _eager(q):
    """Whether a call on q takes :class:`_Eager`: a plain tensor, not under torch.compile and
    with no dispatch mode active (make_fx's tracing, FlopCounterMode and the like see the op)."""
    return type(q) is torch.Tensor and not torch.compiler.is_compiling() \
        and _dispatch_modes() == 0


# -- the options as op arguments -------------------------------------------------------------

def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _seed_tensor(dropout_p, seed, offset):
    """(dropout_p, seed tensor or None, offset) checked: with dropout_p > 0 and no seed, one is
    drawn from torch's default generator (so torch.manual_seed makes runs repeatable; the
    backward draws the forward's mask again from it); a given seed in [0, 2**64) is kept as the
    int64 of the same bits."""
    p, _, _ = inputs.check_dropout(dropout_p, 0, offset)
    if p == 0.0:
        return 0.0, None, 0
    if seed is None:
        return p, torch.randint(0, 2**62, ()), int(offset)
    _, seed, offset = inputs.check_dropout(p, seed, offset)
    return p, torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64), offset


def _tensor_option(x, name):
    """key_lengths or block_mask as a tensor (lists and NumPy arrays converted) or None."""
    if x is None or isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{name} could not be read as an array: {exc}") from exc


def _block_size_arg(block_size):
    """block_size as the ops take it: [b] or [bq, bk] (None without a block mask)."""
    if block_size is None:
        return None
    if _is_int(block_size):
        return [int(block_size)]
    if isinstance(block_size, (list, tuple)) and len(block_size) == 2 \
            and all(_is_int(b) for b in block_size):
        return [int(b) for b in block_size]
    raise InputError(f"block_size must be a positive integer or a pair of them; "
                     f"got {block_size!r}")


def _op_arguments(causal, softmax_scale, impl, deterministic, dropout_p, seed, offset,
                  key_lengths, block_mask, block_size, layout, softcap=0.0,
                  window_size=(-1, -1), alibi_slopes=None):
    """The ops' arguments after q, k, v, each of a type the ops' schema takes; what is not a
    tensor is checked here, the rest by nbflash's checks when the op runs (before any kernel)."""
    if softmax_scale is not None:
        if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
            raise InputError(f"softmax_scale must be a number or None; got {softmax_scale!r}")
        softmax_scale = float(softmax_scale)
    if not isinstance(impl, str):
        raise InputError(f"impl must be a name (a string); got {impl!r}")
    softcap = inputs.softcap_value(softcap)
    window = inputs.window_value(window_size)
    p, seed, offset = _seed_tensor(dropout_p, seed, offset)
    return (_tensor_option(key_lengths, "key_lengths"), _tensor_option(block_mask, "block_mask"),
            seed, bool(causal), softmax_scale, impl, bool(deterministic), p, offset,
            _block_size_arg(block_size), layout, softcap,
            None if window == (-1, -1) else list(window),
            _tensor_option(alibi_slopes, "alibi_slopes"))


def _attention(q, k, v, layout, causal=False, softmax_scale=None, impl="auto",
               deterministic=False, dropout_p=0.0, seed=None, offset=0, key_lengths=None,
               block_mask=None, block_size=None, softcap=0.0, window_size=(-1, -1),
               alibi_slopes=None):
    """(o, lse) through the forward op (autograd, torch.compile), q, k, v and o in `layout`."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name} must be a torch tensor; got {type(x).__name__} "
                             f"(nbflash.attention takes NumPy and CuPy arrays)")
    args = _op_arguments(causal, softmax_scale, impl, deterministic, dropout_p, seed, offset,
                         key_lengths, block_mask, block_size, layout, softcap, window_size,
                         alibi_slopes)
    if _eager(q):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _Eager.apply(q, k, v, *args)
        return _forward(q, k, v, *args)      # (no graph to record)
    return attention_forward_op(q, k, v, *args)


def attention(q, k, v, *, causal=False, softmax_scale=None, impl="auto", deterministic=False,
              dropout_p=0.0, seed=None, offset=0, key_lengths=None, block_mask=None,
              block_size=None, return_lse=False, enable_gqa=False, softcap=0.0,
              window_size=(-1, -1), alibi_slopes=None):
    """softmax(τ q kᵀ) v for torch tensors (B, H, N, d), differentiable in q, k and v.

    k and v may have fewer heads H_kv dividing H (grouped-query and multi-query attention:
    query head h reads key/value head h // (H / H_kv); their gradients have H_kv heads), with
    or without enable_gqa, which is taken for SDPA's users and changes nothing.
    Arguments as :func:`nbflash.attention_forward`; deterministic as
    :func:`nbflash.attention_backward`. With dropout_p > 0 and no seed, a seed is drawn from
    torch's default generator (so torch.manual_seed makes runs repeatable); the backward
    regenerates the forward's mask from it. return_lse: return (o, lse), lse float32
    (B, H, Nq) = m + log ℓ per query row; no gradient flows through lse (as in FlashAttention).
    """
    o, lse = _attention(q, k, v, "bhnd", causal, softmax_scale, impl, deterministic, dropout_p,
                        seed, offset, key_lengths, block_mask, block_size, softcap, window_size,
                        alibi_slopes)
    return (o, lse) if return_lse else o


# -- masks as nbflash's options --------------------------------------------------------------

def mask_options(mask, B, Nq, Nk, additive=False, window_size=(-1, -1)):
    """(causal, key_lengths) of an attention mask that nbflash can express, else InputError.

    mask: broadcastable to (B, H, Nq, Nk), True (or, with additive, 0) where query i sees key j.
    nbflash expresses exactly two patterns, with key_lengths[b] keys visible in batch entry b
    (right padding): key j visible when j < key_lengths[b] (a key-padding mask), or that and
    the causal mask, bottom-right aligned (j <= i + Nk - Nq); with window_size (left, right)
    each of them inside that sliding window too (nbflash.attention_forward's window_size: the
    caller passes the window on with the options found). Heads must share the mask.
    additive: a float mask added to the scores, each entry 0 (visible) or -inf or at most
    finfo.min / 2 (masked), as transformers builds them for eager attention. Anything else
    (a bias, left padding, packed sequences, another window) is refused with what was found.
    The check reads the whole mask (a device-to-host read: not for graphs under torch.compile).
    key_lengths is None when no key is masked.
    """
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"the attention mask must be a torch tensor; got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        visible = mask
    elif additive and mask.is_floating_point():
        if not bool(((mask == 0) | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
            raise InputError("the additive attention mask holds values other than 0 and -inf "
                             "(or finfo.min): a score bias, which nbflash does not take")
        visible = mask == 0
    else:
        raise InputError(
            f"an attention mask of dtype {mask.dtype} is refused: a float mask adds a bias to "
            f"the scores, which nbflash does not take; pass a boolean key-padding mask "
            f"(True where a key is visible) or use the causal flag")
    if mask.ndim > 4:
        raise InputError(f"the attention mask has {mask.ndim} dimensions; expected at most 4, "
                         f"broadcastable to (B, H, Nq, Nk) = ({B}, H, {Nq}, {Nk})")
    visible = visible.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if visible.shape[0] not in (1, B) or visible.shape[2] not in (1, Nq) \
            or visible.shape[3] != Nk:
        raise InputError(f"the attention mask has shape {tuple(mask.shape)}; expected one "
                         f"broadcastable to (B, H, Nq, Nk) = ({B}, H, {Nq}, {Nk})")
    if visible.shape[1] != 1 and not bool((visible == visible[:, :1]).all()):
        raise InputError("the attention mask differs between heads; nbflash's masks are the "
                         "same for every head")
    visible = visible[:, 0].expand(B, Nq, Nk)
    j = torch.arange(Nk, device=visible.device)
    seen = visible.any(1)                       # (B, Nk): keys some query row sees
    # the padding's length: one past the last key any row sees (0 for none)
    lengths = torch.where(seen, j + 1, 0).amax(-1)
    i = torch.arange(Nq, device=visible.device)[:, None]
    padding = j < lengths[:, None, None]
    left, right = inputs.window_value(window_size)
    if left >= 0:
        padding = padding & (j >= i + Nk - Nq - left)
    if right >= 0:
        padding = padding & (j <= i + Nk - Nq + right)
    for causal, want in ((False, padding), (True, padding & (j <= i + Nk - Nq))):
        if torch.equal(visible, want.expand(B, Nq, Nk)):
            full = bool((lengths == Nk).all())
            return causal, None if full else lengths.to(torch.int32)
    inside = "" if (left, right) == (-1, -1) else \
        f", each inside the sliding window {(left, right)}"
    raise InputError(
        f"the attention mask is neither a right-padding key mask (batch entry b sees keys "
        f"0..L_b-1) nor that combined with the causal mask (bottom-right aligned){inside}: "
        f"nbflash cannot express it as a mask (left padding is not supported; packed "
        f"sequences run through nbflash.torch.attention_varlen with their cu_seqlens)")


def _sdpa_heads(query, key, value, enable_gqa):
    """torch SDPA's rule for key/value heads: as many as the query's, or with enable_gqa=True
    fewer (nbflash's kernels read them in place; the API checks that they divide)."""
    Hq, Hk, Hv = query.shape[-3], key.shape[-3], value.shape[-3]
    if not enable_gqa and not Hq == Hk == Hv:
        raise InputError(f"query has {Hq} heads but key {Hk} and value {Hv}: fewer key/value "
                         "heads (grouped-query attention) need enable_gqa=True, as in torch's "
                         "scaled_dot_product_attention")


# -- torch SDPA's signature ------------------------------------------------------------------

def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
         enable_gqa=False):
    """nbflash with torch.nn.functional.scaled_dot_product_attention's signature: (B, H, N, d)
    tensors in, o (B, H, Nq, d) out, differentiable in query, key and value.

    What differs from torch's:
    - attn_mask: a boolean mask only, and only one nbflash can express (:func:`mask_options`):
      a right-padding key mask (broadcastable to (B, H, Nq, Nk), True where a key is visible:
      batch entry b sees keys 0..L_b-1), alone or combined with the causal mask (bottom-right
      aligned), becomes key_lengths (and causal). A float mask (a bias) and any other pattern
      raise nbflash.InputError. Reading the mask is a device-to-host read and a graph break
      under torch.compile; without a mask the call compiles into one graph.
    - is_causal is top-left aligned in torch (query i sees keys 0..i) and bottom-right in
      nbflash; the two agree when Nq == Nk. With Nq < Nk the keys from Nq on are cut off
      (no query sees them: their gradients are 0); Nq > Nk is refused.
    - enable_gqa=True with fewer key/value heads: as torch's (query head h reads key/value
      head h // (H / H_kv)), read in place by the grouped-query kernels, no copy; dk and dv
      come back with the key/value heads, summed over each group inside the kernels.
    - dropout: nbflash's mask (Philox, drawn again in the backward), seeded from torch's
      default generator, not torch's own dropout mask.
    - rows that see no key give 0 (torch: NaN); only 4-dimensional inputs, of the same head dim,
      in float16, bfloat16 or float32.
    """
    B, Nq = query.shape[0], query.shape[-2]
    Nk = key.shape[-2]
    causal, key_lengths = bool(is_causal), None
    if attn_mask is not None:
        if is_causal:
            raise InputError("attn_mask and is_causal are both given (torch refuses this too): "
                             "pass one")
        causal, key_lengths = mask_options(attn_mask, B, Nq, Nk)
    elif causal and Nq != Nk:
        if Nq > Nk:
            raise InputError(
                f"is_causal with Nq={Nq} > Nk={Nk}: torch's causal mask is top-left aligned "
                f"and nbflash's bottom-right; they agree only when Nq <= Nk (pass the mask "
                f"you mean as a boolean attn_mask, or call nbflash.torch.attention)")
        key, value = key[..., :Nq, :], value[..., :Nq, :]   # top-left: no query sees them
    _sdpa_heads(query, key, value, enable_gqa)
    return _attention(query, key, value, "bhnd", causal, scale, dropout_p=dropout_p,
                      key_lengths=key_lengths)[0]


# -- FlashAttention's signature --------------------------------------------------------------

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    """nbflash with FlashAttention's flash_attn_func signature: q (B, Nq, H, d), k and v
    (B, Nk, H_kv, d), out (B, Nq, H, d), differentiable in q, k and v; causal bottom-right
    aligned, as in FlashAttention 2.

    What differs from FlashAttention's:
    - (B, N, H, d) tensors are read in place when contiguous (with head dims whose rows are
      a multiple of 16 bytes: d a multiple of 8 in 16 bits); others are copied;
    - fewer key/value heads (MQA/GQA, H_kv dividing H): as FlashAttention's, read in place by
      the grouped-query kernels (no repeat), dk and dv summed over each group inside them;
    - softcap and window_size as FlashAttention's: the scores softcap·tanh(τ q·k / softcap);
      query i sees key j only when i + Nk - Nq - left <= j <= i + Nk - Nq + right for
      window_size = (left, right), -1 unbounded;
    - alibi_slopes as FlashAttention's: (H,) or (B, H), the bias -slope·|i + Nk - Nq - j|
      added to the scores;
    - return_attn_probs=True (nbflash never forms P) raises nbflash.InputError; for the
      softmax's lse, call nbflash.torch.attention(..., return_lse=True);
    - dropout: nbflash's mask, seeded from torch's default generator.
    """
    if return_attn_probs:
        raise InputError("return_attn_probs=True: nbflash never forms the attention "
                         "probabilities; nbflash.torch.attention(..., return_lse=True) returns "
                         "the softmax's lse")
    return _attention(q, k, v, "bnhd", causal, softmax_scale, deterministic=deterministic,
                      dropout_p=dropout_p, softcap=softcap, window_size=window_size,
                      alibi_slopes=alibi_slopes)[0]



# -- packed variable-length batches ----------------------------------------------------------
#
# Two more ops carry them (nbflash::attention_varlen_forward / _backward): q (total_q, H, d),
# k and v (total_k, H_kv, d), cu_seqlens int tensors (B + 1,), lse (H, total_q); their outputs
# are contiguous (the fakes say so).

def _varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                    max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
                    seed: Optional[torch.Tensor], causal: bool, softmax_scale: Optional[float],
                    impl: str, deterministic: bool, dropout_p: float, offset: int,
                    softcap: float, window_size: Optional[List[int]],
                    alibi_slopes: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of nbflash.attention_varlen_forward; o contiguous (total_q, H, d), lse float32
    (H, total_q). `deterministic` is the backward's (the autograd formula passes it on)."""
    o, lse = api.attention_varlen_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
        softmax_scale=softmax_scale, impl=impl,
        **_varlen_masking(seed, dropout_p, offset, softcap, window_size, alibi_slopes))
    return o.contiguous(), lse.contiguous()


attention_varlen_forward_op = torch.library.custom_op("nbflash::attention_varlen_forward",
                                                      _varlen_forward, mutates_args=())


@attention_varlen_forward_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, causal,
      softmax_scale, impl, deterministic, dropout_p, offset, softcap, window_size, alibi_slopes):
    total, H, _ = q.shape
    return (q.new_empty((total, H, v.shape[-1]), dtype=_out_dtype(q.dtype)),
            q.new_empty((H, total), dtype=torch.float32))


def _varlen_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     o: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int],
                     max_seqlen_k: Optional[int], seed: Optional[torch.Tensor], causal: bool,
                     softmax_scale: Optional[float], impl: str, deterministic: bool,
                     dropout_p: float, offset: int, softcap: float,
                     window_size: Optional[List[int]], alibi_slopes: Optional[torch.Tensor]
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of nbflash.attention_varlen_backward, contiguous."""
    if not do.is_contiguous() or do.data_ptr() % 16:
        do = torch.empty_like(o).copy_(do)
    grads = api.attention_varlen_backward(
        do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal=causal, softmax_scale=softmax_scale, impl=impl, deterministic=deterministic,
        **_varlen_masking(seed, dropout_p, offset, softcap, window_size, alibi_slopes))
    return tuple(g.contiguous() for g in grads)


attention_varlen_backward_op = torch.library.custom_op("nbflash::attention_varlen_backward",
                                                       _varlen_backward, mutates_args=())


@attention_varlen_backward_op.register_fake
def _(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, causal,
      softmax_scale, impl, deterministic, dropout_p, offset, softcap, window_size, alibi_slopes):
    return tuple(x.new_empty(x.shape, dtype=_out_dtype(x.dtype)) for x in (q, k, v))


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, seed, *options, alibi_slopes = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k, seed, alibi_slopes)
    ctx.sizes, ctx.options = (max_q, max_k), options
    ctx.mark_non_differentiable(lse)


def _varlen_grads(ctx, do, backward):
    q, k, v, o, lse, cu_q, cu_k, seed, alibi_slopes = ctx.saved_tensors
    dq, dk, dv = backward(do, q, k, v, o, lse, cu_q, cu_k, *ctx.sizes, seed, *ctx.options,
                          alibi_slopes)
    return (dq, dk, dv) + (None,) * (6 + len(ctx.options))


attention_varlen_forward_op.register_autograd(
    lambda ctx, do, _dlse: _varlen_grads(ctx, do, attention_varlen_backward_op),
    setup_context=_varlen_setup_context)


class _VarlenEager(torch.autograd.Function):
    """The varlen forward op's autograd formula for eager calls (as :class:`_Eager`)."""

    @staticmethod
    def forward(ctx, *args):
        out = _varlen_forward(*args)
        _varlen_setup_context(ctx, args, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, _dlse):
        return _varlen_grads(ctx, do, _varlen_backward)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                     *, causal=False, softmax_scale=None, impl="auto", deterministic=False,
                     dropout_p=0.0, seed=None, offset=0, softcap=0.0, window_size=(-1, -1),
                     alibi_slopes=None, return_lse=False):
    """nbflash.attention_varlen for torch tensors, differentiable in q, k and v: q (total_q, H,
    d), k and v (total_k, H_kv, d), cu_seqlens_q and cu_seqlens_k int tensors (B + 1,) (see
    :func:`nbflash.attention_varlen_forward`). return_lse: (o, lse), lse float32 (H, total_q),
    no gradient through it. Dropout without a seed draws one from torch's generator, as
    :func:`attention` does."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name} must be a torch tensor; got {type(x).__name__} "
                             f"(nbflash.attention_varlen takes NumPy and CuPy arrays)")
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if n is not None and not _is_int(n):
            raise InputError(f"{name} must be an integer or None; got {n!r}")
    cu = [_tensor_option(c, name) for c, name in ((cu_seqlens_q, "cu_seqlens_q"),
                                                  (cu_seqlens_k, "cu_seqlens_k"))]
    for name, c in zip(("cu_seqlens_q", "cu_seqlens_k"), cu):
        if c is None:
            raise InputError(f"{name} is None; a packed batch needs its sequences' offsets")
    (_, _, seed, causal, softmax_scale, impl, deterministic, p, offset, _, _, softcap, window,
     slopes) = _op_arguments(causal, softmax_scale, impl, deterministic, dropout_p, seed, offset,
                             None, None, None, "bnhd", softcap, window_size, alibi_slopes)
    args = (q, k, v, *cu, None if max_seqlen_q is None else int(max_seqlen_q),
            None if max_seqlen_k is None else int(max_seqlen_k), seed, causal, softmax_scale,
            impl, deterministic, p, offset, softcap, window, slopes)
    if _eager(q):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            o, lse = _VarlenEager.apply(*args)
        else:
            o, lse = _varlen_forward(*args)
    else:
        o, lse = attention_varlen_forward_op(*args)
    return (o, lse) if return_lse else o


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    """nbflash with FlashAttention's flash_attn_varlen_func signature: q (total_q, H, d), k
    and v (total_k, H_kv, d), cu_seqlens_q, cu_seqlens_k int32 (B + 1,), out (total_q, H, d),
    differentiable in q, k and v; each sequence causal bottom-right aligned, as in
    FlashAttention 2. What differs from FlashAttention's is what :func:`flash_attn_func` says,
    and: cu_seqlens are checked (read back to the host once per call); block_table (a paged
    KV cache) raises nbflash.InputError."""
    if return_attn_probs:
        raise InputError("return_attn_probs=True: nbflash never forms the attention "
                         "probabilities; nbflash.torch.attention_varlen(..., return_lse=True) "
                         "returns the softmax's lse")
    if block_table is not None:
        raise InputError("block_table (a paged KV cache) is not taken by nbflash's varlen "
                         "attention")
    return attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            causal=causal, softmax_scale=softmax_scale,
                            deterministic=deterministic, dropout_p=dropout_p, softcap=softcap,
                            window_size=window_size, alibi_slopes=alibi_slopes)

__all__ = ["attention", "attention_varlen", "sdpa", "flash_attn_func",
           "flash_attn_varlen_func", "mask_options", "attention_forward_op",
           "attention_backward_op", "attention_varlen_forward_op",
           "attention_varlen_backward_op", "LAYOUTS"]
