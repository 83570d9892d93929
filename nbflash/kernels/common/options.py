"""The kernels' masking and dropout options, on the host side: what is compiled in, and the
arguments that carry the rest (every family's kernels take them the same way).

Seven options change the kernels' code, so they are compile-time flags (:class:`Features`):
dropout, key padding (key_lengths), a block mask, softcapping, a sliding window, ALiBi and
packed variable-length batches (varlen: the key_lengths argument then holds the batch's two
cu_seqlens interleaved, nbflash.kernels.common.packed; the grids cover its longest sequence). The
softcap's two float32 scalars come with the scales (:func:`softcap_scalars`); the others'
arguments come last, in the same order (:meth:`Layout.scalars`): the key_lengths, block-mask
and ALiBi-slope arrays (placeholders when unused), then the window's two bounds
(:func:`window_bounds`), the slopes' batch stride (H for slopes of shape (B, H), 0 for (H,)),
the mask's batch and head strides, its number of key blocks and its block size (bq, bk), then
dropout's seed (low and high 32-bit words), offset, 16-bit threshold and 1/(1-p).
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

from numba import types

from ... import rng


class Features(NamedTuple):
    """Which options a kernel is compiled with."""

    dropout: bool = False
    padding: bool = False
    sparse: bool = False
    softcap: bool = False
    window: bool = False
    alibi: bool = False
    varlen: bool = False


#: a window side without a bound: further than any key is from any query (and small enough
#: that row + UNBOUNDED stays far inside int32 and int64)
UNBOUNDED = 2**30


def window_bounds(window_size, causal):
    """The kernels' window arguments (left, right) for window_size = (left, right) (-1:
    unbounded; checked by nbflash.inputs) and the causal flag: query row i sees key j when
    i + Nk - Nq - left <= j <= i + Nk - Nq + right, an unbounded side as :data:`UNBOUNDED`,
    the causal mask folded into right (the kernels then compile without their causal flag).
    None when nothing is left for a window to hide: no bound, or causal with no left bound."""
    left, right = window_size
    if causal:
        right = 0
    if left < 0 and right < 0 or causal and left < 0:
        return None
    return (UNBOUNDED if left < 0 else int(left), UNBOUNDED if right < 0 else int(right))


@dataclass(frozen=True)
class Layout:
    """Everything about the options that a compiled kernel and a launch plan depend on: the
    features, dropout's p, the block mask's shape (B or 1, H or 1, n_q_blocks, n_k_blocks)
    and block size, the softcap (0: off) and the window's (left, right) (:func:`window_bounds`;
    unused without the window feature). Seeds, offsets and the arrays themselves change from
    call to call."""

    features: Features = Features()
    dropout_p: float = 0.0
    mask_shape: tuple = (1, 1, 1, 1)
    block_size: tuple = (1, 1)
    softcap: float = 0.0
    window: tuple = (UNBOUNDED, UNBOUNDED)
    alibi_shape: tuple = ()       # the slopes' shape, (H,) or (B, H); () without ALiBi
    #: a packed batch's (sequences, max_seqlen_q, max_seqlen_k); () for a padded batch
    packed: tuple = ()

    def window_size(self):
        """The window as nbflash.naive takes it, (left, right) with -1 unbounded (the causal
        mask folded in, as in the kernels' bounds)."""
        if not self.features.window:
            return (-1, -1)
        return tuple(-1 if w == UNBOUNDED else w for w in self.window)

    def causal_kernels(self, causal):
        """The kernels' causal flag for a causal call: off with a window, which holds it."""
        return bool(causal) and not self.features.window

    def scalars(self, seed=0, offset=0):
        """The options' scalar arguments for a call with this seed and offset."""
        Bm, Hm, nbq, nbk = self.mask_shape
        msb = Hm * nbq * nbk if Bm > 1 else 0
        msh = nbq * nbk if Hm > 1 else 0
        lo, hi = rng.seed_words(seed)
        p = self.dropout_p
        asb = self.alibi_shape[-1] if len(self.alibi_shape) == 2 else 0
        return (*self.window, asb, msb, msh, nbk, *self.block_size, lo, hi, int(offset),
                rng.threshold(p), 1.0 / (1.0 - p))

    def array_sizes(self, B):
        """(items, itemsize) of the key_lengths (int32; a packed batch's interleaved
        cu_seqlens), block-mask (uint8) and ALiBi-slope (float32) arguments."""
        Bm, Hm, nbq, nbk = self.mask_shape
        lengths = 2 * B + 2 if self.features.varlen else B if self.features.padding else 1
        return ((lengths, 4),
                (Bm * Hm * nbq * nbk if self.features.sparse else 1, 1),
                (math.prod(self.alibi_shape) if self.features.alibi else 1, 4))


NONE = Layout()


def layout(dropout_p=0.0, seed=0, offset=0, key_lengths=None, block_mask=None,
           block_size=None, softcap=0.0, window_size=(-1, -1), causal=False, alibi_slopes=None,
           packed=None):
    """(Layout, (key_lengths, block_mask, seed, offset, alibi_slopes)) of checked options (as
    nbflash.inputs.Problem.masking gives them, and the causal flag); the arrays may be None.
    packed: a packed batch's (cu_seqlens interleaved, (sequences, max_seqlen_q,
    max_seqlen_k)), its cu_seqlens then in key_lengths' place (key_lengths None); or None."""
    window = window_bounds(window_size, causal)
    if packed is not None:
        key_lengths, packed = packed
    features = Features(dropout_p > 0, key_lengths is not None and packed is None,
                        block_mask is not None, softcap > 0, window is not None,
                        alibi_slopes is not None, packed is not None)
    if not any(features):
        return NONE, (None, None, 0, 0, None)
    lay = Layout(features, float(dropout_p),
                 tuple(block_mask.shape) if features.sparse else (1, 1, 1, 1),
                 tuple(block_size) if features.sparse else (1, 1), float(softcap),
                 window or (UNBOUNDED, UNBOUNDED),
                 tuple(alibi_slopes.shape) if features.alibi else (),
                 tuple(packed) if features.varlen else ())
    return lay, (key_lengths, block_mask, seed, offset, alibi_slopes)


def softcap_scalars(softcap, scale):
    """The kernels' two softcap arguments: τ / softcap and softcap · log2(e), so that a score
    s becomes softcap·tanh(τ s / softcap) in base 2 as tanh(s · first) · second (0, 0 when
    off: not read)."""
    if not softcap:
        return 0.0, 0.0
    return float(scale) / softcap, softcap * math.log2(math.e)


def argument_types():
    """(array types, scalar types): the Numba types of the options' arguments, in order: the
    key_lengths (int32), flat block-mask (uint8) and flat ALiBi-slope (float32) arrays; 12
    integers (the window's bounds, the slopes' batch stride, mask strides, key blocks and block
    size, seed words, offset, threshold) and 1/(1-p)."""
    arrays = (types.Array(types.int32, 1, "C"), types.Array(types.uint8, 1, "C"),
              types.Array(types.float32, 1, "C"))
    return arrays, (types.int64,) * 12 + (types.float32,)


class OptionArguments:
    """The options' arguments of a call, for launch plans that hold a :class:`Layout` as
    ``self.layout``: placeholder arrays (made once) where an option is off, and the scalars for
    the call's seed and offset."""

    _placeholders = None

    def option_arrays(self, xp, key_lengths, block_mask, alibi_slopes=None):
        """(key_lengths, flat block mask, flat ALiBi slopes), placeholders where off."""
        if self._placeholders is None:
            self._placeholders = (xp.zeros(1, xp.int32), xp.zeros(1, xp.uint8),
                                  xp.zeros(1, xp.float32))
        return (self._placeholders[0] if key_lengths is None else key_lengths,
                self._placeholders[1] if block_mask is None else block_mask.reshape(-1),
                self._placeholders[2] if alibi_slopes is None else alibi_slopes.reshape(-1))

    def options(self, xp, key_lengths, block_mask, seed, offset, alibi_slopes=None):
        """(the options' arrays, their scalars): the scalars for this call's seed and offset
        where they matter (dropout; packed anew at each launch), else None (the plan's packed
        scalars stand)."""
        arrays = self.option_arrays(xp, key_lengths, block_mask, alibi_slopes)
        if not self.layout.features.dropout:
            return arrays, None
        return arrays, self.layout.scalars(seed, offset)

    @staticmethod
    def with_options(bound, opt_scalars):
        """A bound launch's scalars with the options' last ones replaced (None: unchanged)."""
        if opt_scalars is None:
            return None
        return bound.scalars[:len(bound.scalars) - len(opt_scalars)] + opt_scalars
