"""The command line and the device-mode switch, as a user runs them."""

import json
import os
import subprocess
import sys

import pytest

import nbflash
from nbflash import impls


def run(*args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_info_reports_mode_and_versions():
    done = run("-m", "nbflash", "info", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["mode"] == nbflash.MODE
    assert info["versions"]["numba-cuda"] and info["versions"]["numpy"]
    if nbflash.MODE == "gpu":
        assert info["gpu"] and info["compute_capability"] and info["shared_memory_per_block"]


def test_check_prints_a_row_for_every_registered_impl():
    done = run("-m", "nbflash", "check", "--N", "9", "--d", "4", "--causal")
    assert done.returncode == 0, done.stderr
    assert "max err o" in done.stdout
    rows = [line.split()[1] for line in done.stdout.splitlines()
            if line.startswith("│") and len(line.split()) > 1]
    assert set(impls.names()) <= set(rows), rows


def test_unknown_device_mode_is_a_clear_error():
    done = run("-c", "import nbflash", env={"NBFLASH_DEVICE": "tpu"})
    assert done.returncode != 0
    assert "NBFLASH_DEVICE='tpu' is not a device mode" in done.stderr


@pytest.mark.skipif(nbflash.MODE == "gpu", reason="this machine has a GPU")
def test_asking_for_a_gpu_without_one_is_a_clear_error():
    done = run("-c", "import nbflash", env={"NBFLASH_DEVICE": "gpu"})
    assert done.returncode != 0
    assert "NBFLASH_DEVICE=gpu, but no CUDA driver with a device was found" in done.stderr


def test_compile_mode_refuses_to_run_kernels():
    code = ("import numpy as np, nbflash\n"
            "x = np.zeros((1, 1, 2, 4), np.float32)\n"
            "print(nbflash.attention(x, x, x, impl='naive').shape)\n"
            "nbflash.attention(x, x, x)\n")
    done = run("-c", code, env={"NBFLASH_DEVICE": "compile"})
    assert "(1, 1, 2, 4)" in done.stdout
    assert "NBFLASH_DEVICE=compile builds kernels for inspection but cannot run them" in done.stderr


def test_numba_cuda_imported_first_decides_the_mode():
    sim = {"NUMBA_ENABLE_CUDASIM": "1"}
    done = run("-c", "import numba.cuda, nbflash; print(nbflash.MODE)",
               env={**sim, "NBFLASH_DEVICE": "auto"})
    assert done.returncode == 0 and done.stdout.strip() == "sim", done.stderr
    done = run("-c", "import numba.cuda, nbflash", env={**sim, "NBFLASH_DEVICE": "gpu"})
    assert done.returncode != 0
    assert "numba.cuda was already imported in simulator mode" in done.stderr
