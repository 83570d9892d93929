"""The experiments: their measuring code run in the simulator at tiny sizes (the same code that
measures on the GPU), resume, the GPU guard, ncu's output parsed, and every figure drawn from the
committed data."""

import json
import shutil
from pathlib import Path

import pytest

from experiments import NAMES, common, ncu, tuning
from experiments import __main__ as cli
from nbflash import MODE

ROOT = Path(__file__).resolve().parent.parent
sim_only = pytest.mark.skipif(MODE != "sim", reason="the tiny sizes are the simulator's")


@pytest.fixture
def figures(tmp_path, monkeypatch):
    """A scratch figures/ folder holding a copy of the committed data."""
    shutil.copytree(ROOT / "figures" / "data", tmp_path / "data")
    monkeypatch.setattr(common, "FIGURES", tmp_path)
    return tmp_path


@pytest.fixture
def empty_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "FIGURES", tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", NAMES)
def test_plot_from_committed_data(figures, name):
    """Every experiment's figure is drawn from the data in figures/data (none yet: None)."""
    import importlib
    mod = importlib.import_module(f"experiments.{name}")
    has_data = common.data_path(name).exists() or name == "throughput"
    path = mod.plot()
    if not has_data:
        assert path is None
        return
    assert path == figures / f"{name}.png"
    assert path.stat().st_size > 10_000


@sim_only
@pytest.mark.parametrize("name", ["io_table", "block_size", "runtime", "memory", "speedup",
                                  "block_sparsity"])
def test_measure_in_simulator(empty_figures, name):
    """The GPU measuring code at the simulator's tiny sizes: every point ends ok (checked against
    the float64 reference where it is timed), the data file says where it ran, and a figure is
    drawn from it."""
    import importlib
    mod = importlib.import_module(f"experiments.{name}")
    mod.measure(fresh=True)
    doc = json.loads(common.data_path(name).read_text())
    assert doc["meta"]["gpu"] == "simulator"
    items = doc.get("points", doc.get("records"))
    assert items
    # tc takes float16 and head dims that are multiples of 16 only: elsewhere it is refused
    bad = [p for p in items if p["status"] != "ok"
           and not (p.get("impl") == "tc" and p["status"] == "unsupported")]
    assert not bad, bad[:3]
    for p in items:
        if p["status"] != "ok":
            continue
        if "median_ms" in p:
            assert p["median_ms"] > 0
        if "max_err" in p:
            assert all(p["max_err"][k] <= p["tolerance"][k] for k in p["max_err"])
    assert mod.plot().exists()


@sim_only
@pytest.mark.parametrize("name", tuning.NAMES)
def test_tuning_sweep_in_simulator(empty_figures, name):
    """Each tuning sweep at the simulator's sizes: every candidate checked against the float64
    reference (within the tolerance) and timed, its point stored; a rerun measures nothing
    new, so it leaves the file as it was."""
    import importlib
    mod = importlib.import_module(f"experiments.tuning.{name}")
    mod.measure(fresh=True)
    path = tuning.data_path(name)
    doc = json.loads(path.read_text())
    assert doc["meta"]["gpu"] == "simulator" and doc["points"]
    for p in doc["points"]:
        assert p["status"] == "ok", p
        assert p["median_ms"] > 0 and all(p["max_err"][k] <= p["tolerance"][k]
                                          for k in p["max_err"]), p
    mod.measure()
    assert json.loads(path.read_text()) == doc


@sim_only
def test_store_resumes_and_keeps_points(empty_figures):
    store = common.Store("x", {}, key=("a",))
    store.add({"a": 1, "status": "ok", "v": 1})
    store.add({"a": 2, "status": "error", "v": 2})
    again = common.Store("x", {}, key=("a",))
    assert again.done(a=1)["v"] == 1
    assert again.done(a=2) is None                    # errors are measured again
    assert len(again.doc["meta"]["earlier_runs"]) == 1
    again.add({"a": 1, "status": "ok", "v": 3})         # a point replaces its earlier record
    assert [p["v"] for p in json.loads(common.data_path("x").read_text())["points"]] == [2, 3]
    assert common.Store("x", {}, key=("a",), fresh=True).done(a=1) is None


def test_other_gpu_data_is_not_resumed(empty_figures):
    path = common.data_path("x")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"meta": {"gpu": "Some Other GPU"}, "points": []}))
    with pytest.raises(common.StaleData, match="--fresh"):
        common.Store("x", {}, key=("a",))
    common.Store("x", {}, key=("a",), fresh=True)


#: ncu --csv --print-units base output, as ncu 2025 printed it on the H200 (shortened)
NCU_CSV = '''==PROF== Connected to process 539 (/usr/bin/python3.12)
==PROF== Disconnected from process 539
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","539","python3.12","127.0.0.1","void sgemm(T1::Params)","1","7","(256, 1, 1)","(128, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","16,851,968"
"0","539","python3.12","127.0.0.1","void sgemm(T1::Params)","1","7","(256, 1, 1)","(128, 1, 1)","0","9.0","Command line profiler metrics","lts__t_sectors_srcunit_tex_op_read.sum","sector","11,638,080"
"1","539","python3.12","127.0.0.1","cupy_add","1","7","(128, 1, 1)","(32768, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","16,780,800"
"1","539","python3.12","127.0.0.1","cupy_add","1","7","(128, 1, 1)","(32768, 1, 1)","0","9.0","Command line profiler metrics","lts__t_sectors_srcunit_tex_op_read.sum","sector","524,288"
'''


def test_ncu_output_parsed():
    kernels = ncu.parse(NCU_CSV)
    assert [k["kernel"] for k in kernels] == ["void sgemm(T1::Params)", "cupy_add"]
    t = ncu.totals(kernels)
    assert t["dram_read"] == 16_851_968 + 16_780_800
    assert t["l2_read"] == 32 * (11_638_080 + 524_288)      # sectors are 32 bytes
    assert "dram_write" not in t                            # a counter not measured is absent
    with pytest.raises(RuntimeError, match="no ncu table"):
        ncu.parse("==ERROR== something went wrong")


def test_cli_lists_and_rejects_unknown(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NAMES)
    with pytest.raises(SystemExit):
        cli.main(["no_such_experiment"])


@sim_only
def test_bench_gives_up_on_slow_series(empty_figures):
    """bench.run(give_up_ms=...): after a point slower than the limit, the same series' larger N
    are recorded as skipped (not measured), also when a rerun resumes the file."""
    from nbflash import bench
    out = common.data_path("give_up")
    grid = {"impls": ("naive",), "dtypes": ("float32",), "ds": (4,), "causal": (False,),
            "passes": ("fwd",), "tokens": 8, "hidden": 4, "host_overhead": False,
            "progress": False, "out": out}
    doc = bench.run(Ns=(4, 8), give_up_ms=1e-6, **grid)
    status = {r["N"]: r["status"] for r in doc["records"]}
    assert status == {4: "ok", 8: "skipped"}
    assert "took" in next(r for r in doc["records"] if r["N"] == 8)["error"]
    doc = bench.run(Ns=(4, 8, 12), give_up_ms=1e-6, **grid)      # resumed: 12 skipped too
    assert {r["N"]: r["status"] for r in doc["records"]} == {4: "ok", 8: "skipped",
                                                             12: "skipped"}
    doc = bench.run(Ns=(16,), give_up_ms=None, **grid)           # no limit: measured
    assert next(r for r in doc["records"] if r["N"] == 16)["status"] == "ok"
