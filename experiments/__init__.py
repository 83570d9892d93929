"""The FlashAttention paper's kernel figures, regenerated from measured data.

    python -m experiments all            # every experiment
    python -m experiments runtime memory # some of them
    python -m experiments --list

One module per figure (NAMES below); each has `measure(fresh)` (the GPU measurements, resumable),
optionally `count()` (what Numba's CUDA simulator can measure without a GPU), and `plot()` (the
figure, from the stored data). See experiments/__main__.py for what runs where.
"""

#: the experiments, in the order `all` runs them (paper figure in parentheses)
NAMES = (
    "io_table",        # Fig. 2 left: GFLOPs, HBM reads+writes, runtime (B=64, H=16, N=1024)
    "block_size",      # Fig. 2 middle: fa1 forward, HBM accesses and runtime against block size
    "block_sparsity",  # Fig. 2 right: forward+backward runtime against the fraction of blocks
    "runtime",         # Fig. 3 left: forward+backward runtime against N
    "memory",          # Fig. 3 right: peak memory against N
    "throughput",      # FlashAttention-2 Figs. 4-6: TFLOP/s bars from the benchmark
    "io_complexity",   # Theorem 2: HBM accesses against M and N, modelled, counted, measured
    "speedup",         # Figs. 5-8: speed-up over the naive baseline, with dropout and masking
    "llama_step",      # not the paper's: a Llama's training step with nbflash and SDPA (issue 18)
)
