"""The checks every impl shares: array kinds, shapes, dtypes, the scalars and the options.

Everything here runs before any kernel; kernels never re-check what was checked here. Arrays are
CuPy on the GPU and NumPy in the simulator. On the GPU, NumPy inputs are also taken (copied to
the device, results copied back) as a convenience; CuPy arrays in the simulator are refused with
a message saying so. torch tensors (CUDA tensors on the GPU, CPU tensors in the simulator) are
taken without a copy through DLPack, run on torch's current stream, and the results come back as
torch tensors; torch is only imported when such a tensor arrives.

bfloat16 arrives in three forms, each viewed as its bits (BF16_BITS, uint16) without a copy:
torch.bfloat16 tensors (results come back as torch.bfloat16), arrays whose dtype is
ml_dtypes.bfloat16 (NumPy, or CuPy where it takes ml_dtypes: results come back as that dtype,
NumPy inputs on the GPU included) and uint16 arrays of any kind, taken as bfloat16 bits (results
come back as uint16 bits). ml_dtypes is never imported (nbflash.bfloat16.is_bfloat16).

What an impl takes (its dtypes, head dims, deterministic dq, its own options) comes from the
registry (nbflash.impls), and the impl's own checks (its tiles' shared memory, fa1's M) run last,
from its registry entry.
"""

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from . import impls, rng, sparsity
from .bfloat16 import is_bfloat16
from ._cuda import MODE
from .errors import InputError
from .kernels.common import layouts as _layouts, options as _options

#: the float dtypes of arrays nbflash takes (and bfloat16, as BF16_BITS)
DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
#: bfloat16 data as the kernels take it: its bits, uint16 arrays (torch.bfloat16 tensors and
#: ml_dtypes.bfloat16 arrays are viewed as such; uint16 arrays are taken as bfloat16 bits)
BF16_BITS = np.dtype(np.uint16)
#: what the dtype error says nbflash takes
_SUPPORTED = ("float16, float32 or bfloat16 (torch.bfloat16 tensors, ml_dtypes.bfloat16 arrays, "
              "or uint16 arrays of bfloat16 bits)")


@dataclass(frozen=True)
class Problem:
    """What the checks found: sizes, dtype, options, the array module, and the kernel tiles."""

    B: int
    H: int
    Nq: int
    Nk: int
    d: int
    dtype: np.dtype
    causal: bool
    scale: float
    impl: str
    xp: object
    to_host: bool          # inputs were NumPy on the GPU: return NumPy
    tiles: object = None   # what the impl's own checks returned (fa1: its Tiles)
    torch: bool = False    # inputs were torch tensors: return torch tensors
    stream: int = 0        # the CUDA stream kernels are launched on
    dropout_p: float = 0.0
    seed: int = 0
    offset: int = 0
    key_lengths: object = None   # int32 (B,) device array
    block_mask: object = None    # uint8 (B or 1, H or 1, n_q_blocks, n_k_blocks) device array
    block_size: tuple = None     # (bq, bk)
    bf16_dtype: np.dtype = None  # inputs were bfloat16 arrays (ml_dtypes): the outputs' dtype
    H_kv: int = None             # heads of k and v (dividing H: grouped-query); None: H
    #: the layouts (nbflash.kernels.common.layouts) of the query-shaped arrays and of the
    #: key-shaped ones as the checks hand them over: both "bhnd" unless the impl takes others
    layouts: tuple = (_layouts.BHND, _layouts.BHND)
    softcap: float = 0.0         # scores softcap·tanh(score / softcap); 0: off
    window_size: tuple = (-1, -1)   # a sliding window (left, right); -1: unbounded
    alibi_slopes: object = None     # float32 (H,) or (B, H) device array: ALiBi's slopes
    #: a packed variable-length batch's (interleaved cu_seqlens, int32 (2B + 2,) device array,
    #: (sequences B, max_seqlen_q, max_seqlen_k)) (nbflash.kernels.common.packed); its q, k, v
    #: are (1, H, total, d) views, so B = 1 and Nq, Nk are total_q, total_k; None: a batch
    packed: tuple = None
    d_v: int = None               # v's head dim where it differs from q's and k's; None: d

    @property
    def value_dim(self):
        """v's (and o's) head dim: d, or d_v."""
        return self.d if self.d_v is None else self.d_v

    @property
    def kernel_dim(self):
        """The head dim the kernels run at: max(d, d_v) (nbflash.impls.ValuePadding pads the
        narrower side with zero columns)."""
        return max(self.d, self.value_dim)

    @property
    def kv_heads(self):
        """Heads of k and v: H, or fewer (grouped-query / multi-query attention)."""
        return self.H if self.H_kv is None else self.H_kv

    @property
    def dtype_name(self):
        """"float16", "float32", or "bfloat16" (whose arrays hold its bits as uint16)."""
        return "bfloat16" if self.dtype == BF16_BITS else str(self.dtype)

    def masking(self):
        """The mask and dropout options, as nbflash.naive takes them."""
        return dict(dropout_p=self.dropout_p, seed=self.seed, offset=self.offset,
                    key_lengths=self.key_lengths, block_mask=self.block_mask,
                    block_size=self.block_size, softcap=self.softcap,
                    window_size=self.window_size, alibi_slopes=self.alibi_slopes)

    def options(self):
        """(Layout, (key_lengths, block_mask, seed, offset, alibi_slopes)): the options as the
        kernels' plans take them (nbflash.kernels.common.options)."""
        return _options.layout(causal=self.causal, packed=self.packed, **self.masking())

    def stream_context(self):
        """On torch's current stream when the inputs were torch tensors (so that CuPy's
        allocations and the kernels are ordered with the caller's torch work)."""
        if self.torch and MODE == "gpu":
            import cupy  # noqa: PLC0415
            return external_stream(cupy, self.stream)
        return contextlib.nullcontext()

    def outputs(self, arrays):
        """Results in the kind of array the caller passed, bfloat16 in the form it came in
        (torch.bfloat16, ml_dtypes.bfloat16, or uint16 bits)."""
        if self.to_host:
            arrays = tuple(self.xp.asnumpy(a) for a in arrays)
        elif self.torch:
            import torch  # noqa: PLC0415
            return tuple(torch.from_dlpack(a).view(torch.bfloat16) if a.dtype == BF16_BITS
                         else torch.from_dlpack(a) for a in arrays)
        if self.bf16_dtype is not None:
            arrays = tuple(a.view(self.bf16_dtype) if a.dtype == BF16_BITS else a
                           for a in arrays)
        return arrays


class _StreamHandle:
    """A raw CUDA stream handle behind the CUDA stream protocol (``__cuda_stream__``), which
    CuPy 14's Stream.from_external takes."""

    def __init__(self, ptr):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


def external_stream(cupy, ptr):
    """CuPy's stream object for the raw handle `ptr` (torch's current stream): through
    Stream.from_external where CuPy has it (CuPy 14 deprecates ExternalStream), else
    ExternalStream."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(_StreamHandle(ptr))
    return cupy.cuda.ExternalStream(ptr)


def _kind(x):
    mod = type(x).__module__.split(".")[0]
    if isinstance(x, np.ndarray):
        return "numpy"
    if mod in ("cupy", "torch"):
        return mod
    return f"{type(x).__module__}.{type(x).__qualname__}"


def _from_torch(named):
    """torch tensors -> CuPy (GPU) or NumPy (simulator) arrays sharing their memory (DLPack);
    returns (arrays, stream of torch's current stream or 0)."""
    import torch  # noqa: PLC0415

    want = "cuda" if MODE == "gpu" else "cpu"
    for name, x in named.items():
        if x.device.type != want:
            raise InputError(
                f"{name} is a torch tensor on {x.device}; nbflash in "
                f"{'GPU' if MODE == 'gpu' else 'simulator'} mode takes {want} tensors")
        if x.requires_grad:
            named[name] = x = x.detach()
        if x.dtype == torch.bfloat16:   # neither CuPy nor NumPy holds bfloat16: take its bits
            named[name] = x = x.view(torch.int16)
    if MODE == "gpu":
        import cupy  # noqa: PLC0415
        dev = next(iter(named.values())).device
        for name, x in named.items():
            if x.device != dev:
                raise InputError(f"{name} is on {x.device} but q is on {dev}")
        stream = torch.cuda.current_stream(dev).cuda_stream
        with cupy.cuda.Device(dev.index):
            return {n: _bf16_bits(cupy.from_dlpack(x)) for n, x in named.items()}, stream
    return {n: _bf16_bits(np.from_dlpack(x)) for n, x in named.items()}, 0


def _bf16_bits(x):
    """A bfloat16 tensor's int16 view (see _from_torch) as BF16_BITS."""
    return x.view(BF16_BITS) if x.dtype == np.int16 else x


def _from_bf16_arrays(named):
    """NumPy or CuPy arrays of a bfloat16 dtype (ml_dtypes.bfloat16) among the 16-bit inputs
    (all but lse) viewed as their bits (BF16_BITS); returns (arrays, the bfloat16 dtype or
    None). Refused mixed with uint16 bits: the results could come back as either."""
    bf16 = [n for n, x in named.items() if n != "lse" and is_bfloat16(x.dtype)]
    if not bf16:
        return named, None
    raw = [n for n, x in named.items() if n != "lse" and x.dtype == BF16_BITS]
    if raw:
        raise InputError(f"{', '.join(bf16)} {'has' if len(bf16) == 1 else 'have'} dtype "
                         f"bfloat16 but {', '.join(raw)} {'has' if len(raw) == 1 else 'have'} "
                         "uint16 (bfloat16 bits); pass bfloat16 arrays or their uint16 bits, "
                         "not both")
    dtype = named[bf16[0]].dtype
    return {n: x.view(BF16_BITS) if n in bf16 else x for n, x in named.items()}, dtype


def _one_kind(named):
    """Check that all arrays are of one kind nbflash takes; return it."""
    kinds = {name: _kind(x) for name, x in named.items()}
    for name, kind in kinds.items():
        if kind not in ("numpy", "cupy", "torch"):
            raise InputError(
                f"{name} is a {kind}; nbflash takes CuPy arrays on the GPU, NumPy arrays in "
                "the simulator, and torch tensors")
    if len(set(kinds.values())) > 1:
        desc = ", ".join(f"{n} is {k}" for n, k in kinds.items())
        raise InputError(f"arrays must all be of one kind: {desc}")
    return next(iter(kinds.values()))


def _array_module(kind, named):
    """The array module for arrays of `kind` (NumPy or CuPy) in this device mode, checking
    they are on the current device; returns (xp, to_host)."""
    if MODE == "gpu":
        import cupy  # noqa: PLC0415
        if kind == "cupy":
            here = cupy.cuda.Device().id
            for name, x in named.items():
                if x.device.id != here:
                    raise InputError(
                        f"{name} is on GPU {x.device.id} but the current device is GPU {here}; "
                        "run under `with cupy.cuda.Device(n):` for the arrays' device")
            return cupy, False
        return cupy, True
    if kind == "cupy":
        raise InputError(
            f"nbflash is in {'simulator' if MODE == 'sim' else 'compile-only'} mode "
            f"(NBFLASH_DEVICE={MODE}), which takes NumPy arrays; got CuPy arrays "
            "(use cupy.asnumpy, or NBFLASH_DEVICE=gpu on a machine with a GPU)")
    return np, False


def _check_own_options(impl, own):
    """The options only some impls take (fa1's M and block_rule): refused for the others."""
    given = [k for k, v in own.items() if v is not None and k not in impl.own_options]
    if given:
        takers = [i.name for i in impls.REGISTRY.values() if set(given) <= set(i.own_options)]
        raise InputError(f"{', '.join(given)} only apply to {_names(takers, ' or ')} "
                         f"(got impl={impl.name!r})")
    if impl.runs_kernels and MODE == "compile":
        raise InputError(
            "NBFLASH_DEVICE=compile builds kernels for inspection but cannot run them; use "
            "NBFLASH_DEVICE=gpu or sim (or impl='naive')")


def _check_takes(impl, dtype, d):
    """The impl's dtypes and head dims (nbflash.impls), naming those that take the inputs."""
    if dtype not in impl.dtypes:
        others = impls.taking(dtype, d)
        raise InputError(f"impl={impl.name!r} takes {' or '.join(impl.dtypes)} inputs; got "
                         f"{dtype}" + (f" ({_names(others)} {_takes(others)} {dtype})"
                                       if others else ""))
    if d > impl.max_head_dim or d % impl.head_dim_multiple:
        if impl.head_dim_multiple == 1:
            msg = f"head_dim {d} is above {impl.name}'s limit of {impl.max_head_dim}"
        else:
            msg = (f"impl={impl.name!r} takes head_dim a multiple of {impl.head_dim_multiple} "
                   f"up to {impl.max_head_dim}; got {d}")
        others = [n for n in impls.taking(dtype, d) if impls.get(n).runs_kernels]
        if others:
            msg += f"; {_names(others)} {_takes(others)} head_dim {d} in {dtype}"
        raise InputError(msg)


def _check_deterministic(impl, deterministic, dtype, d):
    if deterministic and impl.deterministic == "never":
        optional = [i for i in impls.kernels() if i.deterministic == "optional"]
        others = [i.name for i in optional if i.takes(dtype, d)]
        msg = f"impl={impl.name!r} adds dq with atomics and has no deterministic pass; "
        if others:
            msg += (f"use {_names(others, ' or ')} with deterministic=True for bitwise "
                    "reproducible dq")
        else:
            dtypes = sorted({t for i in optional for t in i.dtypes})
            msg += (f"a deterministic dq needs {_names([i.name for i in optional], ' or ')} "
                    f"({' or '.join(dtypes)} inputs); got {dtype}")
        raise InputError(msg)


#: the most blocks a CUDA grid takes along y and z: fa2's and tc's grids have B·H_kv blocks
#: along z (the forward and the dQ pass: a key/value head's query heads along y)
MAX_GRID_YZ = 65535


def _check_gqa(impl, B, H, H_kv):
    """Grouped-query heads (k and v with H_kv < H heads) only for the impls that take them;
    for the kernels that do, B·H_kv within a grid's z axis."""
    if H_kv != H and not impl.gqa:
        others = [i.name for i in impls.REGISTRY.values() if i.gqa]
        raise InputError(f"impl={impl.name!r} takes k and v with as many heads as q ({H}); got "
                         f"{H_kv} (grouped-query heads run with {_names(others, ' or ')})")
    if impl.gqa and impl.runs_kernels and B * H_kv > MAX_GRID_YZ:
        raise InputError(f"batch x heads of k and v is {B} x {H_kv} = {B * H_kv}, above the "
                         f"{MAX_GRID_YZ} that {impl.name}'s grids take (one block row per "
                         f"batch entry and key/value head); split the batch")


def _names(names, sep=", "):
    return sep.join(f"impl={n!r}" for n in names)


def _takes(names):
    return "takes" if len(names) == 1 else "take"


def _check_qkv(q, k, v, empty_rows=False):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise InputError(
                f"{name} has {x.ndim} dimensions, shape {tuple(x.shape)}; expected 4: "
                "(batch, heads, seqlen, head_dim)")
        if x.dtype not in DTYPES and x.dtype != BF16_BITS:
            bf16 = _names([n for n in impls.names() if "bfloat16" in impls.get(n).dtypes],
                          " or ")
            raise InputError(f"{name} has dtype {x.dtype}, which nbflash does not support; "
                             f"use {_SUPPORTED}; bfloat16 runs with {bf16}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k, v must share one dtype; got {_name(q)}, {_name(k)}, {_name(v)}")
    B, H, Nq, d = q.shape
    for name, x in (("k", k), ("v", v)):
        for axis, what in ((0, "batch"), (3, "head_dim")):
            if axis == 3 and name == "v":     # (v's head dim d_v may differ: the value's own)
                continue
            if x.shape[axis] != q.shape[axis]:
                raise InputError(f"{what} of {name} is {x.shape[axis]} but {what} of q is "
                                 f"{q.shape[axis]} (q {tuple(q.shape)}, {name} {tuple(x.shape)})")
    if k.shape[1] != v.shape[1]:
        raise InputError(f"k and v must have the same number of heads; got {k.shape[1]} and "
                         f"{v.shape[1]} (k {tuple(k.shape)}, v {tuple(v.shape)})")
    H_kv = k.shape[1]
    if H_kv and H % H_kv:
        raise InputError(f"heads of k and v ({H_kv}) must divide heads of q ({H}): query head "
                         f"h reads key/value head h // (H / H_kv) (grouped-query attention; "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)})")
    if k.shape[2] != v.shape[2]:
        raise InputError(f"k and v must have the same seqlen; got {k.shape[2]} and {v.shape[2]}")
    Nk = k.shape[2]
    for what, n in (("batch", B), ("heads", H), ("heads of k and v", H_kv),
                    ("seqlen of q (Nq)", Nq),
                    ("seqlen of k and v (Nk)", Nk), ("head_dim", d),
                    ("head_dim of v", v.shape[3])):
        if n == 0 and not (empty_rows and what.startswith("seqlen")):
            raise InputError(f"{what} is 0: nothing to attend "
                             f"(q {tuple(q.shape)}, k {tuple(k.shape)})")
    return B, H, Nq, Nk, d


def _check_scalars(causal, softmax_scale, d):
    if not isinstance(causal, (bool, np.bool_)):
        raise InputError(f"causal must be True or False; got {causal!r}")
    if softmax_scale is None:
        return bool(causal), 1.0 / math.sqrt(d)
    if isinstance(softmax_scale, (bool, np.bool_)) or not isinstance(
            softmax_scale, (int, float, np.integer, np.floating)):
        raise InputError(f"softmax_scale must be a number; got {softmax_scale!r}")
    if not math.isfinite(float(softmax_scale)):
        raise InputError(f"softmax_scale must be finite; got {softmax_scale!r}")
    if abs(float(softmax_scale)) > float(np.finfo(np.float32).max):  # kernels take τ as float32
        raise InputError(f"softmax_scale {softmax_scale!r} overflows float32")
    return bool(causal), float(softmax_scale)


def _name(x):
    return "bfloat16" if x.dtype == BF16_BITS else str(x.dtype)


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def softcap_value(softcap):
    """softcap as a float: 0 (off), or a positive finite number."""
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(
            softcap, (int, float, np.integer, np.floating)) or not math.isfinite(softcap) \
            or softcap < 0:
        raise InputError(f"softcap must be 0 (off) or a positive finite number; got {softcap!r}")
    return float(softcap)


def check_softcap(impl, softcap):
    """softcap as a float (:func:`softcap_value`), for an impl that takes it."""
    softcap = softcap_value(softcap)
    if softcap and not impl.softcap:
        others = [i.name for i in impls.REGISTRY.values() if i.softcap]
        raise InputError(f"impl={impl.name!r} does not take softcap (softcapping runs with "
                         f"{_names(others, ' or ')})")
    return softcap


def window_value(window_size):
    """window_size as a pair of ints (left, right), each -1 (unbounded) or >= 0."""
    bad = InputError(f"window_size must be a pair (left, right) of integers, each -1 "
                     f"(unbounded) or >= 0; got {window_size!r}")
    if isinstance(window_size, (str, bytes)):
        raise bad
    try:
        pair = tuple(window_size)
    except TypeError:
        raise bad from None
    if len(pair) != 2 or not all(_is_int(w) and w >= -1 for w in pair):
        raise bad
    return int(pair[0]), int(pair[1])


def check_window(impl, window_size, causal):
    """window_size as (left, right) (:func:`window_value`), for an impl that takes it where it
    hides anything (not (-1, -1), nor a window without a left bound with causal masking)."""
    window = window_value(window_size)
    if _options.window_bounds(window, causal) is not None and not impl.window:
        others = [i.name for i in impls.REGISTRY.values() if i.window]
        raise InputError(f"impl={impl.name!r} does not take window_size={window} (sliding "
                         f"windows run with {_names(others, ' or ')})")
    return window


def _check_alibi(xp, impl, alibi_slopes, B, H):
    """alibi_slopes as a contiguous float32 (H,) or (B, H) array of `xp` with finite values,
    for an impl that takes them; None stays None."""
    if alibi_slopes is None:
        return None
    if not impl.alibi:
        others = [i.name for i in impls.REGISTRY.values() if i.alibi]
        raise InputError(f"impl={impl.name!r} does not take alibi_slopes (ALiBi runs with "
                         f"{_names(others, ' or ')})")
    slopes = _small_array(xp, alibi_slopes, "alibi_slopes")
    if slopes.dtype.kind not in "fiu":
        raise InputError(f"alibi_slopes must be numbers; got dtype {slopes.dtype}")
    if tuple(slopes.shape) not in ((H,), (B, H)):
        raise InputError(f"alibi_slopes has shape {tuple(slopes.shape)}; expected (H,) = ({H},) "
                         f"or (B, H) = ({B}, {H})")
    slopes = xp.ascontiguousarray(slopes.astype(xp.float32))
    if not bool(xp.isfinite(slopes).all()):
        raise InputError("alibi_slopes must be finite (float32)")
    return slopes


def check_dropout(dropout_p, seed, offset):
    """(p, seed, offset) of a valid dropout request."""
    if isinstance(dropout_p, (bool, np.bool_)) or not isinstance(
            dropout_p, (int, float, np.integer, np.floating)):
        raise InputError(f"dropout_p must be a number in [0, 1); got {dropout_p!r}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise InputError(f"dropout_p must be in [0, 1); got {dropout_p!r}")
    if p == 0.0:
        return 0.0, 0, 0
    if seed is None:
        raise InputError("dropout_p > 0 needs a seed (an integer in [0, 2**64)): the backward "
                         "pass regenerates the forward's dropout mask from it, so pass the "
                         "same seed (and offset) to attention_forward and attention_backward")
    if not _is_int(seed) or not 0 <= int(seed) < rng.MAX_SEED:
        raise InputError(f"seed must be an integer in [0, 2**64); got {seed!r}")
    if not _is_int(offset) or not 0 <= int(offset) < rng.MAX_OFFSET:
        raise InputError(f"offset must be an integer in [0, 2**32); got {offset!r}")
    return p, int(seed), int(offset)


def _small_array(xp, x, name):
    """A host or device array-like (list, NumPy, CuPy, torch) as an `xp` array."""
    kind = _kind(x)
    if kind == "torch":
        x = x.detach().cpu().numpy()
    elif kind == "cupy" and xp is np:
        raise InputError(f"{name} is a CuPy array, but nbflash is in {MODE} mode: use NumPy")
    elif kind not in ("numpy", "cupy"):
        try:
            x = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name} could not be read as an array: {exc}") from exc
    return xp.asarray(x)


def _check_key_lengths(xp, key_lengths, B, Nk):
    """key_lengths as a contiguous int32 (B,) array of `xp`, values in [0, Nk]."""
    if key_lengths is None:
        return None
    kl = _small_array(xp, key_lengths, "key_lengths")
    if kl.dtype.kind not in "iu":
        raise InputError(f"key_lengths must be integers; got dtype {kl.dtype}")
    if tuple(kl.shape) != (B,):
        raise InputError(f"key_lengths has shape {tuple(kl.shape)}; expected (B,) = ({B},)")
    lo, hi = (int(x) for x in xp.stack((kl.min(), kl.max())).tolist())   # one read back
    if lo < 0 or hi > Nk:
        raise InputError(f"key_lengths must be in [0, Nk] = [0, {Nk}]; got values from {lo} "
                         f"to {hi}")
    return xp.ascontiguousarray(kl.astype(xp.int32))


def _check_block_mask(xp, block_mask, block_size, B, H, Nq, Nk):
    """(mask, (bq, bk)): the block mask as a contiguous uint8 (B or 1, H or 1, n_q_blocks,
    n_k_blocks) array of `xp`."""
    if block_mask is None:
        if block_size is not None:
            raise InputError("block_size is given without block_mask")
        return None, None
    if block_size is None:
        raise InputError("block_mask needs block_size: the number of query and key positions "
                         "per mask block, an integer or a pair (bq, bk)")
    size = (block_size, block_size) if _is_int(block_size) else block_size
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(_is_int(b) and b >= 1 for b in size)):
        raise InputError(f"block_size must be a positive integer or a pair of them; "
                         f"got {block_size!r}")
    bq, bk = int(size[0]), int(size[1])
    mask = _small_array(xp, block_mask, "block_mask")
    if mask.dtype.kind not in "biu":
        raise InputError(f"block_mask must be boolean; got dtype {mask.dtype}")
    blocks = (sparsity.n_blocks(Nq, bq), sparsity.n_blocks(Nk, bk))
    if mask.ndim not in (2, 3, 4) or tuple(mask.shape[-2:]) != blocks:
        raise InputError(
            f"block_mask has shape {tuple(mask.shape)}; with block_size ({bq}, {bk}), Nq={Nq} "
            f"and Nk={Nk} expected (..., {blocks[0]}, {blocks[1]}) with leading axes (), "
            f"(H,) or (B, H) (1 to share one mask)")
    lead = (1,) * (4 - mask.ndim) + tuple(mask.shape[:-2])
    if lead[0] not in (1, B) or lead[1] not in (1, H):
        raise InputError(f"block_mask's leading axes {tuple(mask.shape[:-2])} do not match "
                         f"(B, H) = ({B}, {H}) (use 1 to share a mask)")
    mask = (mask != 0).astype(xp.uint8).reshape(lead + blocks)
    return xp.ascontiguousarray(mask), (bq, bk)


def _check_cu_seqlens(xp, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q,
                      total_k):
    """A packed batch's (interleaved cu_seqlens, (B, max_seqlen_q, max_seqlen_k)) as the
    kernels take them (nbflash.kernels.common.packed): each cu_seqlens integers of shape
    (B + 1,), 0 first, nondecreasing, ending at the packed arrays' rows; each max_seqlen None
    (the longest sequence's) or an integer no smaller than it (the grids cover it). One read
    back of the lengths to the host."""
    host = []
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        c = _small_array(xp, cu, name)
        if c.dtype.kind not in "iu":
            raise InputError(f"{name} must be integers; got dtype {c.dtype}")
        if c.ndim != 1 or c.shape[0] < 2:
            raise InputError(f"{name} has shape {tuple(c.shape)}; expected (B + 1,) with B >= 1 "
                             "sequences: the offsets of their first rows, then the total")
        host.append(c)
    if host[0].shape != host[1].shape:
        raise InputError(f"cu_seqlens_q has {host[0].shape[0]} entries but cu_seqlens_k has "
                         f"{host[1].shape[0]}: B + 1 each, for the same B sequences")
    both = xp.stack([c.astype(xp.int64) for c in host], axis=1)
    both = np.asarray(both if xp is np else xp.asnumpy(both))      # (B + 1, 2), one read
    B = both.shape[0] - 1
    maxima = []
    for col, (name, total, what, mx, mx_name) in enumerate((
            ("cu_seqlens_q", total_q, "q has total_q", max_seqlen_q, "max_seqlen_q"),
            ("cu_seqlens_k", total_k, "k and v have total_k", max_seqlen_k, "max_seqlen_k"))):
        c = both[:, col]
        lengths = np.diff(c)
        if c[0] != 0:
            raise InputError(f"{name} must start at 0; got {int(c[0])}")
        if (lengths < 0).any():
            b = int(np.argmax(lengths < 0))
            raise InputError(f"{name} must be nondecreasing (sequence lengths >= 0); "
                             f"{name}[{b + 1}] = {int(c[b + 1])} < {name}[{b}] = {int(c[b])}")
        if c[-1] != total:
            raise InputError(f"{name} ends at {int(c[-1])} but {what} = {total} rows")
        longest = int(lengths.max())
        if mx is None:
            mx = longest
        elif not _is_int(mx) or mx < longest:
            raise InputError(f"{mx_name} must be an integer no smaller than the longest "
                             f"sequence's {longest} (sequence {int(np.argmax(lengths))}); got "
                             f"{mx!r}")
        maxima.append(int(mx))
    if max(total_q, total_k) >= 2**31:
        raise InputError(f"a packed batch holds fewer than 2**31 rows (int32 cu_seqlens); got "
                         f"total_q = {total_q}, total_k = {total_k}")
    cu = xp.asarray(both.reshape(-1).astype(np.int32))     # cu_q[b], cu_k[b] interleaved
    return cu, (B, *maxima)


def _contiguous(xp, x):
    """A C-contiguous device array of x; 16-byte aligned too, as fa2 reads rows 16 bytes at a
    time (a contiguous view that starts inside an allocation may not be). In the simulator, a
    copy of a read-only array (np.frombuffer, a read-only memmap or view): the simulator copies
    every kernel argument back after the launch, which a read-only array refuses."""
    if not isinstance(x, xp.ndarray):
        x = xp.asarray(x)
    if not x.flags.c_contiguous:
        return xp.ascontiguousarray(x)
    if xp is np and not x.flags.writeable:
        return x.copy()
    if xp is not np and x.data.ptr % 16:
        return x.copy()
    return x


def _laid_out(xp, x):
    """x's layout (nbflash.kernels.common.layouts) when the fa2 and tc kernels can read it in
    place (layouts.in_place), else None; a device array off a 16-byte boundary, or a
    read-only NumPy one (see :func:`_contiguous`), is copied in either layout."""
    if not isinstance(x, xp.ndarray) or (xp is np and not x.flags.writeable):
        return None
    ptr = x.__array_interface__["data"][0] if xp is np else x.data.ptr
    if xp is not np and ptr % 16:
        return None
    return _layouts.in_place(x, x.itemsize, ptr % 16 == 0)   # (NumPy too: as on the GPU)


def _placed(xp, prob, named):
    """The query-shaped and the key-shaped arrays of `named` (q, k, v, and do, o) as the
    impl reads them, and the Problem with their layouts: for an impl whose kernels take
    layouts (nbflash.impls: `layouts`), q where it lies when that is one of them, do and o in
    q's layout, and k and v where they lie when both lie in the same one (copies otherwise:
    contiguous, or in q's layout); for the others contiguous arrays."""
    if not impls.get(prob.impl).layouts:
        return prob, {n: _contiguous(xp, x) for n, x in named.items()}
    found = {n: _laid_out(xp, x) for n, x in named.items()}
    lq = found["q"] or _layouts.BHND
    lk = found["k"] if found["k"] is not None and found["v"] == found["k"] else _layouts.BHND
    out = {}
    for n, x in named.items():
        lay = lq if n in ("q", "do", "o") else lk
        out[n] = x if found[n] == lay else _layouts.into(xp, lay, _contiguous(xp, x))
    return dataclasses.replace(prob, layouts=(lq, lk)), out


def _arrays(named):
    """(xp, to_host, torch, stream, arrays, bf16_dtype): torch tensors and bfloat16 arrays
    viewed as the kernels take them, kinds checked."""
    kind = _one_kind(named)
    torch = kind == "torch"
    stream = 0
    if torch:
        try:
            named, stream = _from_torch(dict(named))
        except (TypeError, BufferError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"a torch tensor could not be taken through DLPack ({exc}); "
                             "nbflash takes float16, float32 and bfloat16 tensors") from exc
        kind = _kind(next(iter(named.values())))
    xp, to_host = _array_module(kind, named)
    bf16_dtype = None
    if not torch:
        named, bf16_dtype = _from_bf16_arrays(named)
        if xp is not np:
            stream = xp.cuda.get_current_stream().ptr
    return xp, to_host, torch, stream, named, bf16_dtype


def _problem(xp, to_host, torch, stream, bf16_dtype, q, k, v, impl, pass_, causal,
             softmax_scale, own, masking, deterministic=False, dims=None, packed=None):
    """The shared checks, then the impl's own (nbflash.impls); returns the Problem. dims:
    (B, H, Nq, Nk, d) when the caller has checked q, k, v already. packed: a packed batch's
    (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), q, k, v its (1, H, total, d)
    views (:func:`check_varlen_forward`)."""
    B, H, Nq, Nk, d = dims or _check_qkv(q, k, v)
    dtype = _name(q)
    d_v = v.shape[3]          # v's head dim: d, or its own
    D = max(d, d_v)           # the kernels' (nbflash.impls.ValuePadding)
    impl = impls.resolve(impl, dtype, D, bool(deterministic))
    _check_own_options(impl, own)
    if d_v != d and not impl.value_dim:
        others = [i.name for i in impls.REGISTRY.values() if i.value_dim]
        raise InputError(f"impl={impl.name!r} takes v with q's head_dim ({d}); got {d_v} (a "
                         f"value head dim of its own runs with {_names(others, ' or ')})")
    _check_takes(impl, dtype, D)
    causal, scale = _check_scalars(causal, softmax_scale, d)
    p, seed, offset = check_dropout(masking["dropout_p"], masking["seed"], masking["offset"])
    _check_deterministic(impl, deterministic, dtype, d)
    H_kv = k.shape[1]
    if packed is not None:
        if not impl.varlen:
            others = [i.name for i in impls.REGISTRY.values() if i.varlen]
            raise InputError(f"impl={impl.name!r} does not take packed variable-length batches "
                             f"(they run with {_names(others, ' or ')})")
        packed = _check_cu_seqlens(xp, *packed, Nq, Nk)
        B = packed[1][0]        # the sequences, for the grids and the ALiBi slopes' shape
    _check_gqa(impl, B, H, H_kv)
    key_lengths = _check_key_lengths(xp, masking["key_lengths"], B, Nk)
    block_mask, block_size = _check_block_mask(xp, masking["block_mask"],
                                               masking["block_size"], B, H, Nq, Nk)
    softcap = check_softcap(impl, masking["softcap"])
    window = check_window(impl, masking["window_size"], causal)
    alibi = _check_alibi(xp, impl, masking["alibi_slopes"], B, H)
    tiles = impl.check(D, pass_, p > 0, **{k: v for k, v in own.items()
                                           if k in impl.own_options}) if impl.check else None
    return Problem(1 if packed else B, H, Nq, Nk, d, q.dtype, causal, scale, impl.name, xp,
                   to_host, tiles, torch, stream, p, seed, offset, key_lengths, block_mask,
                   block_size, bf16_dtype, H_kv, softcap=softcap, window_size=window,
                   alibi_slopes=alibi, packed=packed, d_v=None if d_v == d else d_v)


#: the mask, dropout, softcap, window and ALiBi options of the public functions, and their
#: defaults
MASKING = dict(dropout_p=0.0, seed=None, offset=0, key_lengths=None, block_mask=None,
               block_size=None, softcap=0.0, window_size=(-1, -1), alibi_slopes=None)


def _known_impl(impl):
    if impl != "auto":
        impls.get(impl)    # an unknown name: refused before the arrays are looked at


def check_forward(q, k, v, *, causal, softmax_scale, impl, M=None, block_rule=None,
                  **masking):
    """Check a forward call; returns (Problem, (q, k, v)) with device arrays as the impl reads
    them (:func:`_placed`). `masking`: the options of MASKING."""
    _known_impl(impl)
    xp, to_host, torch, stream, a, bf16_dtype = _arrays({"q": q, "k": k, "v": v})
    q, k, v = a["q"], a["k"], a["v"]
    prob = _problem(xp, to_host, torch, stream, bf16_dtype, q, k, v, impl, "forward", causal,
                    softmax_scale, {"M": M, "block_rule": block_rule}, {**MASKING, **masking})
    prob, a = _placed(xp, prob, {"q": q, "k": k, "v": v})
    return prob, (a["q"], a["k"], a["v"])


def _check_forward_outputs(do, o, lse, q, want, q_axes, lse_name, lse_shape):
    """do and o of o's shape `want` (q's `q_axes`, v's head_dim) and q's dtype, lse float32 of
    `lse_shape` (named `lse_name`), as the forward returned them."""
    for name, x in (("do", do), ("o", o)):
        if tuple(x.shape) != want:
            raise InputError(f"{name} has shape {tuple(x.shape)}; expected o's {want} (q's "
                             f"{q_axes}, v's head_dim)")
        if x.dtype != q.dtype:
            raise InputError(f"{name} has dtype {_name(x)}; expected q's {_name(q)}")
    if tuple(lse.shape) != tuple(lse_shape):
        raise InputError(f"lse has shape {tuple(lse.shape)}; expected {lse_name} = "
                         f"{tuple(lse_shape)}")
    if lse.dtype != np.float32:
        raise InputError(f"lse has dtype {lse.dtype}; expected float32, as the forward returns")


def check_backward(do, q, k, v, o, lse, *, causal, softmax_scale, impl, M=None,
                   block_rule=None, deterministic=False, **masking):
    """Check a backward call; returns (Problem, (do, q, k, v, o, lse)), the arrays as the impl
    reads them (:func:`_placed`; lse contiguous)."""
    _known_impl(impl)
    if not isinstance(deterministic, (bool, np.bool_)):
        raise InputError(f"deterministic must be True or False; got {deterministic!r}")
    xp, to_host, torch, stream, a, bf16_dtype = _arrays(
        {"do": do, "q": q, "k": k, "v": v, "o": o, "lse": lse})
    do, q, k, v, o, lse = (a[n] for n in ("do", "q", "k", "v", "o", "lse"))
    B, H, Nq, Nk, d = _check_qkv(q, k, v)
    _check_forward_outputs(do, o, lse, q, tuple(q.shape[:3]) + (v.shape[3],),
                           "batch, heads and rows", "(B, H, Nq)", (B, H, Nq))
    prob = _problem(xp, to_host, torch, stream, bf16_dtype, q, k, v, impl, "backward", causal,
                    softmax_scale, {"M": M, "block_rule": block_rule}, {**MASKING, **masking},
                    deterministic, (B, H, Nq, Nk, d))
    prob, a = _placed(xp, prob, {"do": do, "q": q, "k": k, "v": v, "o": o})
    return prob, (*(a[n] for n in ("do", "q", "k", "v", "o")), _contiguous(xp, lse))


def _check_packed(q, k, v):
    """The shapes of a packed variable-length batch's q (total_q, H, d), k and v (total_k, H_kv,
    d), named as FlashAttention's varlen functions name them."""
    for name, x, rows in (("q", q, "total_q"), ("k", k, "total_k"), ("v", v, "total_k")):
        if x.ndim != 3:
            raise InputError(f"{name} has {x.ndim} dimensions, shape {tuple(x.shape)}; a packed "
                             f"batch's are 3: ({rows}, heads, head_dim)")
    if k.shape[0] != v.shape[0]:
        raise InputError(f"k and v must have the same rows (total_k); got {k.shape[0]} and "
                         f"{v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise InputError(f"k and v must have the same number of heads; got {k.shape[1]} and "
                         f"{v.shape[1]} (k {tuple(k.shape)}, v {tuple(v.shape)})")
    if k.shape[2] != q.shape[2]:
        raise InputError(f"head_dim of k is {k.shape[2]} but head_dim of q is {q.shape[2]} "
                         f"(q {tuple(q.shape)}, k {tuple(k.shape)})")
    H, H_kv = q.shape[1], k.shape[1]
    for what, n in (("heads", H), ("heads of k and v", H_kv), ("head_dim", q.shape[2]),
                    ("head_dim of v", v.shape[2])):
        if n == 0:
            raise InputError(f"{what} is 0: nothing to attend (q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)})")
    if H % H_kv:
        raise InputError(f"heads of k and v ({H_kv}) must divide heads of q ({H}): query head "
                         f"h reads key/value head h // (H / H_kv) (grouped-query attention; "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)})")


def check_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                         causal, softmax_scale, impl, **masking):
    """Check a packed variable-length forward call; returns (Problem, (q, k, v)), the arrays
    (1, H, total, d) views (layouts.batch_view) as the impl reads them. `masking`: dropout_p,
    seed, offset, softcap, window_size, alibi_slopes ((H,) or (B, H) for the B sequences)."""
    _known_impl(impl)
    xp, to_host, torch, stream, a, bf16_dtype = _arrays({"q": q, "k": k, "v": v})
    _check_packed(a["q"], a["k"], a["v"])
    q, k, v = (_layouts.batch_view(a[n]) for n in ("q", "k", "v"))
    prob = _problem(xp, to_host, torch, stream, bf16_dtype, q, k, v, impl, "forward", causal,
                    softmax_scale, {"M": None, "block_rule": None}, {**MASKING, **masking},
                    dims=_check_qkv(q, k, v, empty_rows=True),
                    packed=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    prob, a = _placed(xp, prob, {"q": q, "k": k, "v": v})
    return prob, (a["q"], a["k"], a["v"])


def check_varlen_backward(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, *, causal, softmax_scale, impl, deterministic=False,
                          **masking):
    """Check a packed variable-length backward call (do, o as q; lse (H, total_q) float32);
    returns (Problem, (do, q, k, v, o, lse)) as :func:`check_backward` does, the arrays as
    (1, H, total, d) and (1, H, total_q) views."""
    _known_impl(impl)
    if not isinstance(deterministic, (bool, np.bool_)):
        raise InputError(f"deterministic must be True or False; got {deterministic!r}")
    xp, to_host, torch, stream, a, bf16_dtype = _arrays(
        {"do": do, "q": q, "k": k, "v": v, "o": o, "lse": lse})
    _check_packed(a["q"], a["k"], a["v"])
    q = a["q"]
    _check_forward_outputs(a["do"], a["o"], a["lse"], q, tuple(q.shape[:2]) + (a["v"].shape[2],),
                           "rows and heads", "(H, total_q)", (q.shape[1], q.shape[0]))
    lse = a["lse"]
    do, q, k, v, o = (_layouts.batch_view(a[n]) for n in ("do", "q", "k", "v", "o"))
    prob = _problem(xp, to_host, torch, stream, bf16_dtype, q, k, v, impl, "backward", causal,
                    softmax_scale, {"M": None, "block_rule": None}, {**MASKING, **masking},
                    deterministic, _check_qkv(q, k, v, empty_rows=True),
                    packed=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    prob, a = _placed(xp, prob, {"do": do, "q": q, "k": k, "v": v, "o": o})
    return prob, (*(a[n] for n in ("do", "q", "k", "v", "o")), _contiguous(xp, lse[None]))
