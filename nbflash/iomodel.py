"""HBM traffic: the bytes each algorithm reads from and writes to global memory, modelled from
its loop structure, and counted in Numba's CUDA simulator.

    import nbflash.iomodel as io
    t = io.hbm_bytes("fa1", "fwd", B, H, Nq, Nk, d, "float16", causal=True)
    t.read, t.write, t.atomic, t.kernels        # bytes; per kernel: name -> IO
    with io.count() as c:                       # NBFLASH_DEVICE=sim
        nbflash.attention_forward(q, k, v, causal=True, impl="fa1")
    assert c.traffic == io.hbm_bytes("fa1", "fwd", ..., causal=True)

**The model** (:func:`hbm_bytes`) counts, for every kernel, every element of every array it
loads or stores in global memory, kernel by kernel and array by array (:class:`Traffic`), as
the kernels' loops visit them: the FlashAttention paper's Algorithms 1 (forward) and 4
(backward) for ``fa1`` (nbflash.kernels.fa1, the line numbers below are the paper's), the
FlashAttention-2 kernels for ``fa2`` (nbflash.kernels.fa2), and, for ``naive``, the array
operations of nbflash.naive (standard attention, as a CuPy user writes it). It covers ragged
lengths (the last block of a sequence is short) and causal block skipping (bottom-right
aligned) exactly. Block sizes are the kernels': fa1's (Br, Bc) from M and the block rule
(nbflash.kernels.fa1.tiles.block_sizes; M=None: the largest whose kernel fits 48 KB of shared
memory, default_M, as fa1's checks choose it), fa2's RegTiles from the table its plan uses on
this device (nbflash.kernels.fa2.tiles: GPU_TILES on a GPU, SIM_TILES, 8 x 8 blocks, in the
simulator) unless `tiles` says otherwise. Dropout, key_lengths and block masks are
not modelled (an error).

Statistics are float32 whatever the input dtype: fa1's running m and ℓ (B, H, Nq), lse, fa2's D
(``delta``); so are the float32 accumulators fa1 keeps in HBM (``o_acc``, ``dq_acc``) and fa2's
atomic dQ (``dq_acc``). q, k, v, o, do and the gradients are in the input dtype.

**The counter** (:func:`count`) records what simulated kernels actually move
(nbflash._cuda.count_global_memory): an element load or store counts its itemsize, a store to a
slice the slice's bytes, a view nothing until its elements are read or written, an atomic add its
itemsize once (as ``atomic``); shared and local memory are not counted. One rule is about
hardware: loads of the same element by threads of one block between two barriers count once (a
broadcast, which a warp serves with one request and L1 serves to the block's other warps); the
repeats are reported apart (:attr:`Count.merged`). The option-free kernels make no such
repeated loads (merged is 0, the tests check it), so counting per thread would give the same
numbers today; the rule keeps the count meaningful where a kernel broadcasts (every thread
reads key_lengths[b] with key padding, and the block mask with block-sparse attention), where a
per-thread count would charge a block's T threads for one 4-byte request.

**Against hardware** (experiments/ncu.py, README): the model counts the bytes the SMs' global
load, store and atomic instructions move, which Nsight Compute reports as
``sm__sass_data_bytes_mem_global_op_*``: on the H200 the two were equal to the byte for fa1 and
fa2 at every size measured. What reaches L2 (``lts__t_sectors_srcunit_tex_op_*`` x 32 bytes) is
that rounded up to whole 32-byte sectors (fa2's float16 stores of O and its dQ atomics touch
sectors partly, so L2 sees 2-4x their bytes), less what L1 catches. DRAM traffic
(``dram__bytes_*``) is lower still while L2 (60 MB on an H200) serves repeated reads of K, V (and
fa1's Q_i, O_i) by different blocks.

**The paper's bounds** (Theorem 2): standard attention makes Θ(Nd + N²) HBM accesses,
FlashAttention Θ(N²d²/M); :func:`theorem2_standard` and :func:`theorem2_flash` give those
forms without constants (a caller fits them to measurements).
"""

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .kernels.common import masks
from .kernels.fa1 import tiles as fa1_tiles
from .kernels.fa2 import tiles as fa2_table

F32 = 4          # bytes of a float32: statistics and accumulators
PASSES = ("fwd", "bwd", "fwdbwd")
IMPLS = ("fa1", "fa2", "naive")
#: prefix of the parts of a Traffic that are array operations (CuPy/NumPy), not nbflash kernels
ARRAY_OP = "array op: "


class IO(NamedTuple):
    """Bytes read, written and atomically updated (``+`` adds them)."""

    read: int = 0
    write: int = 0
    atomic: int = 0

    def __add__(self, other):
        return IO(*(a + b for a, b in zip(self, other)))

    def __mul__(self, n):
        return IO(*(a * n for a in self))

    @property
    def total(self):
        return self.read + self.write + self.atomic


@dataclass(frozen=True, eq=False)
class Traffic:
    """HBM bytes of a pass: ``parts[name][array]`` is an :class:`IO`, `name` a kernel's function
    name (``fa1_forward``, ``fa2_dkdv``, ...) or ``ARRAY_OP + label`` for an array operation,
    `array` the kernel's parameter name. Zero entries are left out, so two Traffics are equal
    when every kernel moved the same bytes of every array."""

    parts: dict

    def __post_init__(self):
        clean = {n: {a: IO(*x) for a, x in arrays.items() if any(x)}
                 for n, arrays in self.parts.items()}
        object.__setattr__(self, "parts", {n: a for n, a in clean.items() if a})

    def __eq__(self, other):
        return isinstance(other, Traffic) and self.parts == other.parts

    def __add__(self, other):
        parts = {n: dict(a) for n, a in self.parts.items()}
        for n, arrays in other.parts.items():
            for a, x in arrays.items():
                parts.setdefault(n, {})[a] = parts.get(n, {}).get(a, IO()) + x
        return Traffic(parts)

    @property
    def kernels(self):
        """Bytes per part (kernel or array operation): name -> IO."""
        return {n: sum(a.values(), IO()) for n, a in self.parts.items()}

    @property
    def io(self):
        return sum(self.kernels.values(), IO())

    read = property(lambda self: self.io.read)
    write = property(lambda self: self.io.write)
    atomic = property(lambda self: self.io.atomic)
    total = property(lambda self: self.io.total)

    def kernels_only(self):
        """The parts that are nbflash kernels (what the simulator counter sees)."""
        return Traffic({n: a for n, a in self.parts.items() if not n.startswith(ARRAY_OP)})

    def __repr__(self):
        return f"Traffic(read={self.read}, write={self.write}, atomic={self.atomic}, " \
               f"kernels={self.kernels})"


def _scaled(arrays, n):
    return {a: IO(*x) * n for a, x in arrays.items()}


def _key_blocks(row0, rows, Nq, Nk, C, causal):
    """How many key blocks of C keys, from the first, the query rows row0 .. row0+rows-1 walk:
    all ceil(Nk/C), or with causal masking those up to the last key the last row sees. The
    kernels' own rule (masks.key_range, run here as Python, without key padding or a window):
    fa2 walks these blocks, and they are the blocks Alg. 1 line 8's loop does not skip in fa1
    (masks.block_hidden)."""
    first, end = masks.key_range.py_func(row0, rows, C, Nq, Nk, Nk, causal, False, 0, 0)
    return max(0, end - first)


def _rows(n, block, i):
    """Rows of block i of `block` rows in a sequence of n (the last one may be short)."""
    return min(block, n - i * block)


def _fa1_steps(Nq, Nk, Br, Bc, causal):
    """Query rows summed over the (i, j) blocks that Algorithm 1 (and 4) compute, i.e. do not
    skip: each of them loads Q_i (and more) once."""
    return sum(_rows(Nq, Br, i) * _key_blocks(i * Br, Br, Nq, Nk, Bc, causal)
               for i in range(-(-Nq // Br)))


# ---------------------------------------------------------------------------------- fa1

def fa1_blocks(d, pass_, M=None, block_rule="paper"):
    """(Br, Bc) of the fa1 kernel of `pass_` ("forward" or "backward") for on-chip memory M
    (None: the input checks' default, the largest M whose kernel fits 48 KB)."""
    if M is None:
        M = fa1_tiles.default_M(d, pass_, block_rule, fa1_tiles.STATIC_SMEM_BYTES)
    return fa1_tiles.block_sizes(M, d, block_rule)


def fa1_forward(Nq, Nk, d, s, causal, Br, Bc):
    """Algorithm 1 (nbflash.kernels.fa1.make_forward), per head: {array: IO}. s: bytes of an
    element of q, k, v, o. o_acc is the float32 running O (the output itself for float32)."""
    steps = _fa1_steps(Nq, Nk, Br, Bc, causal)   # Σ rows of Q_i over computed blocks (i, j)
    cast = s != F32
    seen = min(Nq, Nk) if causal else Nq     # rows that see a key: ℓ > 0 at the end
    return {
        "k": IO(read=Nk * d * s),                 # line 7: K_j, once per outer step j
        "v": IO(read=Nk * d * s),                 # line 7: V_j
        "q": IO(read=steps * d * s),              # line 9: Q_i at every step (i, j)
        "o_acc": IO(read=steps * d * F32          # line 9: O_i at every step
                    + (Nq * d * F32 if cast else 0),      # epilogue: O into the output dtype
                    write=Nq * d * F32            # line 3: O = 0
                    + steps * d * F32),           # line 13: O_i written back
        "m": IO(read=steps * F32 + seen * F32,    # line 9: m_i; epilogue: lse = m + log ℓ
                write=Nq * F32 + steps * F32      # line 3: m = -inf; line 14: m_i
                + Nq * F32),                      # epilogue: m holds lse
        "l": IO(read=steps * F32 + Nq * F32,      # line 9: ℓ_i; epilogue
                write=Nq * F32 + steps * F32),    # line 3: ℓ = 0; line 14: ℓ_i
        "o": IO(write=Nq * d * s if cast else 0),  # epilogue: the output in its dtype
    }


def fa1_backward(Nq, Nk, d, s, causal, Br, Bc):
    """Algorithm 4 (nbflash.kernels.fa1.make_backward), per head: {array: IO}. nbflash saves
    lse = m + log ℓ instead of m and ℓ, so each step reads one float32 per row, not two."""
    steps = _fa1_steps(Nq, Nk, Br, Bc, causal)
    cast = s != F32
    return {
        "k": IO(read=Nk * d * s),                 # line 8: K_j, once per outer step j
        "v": IO(read=Nk * d * s),                 # line 8: V_j
        "q": IO(read=steps * d * s),              # line 11: Q_i at every step (i, j)
        "do": IO(read=steps * d * s),             # line 11: dO_i
        "o": IO(read=steps * d * s),              # line 20 (loaded with line 11): O_i for D_i
        "lse": IO(read=steps * F32),              # line 11: ℓ_i, m_i, as lse_i
        "dq_acc": IO(read=steps * d * F32         # line 22: dQ_i read,
                     + (Nq * d * F32 if cast else 0),     # epilogue: dQ into the output dtype
                     write=Nq * d * F32           # line 6: dQ = 0
                     + steps * d * F32),          # line 22: ... and written back
        "dq": IO(write=Nq * d * s if cast else 0),  # epilogue
        "dk": IO(write=Nk * d * s),               # line 25: dK_j, once per j
        "dv": IO(write=Nk * d * s),               # line 25: dV_j
    }


# ---------------------------------------------------------------------------------- fa2

def fa2_tiles(kernel, d, tiles=None):
    """The RegTiles of fa2 `kernel` ("forward", "dkdv", "dq") at head dim d: from `tiles` (a
    {kernel: RegTiles} dict, or a table like nbflash.kernels.fa2.tiles.GPU_TILES), else what
    its plan uses on this device (nbflash.kernels.fa2.tiles.tiles)."""
    t = (tiles or {}).get(kernel)
    if isinstance(t, fa2_table.RegTiles):
        return t
    if isinstance(t, dict):
        return fa2_table.tiles(kernel, d, tiles)
    return fa2_table.tiles(kernel, d)      # as the plan picks them


def _fa2_key_rows(Nq, Nk, R, C, causal):
    """Key rows loaded, summed over the blocks of R query rows that walk key blocks of C."""
    return sum(min(_key_blocks(i * R, R, Nq, Nk, C, causal) * C, Nk)
               for i in range(-(-Nq // R)))


def fa2_forward(Nq, Nk, d, s, causal, t):
    """FA2 Algorithm 1 (fa2.make_forward), per head: one block per R query rows loads Q_i once,
    walks the key blocks it sees (K_j, V_j each), writes O_i and lse_i once."""
    kv = _fa2_key_rows(Nq, Nk, t.R, t.C, causal) * d * s
    return {"q": IO(read=Nq * d * s), "k": IO(read=kv), "v": IO(read=kv),
            "o": IO(write=Nq * d * s), "lse": IO(write=Nq * F32)}


def fa2_delta(Nq, d, s, atomic):
    """D = rowsum(dO ∘ O) (FA2 Algorithm 2 line 4; fa2.make_delta), per head; it also zeroes
    the float32 dQ accumulator when dQ is added by atomics."""
    return {"o": IO(read=Nq * d * s), "do": IO(read=Nq * d * s), "delta": IO(write=Nq * F32),
            "dq_acc": IO(write=Nq * d * F32 if atomic else 0)}


def fa2_dkdv(Nq, Nk, d, s, causal, t, atomic):
    """FA2 Algorithm 2 (fa2.make_dkdv), per head: one block per R keys loads K_j, V_j once,
    walks the query blocks of C rows from the first that sees one of its keys (Q_i, dO_i,
    lse_i, D_i each), adds τ dS K_j into dQ_i with atomics (if `atomic`), writes dK_j, dV_j."""
    q_rows = 0
    for j in range(-(-Nk // t.R)):
        first = masks.query_range.py_func(j * t.R, t.R, t.C, Nq, Nk, causal, False, 0, 0)[0]
        q_rows += Nq - first * t.C
    return {"k": IO(read=Nk * d * s), "v": IO(read=Nk * d * s),
            "q": IO(read=q_rows * d * s), "do": IO(read=q_rows * d * s),
            "lse": IO(read=q_rows * F32), "delta": IO(read=q_rows * F32),
            "dq_acc": IO(atomic=q_rows * d * F32 if atomic else 0),
            "dk": IO(write=Nk * d * s), "dv": IO(write=Nk * d * s)}


def fa2_dq(Nq, Nk, d, s, causal, t):
    """The deterministic dQ pass (fa2.make_dq), per head: the forward's loop with Q_i, dO_i,
    lse_i, D_i loaded once per query block and dQ_i written once."""
    kv = _fa2_key_rows(Nq, Nk, t.R, t.C, causal) * d * s
    return {"q": IO(read=Nq * d * s), "do": IO(read=Nq * d * s), "lse": IO(read=Nq * F32),
            "delta": IO(read=Nq * F32), "k": IO(read=kv), "v": IO(read=kv),
            "dq": IO(write=Nq * d * s)}


# -------------------------------------------------------------------------------- naive

def _ops(prefix, ops):
    """Parts of array operations (label, reads {array: bytes}, (output, bytes))."""
    parts = {}
    for n, (label, reads, (out, nbytes)) in enumerate(ops):
        arrays = {a: IO(read=b) for a, b in reads.items()}
        arrays[out] = arrays.get(out, IO()) + IO(write=nbytes)
        parts[f"{ARRAY_OP}{prefix} {n + 1:02d} {label}"] = arrays
    return parts


def _naive_scores(BH, Nq, Nk, d, s, causal):
    """S = τ q kᵀ in float32, masked (naive._scores, with the causal mask naive.visible builds).
    """
    q, k, S, A = BH * Nq * d, BH * Nk * d, BH * Nq * Nk, F32
    mask = [("i = arange(Nq)", {}, ("i", 8 * Nq)),
            ("j = arange(Nk)", {}, ("j", 8 * Nk)),
            ("i + (Nk - Nq)", {"i": 8 * Nq}, ("i'", 8 * Nq)),
            ("vis = j <= i'", {"j": 8 * Nk, "i'": 8 * Nq}, ("vis", Nq * Nk))] if causal else []
    return mask + [
        ("q @ kᵀ", {"q": q * s, "k": k * s}, ("QK", S * s)),
        ("QK.astype(float32)", {"QK": S * s}, ("QK32", S * A)),
        ("S = QK32 * τ", {"QK32": S * A}, ("S", S * A)),
    ] + ([("where(vis, S, -inf)", {"vis": Nq * Nk, "S": S * A}, ("S", S * A))]
         if causal else [])


def naive_forward(B, H, Nq, Nk, d, s, causal):
    """The array operations of nbflash.naive.attention_forward as the API calls it (all rows
    at once, row_chunk=None), as CuPy runs them: each reads its inputs once and writes its
    output (a matmul reads both operands and writes its result; a reduction reads its input; a
    broadcast operand is read once, at its own size; transposes are views that cuBLAS takes as
    they are). S, P and the softmax's statistics are float32, the matmuls' results in the input
    dtype. This is the model of standard attention that Theorem 2's Θ(Nd + N²) describes."""
    BH = B * H
    q, S, r, A = BH * Nq * d, BH * Nq * Nk, BH * Nq, F32
    ops = _naive_scores(BH, Nq, Nk, d, s, causal) + [
        ("m = S.max(-1)", {"S": S * A}, ("m", r * A)),
        ("isfinite(m)", {"m": r * A}, ("finite", r)),
        ("m = where(finite, m, 0)", {"finite": r, "m": r * A}, ("m", r * A)),
        ("S - m", {"S": S * A, "m": r * A}, ("S-m", S * A)),
        ("E = exp(S - m)", {"S-m": S * A}, ("E", S * A)),
        ("ℓ = E.sum(-1)", {"E": S * A}, ("ℓ", r * A)),
        ("seen = ℓ > 0", {"ℓ": r * A}, ("seen", r)),
        ("where(seen, ℓ, 1)", {"seen": r, "ℓ": r * A}, ("ℓ1", r * A)),
        ("E / ℓ1", {"E": S * A, "ℓ1": r * A}, ("E/ℓ", S * A)),
        ("P = where(seen, E/ℓ, 0)", {"seen": r, "E/ℓ": S * A}, ("P", S * A)),
        ("P.astype(dtype)", {"P": S * A}, ("Pd", S * s)),
        ("o = Pd @ v", {"Pd": S * s, "v": BH * Nk * d * s}, ("o", q * s)),
        ("where(seen, ℓ, 1)", {"seen": r, "ℓ": r * A}, ("ℓ1", r * A)),
        ("log(ℓ1)", {"ℓ1": r * A}, ("logℓ", r * A)),
        ("m + logℓ", {"m": r * A, "logℓ": r * A}, ("m+logℓ", r * A)),
        ("where(seen, m + logℓ, -inf)", {"seen": r, "m+logℓ": r * A}, ("lse", r * A)),
        ("lse.astype(float32)", {"lse": r * A}, ("lse", r * A)),
    ]
    return _ops("naive forward", ops)


def naive_backward(B, H, Nq, Nk, d, s, causal):
    """The array operations of nbflash.naive.attention_backward (see :func:`naive_forward`)."""
    BH = B * H
    q, k, S, r, A = BH * Nq * d, BH * Nk * d, BH * Nq * Nk, BH * Nq, F32
    ops = _naive_scores(BH, Nq, Nk, d, s, causal) + [
        ("lse.astype(float32)", {"lse": r * A}, ("lse", r * A)),
        ("seen = isfinite(lse)", {"lse": r * A}, ("seen", r)),
        ("where(seen, lse, 0)", {"seen": r, "lse": r * A}, ("lse0", r * A)),
        ("S - lse0", {"S": S * A, "lse0": r * A}, ("S-lse", S * A)),
        ("exp(S - lse0)", {"S-lse": S * A}, ("E", S * A)),
        ("P = where(seen, E, 0)", {"seen": r, "E": S * A}, ("P", S * A)),
        ("do @ vᵀ", {"do": q * s, "v": k * s}, ("dOVᵀ", S * s)),
        ("dP = dOVᵀ.astype(float32)", {"dOVᵀ": S * s}, ("dP", S * A)),
        ("P.astype(dtype)", {"P": S * A}, ("Pd", S * s)),
        ("dv = Pdᵀ @ do", {"Pd": S * s, "do": q * s}, ("dv", k * s)),
        ("do.astype(float32)", {"do": q * s}, ("do32", q * A)),
        ("o.astype(float32)", {"o": q * s}, ("o32", q * A)),
        ("do32 * o32", {"do32": q * A, "o32": q * A}, ("dO∘O", q * A)),
        ("D = (dO∘O).sum(-1)", {"dO∘O": q * A}, ("D", r * A)),
        ("dP - D", {"dP": S * A, "D": r * A}, ("dP-D", S * A)),
        ("P * (dP - D)", {"P": S * A, "dP-D": S * A}, ("dS32", S * A)),
        ("dS = dS32.astype(dtype)", {"dS32": S * A}, ("dS", S * s)),
        ("dS @ k", {"dS": S * s, "k": k * s}, ("dSK", q * s)),
        ("dSK.astype(float32)", {"dSK": q * s}, ("dSK32", q * A)),
        ("dSK32 * τ", {"dSK32": q * A}, ("dq32", q * A)),
        ("dq = dq32.astype(dtype)", {"dq32": q * A}, ("dq", q * s)),
        ("dSᵀ @ q", {"dS": S * s, "q": q * s}, ("dSᵀQ", k * s)),
        ("dSᵀQ.astype(float32)", {"dSᵀQ": k * s}, ("dSᵀQ32", k * A)),
        ("dSᵀQ32 * τ", {"dSᵀQ32": k * A}, ("dk32", k * A)),
        ("dk = dk32.astype(dtype)", {"dk32": k * A}, ("dk", k * s)),
    ]
    return _ops("naive backward", ops)


# --------------------------------------------------------------------------- entry point

def _itemsize(dtype):
    name = np.dtype(dtype).name
    if name not in ("float16", "float32"):
        raise ValueError(f"dtype {name}: the model covers float16 and float32")
    return np.dtype(dtype).itemsize


def hbm_bytes(impl, pass_, B, H, Nq, Nk, d, dtype, causal=False, M=None, block_rule="paper",
              tiles=None, deterministic=False, dropout_p=0.0, key_lengths=None,
              block_mask=None):
    """Bytes `impl` ("fa1", "fa2", "naive") moves in HBM for `pass_` ("fwd", "bwd" or
    "fwdbwd"), as a :class:`Traffic`, at batch B, H heads, Nq queries, Nk keys, head dim d,
    q/k/v/o in `dtype` (float16 or float32).

    fa1: M (on-chip memory in elements; None: each kernel's default, which differs between the
    forward and the backward) and block_rule ("paper" or "seed") give (Br, Bc) as the kernels
    get them. fa2: `tiles` ({kernel: RegTiles}, or a table such as fa2's GPU_TILES; None:
    the launcher's on this device); `deterministic`: dQ from the separate pass instead of
    atomics. With float16 and atomic dQ, fa2 converts the float32 dQ accumulator after the
    kernels, an array operation counted as a part of its own (``ARRAY_OP``).

    dropout_p, key_lengths and block_mask are not modelled: giving them raises
    NotImplementedError.
    """
    if dropout_p or key_lengths is not None or block_mask is not None:
        raise NotImplementedError("the HBM model covers attention without dropout, key_lengths "
                                  "or block_mask")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: one of {IMPLS}")
    if pass_ not in PASSES:
        raise ValueError(f"pass_={pass_!r}: one of {PASSES}")
    if pass_ == "fwdbwd":
        return sum((hbm_bytes(impl, p, B, H, Nq, Nk, d, dtype, causal, M, block_rule, tiles,
                              deterministic) for p in ("fwd", "bwd")), Traffic({}))
    s, BH, causal = _itemsize(dtype), B * H, bool(causal)
    fwd = pass_ == "fwd"
    if impl == "naive":
        return Traffic((naive_forward if fwd else naive_backward)(B, H, Nq, Nk, d, s, causal))
    if impl == "fa1":
        kernel = "forward" if fwd else "backward"
        Br, Bc = fa1_blocks(d, kernel, M, block_rule)
        model = fa1_forward if fwd else fa1_backward
        return Traffic({f"fa1_{kernel}": _scaled(model(Nq, Nk, d, s, causal, Br, Bc), BH)})
    if fwd:
        t = fa2_tiles("forward", d, tiles)
        return Traffic({"fa2_forward": _scaled(fa2_forward(Nq, Nk, d, s, causal, t), BH)})
    atomic = not deterministic
    parts = {"fa2_delta": _scaled(fa2_delta(Nq, d, s, atomic), BH),
             "fa2_dkdv": _scaled(fa2_dkdv(Nq, Nk, d, s, causal, fa2_tiles("dkdv", d, tiles),
                                          atomic), BH)}
    if not atomic:
        parts["fa2_dq"] = _scaled(fa2_dq(Nq, Nk, d, s, causal, fa2_tiles("dq", d, tiles)), BH)
    elif s != F32:   # Fa2Plan.backward: dq_acc.astype(dtype)
        n = BH * Nq * d
        parts[ARRAY_OP + "dq = dq_acc.astype(dtype)"] = {"dq_acc": IO(read=n * F32),
                                                          "dq": IO(write=n * s)}
    return Traffic(parts)


# ----------------------------------------------------------------- the paper's asymptotics

def theorem2_standard(N, d):
    """Θ(Nd + N²): HBM accesses of standard attention (FlashAttention paper, Theorem 2), without
    its constant: fit one to measurements."""
    return N * d + N * N


def theorem2_flash(N, d, M):
    """Θ(N²d²/M): HBM accesses of FlashAttention with on-chip memory M (Theorem 2), without its
    constant."""
    return N * N * d * d / M


# ------------------------------------------------------------------------------ counting

class Count:
    """What the kernels launched inside :func:`count` moved, as counted (live while counting)."""

    def __init__(self, tally):
        self._tally = tally

    @property
    def traffic(self):
        parts = {}
        for (kernel, array), (r, w, a, _) in list(self._tally.moved.items()):
            parts.setdefault(kernel, {})[array] = IO(r, w, a)
        return Traffic(parts)

    @property
    def merged(self):
        """{(kernel, array): bytes} of repeated loads within a block and barrier interval that
        the counting rule did not count (broadcasts); empty when there were none."""
        return {key: row[3] for key, row in list(self._tally.moved.items()) if row[3]}

    read = property(lambda self: self.traffic.read)
    write = property(lambda self: self.traffic.write)
    atomic = property(lambda self: self.traffic.atomic)
    kernels = property(lambda self: self.traffic.kernels)


@contextlib.contextmanager
def count():
    """Count the global-memory bytes of every kernel run inside the ``with`` block, in Numba's
    CUDA simulator (NBFLASH_DEVICE=sim); yields a :class:`Count`. Array operations (the naive
    baseline, host-side conversions) are not kernels and are not counted. See the module
    docstring for the counting rule."""
    from ._cuda import count_global_memory  # noqa: PLC0415
    with count_global_memory() as tally:
        yield Count(tally)


__all__ = ["IO", "Traffic", "Count", "hbm_bytes", "count", "fa1_blocks", "fa2_tiles",
           "theorem2_standard", "theorem2_flash", "ARRAY_OP"]
