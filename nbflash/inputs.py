"""The one place that checks inputs: shapes, dtypes, array kinds, options, kernel limits.

Everything here runs before any kernel; kernels never re-check what this module checked.
Arrays are CuPy on the GPU and NumPy in the simulator. On the GPU, NumPy inputs are also taken
(copied to the device, results copied back) as a convenience; CuPy arrays in the simulator are
refused with a message saying so.
"""

import math
from dataclasses import dataclass

import numpy as np

from . import tiling
from ._cuda import MODE

IMPLS = ("auto", "naive", "fa1")
DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
#: Largest head dim each kernel family takes: what the tests cover (fa1 on the GPU up to 128).
MAX_HEAD_DIM = {"fa1": 128}


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


def _kind(x):
    mod = type(x).__module__.split(".")[0]
    if isinstance(x, np.ndarray):
        return "numpy"
    if mod == "cupy":
        return "cupy"
    return f"{type(x).__module__}.{type(x).__qualname__}"


def _array_module(named):
    """Check that all arrays are of one kind the device mode takes; return (xp, to_host)."""
    kinds = {name: _kind(x) for name, x in named.items()}
    for name, kind in kinds.items():
        if kind not in ("numpy", "cupy"):
            raise InputError(
                f"{name} is a {kind}; nbflash takes CuPy arrays on the GPU and NumPy arrays in "
                "the simulator")
    if len(set(kinds.values())) > 1:
        desc = ", ".join(f"{n} is {k}" for n, k in kinds.items())
        raise InputError(f"arrays must all be of one kind: {desc}")
    kind = next(iter(kinds.values()))
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
    impl = "fa1" if impl == "auto" else impl
    if impl != "fa1" and any(v is not None for v in tiles_opts.values()):
        given = ", ".join(k for k, v in tiles_opts.items() if v is not None)
        raise InputError(f"{given} only apply to impl='fa1' (got impl={impl!r})")
    if impl == "fa1" and MODE == "compile":
        raise InputError(
            "NBFLASH_DEVICE=compile builds kernels for inspection but cannot run them; use "
            "NBFLASH_DEVICE=gpu or sim (or impl='naive')")
    return impl


def _check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise InputError(
                f"{name} has {x.ndim} dimensions, shape {tuple(x.shape)}; expected 4: "
                "(batch, heads, seqlen, head_dim)")
        if x.dtype not in DTYPES:
            raise InputError(f"{name} has dtype {x.dtype}, which nbflash does not support; "
                             "use float16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
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


def _check_tiles(impl, d, pass_, M, block_rule):
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
    return xp.ascontiguousarray(xp.asarray(x))


def check_forward(q, k, v, *, causal, softmax_scale, impl, M=None, block_rule=None):
    """Check a forward call; returns (Problem, (q, k, v)) with contiguous device arrays."""
    impl = _check_impl(impl, {"M": M, "block_rule": block_rule})
    xp, to_host = _array_module({"q": q, "k": k, "v": v})
    B, H, Nq, Nk, d = _check_qkv(q, k, v)
    causal, scale = _check_scalars(causal, softmax_scale, d)
    tiles = _check_tiles(impl, d, "forward", M, block_rule)
    prob = Problem(B, H, Nq, Nk, d, q.dtype, causal, scale, impl, xp, to_host, tiles)
    return prob, tuple(_contiguous(xp, x) for x in (q, k, v))


def check_backward(do, q, k, v, o, lse, *, causal, softmax_scale, impl, M=None,
                   block_rule=None):
    """Check a backward call; returns (Problem, (do, q, k, v, o, lse)) as contiguous arrays."""
    impl = _check_impl(impl, {"M": M, "block_rule": block_rule})
    xp, to_host = _array_module({"do": do, "q": q, "k": k, "v": v, "o": o, "lse": lse})
    B, H, Nq, Nk, d = _check_qkv(q, k, v)
    for name, x in (("do", do), ("o", o)):
        if tuple(x.shape) != tuple(q.shape):
            raise InputError(f"{name} has shape {tuple(x.shape)}; expected q's {tuple(q.shape)}")
        if x.dtype != q.dtype:
            raise InputError(f"{name} has dtype {x.dtype}; expected q's {q.dtype}")
    if tuple(lse.shape) != (B, H, Nq):
        raise InputError(f"lse has shape {tuple(lse.shape)}; expected (B, H, Nq) = {(B, H, Nq)}")
    if lse.dtype != np.float32:
        raise InputError(f"lse has dtype {lse.dtype}; expected float32, as the forward returns")
    causal, scale = _check_scalars(causal, softmax_scale, d)
    tiles = _check_tiles(impl, d, "backward", M, block_rule)
    prob = Problem(B, H, Nq, Nk, d, q.dtype, causal, scale, impl, xp, to_host, tiles)
    return prob, tuple(_contiguous(xp, x) for x in (do, q, k, v, o, lse))
