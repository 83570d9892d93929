"""The one place that checks inputs: shapes, dtypes, array kinds, options, kernel limits.

Everything here runs before any kernel; kernels never re-check what this module checked.
Arrays are CuPy on the GPU and NumPy in the simulator. On the GPU, NumPy inputs are also taken
(copied to the device, results copied back) as a convenience; CuPy arrays in the simulator are
refused with a message saying so. torch tensors (CUDA tensors on the GPU, CPU tensors in the
simulator) are taken without a copy through DLPack, run on torch's current stream, and the
results come back as torch tensors; torch is only imported when such a tensor arrives.
"""

import contextlib
import functools
import math
from dataclasses import dataclass

import numpy as np

from . import rng, sparsity, tiling
from ._cuda import MODE

IMPLS = ("auto", "naive", "fa1", "fa2", "tc")
#: what impl="auto" runs: fa2, the FlashAttention kernel that takes every dtype and option
AUTO = "fa2"
DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
#: bfloat16 data: torch bfloat16 tensors arrive as their bits, uint16 arrays (impl="tc" only)
BF16_BITS = np.dtype(np.uint16)
#: Largest head dim each kernel family takes: what the tests cover (on the GPU up to 128).
MAX_HEAD_DIM = {"fa1": 128, "fa2": 128, "tc": tiling.TC_MAX_HEAD_DIM}


class InputError(ValueError):
    """An input nbflash cannot take; the message names the argument and the problem."""


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
    tiles: object = None   # tiling.Tiles for fa1
    torch: bool = False    # inputs were torch tensors: return torch tensors
    stream: int = 0        # the CUDA stream kernels are launched on
    dropout_p: float = 0.0
    seed: int = 0
    offset: int = 0
    key_lengths: object = None   # int32 (B,) device array
    block_mask: object = None    # uint8 (B or 1, H or 1, n_q_blocks, n_k_blocks) device array
    block_size: tuple = None     # (bq, bk)

    @property
    def dtype_name(self):
        """"float16", "float32", or "bfloat16" (whose arrays hold its bits as uint16)."""
        return "bfloat16" if self.dtype == BF16_BITS else str(self.dtype)

    def masking(self):
        """The mask and dropout options, as nbflash.naive takes them."""
        return dict(dropout_p=self.dropout_p, seed=self.seed, offset=self.offset,
                    key_lengths=self.key_lengths, block_mask=self.block_mask,
                    block_size=self.block_size)

    def stream_context(self):
        """On torch's current stream when the inputs were torch tensors (so that CuPy's
        allocations and the kernels are ordered with the caller's torch work)."""
        if self.torch and MODE == "gpu":
            import cupy  # noqa: PLC0415
            return cupy.cuda.ExternalStream(self.stream)
        return contextlib.nullcontext()

    def outputs(self, arrays):
        """Results in the kind of array the caller passed."""
        if self.to_host:
            return tuple(self.xp.asnumpy(a) for a in arrays)
        if self.torch:
            import torch  # noqa: PLC0415
            return tuple(torch.from_dlpack(a).view(torch.bfloat16) if a.dtype == BF16_BITS
                         else torch.from_dlpack(a) for a in arrays)
        return arrays


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


def _check_impl(impl, tiles_opts):
    if impl not in IMPLS:
        raise InputError(f"impl={impl!r} is not an implementation; use one of {IMPLS}")
    impl = AUTO if impl == "auto" else impl
    if impl != "fa1" and any(v is not None for v in tiles_opts.values()):
        given = ", ".join(k for k, v in tiles_opts.items() if v is not None)
        raise InputError(f"{given} only apply to impl='fa1' (got impl={impl!r})")
    if impl != "naive" and MODE == "compile":
        raise InputError(
            "NBFLASH_DEVICE=compile builds kernels for inspection but cannot run them; use "
            "NBFLASH_DEVICE=gpu or sim (or impl='naive')")
    return impl


def _check_qkv(q, k, v, torch=False):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise InputError(
                f"{name} has {x.ndim} dimensions, shape {tuple(x.shape)}; expected 4: "
                "(batch, heads, seqlen, head_dim)")
        if x.dtype not in DTYPES and not (torch and x.dtype == BF16_BITS):
            raise InputError(f"{name} has dtype {x.dtype}, which nbflash does not support; "
                             "use float16 or float32 (or bfloat16 torch tensors with impl='tc')")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k, v must share one dtype; got {_name(q)}, {_name(k)}, {_name(v)}")
    B, H, Nq, d = q.shape
    for name, x in (("k", k), ("v", v)):
        for axis, what in ((0, "batch"), (1, "heads"), (3, "head_dim")):
            if x.shape[axis] != q.shape[axis]:
                raise InputError(f"{what} of {name} is {x.shape[axis]} but {what} of q is "
                                 f"{q.shape[axis]} (q {tuple(q.shape)}, {name} {tuple(x.shape)})")
    if k.shape[2] != v.shape[2]:
        raise InputError(f"k and v must have the same seqlen; got {k.shape[2]} and {v.shape[2]}")
    Nk = k.shape[2]
    for what, n in (("batch", B), ("heads", H), ("seqlen of q (Nq)", Nq),
                    ("seqlen of k and v (Nk)", Nk), ("head_dim", d)):
        if n == 0:
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


def _check_tc(d, dtype, pass_, dropout=False, deterministic=False):
    """What the tensor-core kernels take: 16-bit inputs, head dims that are multiples of 16 up
    to MAX_HEAD_DIM["tc"], dQ by atomics; and their shared memory."""
    if dtype not in (np.dtype(np.float16), BF16_BITS):
        raise InputError(f"impl='tc' runs on tensor cores, which take float16 or bfloat16; got "
                         f"{dtype} (use impl='fa2' for float32)")
    limit = MAX_HEAD_DIM["tc"]
    if d % 16 or d > limit:
        raise InputError(f"impl='tc' takes head_dim a multiple of 16 up to {limit} (the "
                         f"tensor-core tiles are 16 wide); got {d}; impl='fa2' takes any "
                         f"head_dim up to {MAX_HEAD_DIM['fa2']}")
    if deterministic:
        raise InputError("impl='tc' adds dq with atomics and has no deterministic pass; use "
                         "impl='fa2' with deterministic=True for bitwise reproducible dq")
    _check_smem("tc", ("forward",) if pass_ == "forward" else ("dkdv",), d, dropout)


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_dropout(dropout_p, seed, offset):
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


@functools.lru_cache(maxsize=None)
def _check_fa2(d, pass_, dropout=False):
    """fa2's head-dim limit, and its tiles' shared memory (with dropout's keep bits) against
    what a block may opt in to."""
    limit = MAX_HEAD_DIM["fa2"]
    if d > limit:
        raise InputError(f"head_dim {d} is above fa2's limit of {limit}")
    _check_smem("fa2", ("forward",) if pass_ == "forward" else ("dkdv", "dq"), d, dropout)


def _check_smem(impl, kernels, d, dropout):
    """On the GPU: the default tiles' shared memory of each of `impl`'s `kernels` at head dim d
    (with dropout's keep bits) against what a block may opt in to."""
    if MODE != "gpu":
        return
    from .kernels import launch  # noqa: PLC0415
    tiles_of = launch.tc_tiles if impl == "tc" else launch.fa2_tiles
    most = _smem_optin()
    for kernel in kernels:
        need = tiles_of(kernel, d).smem_bytes(kernel, dropout)
        if need > most:
            raise InputError(f"{impl}'s {kernel} kernel at head_dim {d} needs {need} bytes of "
                             f"shared memory; this GPU gives a block at most {most}")


@functools.lru_cache(maxsize=None)
def _smem_optin():
    from ._cuda import cuda  # noqa: PLC0415
    return cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN


def _check_tiles(impl, d, pass_, M, block_rule, dropout=False):
    if impl == "fa2":
        _check_fa2(d, pass_, dropout)
        return None
    if impl != "fa1":
        return None
    from .kernels.launch import DEFAULT_THREADS  # noqa: PLC0415  (fa1 only)
    limit = MAX_HEAD_DIM["fa1"]
    if d > limit:
        raise InputError(f"head_dim {d} is above fa1's limit of {limit}")
    rule = "paper" if block_rule is None else block_rule
    if rule not in tiling.RULES:
        raise InputError(f"block_rule={block_rule!r} is not a rule; use one of {tiling.RULES}")
    if M is None:
        M = tiling.default_M(d, pass_, rule, _smem_limit())
    elif isinstance(M, bool) or not isinstance(M, (int, np.integer)) or M < 1:
        raise InputError(f"M (on-chip memory in elements) must be a positive integer; got {M!r}")
    tiles = tiling.tiles_for(int(M), d, rule, DEFAULT_THREADS)
    need, limit = tiles.smem_bytes(pass_), _smem_limit()
    if need > limit:
        raise InputError(
            f"M={M} gives Br={tiles.Br}, Bc={tiles.Bc} at head_dim {d}, and the fa1 {pass_} "
            f"kernel would need {need} bytes of shared memory, above the {limit} a block "
            f"gets; use a smaller M (default: largest that fits, "
            f"{tiling.default_M(d, pass_, rule, limit)})")
    return tiles


def _smem_limit():
    """Static shared memory a block gets: the device's figure on a GPU (48 KB on every CUDA GPU
    since Volta), at most the 48 KB static shared arrays may use."""
    if MODE != "gpu":
        return tiling.STATIC_SMEM_BYTES
    from ._cuda import cuda  # noqa: PLC0415
    return min(tiling.STATIC_SMEM_BYTES, cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK)


def _contiguous(xp, x):
    """A C-contiguous device array of x; 16-byte aligned too, as fa2 reads rows 16 bytes at a
    time (a contiguous view that starts inside an allocation may not be)."""
    if not isinstance(x, xp.ndarray):
        x = xp.asarray(x)
    if not x.flags.c_contiguous:
        return xp.ascontiguousarray(x)
    if xp is not np and x.data.ptr % 16:
        return x.copy()
    return x


def _arrays(named):
    """(xp, to_host, torch, stream, arrays): torch tensors converted, kinds checked."""
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
                             "nbflash takes float16 and float32 tensors") from exc
        kind = _kind(next(iter(named.values())))
    xp, to_host = _array_module(kind, named)
    if not torch and xp is not np:
        stream = xp.cuda.get_current_stream().ptr
    return xp, to_host, torch, stream, named


def _problem(xp, to_host, torch, stream, q, k, v, impl, pass_, causal, softmax_scale, M,
             block_rule, masking, deterministic=False):
    B, H, Nq, Nk, d = _check_qkv(q, k, v, torch)
    if q.dtype == BF16_BITS and impl != "tc":
        raise InputError(f"bfloat16 inputs run with impl='tc' only (got impl={impl!r})")
    causal, scale = _check_scalars(causal, softmax_scale, d)
    p, seed, offset = _check_dropout(masking["dropout_p"], masking["seed"], masking["offset"])
    if impl == "tc":
        _check_tc(d, q.dtype, pass_, p > 0, deterministic)
    key_lengths = _check_key_lengths(xp, masking["key_lengths"], B, Nk)
    block_mask, block_size = _check_block_mask(xp, masking["block_mask"],
                                               masking["block_size"], B, H, Nq, Nk)
    tiles = _check_tiles(impl, d, pass_, M, block_rule, p > 0)
    return Problem(B, H, Nq, Nk, d, q.dtype, causal, scale, impl, xp, to_host, tiles, torch,
                   stream, p, seed, offset, key_lengths, block_mask, block_size)


#: the mask and dropout options of the public functions, and their defaults
MASKING = dict(dropout_p=0.0, seed=None, offset=0, key_lengths=None, block_mask=None,
               block_size=None)


def check_forward(q, k, v, *, causal, softmax_scale, impl, M=None, block_rule=None,
                  **masking):
    """Check a forward call; returns (Problem, (q, k, v)) with contiguous device arrays.
    `masking`: the options of MASKING."""
    impl = _check_impl(impl, {"M": M, "block_rule": block_rule})
    xp, to_host, torch, stream, a = _arrays({"q": q, "k": k, "v": v})
    q, k, v = a["q"], a["k"], a["v"]
    prob = _problem(xp, to_host, torch, stream, q, k, v, impl, "forward", causal,
                    softmax_scale, M, block_rule, {**MASKING, **masking})
    return prob, tuple(_contiguous(xp, x) for x in (q, k, v))


def check_backward(do, q, k, v, o, lse, *, causal, softmax_scale, impl, M=None,
                   block_rule=None, deterministic=False, **masking):
    """Check a backward call; returns (Problem, (do, q, k, v, o, lse)) as contiguous arrays."""
    impl = _check_impl(impl, {"M": M, "block_rule": block_rule})
    if not isinstance(deterministic, (bool, np.bool_)):
        raise InputError(f"deterministic must be True or False; got {deterministic!r}")
    xp, to_host, torch, stream, a = _arrays(
        {"do": do, "q": q, "k": k, "v": v, "o": o, "lse": lse})
    do, q, k, v, o, lse = (a[n] for n in ("do", "q", "k", "v", "o", "lse"))
    B, H, Nq, Nk, d = _check_qkv(q, k, v, torch)
    for name, x in (("do", do), ("o", o)):
        if tuple(x.shape) != tuple(q.shape):
            raise InputError(f"{name} has shape {tuple(x.shape)}; expected q's {tuple(q.shape)}")
        if x.dtype != q.dtype:
            raise InputError(f"{name} has dtype {_name(x)}; expected q's {_name(q)}")
    if tuple(lse.shape) != (B, H, Nq):
        raise InputError(f"lse has shape {tuple(lse.shape)}; expected (B, H, Nq) = {(B, H, Nq)}")
    if lse.dtype != np.float32:
        raise InputError(f"lse has dtype {lse.dtype}; expected float32, as the forward returns")
    prob = _problem(xp, to_host, torch, stream, q, k, v, impl, "backward", causal,
                    softmax_scale, M, block_rule, {**MASKING, **masking}, deterministic)
    return prob, tuple(_contiguous(xp, x) for x in (do, q, k, v, o, lse))
