"""The experiments: their measuring code run in the simulator at tiny sizes (the same code that
measures on the GPU), resume, the GPU guard, ncu's output parsed, and every figure drawn from the
committed data."""

import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

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
    assert again.resumed == common.unfinished("x")     # the unfinished run's side file
    assert not common.data_path("x").exists()         # no run has finished: no data file yet
    again.add({"a": 1, "status": "ok", "v": 3})         # a point replaces its earlier record
    again.finish()
    doc = json.loads(common.data_path("x").read_text())
    assert [p["v"] for p in doc["points"]] == [2, 3] and doc["meta"]["complete"] is True
    assert common.unfinished("x") is None
    path, before = common.data_path("x"), common.data_path("x").read_bytes()
    with pytest.raises(KeyboardInterrupt), common.Store("x", {}, key=("a",), fresh=True) as st:
        assert st.done(a=1) is None                   # fresh: nothing stored is kept
        st.add({"a": 9, "status": "ok"})
        raise KeyboardInterrupt                       # a block left by an exception: no finish
    assert path.read_bytes() == before
    with common.Store("x", {}, key=("a",)) as st:     # resumes the interrupted fresh run
        assert st.done(a=9) and st.done(a=1) is None
    assert [p["a"] for p in json.loads(path.read_text())["points"]] == [9]


def test_other_gpu_data_is_not_resumed(empty_figures):
    path = common.data_path("x")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"meta": {"gpu": "Some Other GPU"}, "points": []}))
    with pytest.raises(common.StaleData, match="--fresh"):
        common.Store("x", {}, key=("a",))
    common.Store("x", {}, key=("a",), fresh=True)


# -- interrupted and damaged data files (issue 16) ------------------------------------------------

def _cut_short(path):
    """Truncate a data file mid-way, as a full disk or a copy cut short leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path.read_bytes()


def test_corrupt_data_file_is_named_with_what_to_do(figures):
    """A data file cut short stops a run and a figure with an error that names the file and
    says what to do (--fresh), not a JSONDecodeError without the path."""
    path = common.data_path("block_size")
    _cut_short(path)
    for read in (lambda: common.Store("block_size", {}, key=("M",)), lambda: common.load(path),
                 lambda: cli.run_one("block_size", False, True, Console(width=200))):
        with pytest.raises(common.CorruptData) as got:
            read()
        assert str(path) in str(got.value) and "--fresh" in str(got.value)
        assert "git checkout" in str(got.value)           # or put a good copy back
        assert not isinstance(got.value, json.JSONDecodeError)
        assert got.value.__cause__ is None and got.value.__suppress_context__


@sim_only
def test_interrupted_count_keeps_the_committed_file(figures, monkeypatch):
    """Ctrl-C in io_complexity's count (which counts everything again) leaves the committed
    file byte for byte and the count so far in its side file; the next run resumes that and,
    when it finishes, replaces the file."""
    from experiments import io_complexity
    from nbflash import iomodel
    points = io_complexity.SIM_POINTS[3:6]            # three small fa1 forwards
    monkeypatch.setattr(io_complexity, "SIM_POINTS", points)
    path = common.data_path(io_complexity.COUNTED)
    before = path.read_bytes()
    real, calls = iomodel.count, []

    def count():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real()
    monkeypatch.setattr(iomodel, "count", count)
    with pytest.raises(KeyboardInterrupt):
        io_complexity.count()
    assert path.read_bytes() == before
    side = json.loads(common.unfinished(io_complexity.COUNTED).read_text())
    assert len(side["points"]) == 2 and side["meta"]["complete"] is False
    assert common.incomplete_note(side) == "incomplete: 2 of 3 points"
    io_complexity.count()                             # resumes: counts the third point only
    assert len(calls) == 4
    doc = json.loads(path.read_text())
    assert [p["point"] for p in doc["points"]] == [list(p) for p in points]
    assert doc["meta"]["complete"] is True and all(p["equal"] for p in doc["points"])
    assert common.unfinished(io_complexity.COUNTED) is None


@sim_only
def test_interrupted_experiment_of_bench_runs_keeps_its_file(empty_figures, monkeypatch):
    """run_bench (several bench runs into one file, the first afresh): interrupted in its second
    run, the data file is as it was; a rerun resumes the side file and only then replaces it."""
    from nbflash import bench
    grid = {"impls": ("naive",), "dtypes": ("float32",), "ds": (4,), "causal": (False,),
            "passes": ("fwd",), "tokens": 8, "hidden": 4, "progress": False}
    runs = [{"Ns": (4,)}, {"Ns": (8,)}]
    common.run_bench("x", False, runs, **grid)
    path = common.data_path("x")
    before = path.read_bytes()
    real, calls = bench.timing.median_ms, []

    def timed(*args, **kw):
        calls.append(1)
        if len(calls) == 2:                           # the second run's point
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(bench.timing, "median_ms", timed)
    with pytest.raises(KeyboardInterrupt):
        common.run_bench("x", True, runs, **grid)
    assert path.read_bytes() == before
    assert [r["N"] for r in json.loads(common.unfinished("x").read_text())["records"]] == [4]
    common.run_bench("x", False, runs, **grid)
    assert len(calls) == 3                            # N=8 only
    doc = json.loads(path.read_text())
    assert sorted(r["N"] for r in doc["records"]) == [4, 8] and doc["meta"]["complete"]
    assert common.unfinished("x") is None


def test_fresh_sets_a_corrupt_file_aside_and_starts_again(figures):
    """--fresh on a file that cannot be read: the file is renamed aside (its bytes kept next to
    it) and the run starts again; `python -m experiments NAME --fresh` gets past a damaged file
    it only plots from, drawing the figure without it."""
    path = common.data_path("block_size")
    damaged = _cut_short(path)
    store = common.Store("block_size", {}, key=("M",), fresh=True)
    (aside,) = path.parent.glob("block_size.corrupt-*.json")
    assert aside.read_bytes() == damaged and not path.exists()
    store.add({"M": 1, "status": "ok"})
    store.finish()
    assert [p["M"] for p in json.loads(path.read_text())["points"]] == [1]

    path = common.data_path("io_complexity")          # GPU data, read by the plot only
    damaged = _cut_short(path)
    did, fig, _ = cli.run_one("io_complexity", True, False, Console(width=200), count=False)
    (aside,) = path.parent.glob("io_complexity.corrupt-*.json")
    assert aside.read_bytes() == damaged and fig.exists() and "plotted" in did


@sim_only
def test_incomplete_data_says_so_in_the_figure_and_the_summary(empty_figures, monkeypatch):
    """Data of a run that did not finish (only its side file there) is drawn, and the figure's
    title and the summary's "what ran" say it is incomplete and how much is there; complete
    data and files from before the store marked completeness say nothing."""
    committed = json.loads((ROOT / "figures" / "data" / "block_size.json").read_text())
    assert common.incomplete_note(committed) is None          # no flag: complete
    store = common.Store("block_size", committed["meta"]["params"], key=("M",),
                         planned=[{"M": p["M"]} for p in committed["points"]])
    for p in committed["points"][:2]:
        store.add(p)                                  # ... and the run stops here
    n = len(committed["points"])
    doc = common.load(common.data_path("block_size"))
    assert common.incomplete_note(doc) == f"incomplete: 2 of {n} points"
    assert common.incomplete_note(doc, "(c)") == f"(c) incomplete: 2 of {n} points"
    assert common.incomplete_note({"meta": {"complete": False}, "bars": []}) == \
        "incomplete: the run did not finish"
    titles = []
    real = common.title_lines
    monkeypatch.setattr(common, "title_lines", lambda *a, **k: titles.append(real(*a, **k))
                        or titles[-1])
    did, fig, _ = cli.run_one("block_size", False, True, Console(width=200))
    assert fig.exists() and f"incomplete: 2 of {n} points" in titles[-1]
    assert f"block_size.json: incomplete: 2 of {n} points" in did
    store.finish()
    assert common.incomplete_note(common.load(common.data_path("block_size"))) is None
    did, _, _ = cli.run_one("block_size", False, True, Console(width=200))
    assert "incomplete" not in did and "incomplete" not in titles[-1]


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
