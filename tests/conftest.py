"""Test configuration. Tests run wherever nbflash's device mode points: in Numba's CUDA
simulator on a machine without a GPU (CI), on the GPU with NBFLASH_DEVICE=gpu (or auto there).
Tests marked `gpu` use sizes that only make sense on a GPU and are skipped elsewhere."""

import os

# The tests use deliberately small grids; Numba's "grid size N will likely result in GPU
# under-utilization" warning on each of them hides the warnings that matter.
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

import pytest  # noqa: E402

from nbflash import MODE  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if MODE == "gpu":
        return
    skip = pytest.mark.skip(reason=f"needs a GPU (device mode here: {MODE})")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    import nbflash  # noqa: PLC0415
    i = nbflash.info()
    return f"nbflash device mode: {i['mode']}, GPU: {i['gpu']}, versions: {i['versions']}"
