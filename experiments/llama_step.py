"""Llama training step (issue 18): step time and losses with nbflash and with torch SDPA.

A random-weight Llama (transformers' LlamaForCausalLM: 8 layers, hidden 1024, 16 query heads and
4 key/value heads of dim 64, MLP 4096, vocabulary 32000), batch 4 of T = 2048 tokens, bfloat16
weights and activations, AdamW. The same model is built twice from the same seed, once with
attn_implementation="sdpa" and once with nbflash (nbflash.hf.register(), impl "auto": tc for
bfloat16), and both train in one process on one fixed batch of random tokens:

- step time: forward, backward and optimizer step of the whole model, between a pair of CUDA
  events, the steps queued back to back (the losses are read after the last one), median of
  STEPS steps after WARMUP (the first compiles nbflash's kernels);
- losses: all steps' losses (warm-up included), the same data and weights for both, so that
  the two curves should agree to bfloat16's precision (the issue measured 0.005 over 40 steps);
- host time per attention call through torch, forward only at the model's attention shape
  (nbflash.bench.host_us: perf_counter around the call, no synchronization inside): torch SDPA
  (GQA), nbflash.torch.attention (K and V already repeated) and the transformers attention
  function nbflash.hf registers (K and V with their key/value heads, read in place by the
  grouped-query kernels, and the (B, N, H, d) memory of the projections read in place).

In the simulator a 1-layer model of hidden 64 (4 heads, 2 key/value heads), T = 16, float32,
on the CPU runs the same code (only the tests measure there).
"""

import statistics
import time

from nbflash import bench

from . import common

NAME = "llama_step"
ATTNS = ("sdpa", "nbflash")


def config():
    return common.sized(
        {"layers": 8, "hidden": 1024, "heads": 16, "kv_heads": 4, "head_dim": 64,
         "intermediate": 4096, "vocab": 32000, "B": 4, "T": 2048, "dtype": "bfloat16",
         "lr": 1e-4, "warmup": 3, "steps": 20, "host_calls": 200, "host_warmup": 10},
        {"layers": 1, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16,
         "intermediate": 128, "vocab": 128, "B": 2, "T": 16, "dtype": "float32",
         "lr": 1e-2, "warmup": 1, "steps": 2, "host_calls": 2, "host_warmup": 1})


def _device():
    return "cuda" if common.on_gpu() else "cpu"


def _model(c, attn_implementation):
    """The Llama of config c with random weights from seed 0, on the device, in c's dtype."""
    import torch  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415
    cfg = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"],
                      intermediate_size=c["intermediate"], num_hidden_layers=c["layers"],
                      num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
                      head_dim=c["head_dim"], max_position_embeddings=c["T"],
                      attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(_device(), getattr(torch, c["dtype"]))


def _batch(c):
    import torch  # noqa: PLC0415
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, c["vocab"], (c["B"], c["T"]), generator=g).to(_device())


class _Timer:
    """Milliseconds of a region: CUDA events on torch's current stream on the GPU (read after
    the last step), wall clock in the simulator."""

    def __init__(self):
        import torch  # noqa: PLC0415
        self.torch, self.spans = torch, []

    def start(self):
        if common.on_gpu():
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
            self.spans.append([ev])
        else:
            self.spans.append([time.perf_counter()])

    def stop(self):
        if common.on_gpu():
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
            self.spans[-1].append(ev)
        else:
            self.spans[-1].append(time.perf_counter())

    def ms(self):
        if common.on_gpu():
            self.torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in self.spans]
        return [(e - s) * 1e3 for s, e in self.spans]


def train(c, attn_implementation):
    """(losses of every step, ms of each timed step) of the model trained with this attention."""
    import torch  # noqa: PLC0415
    model = _model(c, attn_implementation)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"])
    ids = _batch(c)
    timer, losses = _Timer(), []
    for i in range(c["warmup"] + c["steps"]):
        if i >= c["warmup"]:
            timer.start()
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        if i >= c["warmup"]:
            timer.stop()
        losses.append(loss.detach())
        if i < c["warmup"]:
            bench.sync()            # warm-up (compilation) stays out of the timed steps' queue
    ms = timer.ms()
    losses = [float(x) for x in losses]
    del model, opt
    bench.free_memory(collect=True)
    return losses, ms


def host_times(c, name):
    """{series: median µs of host time per forward call} at the model's attention shape."""
    import torch  # noqa: PLC0415
    import nbflash.hf  # noqa: PLC0415
    import nbflash.torch  # noqa: PLC0415
    F = torch.nn.functional
    B, T, H, Hkv, d = c["B"], c["T"], c["heads"], c["kv_heads"], c["head_dim"]
    dtype, dev = getattr(torch, c["dtype"]), _device()
    g = torch.Generator().manual_seed(2)
    # as transformers passes them: (B, H, T, d) views of (B, T, H, d) projections
    q, k, v = (torch.randn(B, T, h, d, generator=g).to(dev, dtype).transpose(1, 2)
               for h in (H, Hkv, Hkv))
    kr, vr = (x.repeat_interleave(H // Hkv, 1) for x in (k, v))
    qc = q.contiguous()

    class Module(torch.nn.Module):
        is_causal = True
        num_key_value_groups = H // Hkv

    module = Module()
    calls = {
        "torch SDPA (enable_gqa)": lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True),
        "nbflash.torch.attention": lambda: nbflash.torch.attention(qc, kr, vr, causal=True),
        "nbflash.hf attention function": lambda: nbflash.hf.attention_forward(
            module, q, k, v, None, impl="auto"),
    }
    with torch.no_grad():
        return {label: bench.host_us(lambda f=f: f, c["host_calls"], c["host_warmup"], 50)
                for label, f in calls.items()}


def measure(fresh=False):
    import nbflash.hf  # noqa: PLC0415
    c = config()
    name = nbflash.hf.register()
    store = common.Store(NAME, {**c, "attns": ATTNS, "nbflash_name": name},
                         key=("series",), fresh=fresh,
                         planned=[{"series": s} for s in (*ATTNS, "host")])
    for attn in ATTNS:
        if store.done(series=attn):
            continue
        print(f"{attn}: {c['warmup']} + {c['steps']} training steps", flush=True)
        point = {"series": attn}
        try:
            losses, ms = train(c, "sdpa" if attn == "sdpa" else name)
            point.update(status="ok", losses=losses, step_ms=ms,
                         median_ms=statistics.median(ms))
        except Exception as exc:  # noqa: BLE001
            point.update(bench.failure(exc))
        store.add(point)
    if not store.done(series="host"):
        print("host time per attention call", flush=True)
        try:
            point = {"series": "host", "status": "ok", "host_us": host_times(c, name)}
        except Exception as exc:  # noqa: BLE001
            point = {"series": "host", **bench.failure(exc)}
        store.add(point)
    store.finish()
    summary = summarize(common.load(common.data_path(NAME)))
    if summary:
        print(summary)


def summarize(doc):
    """One line: the step times, their ratio, the largest loss difference; None without both."""
    pts = {p["series"]: p for p in (doc or {}).get("points", []) if p["status"] == "ok"}
    if not all(a in pts for a in ATTNS):
        return None
    s, n = pts["sdpa"], pts["nbflash"]
    diff = max(abs(a - b) for a, b in zip(s["losses"], n["losses"]))
    return (f"step: SDPA {s['median_ms']:.1f} ms, nbflash {n['median_ms']:.1f} ms "
            f"({n['median_ms'] / s['median_ms']:.2f}x); losses differ by at most {diff:.3g}")


def plot():
    doc = common.load(common.data_path(NAME))
    pts = {p["series"]: p for p in (doc or {}).get("points", []) if p["status"] == "ok"}
    if not any(a in pts for a in ATTNS):
        return None
    plt = common.pyplot()
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(9.0, 3.8))
    style = {"sdpa": common.STYLE["torch"], "nbflash": common.STYLE["tc"]}
    for i, attn in enumerate(a for a in ATTNS if a in pts):
        p, st = pts[attn], style[attn]
        ax_t.bar(i, p["median_ms"], color=st["color"], label=attn)
        ax_t.text(i, p["median_ms"], f"{p['median_ms']:.1f}", ha="center", va="bottom")
        ax_l.plot(range(1, len(p["losses"]) + 1), p["losses"], marker=st["marker"],
                  color=st["color"], label=attn, markersize=3)
    ax_t.set_xticks(range(len([a for a in ATTNS if a in pts])))
    ax_t.set_xticklabels([a for a in ATTNS if a in pts])
    ax_t.set_ylabel("training step (ms, median)")
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("loss")
    ax_l.legend()
    m = doc["meta"]["params"]
    title = (f"Llama training step, {m['layers']} layers, hidden {m['hidden']}, "
             f"{m['heads']}/{m['kv_heads']} heads, B={m['B']} T={m['T']} {m['dtype']}")
    return common.save(fig, NAME, title, doc, note=summarize(doc))
