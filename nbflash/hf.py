"""nbflash as an attention implementation of Hugging Face transformers models.

    import nbflash.hf
    name = nbflash.hf.register()          # "nbattn", with transformers' attention interfaces
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)
    model.set_attn_implementation(name)   # or switch a model that is already built

register() adds an attention function to transformers' AttentionInterface and, under the same
name, transformers' own SDPA mask builder to its AttentionMaskInterface: without a mask entry,
transformers builds no mask at all for a registered name, and padding would be dropped. The name
must not contain "flash", so the default is "nbattn", not "nbflash": transformers 5.x takes
every name containing "flash" for a flash-attention kernel (its own FlashAttention path, or one
to fetch from its hub) and fails with "Could not find the currently requested flash attention
implementation".

What the attention function does with what transformers passes:
- no mask: causal attention when the module is causal (its is_causal, or the call's), else full
  attention; nbflash's causal mask is bottom-right aligned, which is transformers' alignment
  with a cache (the new queries are the last positions);
- a mask (4-D, boolean, or additive with 0 and -inf / finfo.min): it must be a right-padding key
  mask, alone or with the causal mask, and inside the layer's sliding window where it has one
  (nbflash.torch.mask_options), and becomes key_lengths; left padding, packed sequences and
  biases are refused with nbflash.InputError. The mask is read on the host once per mask
  tensor (all layers of one kind share one); that read is a graph break under torch.compile,
  which compiles the no-mask call whole;
- grouped-query heads (fewer key/value heads): passed as they are, read in place by nbflash's
  grouped-query kernels (no repeat_interleave, which transformers' SDPA path may do), dk and
  dv summed over each group inside them;
- scaling becomes softmax_scale; dropout becomes dropout_p, with a seed from torch's generator;
- softcap (Gemma 2's attn_logit_softcapping) is nbflash's softcap;
- sliding_window W (Mistral, Gemma 2 and 3, Qwen's sliding layers) is nbflash's window_size
  (W - 1, W - 1), as transformers passes it to FlashAttention (with the causal mask: each query
  sees itself and the W - 1 keys before it, transformers' sliding-window mask);
- packed sequences (padding-free batches: transformers' cu_seq_lens_q, cu_seq_lens_k and
  max_length_q, max_length_k, as DataCollatorWithFlattening's batches bring them) run as
  nbflash.torch.attention_varlen over the batch of one that holds them, each sequence
  attending to itself alone (causal per sequence); a mask beside them is ignored, as the
  lengths say what it would (transformers builds the block-diagonal mask of the same
  sequences);
- attention sinks (s_aux) are refused; attention weights are never returned (None, as
  SDPA's).

transformers hands the projections over as (B, H, N, d) views of (B, N, H, d) tensors: they go
to the op as they are, the fa2 and tc kernels read them in place
(nbflash.kernels.common.layouts) and the output comes back as a contiguous (B, N, H, d) tensor,
which the model's output projection takes as it is: no copy on either side. Importing this
module imports torch; transformers is imported by register().
"""

import weakref

from . import torch as nbtorch
from .errors import InputError

#: the last masks read, [(weak reference, (version, B, Nq, Nk, window), its options)], newest
#: first: the layers of one forward share one mask tensor per kind of layer (full and sliding,
#: alternating in Gemma 2 and 3), so each is read once
_LAST_MASK = []
_MASKS_KEPT = 4

#: keyword arguments of transformers' attention calls that ask for what nbflash lacks
_REFUSED = {"s_aux": "attention sinks", "sinks": "attention sinks"}


def register(name="nbattn", impl="auto", deterministic=False):
    """Register nbflash with transformers' AttentionInterface and AttentionMaskInterface under
    `name`, running `impl` (as nbflash.attention) with `deterministic` dq in the backward;
    returns the name to pass as attn_implementation."""
    if not isinstance(name, str) or not name:
        raise InputError(f"name must be a non-empty string; got {name!r}")
    if "flash" in name.lower():
        raise InputError(f"name {name!r} contains 'flash': transformers 5.x takes such names "
                         f"for flash-attention kernels (\"Could not find the currently requested "
                         f"flash attention implementation\"); choose another, such as 'nbattn'")
    if not isinstance(impl, str):
        raise InputError(f"impl must be a name (a string); got {impl!r}")
    from transformers import AttentionInterface, AttentionMaskInterface  # noqa: PLC0415
    from transformers.masking_utils import sdpa_mask  # noqa: PLC0415

    def nbflash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          is_causal=None, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, dropout, scaling,
                                 is_causal, impl=impl, deterministic=deterministic, **kwargs)

    AttentionInterface.register(name, nbflash_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      is_causal=None, *, impl="auto", deterministic=False, **kwargs):
    """transformers' attention-function signature: query (B, H, Nq, d), key and value
    (B, H_kv, Nk, d) in, (attention output (B, Nq, H, d), None) out."""
    refused = sorted({what for arg, what in _REFUSED.items() if kwargs.get(arg) is not None})
    if refused:
        raise InputError(f"nbflash does not take {', '.join(refused)}")
    B, Nq = query.shape[0], query.shape[2]
    Nk = key.shape[2]
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    key_lengths = None
    window = (-1, -1)
    sliding = kwargs.get("sliding_window")
    if sliding is not None:
        if not isinstance(sliding, int) or isinstance(sliding, bool) or sliding < 1:
            raise InputError(f"sliding_window must be a positive integer; got {sliding!r}")
        window = (sliding - 1, sliding - 1)
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        return _packed(query, key, value, causal, scaling, impl, deterministic, dropout,
                       window, kwargs), None
    if attention_mask is not None:
        causal, key_lengths = _mask_options(attention_mask, B, Nq, Nk, window)
    # (B, H, N, d) views of (B, N, H, d) projections, read in place: o comes back in q's
    # memory, so its (B, N, H, d) transpose is contiguous (see the module docstring)
    o, _ = nbtorch._attention(query, key, value, "bhnd", causal, scaling, impl, deterministic,
                              dropout_p=dropout, key_lengths=key_lengths,
                              softcap=kwargs.get("softcap") or 0.0, window_size=window)
    return o.transpose(1, 2), None


def _packed(query, key, value, causal, scaling, impl, deterministic, dropout, window, kwargs):
    """The attention output (1, total_q, H, d) of a padding-free batch: the (1, H, total, d)
    projections as the packed (total, H, d) tensors of nbflash.torch.attention_varlen."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None:
        raise InputError("cu_seq_lens_q and cu_seq_lens_k come together (a packed batch's "
                         "query and key offsets); got one of them")
    if query.shape[0] != 1:
        raise InputError(f"packed sequences (cu_seq_lens_*) come as a batch of one holding "
                         f"them all; got batch {query.shape[0]}")
    lengths = [kwargs.get(n) for n in ("max_length_q", "max_length_k")]
    lengths = [None if n is None else int(n) for n in lengths]   # (a 0-d tensor, or an int)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))   # (total, H, d) views
    o = nbtorch.attention_varlen(q, k, v, cu_q, cu_k, *lengths, causal=causal,
                                 softmax_scale=scaling, impl=impl, deterministic=deterministic,
                                 dropout_p=dropout, softcap=kwargs.get("softcap") or 0.0,
                                 window_size=window)
    return o[None]


def _mask_options(mask, B, Nq, Nk, window):
    """nbflash.torch.mask_options of a transformers mask (inside `window`), remembered for the
    last few mask tensors (and their versions, so a mask changed in place is read again)."""
    import torch  # noqa: PLC0415
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"the attention mask is a {type(mask).__name__}; nbflash takes a "
                         f"boolean or additive mask tensor (register() builds them)")
    key = (mask._version, B, Nq, Nk, window)
    for ref, seen, got in _LAST_MASK:
        if ref() is mask and seen == key:
            return got
    got = nbtorch.mask_options(mask, B, Nq, Nk, additive=True, window_size=window)
    _LAST_MASK[:] = [(weakref.ref(mask), key, got)] + _LAST_MASK[:_MASKS_KEPT - 1]
    return got


__all__ = ["register", "attention_forward"]
