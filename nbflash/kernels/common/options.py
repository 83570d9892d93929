"""The kernels' masking and dropout options, on the host side: what is compiled in, and the
arguments that carry the rest (every family's kernels take them the same way).

Four options change the kernels' code, so they are compile-time flags (:class:`Features`):
dropout, key padding (key_lengths), a block mask and softcapping. The softcap's two float32
scalars come with the scales (:func:`softcap_scalars`); the others' arguments come last, in
the same order (:meth:`Layout.scalars`): the key_lengths and block-mask arrays (placeholders when
unused), then the mask's batch and head strides, its number of key blocks and its block size
(bq, bk), then dropout's seed (low and high 32-bit words), offset, 16-bit threshold and 1/(1-p).
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


@dataclass(frozen=True)
class Layout:
    """Everything about the options that a compiled kernel and a launch plan depend on: the
    features, dropout's p, the block mask's shape (B or 1, H or 1, n_q_blocks, n_k_blocks)
    and block size, and the softcap (0: off). Seeds, offsets and the arrays themselves change
    from call to call."""

    features: Features = Features()
    dropout_p: float = 0.0
    mask_shape: tuple = (1, 1, 1, 1)
    block_size: tuple = (1, 1)
    softcap: float = 0.0

    def scalars(self, seed=0, offset=0):
        """The options' scalar arguments for a call with this seed and offset."""
        Bm, Hm, nbq, nbk = self.mask_shape
        msb = Hm * nbq * nbk if Bm > 1 else 0
        msh = nbq * nbk if Hm > 1 else 0
        lo, hi = rng.seed_words(seed)
        p = self.dropout_p
        return (msb, msh, nbk, *self.block_size, lo, hi, int(offset), rng.threshold(p),
                1.0 / (1.0 - p))

    def array_sizes(self, B):
        """(items, itemsize) of the key_lengths (int32) and block-mask (uint8) arguments."""
        Bm, Hm, nbq, nbk = self.mask_shape
        return ((B if self.features.padding else 1, 4),
                (Bm * Hm * nbq * nbk if self.features.sparse else 1, 1))


NONE = Layout()


def layout(dropout_p=0.0, seed=0, offset=0, key_lengths=None, block_mask=None,
           block_size=None, softcap=0.0):
    """(Layout, (key_lengths, block_mask, seed, offset)) of checked options (as
    nbflash.inputs.Problem.masking gives them); the arrays may be None."""
    features = Features(dropout_p > 0, key_lengths is not None, block_mask is not None,
                        softcap > 0)
    if not any(features):
        return NONE, (None, None, 0, 0)
    lay = Layout(features, float(dropout_p),
                 tuple(block_mask.shape) if features.sparse else (1, 1, 1, 1),
                 tuple(block_size) if features.sparse else (1, 1), float(softcap))
    return lay, (key_lengths, block_mask, seed, offset)


def softcap_scalars(softcap, scale):
    """The kernels' two softcap arguments: τ / softcap and softcap · log2(e), so that a score
    s becomes softcap·tanh(τ s / softcap) in base 2 as tanh(s · first) · second (0, 0 when
    off: not read)."""
    if not softcap:
        return 0.0, 0.0
    return float(scale) / softcap, softcap * math.log2(math.e)


def argument_types():
    """(array types, scalar types): the Numba types of the options' arguments, in order: the
    key_lengths (int32) and flat block-mask (uint8) arrays; 9 integers (mask strides, key
    blocks and block size, seed words, offset, threshold) and 1/(1-p)."""
    arrays = (types.Array(types.int32, 1, "C"), types.Array(types.uint8, 1, "C"))
    return arrays, (types.int64,) * 9 + (types.float32,)


class OptionArguments:
    """The options' arguments of a call, for launch plans that hold a :class:`Layout` as
    ``self.layout``: placeholder arrays (made once) where an option is off, and the scalars for
    the call's seed and offset."""

    _placeholders = None

    def option_arrays(self, xp, key_lengths, block_mask):
        """(key_lengths, flat block mask), placeholders where off."""
        if self._placeholders is None:
            self._placeholders = (xp.zeros(1, xp.int32), xp.zeros(1, xp.uint8))
        return (self._placeholders[0] if key_lengths is None else key_lengths,
                self._placeholders[1] if block_mask is None else block_mask.reshape(-1))

    def options(self, xp, key_lengths, block_mask, seed, offset):
        """(the options' arrays, their scalars): the scalars for this call's seed and offset
        where they matter (dropout; packed anew at each launch), else None (the plan's packed
        scalars stand)."""
        arrays = self.option_arrays(xp, key_lengths, block_mask)
        if not self.layout.features.dropout:
            return arrays, None
        return arrays, self.layout.scalars(seed, offset)

    @staticmethod
    def with_options(bound, opt_scalars):
        """A bound launch's scalars with the options' last ones replaced (None: unchanged)."""
        if opt_scalars is None:
            return None
        return bound.scalars[:len(bound.scalars) - len(opt_scalars)] + opt_scalars
