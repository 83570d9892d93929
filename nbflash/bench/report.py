"""The benchmark's results on screen and in the README's form: rich tables of a run's records
(one per set of options), the host time per call, and a Markdown table of one impl against its
peers (``python -m nbflash report FILE``).
"""

import sys

from .grid import PASSES, options_label, record_key, record_options
from .timing import host_config


def make_console():
    from rich.console import Console  # noqa: PLC0415
    # piped output (CI logs, the GPU machine) gets 120 columns instead of rich's default 80
    return Console() if sys.stdout.isatty() else Console(width=120)


def _fmt(x, decimals):
    """Fixed decimals, or three significant digits for the simulator's tiny numbers."""
    return f"{x:.{decimals}f}" if x >= 10.0 ** -decimals else f"{x:.2e}"


def _ratio(a, b):
    return _fmt(a / b, 2) if a and b else ""


def _where(r):
    opts = options_label(*record_options(r))
    return f"{r['dtype']} d={r['d']} N={r['N']}{' ' + opts if opts else ''}"


def _table(recs, title):
    """One table of records that share their options."""
    from rich.table import Table  # noqa: PLC0415
    tflops = {record_key(r): r["tflops"] for r in recs if r["status"] == "ok"}
    table = Table(title=title)
    for col in ("impl", "dtype", "d", "N", "causal", "pass", "median ms", "TFLOP/s", "vs torch",
                "vs naive", "status"):
        table.add_column(col, justify="left" if col in ("impl", "status") else "right")
    for r in recs:
        key = record_key(r)
        t = tflops.get(key)
        table.add_row(r["impl"], r["dtype"], str(r["d"]), str(r["N"]),
                      "on" if r["causal"] else "off", r["pass"],
                      _fmt(r["median_ms"], 3) if t else "", _fmt(t, 2) if t else "",
                      _ratio(t, tflops.get(("torch", *key[1:]))) if r["impl"] != "torch" else "",
                      _ratio(t, tflops.get(("naive", *key[1:]))) if r["impl"] != "naive" else "",
                      r["status"] + (" (unchecked)" if r.get("check_skipped") else ""))
    return table


def print_table(doc, console=None):
    """The records as tables, one per set of options (named in its title): time, TFLOP/s (dense
    FLOPs), and the ratio to torch and to naive (same dtype, problem, options and pass); then the
    messages of the points that failed, and why some outputs went unchecked."""
    console = console or make_console()
    recs = sorted(doc["records"], key=lambda r: (r["dtype"], r["d"], r["causal"],
                                                 PASSES.index(r["pass"]), r["N"], r["impl"]))
    by_options = {}
    for r in recs:
        by_options.setdefault(options_label(*record_options(r)), []).append(r)
    for label in sorted(by_options):    # dense ('') first
        title = f"nbflash bench on {doc['meta']['gpu']}{': ' + label if label else ''}"
        console.print(_table(by_options[label], title))
    # each distinct failure, and each reason for an unchecked output, once with where
    notes = {}
    for r in recs:
        if r["status"] != "ok" and r.get("error"):
            notes.setdefault((r["impl"], r["status"], r["error"]), []).append(r)
        elif r.get("check_skipped"):
            notes.setdefault((r["impl"], "unchecked", r["check_skipped"]), []).append(r)
    for (impl, status, error), rs in notes.items():
        where = ", ".join(sorted({_where(r) for r in rs}))
        console.print(f"{impl} {status} x{len(rs)} ({where}): {error[:300]}", style="dim",
                      markup=False, highlight=False)
    if doc["meta"].get("mode") != "gpu":
        console.print("Simulator times are of Python threads on the CPU, not of a GPU.")


def print_host_overhead(doc, console=None):
    """The host time per call as a table."""
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415  (messages are not markup)
    console = console or make_console()
    hosts = doc.get("host_overhead_us") or {}
    if not hosts:
        return
    cfg = doc["meta"].get("params", {}).get("host_overhead") or host_config()
    B, H, N, d = cfg["shape"]
    table = Table(title=f"host time per call, µs (B={B} H={H} N={N} d={d} float32 unless "
                        f"noted, median of {cfg['calls']})")
    for col in ("impl", "forward", "backward", "note"):
        table.add_column(col, justify="left" if col in ("impl", "note") else "right")
    for impl, h in hosts.items():
        table.add_row(impl, *(f"{h[k]:.1f}" if h.get(k) is not None else "-"
                              for k in ("forward", "backward")),
                      Text(f"{h['status']}: {h.get('error', '')[:80]}" if "status" in h else
                           (h["dtype"] if h.get("dtype", "float32") != "float32" else "")))
    console.print(table)


def markdown_table(doc, impl, dtype, peers=("torch",), passes=PASSES):
    """One impl in one dtype against `peers` (impls measured in the same file, same dtype), as
    a Markdown table: a row per (d, causal, N), per pass its TFLOP/s and the ratio to each peer's
    (above 1: `impl` is faster)."""
    rec = {(r["impl"], r["d"], r["N"], r["causal"], r["pass"]): r for r in doc["records"]
           if r["dtype"] == dtype and r["status"] == "ok" and record_options(r)[2] is None
           and not record_options(r)[0] and not record_options(r)[1]}
    head = ["d", "causal", "N"]
    for p in passes:
        head += [f"{impl} {p} TFLOP/s"] + [f"÷ {peer}" for peer in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    mine = sorted({(d, c, n) for (i, d, n, c, _) in rec if i == impl})
    for d, causal, N in mine:
        cells = [str(d), "yes" if causal else "no", str(N)]
        for p in passes:
            r = rec.get((impl, d, N, causal, p))
            cells.append(f"{r['tflops']:.1f}" if r else "-")
            for peer in peers:
                o = rec.get((peer, d, N, causal, p))
                cells.append(f"{r['tflops'] / o['tflops']:.2f}" if r and o else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
