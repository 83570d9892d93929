"""The README's benchmark tables, from the bench JSON: fa2 against torch SDPA and the CuPy naive
baseline in one dtype, per (d, causal, N), forward and forward+backward; with --tc, tc against
torch SDPA float16 (default backend and FlashAttention-2 backend).

    python3 tools/bench_table.py [figures/data/bench_h200.json] [--dtype float32]
    python3 tools/bench_table.py figures/data/bench_tc_h200.json --tc
"""

import argparse
import json


def table(doc, dtype):
    rec = {(r["impl"], r["dtype"], r["d"], r["N"], r["causal"], r["pass"]): r
           for r in doc["records"]}

    def get(impl, d, N, causal, pass_):
        r = rec.get((impl, dtype, d, N, causal, pass_))
        return r if r and r["status"] == "ok" else None

    lines = ["| d | causal | N | fa2 fwd TFLOP/s | torch fwd | fa2/torch fwd | fa2 fwd+bwd TFLOP/s "
             "| torch fwd+bwd | fa2/torch fwd+bwd | fa2 bwd / torch bwd | fa2 speed-up over naive "
             "fwd+bwd |",
             "|" + " --- |" * 11]
    Ns = sorted({r["N"] for r in doc["records"]})
    for d in sorted({r["d"] for r in doc["records"]}):
        for causal in (False, True):
            for N in Ns:
                f, t = get("fa2", d, N, causal, "fwd"), get("torch", d, N, causal, "fwd")
                fb, tb = get("fa2", d, N, causal, "fwdbwd"), get("torch", d, N, causal, "fwdbwd")
                b, tbb = get("fa2", d, N, causal, "bwd"), get("torch", d, N, causal, "bwd")
                nb = get("naive", d, N, causal, "fwdbwd")
                if not (f and fb):
                    continue
                naive = rec.get(("naive", dtype, d, N, causal, "fwdbwd"))
                speedup = (f"{nb['median_ms'] / fb['median_ms']:.1f}x" if nb else
                           (naive or {}).get("status", "not run"))

                def ratio(a, b):
                    return f"{a['tflops'] / b['tflops']:.2f}" if a and b else "-"

                lines.append(
                    f"| {d} | {'yes' if causal else 'no'} | {N} | {f['tflops']:.1f} | "
                    f"{t['tflops']:.1f} | {ratio(f, t)} | {fb['tflops']:.1f} | "
                    f"{tb['tflops']:.1f} | {ratio(fb, tb)} | {ratio(b, tbb)} | {speedup} |")
    return "\n".join(lines)


def tc_table(doc):
    """tc in float16: TFLOP/s and time ratios (torch's time / tc's: above 1, tc is faster)."""
    rec = {(r["impl"], r["d"], r["N"], r["causal"], r["pass"]): r for r in doc["records"]
           if r["dtype"] == "float16" and r["status"] == "ok"}
    lines = ["| d | causal | N | tc fwd TFLOP/s | ÷ torch | ÷ torch FA2 | tc bwd TFLOP/s "
             "| ÷ torch | ÷ torch FA2 | tc fwd+bwd TFLOP/s | ÷ torch | ÷ torch FA2 |",
             "|" + " --- |" * 12]
    for d in sorted({r["d"] for r in doc["records"]}):
        for causal in (False, True):
            for N in sorted({r["N"] for r in doc["records"]}):
                cells = []
                for pass_ in ("fwd", "bwd", "fwdbwd"):
                    tc = rec.get(("tc", d, N, causal, pass_))
                    if tc is None:
                        cells += ["-"] * 3
                        continue
                    cells.append(f"{tc['tflops']:.0f}")
                    for peer in ("torch", "torch-flash"):
                        r = rec.get((peer, d, N, causal, pass_))
                        cells.append(f"{tc['tflops'] / r['tflops']:.2f}" if r else "-")
                lines.append(f"| {d} | {'yes' if causal else 'no'} | {N} | " + " | ".join(cells)
                             + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", nargs="?", default="figures/data/bench_h200.json")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tc", action="store_true", help="the tc table (float16)")
    args = ap.parse_args()
    with open(args.path) as f:
        doc = json.load(f)
    print(tc_table(doc) if args.tc else table(doc, args.dtype))


if __name__ == "__main__":
    main()
