"""The README's benchmark table, from the bench JSON: fa2 against torch SDPA and the CuPy naive
baseline in one dtype, per (d, causal, N), forward and forward+backward.

    python3 tools/bench_table.py [figures/data/bench_h200.json] [--dtype float32]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", nargs="?", default="figures/data/bench_h200.json")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    with open(args.path) as f:
        print(table(json.load(f), args.dtype))


if __name__ == "__main__":
    main()
