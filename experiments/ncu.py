"""HBM traffic measured with Nsight Compute: run one attention pass under `ncu` and sum its
kernels' memory counters.

    counters = ncu.measure({"impl": "fa1", "pass": "fwd", "B": 64, "H": 16, "N": 1024,
                            "d": 64, "dtype": "float16", "causal": False, "M": None})

The pass runs in a child process (`python -m experiments.ncu`, below) that builds the inputs,
runs the pass once untimed (compilation, cuBLAS and allocator warm-up), then runs it again
between cudaProfilerStart and cudaProfilerStop; ncu runs with --profile-from-start off, so it
profiles exactly the kernels of that second call (every kernel of it: the naive baseline's
cuBLAS and CuPy kernels too). ncu replays each kernel once per group of counters and by default
flushes the caches before each replay (--cache-control all), so each kernel starts from a cold
L2, and --clock-control none keeps the GPU's own clocks.

Three levels of traffic, for three questions:
- `global`: bytes the kernels' global load, store, cp.async (LDGSTS), atomic and reduction
  instructions ask for (sm__sass_data_bytes_mem_global_op_*): what the algorithm's loop
  structure moves, the quantity nbflash.iomodel models and the simulator counts;
- `l2`: sectors (32 bytes) the SMs read from and write to L2 (lts__t_sectors_srcunit_tex_op_*):
  the above less what L1 caught, rounded up to whole sectors;
- `dram`: bytes read from and written to HBM (dram__bytes_*): the above less what the 60 MB L2
  caught. On the paper's A100 (40 MB L2) at its sizes these were close; on the H200 re-reads of
  K, V and Q tiles are often L2 hits.
Counters that this ncu does not know are left out; the result records which it used.
"""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

#: what is measured, from which counters (summed); sectors are 32 bytes
COUNTERS = {
    "dram_read": ("dram__bytes_read.sum",),
    "dram_write": ("dram__bytes_write.sum",),
    "l2_read": ("lts__t_sectors_srcunit_tex_op_read.sum",),
    "l2_write": ("lts__t_sectors_srcunit_tex_op_write.sum",),
    "l2_atomic": ("lts__t_sectors_srcunit_tex_op_atom.sum", "lts__t_sectors_srcunit_tex_op_red.sum"),
    "global_read": ("sm__sass_data_bytes_mem_global_op_ld.sum",
                    "sm__sass_data_bytes_mem_global_op_ldgsts.sum"),
    "global_write": ("sm__sass_data_bytes_mem_global_op_st.sum",),
    "global_atomic": ("sm__sass_data_bytes_mem_global_op_atom.sum",
                      "sm__sass_data_bytes_mem_global_op_red.sum"),
    "time_ns": ("gpu__time_duration.sum",),
}
SECTOR_BYTES = 32
FLAGS = ("--profile-from-start", "off", "--clock-control", "none", "--csv",
         "--print-units", "base")
ROOT = Path(__file__).resolve().parent.parent


def find():
    """The ncu executable, or None."""
    return shutil.which("ncu") or next(
        (p for p in ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/ncu")
         if os.path.exists(p)), None)


def _number(text):
    return float(text.replace(",", "")) if text not in ("", "n/a") else 0.0


def parse(text):
    """ncu's --csv output (one row per kernel and counter) as [{"kernel", counter: value}]."""
    start = text.find('"ID"')
    if start < 0:
        raise RuntimeError(f"no ncu table in its output: {text[-500:]}")
    kernels = {}
    for row in csv.DictReader(io.StringIO(text[start:])):
        if not row.get("ID", "").isdigit():
            continue
        k = kernels.setdefault(int(row["ID"]), {"kernel": row["Kernel Name"]})
        k[row["Metric Name"]] = _number(row["Metric Value"])
    return [kernels[i] for i in sorted(kernels)]


def totals(kernels):
    """{quantity: bytes (ns for time_ns)} summed over the kernels; sectors turned into bytes."""
    out = {}
    for name, counters in COUNTERS.items():
        present = [c for c in counters if any(c in k for k in kernels)]
        if not present:
            continue
        unit = SECTOR_BYTES if name.startswith("l2") else 1
        out[name] = unit * sum(k.get(c, 0.0) for k in kernels for c in present)
    return out


def measure(spec, timeout=900):
    """Profile the pass described by `spec` (see run_pass) under ncu. Returns {"totals",
    "kernels" (name, count and totals per kernel name), "counters" (the ncu counter names),
    "ncu" (version)}; raises RuntimeError when ncu is missing or the run fails."""
    exe = find()
    if exe is None:
        raise RuntimeError("ncu not found")
    counters = sorted({c for cs in COUNTERS.values() for c in cs})
    cmd = [exe, *FLAGS, "--metrics", ",".join(counters), sys.executable, "-m", "experiments.ncu",
           json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if res.returncode != 0 or "==ERROR==" in res.stdout + res.stderr:
        raise RuntimeError(f"ncu failed (rc {res.returncode}): {(res.stderr + res.stdout)[-800:]}")
    kernels = parse(res.stdout)
    by_name = {}
    for k in kernels:
        by_name.setdefault(k["kernel"], []).append(k)
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return {"totals": totals(kernels),
            "kernels": [{"kernel": name[:120], "launches": len(ks), **totals(ks)}
                        for name, ks in by_name.items()],
            "counters": {n: [c for c in cs if any(c in k for k in kernels)]
                         for n, cs in COUNTERS.items()},
            "ncu": version.strip().splitlines()[-1] if version.strip() else None}


def fields(spec):
    """{"ncu": measure(spec)}, or {"ncu": None, "ncu_error": why} when ncu is missing or the
    run fails: a point keeps its other measurements either way."""
    if find() is None:
        return {"ncu": None, "ncu_error": "ncu not found"}
    try:
        return {"ncu": measure(spec)}
    except Exception as exc:  # noqa: BLE001
        return {"ncu": None, "ncu_error": str(exc)[:500]}


# -- the child process ----------------------------------------------------------------------------

def run_pass(spec):
    """Build the inputs of `spec` and run its pass twice, the second time inside the profiler
    range. spec: impl ("naive", "fa1", "fa2", "torch"), pass ("fwd", "bwd", "fwdbwd"), B, H, N,
    d, dtype, causal, and M (fa1's on-chip memory, None for the default)."""
    import cupy as cp  # noqa: PLC0415

    import nbflash  # noqa: PLC0415
    B, H, N, d = (spec[k] for k in ("B", "H", "N", "d"))
    rng = cp.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((B, H, N, d), dtype=cp.float32).astype(spec["dtype"])
                   for _ in range(4))
    kw = {"causal": spec["causal"], "impl": spec["impl"]}
    if spec.get("M"):
        kw["M"] = spec["M"]
    o, lse = nbflash.attention_forward(q, k, v, **kw)

    def call():
        if spec["pass"] in ("fwd", "fwdbwd"):
            nbflash.attention_forward(q, k, v, **kw)
        if spec["pass"] in ("bwd", "fwdbwd"):
            nbflash.attention_backward(do, q, k, v, o, lse, **kw)

    call()
    cp.cuda.runtime.deviceSynchronize()
    cp.cuda.runtime.profilerStart()
    call()
    cp.cuda.runtime.deviceSynchronize()
    cp.cuda.runtime.profilerStop()


if __name__ == "__main__":
    run_pass(json.loads(sys.argv[1]))
