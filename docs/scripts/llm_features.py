"""The measurements of docs/llm-features.md: sliding window, softcap and grouped-query heads on
one GPU, in one process (run on a GPU, from the repository root: python3
docs/scripts/llm_features.py [window softcap gqa varlen]: the sections named, all without
arguments; it writes $OUT/llm_features.json, or /tmp/llm_features.json without OUT).

Each nbflash problem is run once and its max errors against the float64 reference on a slice
(batch 0, heads 0-1, rows in chunks) are printed first ("check ..." lines: printed, not judged;
the tests judge, tests/test_window.py's GPU cases); then every series is timed: CUDA events
around each call, the median of 10 after 3 warm-ups, the same inputs each time (no rotation: the window
problem's K and V are 64 MiB each, together twice the H200's 60 MB L2; the grouped-query
problems' K and V with 8 and 4 heads, 16 and 8 MiB each, fit in it). nbflash runs through
nbflash.torch.attention on torch tensors, beside torch SDPA (default backend), SDPA given the
window as a boolean attn_mask (its memory-efficient backend), and torch's flex_attention
(torch.compile'd) with the window as its block mask. A one-off measuring script, not an
experiment with a resumable store: the closing note of the session that added the window
(2026-12-01) quotes its output.
"""
import json, os, sys, time
import numpy as np, torch, cupy as cp
import nbflash.torch as nt
from nbflash import naive
torch.backends.cuda.matmul.allow_tf32 = False
dev = "cuda"
OUT = os.environ.get("OUT", "/tmp")
#: the sections to run (all without arguments): window, softcap, gqa, varlen
ONLY = set(sys.argv[1:]) or {"window", "softcap", "gqa", "varlen"}
res = []

def timeit(fn, reps=10, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return float(np.median(ts))

def fwdbwd(f, q, k, v, do):
    def run():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        f(qq, kk, vv).backward(do)
    return run

def check(q, k, v, do, causal, **opt):
    # nbflash vs float64 reference on heads 0-1 of batch 0 (rows in chunks), o and grads;
    # naive in fp16 on the same slice as the yardstick
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    o = nt.attention(qq, kk, vv, causal=causal, **opt)
    o.backward(do)
    G = q.shape[1] // k.shape[1]
    sl = lambda x, h: cp.asarray(x[:1, :h].detach())
    hk = max(1, 2 // G)
    q64, do64 = (sl(x, 2).astype(cp.float64) for x in (q, do))
    k64, v64 = (sl(x, hk).astype(cp.float64) for x in (k, v))
    kw = dict(causal=causal, row_chunk=2048, **{a: b for a, b in opt.items() if a != "enable_gqa"})
    if G > 1:   # heads 0-1 of q read kv head 0: repeat for the slice
        k64, v64 = k64[:, :1].repeat(2, 1), v64[:, :1].repeat(2, 1)
    ro, rl = naive.attention_forward(q64, k64, v64, **kw)
    rg = naive.attention_backward(do64, q64, k64, v64, ro, rl, **kw)
    got = [o, qq.grad, kk.grad, vv.grad]
    errs = {}
    for name, g, r in zip(("o", "dq", "dk", "dv"), got, (ro, *rg)):
        g = cp.asarray(g[:1, :2 if name in ("o", "dq") or G == 1 else 1].detach()).astype(cp.float64)
        if G > 1 and name in ("dk", "dv"):
            continue   # the slice's kv head sums over query heads outside the slice
        errs[name] = float(abs(g - r).max())
    return errs

def problem(B, H, Hk, N, d, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    q, do = (torch.randn(B, H, N, d, device=dev, generator=g, dtype=torch.float16) for _ in range(2))
    k, v = (torch.randn(B, Hk, N, d, device=dev, generator=g, dtype=torch.float16) for _ in range(2))
    return q, k, v, do

def add(**r):
    res.append(r); print(json.dumps(r), flush=True)

sd_c = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def timed(what, name, f, q, k, v, do, **extra):
    """fwd and fwd+bwd medians of f(q, k, v) and fwd+bwd's peak memory above what is held."""
    for pass_ in ("fwd", "fwdbwd"):
        try:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = timeit((lambda f=f: f(q, k, v)) if pass_ == "fwd" else fwdbwd(f, q, k, v, do))
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            add(what=what, series=name, pass_=pass_, ms=ms, peak_MiB=round(peak, 1), **extra)
        except Exception as exc:
            add(what=what, series=name, pass_=pass_, error=repr(exc)[:300], **extra)


def window_series():
    """Sliding window: N = 16k, d = 128, H = 16 (FA2 grid: 16k tokens, hidden 2048), W = 4096."""
    B, H, N, d, W = 1, 16, 16384, 128, 4096
    q, k, v, do = problem(B, H, H, N, d)
    win = (W - 1, 0)
    add(what="check window", errs=check(q, k, v, do, True, window_size=win))
    nb_w = lambda q, k, v: nt.attention(q, k, v, causal=True, window_size=win)
    nb_c = lambda q, k, v: nt.attention(q, k, v, causal=True)
    i = torch.arange(N, device=dev)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - W)
    sd_m = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                            attn_mask=mask)
    series = [("nbflash tc, window 4096", nb_w), ("nbflash tc, causal (no window)", nb_c),
              ("torch SDPA, causal (no window)", sd_c),
              ("torch SDPA, window as a bool mask", sd_m)]
    try:
        from torch.nn.attention.flex_attention import flex_attention, create_block_mask
        bm = create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (ki > qi - W), None, None, N,
                               N)
        flex = torch.compile(flex_attention)
        fx = lambda q, k, v: flex(q, k, v, block_mask=bm)
        o_fx = fx(q, k, v); o_nb = nb_w(q, k, v)
        add(what="flex vs nbflash window max|diff|", diff=float((o_fx - o_nb).abs().max()))
        series.append(("torch flex_attention, window 4096", fx))
    except Exception as exc:
        add(what="flex_attention unavailable", error=repr(exc)[:300])
    for name, f in series:
        timed("window", name, f, q, k, v, do)


def softcap_series():
    """softcap: N = 8k, d = 128, H = 16, B = 2, causal; nbflash with and without softcap 30."""
    q, k, v, do = problem(2, 16, 16, 8192, 128, 1)
    add(what="check softcap", errs=check(q, k, v, do, True, softcap=30.0))
    for name, opt in (("tc causal", {}), ("tc causal softcap 30", {"softcap": 30.0})):
        timed("softcap", name, lambda q, k, v, opt=opt: nt.attention(q, k, v, causal=True, **opt),
              q, k, v, do)
    timed("softcap", "torch SDPA causal (no softcap)", sd_c, q, k, v, do)


def gqa_series():
    """GQA: B = 4, N = 4096, H = 32, d = 128, causal; H_kv = 32, 8, 4 (H / H_kv = 1, 4, 8)."""
    for Hk in (32, 8, 4):
        q, k, v, do = problem(4, 32, Hk, 4096, 128, 2)
        add(what="check gqa", Hk=Hk, errs=check(q, k, v, do, True, enable_gqa=True))
        timed("gqa", "nbflash tc", lambda q, k, v: nt.attention(q, k, v, causal=True), q, k, v,
              do, Hk=Hk)
        timed("gqa", "torch SDPA", lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True), q, k, v, do, Hk=Hk)
        del q, k, v, do


def varlen_series():
    """Packed variable-length batches: B = 8 sequences of lengths drawn from U[N/4, N] at
    N = 8192 (seed 0), H = 16, d = 128, causal, against the padded (B, N) batch: nbflash on
    the packed tensors (nbflash.torch.attention_varlen), nbflash on the padded batch (its
    key_lengths; the padded rows computed and thrown away), torch SDPA on the padded batch
    (causal alone is exact for the real rows under right padding: they never see a padded key;
    and with the key-padding mask), and SDPA on jagged nested tensors where torch takes them."""
    B, N, H, d = 8, 8192, 16, 128
    lengths = np.random.default_rng(0).integers(N // 4, N + 1, B)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=dev)
    total = int(lengths.sum())
    g = torch.Generator(device=dev).manual_seed(3)
    q, k, v, do = (torch.randn(total, H, d, device=dev, generator=g, dtype=torch.float16)
                   for _ in range(4))
    add(what="varlen lengths", lengths=lengths.tolist(), total=total, padded=B * N,
        tokens=total / (B * N), causal_scores=float((lengths.astype(float) ** 2).sum()
                                                    / (B * float(N) ** 2)))
    # check: sequences 0 and B-1, heads 0-1, against the float64 reference
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    o = nt.attention_varlen(qq, kk, vv, cu, cu, N, N, causal=True)
    o.backward(do)
    for b in (0, B - 1):
        s = slice(int(cu[b]), int(cu[b + 1]))
        sl = lambda x: cp.asarray(x[s, :2].detach()).swapaxes(0, 1)[None].astype(cp.float64)
        ro, rl = naive.attention_forward(sl(q), sl(k), sl(v), causal=True, row_chunk=2048)
        rg = naive.attention_backward(sl(do), sl(q), sl(k), sl(v), ro, rl, causal=True,
                                      row_chunk=2048)
        errs = {name: float(abs(sl(x) - r).max())
                for name, x, r in zip(("o", "dq", "dk", "dv"), (o, qq.grad, kk.grad, vv.grad),
                                      (ro, *rg))}
        add(what="check varlen", sequence=b, length=int(lengths[b]), errs=errs)
    # the padded batch: (B, H, N, d) with the sequences' rows first
    def padded(x):
        out = torch.zeros(B, N, H, d, device=dev, dtype=x.dtype)
        for b in range(B):
            out[b, :lengths[b]] = x[int(cu[b]):int(cu[b + 1])]
        return out.transpose(1, 2).contiguous()
    pq, pk, pv, pdo = (padded(x) for x in (q, k, v, do))
    kl = torch.tensor(lengths, device=dev, dtype=torch.int32)
    j = torch.arange(N, device=dev)
    pad_mask = (j[None, :] <= j[:, None])[None, None] & (j < kl[:, None])[:, None, None, :]
    timed("varlen", "nbflash tc, packed (attention_varlen)",
          lambda q, k, v: nt.attention_varlen(q, k, v, cu, cu, N, N, causal=True), q, k, v, do)
    timed("varlen", "nbflash tc, padded batch (key_lengths)",
          lambda q, k, v: nt.attention(q, k, v, causal=True, key_lengths=kl), pq, pk, pv, pdo)
    timed("varlen", "torch SDPA, padded batch, causal", sd_c, pq, pk, pv, pdo)
    timed("varlen", "torch SDPA, padded batch, causal and padding as a bool mask",
          lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
              q, k, v, attn_mask=pad_mask), pq, pk, pv, pdo)
    try:
        def nested(x):
            return torch.nested.nested_tensor_from_jagged(x, cu.long()).transpose(1, 2)
        nq, nk, nv = (nested(x) for x in (q, k, v))
        def sd_nested(q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(
                nested(q), nested(k), nested(v), is_causal=True).transpose(1, 2).values()
        sd_nested(q, k, v)
        timed("varlen", "torch SDPA, jagged nested tensors, causal", sd_nested, q, k, v, do)
    except Exception as exc:
        add(what="varlen", series="torch SDPA, jagged nested tensors, causal",
            error=repr(exc)[:300])


add(what="meta", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
    date=time.strftime("%Y-%m-%d"), sections=sorted(ONLY))
for name in ("window", "softcap", "gqa", "varlen"):
    if name in ONLY:
        globals()[f"{name}_series"]()
        torch.cuda.empty_cache()
json.dump(res, open(f"{OUT}/llm_features.json", "w"), indent=1)
