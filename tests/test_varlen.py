"""Packed variable-length batches (issue 17; FlashAttention's varlen functions): q (total_q, H,
d), k and v (total_k, H_kv, d), sequence b the rows cu_seqlens_q[b] .. cu_seqlens_q[b+1] - 1
and cu_seqlens_k[b] .. cu_seqlens_k[b+1] - 1, each attending to its own keys only.

The float64 reference (nbflash.naive's varlen functions, sequence by sequence) is checked
against the definition: the whole packed batch as one sequence under a mask of 1 x 1 blocks
that is block-diagonal and, per block, causal bottom-right aligned. Each kernel impl is checked
against the reference under the tolerance rule (the naive baseline as the yardstick): sequences
of length 0, sequences whose queries see no key, Nq_b != Nk_b, grouped-query heads, and every
option the varlen functions take together (dropout, softcap, window, ALiBi per sequence). A
sequence's results are bitwise those of the same sequence run alone (the kernels find its
rows by cu_seqlens only), and bad cu_seqlens are refused before any kernel runs.
"""

import numpy as np
import pytest

import nbflash
from nbflash import MODE, naive
from nbflash._cuda import cuda
from nbflash.errors import InputError
from support import assert_close, host, randn, xp

runs_kernels = pytest.mark.skipif(MODE == "compile", reason="runs kernels")


def _cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def _inputs(lq, lk, H, H_kv, d, dtype, seed=3, spread=1.0):
    rng = np.random.default_rng(seed)
    q, do = (randn(rng, (int(sum(lq)), H, d), dtype, spread) for _ in range(2))
    k, v = (randn(rng, (int(sum(lk)), H_kv, d), dtype, spread) for _ in range(2))
    return q, k, v, do


def _reference(q, k, v, do, cq, ck, **opts):
    """float64 (o, lse, dq, dk, dv) of nbflash.naive's varlen functions, on the host."""
    q64, k64, v64, do64 = (x.astype(xp.float64) for x in (q, k, v, do))
    o, lse = naive.attention_varlen_forward(q64, k64, v64, cq, ck, **opts)
    grads = naive.attention_varlen_backward(do64, q64, k64, v64, o, lse, cq, ck, **opts)
    return dict(zip(("o", "lse", "dq", "dk", "dv"), (host(x) for x in (o, lse, *grads))))


def _run(impl, q, k, v, do, cq, ck, deterministic=False, **opts):
    o, lse = nbflash.attention_varlen_forward(q, k, v, cq, ck, impl=impl, **opts)
    grads = nbflash.attention_varlen_backward(do, q, k, v, o, lse, cq, ck, impl=impl,
                                              deterministic=deterministic, **opts)
    return dict(zip(("o", "lse", "dq", "dk", "dv"), (host(x) for x in (o, lse, *grads))))


def check(impl, dtype, lq, lk, H, H_kv, d, deterministic=False, **opts):
    """impl against the float64 reference under the tolerance rule; rows that see no key get
    o = 0, lse = -inf, dq = 0 and keys no query sees dk = dv = 0, exactly. Returns (got, ref)."""
    cq, ck = _cu(lq), _cu(lk)
    q, k, v, do = _inputs(lq, lk, H, H_kv, d, dtype)
    ref = _reference(q, k, v, do, cq, ck, **opts)
    got = _run(impl, q, k, v, do, cq, ck, deterministic, **opts)
    base = _run("naive", q, k, v, do, cq, ck, **opts)
    # (the tolerance rule takes batch-shaped arrays: (1, H, total, d), (1, H, total_q))
    shaped = [{n: x[None] if n == "lse" else x.swapaxes(0, 1)[None] for n, x in r.items()}
              for r in (got, base, ref)]
    assert_close(*shaped, dtype, f"{impl} varlen {lq} {lk} {opts}")
    for name, x in got.items():
        assert not np.isnan(x).any(), f"NaN in {name}"
    none = np.isneginf(ref["lse"])                       # (H, total_q)
    assert np.array_equal(np.isneginf(got["lse"]), none), "rows with lse = -inf differ"
    assert np.all(got["o"].swapaxes(0, 1)[none] == 0), "o of rows that see no key"
    assert np.all(got["dq"].swapaxes(0, 1)[none] == 0), "dq of rows that see no key"
    for b in range(len(lq)):
        if lq[b] == 0:
            for name in ("dk", "dv"):
                assert np.all(got[name][ck[b]:ck[b + 1]] == 0), f"{name} of sequence {b}"
    return got, ref


def _definition(lq, lk, causal, window=(-1, -1)):
    """(total_q, total_k) visibility of a packed batch: block-diagonal, each block bottom-right
    aligned to its sequence's lengths."""
    cq, ck = _cu(lq), _cu(lk)
    vis = np.zeros((cq[-1], ck[-1]), bool)
    for b in range(len(lq)):
        block = naive.visible(1, 1, lq[b], lk[b], causal=causal, window_size=window)
        vis[cq[b]:cq[b + 1], ck[b]:ck[b + 1]] = True if block is None else block
    return vis


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)),
                                           (True, (2, -1)), (False, (1, 3))])
def test_the_reference_is_the_block_diagonal_definition(causal, window):
    """The varlen reference against the packed batch as one sequence under the definition's
    mask as 1 x 1 mask blocks (rows without keys: 0 and -inf in both): o and lse to 1e-13,
    gradients to 1e-12."""
    lq, lk = [4, 0, 9, 3, 5], [6, 3, 2, 0, 5]
    q, k, v, do = _inputs(lq, lk, 2, 1, 8, np.float64)
    cq, ck = _cu(lq), _cu(lk)
    ref = _reference(q, k, v, do, cq, ck, causal=causal, window_size=window)
    bm = _definition(lq, lk, causal, window)
    b = lambda x: x[None].swapaxes(1, 2)   # noqa: E731
    o, lse = naive.attention_forward(b(q), b(k), b(v), block_mask=bm, block_size=(1, 1))
    grads = naive.attention_backward(b(do), b(q), b(k), b(v), o, lse, block_mask=bm,
                                     block_size=(1, 1))
    np.testing.assert_array_equal(np.isneginf(ref["lse"]), np.isneginf(host(lse[0])))
    fin = np.isfinite(ref["lse"])
    np.testing.assert_allclose(ref["lse"][fin], host(lse[0])[fin], rtol=0, atol=1e-13)
    np.testing.assert_allclose(ref["o"], host(o[0].swapaxes(0, 1)), rtol=0, atol=1e-13)
    for name, g in zip(("dq", "dk", "dv"), grads):
        np.testing.assert_allclose(ref[name], host(g[0].swapaxes(0, 1)), rtol=0, atol=1e-12,
                                   err_msg=name)


@runs_kernels
@pytest.mark.parametrize("impl,dtype,d,causal", [
    ("fa2", np.float32, 16, True),
    ("fa2", np.float16, 8, False),
    ("tc", np.float16, 16, True),
])
def test_varlen_matches_the_reference(impl, dtype, d, causal):
    """Lengths 0, 1, more than a query tile (the simulator's tiles are 16 or 32 rows),
    queries that see no key (causal with Nq_b > Nk_b, and Nk_b = 0), keys that no query sees
    (Nq_b = 0), grouped-query heads."""
    check(impl, dtype, [5, 0, 35, 1, 9], [9, 4, 3, 0, 20], 2, 1, d, causal=causal)


@runs_kernels
def test_varlen_with_every_option():
    """Dropout (each sequence's mask batch entry b's), softcap, a window and ALiBi slopes of
    shape (B, H), causal; fa2's deterministic dQ pass and tc's default backward."""
    lq, lk = [7, 0, 19], [7, 5, 13]
    slopes = np.array([[0.5, 0.1], [0.3, 0.2], [0.25, 0.05]], np.float32)
    opts = dict(causal=True, dropout_p=0.2, seed=17, offset=3, softcap=4.0, window_size=(6, -1),
                alibi_slopes=slopes)
    check("fa2", np.float32, lq, lk, 2, 1, 16, deterministic=True, **opts)
    check("tc", np.float16, lq, lk, 2, 2, 32, **opts)


@runs_kernels
@pytest.mark.parametrize("impl,dtype,lq,lk", [("fa2", np.float32, [11, 20, 3], [13, 17, 3]),
                                              ("tc", np.float16, [5, 18], [13, 4])])
def test_a_sequence_is_the_same_bits_as_alone(impl, dtype, lq, lk):
    """Each sequence's o, lse and gradients are bitwise those of the same sequence as a batch
    of one through attention_forward / attention_backward (the kernels find its rows through
    cu_seqlens alone; the tiles start at its first row either way); and a larger max_seqlen
    changes nothing."""
    H, H_kv, d = 2, 1, 16
    q, k, v, do = _inputs(lq, lk, H, H_kv, d, dtype)
    cq, ck = _cu(lq), _cu(lk)
    got = _run(impl, q, k, v, do, cq, ck, causal=True)
    o, lse = nbflash.attention_varlen_forward(q, k, v, cq, ck, 40, 99, impl=impl, causal=True)
    np.testing.assert_array_equal(host(o), got["o"])
    np.testing.assert_array_equal(host(lse), got["lse"])
    b = lambda x: xp.ascontiguousarray(x.swapaxes(0, 1)[None])   # noqa: E731
    for i in range(len(lq)):
        sq, sk = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        one = dict(zip(("o", "lse", "dq", "dk", "dv"), _one(impl, *(b(x) for x in (
            q[sq], k[sk], v[sk], do[sq])))))
        for name, s in (("o", sq), ("dq", sq), ("dk", sk), ("dv", sk)):
            np.testing.assert_array_equal(got[name][s], one[name][0].swapaxes(0, 1),
                                          err_msg=f"{name} of sequence {i}")
        np.testing.assert_array_equal(got["lse"][:, sq], one["lse"][0])


def _one(impl, q, k, v, do):
    o, lse = nbflash.attention_forward(q, k, v, impl=impl, causal=True)
    grads = nbflash.attention_backward(do, q, k, v, o, lse, impl=impl, causal=True)
    return [host(x) for x in (o, lse, *grads)]


@runs_kernels
def test_no_keys_or_no_queries_at_all():
    """total_k = 0: every row sees no key (o = 0, lse = -inf, zero gradients); total_q = 0:
    empty results. No kernel runs for either."""
    q, k, v, do = _inputs([3, 4], [0, 0], 2, 2, 8, np.float32)
    got = _run("fa2", q, k, v, do, _cu([3, 4]), _cu([0, 0]), causal=True)
    assert got["o"].shape == (7, 2, 8) and np.all(got["o"] == 0)
    assert got["lse"].shape == (2, 7) and np.isneginf(got["lse"]).all()
    assert np.all(got["dq"] == 0) and got["dk"].shape == (0, 2, 8)
    q, k, v, do = _inputs([0, 0], [5, 1], 2, 2, 8, np.float32)
    got = _run("fa2", q, k, v, do, _cu([0, 0]), _cu([5, 1]))
    assert got["o"].shape == (0, 2, 8) and np.all(got["dk"] == 0)


@pytest.mark.parametrize("change,message", [
    (dict(cu_seqlens_q=[1, 4, 7]), "must start at 0"),
    (dict(cu_seqlens_q=[0, 8, 7]), "must be nondecreasing"),
    (dict(cu_seqlens_q=[0, 3, 6]), "ends at 6 but q has total_q = 7"),
    (dict(cu_seqlens_k=[0, 9]), "cu_seqlens_q has 3 entries but cu_seqlens_k has 2"),
    (dict(cu_seqlens_k=[[0, 4, 9]]), "expected (B + 1,)"),
    (dict(cu_seqlens_k=[0.0, 4.0, 9.0]), "cu_seqlens_k must be integers"),
    (dict(max_seqlen_q=3), "max_seqlen_q must be an integer no smaller than the longest"),
    (dict(alibi_slopes=np.ones((3, 2))), "alibi_slopes has shape (3, 2); expected (H,) = (2,)"
                                         " or (B, H) = (2, 2)"),
    (dict(impl="fa1"), "impl='fa1' does not take packed variable-length batches"),
    (dict(q=np.zeros((1, 7, 2, 8), np.float32)), "a packed batch's are 3: (total_q, heads, "
                                                 "head_dim)"),
    (dict(v=np.zeros((8, 1, 8), np.float32)), "k and v must have the same rows (total_k)"),
    (dict(k=np.zeros((9, 3, 8), np.float32), v=np.zeros((9, 3, 8), np.float32)),
     "heads of k and v (3) must divide heads of q (2)"),
])
def test_bad_packed_inputs_are_refused(change, message):
    args = dict(q=np.zeros((7, 2, 8), np.float32), k=np.zeros((9, 1, 8), np.float32),
                v=np.zeros((9, 1, 8), np.float32), cu_seqlens_q=[0, 4, 7],
                cu_seqlens_k=[0, 4, 9], max_seqlen_q=None, max_seqlen_k=None, impl="naive")
    args.update(change)
    opts = {n: args.pop(n) for n in ("impl", "alibi_slopes") if n in args}
    arrays = [args.pop(n) for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k",
                                    "max_seqlen_q", "max_seqlen_k")]
    if MODE == "gpu":
        arrays[:3] = [xp.asarray(x) for x in arrays[:3]]
    with pytest.raises(InputError) as info:
        nbflash.attention_varlen_forward(*arrays, **opts)
    assert message in str(info.value)


def test_backward_shapes_are_checked():
    q, k, v, do = _inputs([3, 4], [2, 5], 2, 1, 8, np.float32)
    cq, ck = _cu([3, 4]), _cu([2, 5])
    o, lse = nbflash.attention_varlen_forward(q, k, v, cq, ck, impl="naive")
    with pytest.raises(InputError, match=r"lse has shape \(7, 2\); expected \(H, total_q\)"):
        nbflash.attention_varlen_backward(do, q, k, v, o, lse.T, cq, ck, impl="naive")
    with pytest.raises(InputError, match="do has shape"):
        nbflash.attention_varlen_backward(do[:5], q, k, v, o, lse, cq, ck, impl="naive")


@pytest.mark.gpu
@runs_kernels
@pytest.mark.parametrize("impl,dtype,d", [("tc", np.float16, 64), ("tc", np.float16, 128),
                                          ("fa2", np.float32, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_varlen(impl, dtype, d, causal):
    rng = np.random.default_rng(4)
    lq = [0, 1, 127, 128, 129] + list(rng.integers(200, 1100, 5))
    lk = [3, 0, 127, 300, 129] + list(rng.integers(1, 1100, 5))
    check(impl, dtype, lq, lk, 8, 2, d, causal=causal)


@pytest.mark.gpu
@runs_kernels
def test_gpu_varlen_with_every_option():
    rng = np.random.default_rng(5)
    lq, lk = list(rng.integers(0, 700, 6)), list(rng.integers(0, 700, 6))
    slopes = rng.uniform(0.01, 0.5, (6, 8)).astype(np.float32)
    opts = dict(causal=True, dropout_p=0.1, seed=7, softcap=20.0, window_size=(100, -1),
                alibi_slopes=slopes)
    check("tc", np.float16, lq, lk, 8, 4, 128, **opts)
    check("fa2", np.float32, lq, lk, 8, 2, 64, deterministic=True, **opts)


# -- through torch, FlashAttention's signature and transformers ------------------------------

def _torch_inputs(torch, lq, lk, H, H_kv, d, dtype=None):
    q, k, v, do = _inputs(lq, lk, H, H_kv, d, np.float32)
    dev = "cuda" if MODE == "gpu" else "cpu"
    return [torch.as_tensor(host(x), device=dev) for x in (q, k, v, do)]


@runs_kernels
def test_flash_attn_varlen_func_is_the_apis():
    """flash_attn_varlen_func (int32 cu_seqlens tensors, causal, a window, ALiBi (B, H),
    grouped-query heads) is nbflash's varlen API, bitwise, forward and backward; under
    torch.compile(fullgraph=True) too."""
    torch = pytest.importorskip("torch")
    nt = pytest.importorskip("nbflash.torch")
    lq, lk = [5, 0, 12], [7, 3, 12]
    q, k, v, do = _torch_inputs(torch, lq, lk, 2, 1, 8)
    cq, ck = (torch.tensor(_cu(x), device=q.device) for x in (lq, lk))
    slopes = torch.tensor([[0.5, 0.1], [0.2, 0.3], [0.05, 0.4]], device=q.device)
    opts = dict(causal=True, window_size=(4, -1), alibi_slopes=slopes)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    got = nt.flash_attn_varlen_func(*leaves, cq, ck, 12, 12, **opts)
    got.backward(do)
    o, lse = nbflash.attention_varlen_forward(q, k, v, cq, ck, 12, 12, **opts)
    grads = nbflash.attention_varlen_backward(do, q, k, v, o, lse, cq, ck, 12, 12, **opts)
    np.testing.assert_array_equal(got.detach().cpu().numpy(), o.cpu().numpy())
    for x, g in zip(leaves, grads):
        np.testing.assert_array_equal(x.grad.cpu().numpy(), g.cpu().numpy())
    fn = torch.compile(lambda q, k, v: nt.attention_varlen(q, k, v, cq, ck, 12, 12, **opts),
                       fullgraph=True, backend="aot_eager")
    leaves2 = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves2)
    out.backward(do)
    np.testing.assert_array_equal(out.detach().cpu().numpy(), o.cpu().numpy())
    np.testing.assert_array_equal(leaves2[1].grad.cpu().numpy(), grads[1].cpu().numpy())


@runs_kernels
def test_opcheck_varlen_ops():
    """torch.library.opcheck of the varlen ops (schema, fake tensors, autograd, AOT dispatch),
    with dropout's seed, softcap and ALiBi."""
    torch = pytest.importorskip("torch")
    nt = pytest.importorskip("nbflash.torch")
    lq, lk = [4, 9], [6, 5]
    q, k, v, do = _torch_inputs(torch, lq, lk, 2, 2, 8)
    cq, ck = (torch.tensor(_cu(x), device=q.device) for x in (lq, lk))
    args = (q, k, v, cq, ck, 9, 6, torch.tensor(3, dtype=torch.int64), True, None, "auto",
            False, 0.2, 0, 2.0, [3, -1], torch.tensor([0.5, 0.2], device=q.device))
    torch.library.opcheck(nt.attention_varlen_forward_op, args)
    o, lse = nt.attention_varlen_forward_op(*args)
    torch.library.opcheck(nt.attention_varlen_backward_op, (do, q, k, v, o, lse, *args[3:]))


@runs_kernels
def test_transformers_packed_sequences_are_each_sequence_alone():
    """A tiny random Llama (grouped-query heads) on a padding-free batch (transformers'
    cu_seq_lens_q/k, max_length_q/k and position_ids restarting per sequence, as
    DataCollatorWithFlattening gives them) gives each sequence the logits it gets alone,
    through nbflash.hf's attention (within float32 roundings: the same kernels, other
    shapes)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    hf = pytest.importorskip("nbflash.hf")
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415
    name = hf.register()
    torch.manual_seed(0)
    dev = "cuda" if MODE == "gpu" else "cpu"
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=32,
        initializer_range=0.2, attn_implementation=name)).to(dev).eval()
    lengths = [5, 9, 3]
    ids = torch.randint(0, 64, (1, sum(lengths)), device=dev)
    cu = torch.tensor(_cu(lengths), dtype=torch.int32, device=dev)
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(dev)
    with torch.no_grad():
        packed = model(ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                       max_length_q=max(lengths), max_length_k=max(lengths)).logits[0]
        for b, n in enumerate(lengths):
            alone = model(ids[:, cu[b]:cu[b + 1]]).logits[0]
            np.testing.assert_allclose(packed[cu[b]:cu[b + 1]].cpu().numpy(),
                                       alone.cpu().numpy(), rtol=0, atol=2e-5)


# -- the block order of packed.block_xyz (tc's causal kernels) -------------------------------

@pytest.mark.skipif(MODE != "sim", reason="a simulator kernel (the GPU runs it inside tc's)")
@pytest.mark.parametrize("order", [1, -1])
def test_block_order_is_a_permutation_with_the_tile_slowest(order):
    """block_xyz(±1) maps the blocks of a (5, 3, 2) grid one to one onto its coordinates, and
    in the order of the linear block index the tile x changes slowest: every (y, z) of tile
    t before any of the next (ascending for 1, from the last tile down for -1)."""
    from nbflash.kernels.common.packed import block_xyz  # noqa: PLC0415
    ORDER = order

    def kernel(out):
        x, y, z = block_xyz(ORDER)
        lin = cuda.blockIdx.x + cuda.gridDim.x * (cuda.blockIdx.y + cuda.gridDim.y
                                                  * cuda.blockIdx.z)
        out[lin, 0], out[lin, 1], out[lin, 2] = x, y, z

    out = np.full((30, 3), -1, np.int64)
    cuda.jit(kernel)[(5, 3, 2), 1](out)
    assert sorted(map(tuple, out)) == [(x, y, z) for x in range(5) for y in range(3)
                                       for z in range(2)]
    tiles = out[:, 0] if order == 1 else 4 - out[:, 0]
    assert (np.diff(tiles) >= 0).all() and (np.bincount(tiles) == 6).all()
