"""The registry of implementations: one entry per impl, and the order ``impl="auto"`` tries them.

Everything that lists implementations reads it: the input checks (nbflash.inputs) and the calls
(nbflash.api), the command line (``check``, ``bench``, ``compile``, ``sass``, ``sanitize``), the
compile check, the benchmark and the experiments, and the tests' matrices. Adding an
implementation is a family folder under nbflash/kernels/ (its tiles, kernels and plan) and one
:class:`Impl` in :data:`REGISTRY`.

An entry says what the impl takes (dtypes, head dims, whether its dq can be deterministic, the
API options only it has), where its kernels are (``family``: the kernels' names, their specs and
default tiles, for the compile check and the SASS report), its own input checks (``check``: run
after the shared ones, before any kernel; it returns the tiles the call needs, or None) and how
a checked call runs (``plan``: an object with ``forward`` and ``backward``), and how tables and
figures show it.
"""

from dataclasses import dataclass

from . import naive
from .errors import InputError
from .kernels.common.layouts import BHND, batch_view, into, padded, unbatch_view
from .kernels.fa1 import plan as fa1_plan, tiles as fa1_tiles
from .kernels.fa2 import plan as fa2_plan, tiles as fa2_tiles
from .kernels.tc import plan as tc_plan, tiles as tc_tiles


@dataclass(frozen=True)
class Family:
    """A kernel family as the tools see it: its kernels' names, their specs
    (spec(kernel, tiles, causal, dtype, features) -> nbflash.kernels.common.factory.Spec), the
    default tiles of a kernel at a head dim (tiles(kernel, d)), and the storage dtypes its
    kernels are compiled for."""

    kernels: tuple
    spec: object
    tiles: object
    dtypes: tuple


@dataclass(frozen=True)
class Impl:
    name: str
    #: how tables and figures name it, and its colour and marker in figures
    label: str
    color: str
    marker: str
    #: one line: what it is
    summary: str
    #: the input dtypes it takes ("bfloat16": torch.bfloat16 tensors, ml_dtypes.bfloat16
    #: arrays, or uint16 arrays of bfloat16 bits; nbflash.inputs)
    dtypes: tuple
    #: head dims it takes: multiples of head_dim_multiple up to max_head_dim
    max_head_dim: int
    head_dim_multiple: int = 1
    #: dq: "always" bitwise reproducible, "optional" (deterministic=True), or "never" (atomics)
    deterministic: str = "always"
    #: options of the API only this impl takes (fa1: M and block_rule)
    own_options: tuple = ()
    #: takes k and v with fewer heads than q (grouped-query and multi-query attention: H_kv
    #: dividing H, query head h reading key/value head h // (H / H_kv)); off unless an impl
    #: says so, so that a new one is refused such inputs until its kernels take them
    gqa: bool = False
    #: reads and writes the (B, H, N, d) arrays in either layout of
    #: nbflash.kernels.common.layouts ("bhnd", or "bnhd": FlashAttention's and Hugging Face's
    #: (B, N, H, d) memory) in place; off: the checks hand it contiguous copies
    layouts: bool = False
    #: takes softcap > 0 (scores softcap·tanh(score / softcap), Gemma 2's softcapping)
    softcap: bool = False
    #: takes a sliding window (window_size other than unbounded on both sides)
    window: bool = False
    #: takes ALiBi's per-head slopes (alibi_slopes)
    alibi: bool = False
    #: takes packed variable-length batches (nbflash.attention_varlen*)
    varlen: bool = False
    #: takes v with a head dim of its own (d_v != d; the kernels' impls through ValuePadding)
    value_dim: bool = False
    #: fast enough for the FlashAttention-2 grid at 16k tokens (fa1, as written, is not: it
    #: would take minutes per point there)
    at_scale: bool = True
    #: the kernel family (None: no nbflash kernels, the naive baseline)
    family: Family = None
    #: check(d, pass_, dropout, **own_options) -> tiles or None; raises InputError
    check: object = None
    #: plan(problem, layout, deterministic) -> an object with forward() and backward()
    plan: object = None

    def takes(self, dtype, head_dim):
        """Does it take inputs of `dtype` (a name) at this head dim (before shared memory)?"""
        return (str(dtype) in self.dtypes and head_dim <= self.max_head_dim
                and head_dim % self.head_dim_multiple == 0)

    @property
    def runs_kernels(self):
        return self.family is not None


class NaivePlan:
    """The naive baseline behind the same calls as the kernels' plans (nbflash.naive)."""

    def __init__(self, causal, scale, layout):
        self.causal, self.scale, self.layout = causal, scale, layout

    def _options(self, seed, offset, alibi_slopes):
        """The options a padded and a packed batch share, as nbflash.naive takes them."""
        lay = self.layout
        return dict(causal=self.causal, softmax_scale=self.scale, dropout_p=lay.dropout_p,
                    seed=seed, offset=offset, softcap=lay.softcap,
                    window_size=lay.window_size(), alibi_slopes=alibi_slopes)

    def _masking(self, key_lengths, block_mask, seed, offset, alibi_slopes):
        lay = self.layout
        return dict(self._options(seed, offset, alibi_slopes), key_lengths=key_lengths,
                    block_mask=block_mask,
                    block_size=lay.block_size if lay.features.sparse else None)

    def _varlen(self, key_lengths, seed, offset, alibi_slopes):
        """A packed batch's cu_seqlens (key_lengths holds them interleaved:
        nbflash.kernels.common.packed) and options, as nbflash.naive's varlen functions take
        them."""
        return (key_lengths[0::2], key_lengths[1::2]), self._options(seed, offset, alibi_slopes)

    def forward(self, xp, q, k, v, stream=0, key_lengths=None, block_mask=None, seed=0,
                offset=0, alibi_slopes=None):
        if self.layout.features.varlen:     # (1, H, total, d) views of the packed arrays
            cu, opts = self._varlen(key_lengths, seed, offset, alibi_slopes)
            o, lse = naive.attention_varlen_forward(*map(unbatch_view, (q, k, v)), *cu, **opts)
            return batch_view(o), lse[None]
        return naive.attention_forward(q, k, v, **self._masking(key_lengths, block_mask, seed,
                                                                 offset, alibi_slopes))

    def backward(self, xp, do, q, k, v, o, lse, stream=0, key_lengths=None, block_mask=None,
                 seed=0, offset=0, alibi_slopes=None):
        if self.layout.features.varlen:
            cu, opts = self._varlen(key_lengths, seed, offset, alibi_slopes)
            grads = naive.attention_varlen_backward(*map(unbatch_view, (do, q, k, v, o)),
                                                    lse[0], *cu, **opts)
            return tuple(map(batch_view, grads))
        return naive.attention_backward(do, q, k, v, o, lse, **self._masking(
            key_lengths, block_mask, seed, offset, alibi_slopes))


class ValuePadding:
    """A kernel plan at head dim D = max(d, d_v) behind a call whose v has a head dim d_v of
    its own (e.g. 192 / 128): q and k (d columns) and v (d_v) are copied with zero columns up
    to D, contiguous, so that q·kᵀ and P V are unchanged and the padded columns of o, dq, dk
    and dv are zeros, which are cut (FlashAttention's Python layer pads head dims the same
    way). The price is the narrower side's padded columns, read and multiplied: for 192 / 128,
    V's and O's 64 more columns. Outputs come back in the call's layouts."""

    def __init__(self, plan, d, d_v, layouts):
        self.plan, self.d, self.d_v, self.layouts = plan, d, d_v, layouts
        self.D = max(d, d_v)

    def _pad(self, xp, x):
        """x with zero columns up to D, contiguous (the inner plan's layouts)."""
        return into(xp, BHND, padded(xp, x, self.D))

    @staticmethod
    def _cut(xp, x, n, layout):
        """x's first n columns, in `layout`."""
        return into(xp, layout, x[..., :n])

    def forward(self, xp, q, k, v, stream=0, *args, **kwargs):
        o, lse = self.plan.forward(xp, *(self._pad(xp, x) for x in (q, k, v)), stream, *args,
                                   **kwargs)
        return self._cut(xp, o, self.d_v, self.layouts[0]), lse

    def backward(self, xp, do, q, k, v, o, lse, stream=0, *args, **kwargs):
        grads = self.plan.backward(xp, *(self._pad(xp, x) for x in (do, q, k, v, o)), lse,
                                   stream, *args, **kwargs)
        lq, lk = self.layouts
        return tuple(self._cut(xp, g, n, lay) for g, n, lay in
                     zip(grads, (self.d, self.d, self.d_v), (lq, lk, lk)))


def _naive(prob, layout, deterministic=False):
    return NaivePlan(prob.causal, prob.scale, layout)


def _fa1(prob, layout, deterministic=False):
    return fa1_plan.Fa1Plan(prob.tiles, prob.causal, prob.scale, layout)


def _padded_values(make):
    """A kernel impl's plan function, behind :class:`ValuePadding` where v's head dim is its
    own (the kernels then read contiguous padded copies)."""
    def plan(prob, layout, deterministic=False):
        if prob.d_v is None:
            return make(prob, layout, deterministic, prob.d, prob.layouts)
        return ValuePadding(make(prob, layout, deterministic, prob.kernel_dim, (BHND, BHND)),
                            prob.d, prob.d_v, prob.layouts)
    return plan


@_padded_values
def _fa2(prob, layout, deterministic, d, layouts):
    return fa2_plan.plan_for(prob.B, prob.H, prob.Nq, prob.Nk, d, prob.dtype_name,
                             prob.causal, prob.scale, bool(deterministic), layout=layout,
                             kv_heads=prob.kv_heads, layouts=layouts)


@_padded_values
def _tc(prob, layout, deterministic, d, layouts):
    return tc_plan.plan_for(prob.B, prob.H, prob.Nq, prob.Nk, d, prob.dtype_name,
                            prob.causal, prob.scale, layout=layout,
                            deterministic=bool(deterministic), kv_heads=prob.kv_heads,
                            layouts=layouts)


#: every implementation, in the order tables list them
REGISTRY = {impl.name: impl for impl in (
    Impl("naive", "naive (CuPy)", "#7f7f7f", "s",
         "standard attention with array operations (matmul, softmax, matmul): the baseline",
         ("float32", "float16"), 2**31, gqa=True, softcap=True, window=True, alibi=True,
         varlen=True, value_dim=True, plan=_naive),
    Impl("fa1", "nbflash fa1", "#1f77b4", "o",
         "the FlashAttention paper's Algorithms 1 and 4, as written (for reading and the IO "
         "experiments)",
         ("float32", "float16"), fa1_tiles.MAX_HEAD_DIM, own_options=("M", "block_rule"),
         at_scale=False,
         family=Family(fa1_plan.KERNELS, fa1_plan.spec, fa1_tiles.tiles,
                       ("float32", "float16")),
         check=fa1_plan.check, plan=_fa1),
    Impl("fa2", "nbflash fa2", "#d62728", "^",
         "FlashAttention-2 on CUDA cores, register-tiled, float32 math",
         ("float32", "float16"), fa2_tiles.MAX_HEAD_DIM, deterministic="optional", gqa=True,
         layouts=True, softcap=True, window=True, alibi=True, varlen=True, value_dim=True,
         family=Family(fa2_plan.KERNELS, fa2_plan.spec, fa2_tiles.tiles,
                       ("float32", "float16")),
         check=fa2_plan.check, plan=_fa2),
    Impl("tc", "nbflash tc", "#9467bd", "D",
         "FlashAttention-2 on tensor cores (mma.sync through inline PTX), 16-bit inputs",
         ("float16", "bfloat16"), tc_tiles.MAX_HEAD_DIM, tc_tiles.HEAD_DIM_MULTIPLE,
         deterministic="optional", gqa=True, layouts=True, softcap=True, window=True,
         alibi=True, varlen=True, value_dim=True,
         family=Family(tc_plan.KERNELS, tc_plan.spec, tc_tiles.tiles, ("float16", "bfloat16")),
         check=tc_plan.check, plan=_tc),
)}

#: what impl="auto" tries, in order, the fastest first: the first that takes the inputs' dtype
#: and head dim (and, for a deterministic backward, has a deterministic dq) runs: tc for
#: float16 and bfloat16, fa2 for float32 (and for float16 at head dims tc does not take). fa1
#: and naive run only when asked for by name.
AUTO = ("tc", "fa2")


def names():
    """Every registered impl's name, in order."""
    return tuple(REGISTRY)


def get(name):
    """The Impl registered as `name` ("auto" is not one: see :func:`resolve`)."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise InputError(f"impl={name!r} is not an implementation; use one of "
                         f"{('auto',) + names()}") from None


def kernels():
    """The impls that run nbflash's kernels (every one but the naive baseline)."""
    return tuple(impl for impl in REGISTRY.values() if impl.runs_kernels)


def resolve(name, dtype, head_dim, deterministic=False):
    """The Impl a call with impl=`name` runs: `name`'s, or for "auto" the first of AUTO that
    takes `dtype` at `head_dim` (with deterministic=True: the first of those whose dq can be
    deterministic). When none does, the first of AUTO that takes `dtype` at some head dim, else
    AUTO's first: its checks then say why not (fa2's head-dim limit for float32, say)."""
    if name != "auto":
        return get(name)
    auto = [REGISTRY[n] for n in AUTO]
    for impl in auto:
        if impl.takes(dtype, head_dim) and not (deterministic and impl.deterministic == "never"):
            return impl
    for impl in auto:
        if impl.takes(dtype, head_dim):
            return impl
    return next((impl for impl in auto if str(dtype) in impl.dtypes), auto[0])


def taking(dtype, head_dim):
    """The names of the impls that take `dtype` at `head_dim`."""
    return tuple(n for n in names() if REGISTRY[n].takes(dtype, head_dim))


__all__ = ["Impl", "Family", "REGISTRY", "AUTO", "names", "get", "kernels", "resolve", "taking"]
