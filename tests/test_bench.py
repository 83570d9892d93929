"""The benchmark harness (nbflash.bench) on tiny grids: records, resume, failures kept as
records, the FLOP formula, and `python -m nbflash bench`."""

import json
import os
import subprocess
import sys

import pytest

import nbflash
from nbflash import bench
from nbflash import impls

#: the auto impl for float32 inputs at head dim 8 (the FlashAttention kernel the harness times
#: by default)
KERNEL = impls.resolve("auto", "float32", 8).name
#: one problem, B=1 H=2 N=8 d=8 (two heads: the check slice takes heads 0 and 1)
TINY = {"dtypes": ("float32",), "Ns": (8,), "ds": (8,), "tokens": 8, "hidden": 16,
        "repeats": 1, "warmup": 0, "host_overhead": False, "progress": False}
FIELDS = ("impl", "dtype", "B", "H", "N", "d", "causal", "pass", "median_ms", "tflops",
          "status", "max_err")


def by_point(doc):
    return {(r["impl"], r["causal"], r["pass"], r["N"]): r for r in doc["records"]}


@pytest.fixture
def count_timings(monkeypatch):
    """Counts the timed measurements bench makes (one per timed point)."""
    calls = []
    real = bench.median_ms

    def counting(*args, **kw):
        calls.append(args)
        return real(*args, **kw)
    monkeypatch.setattr(bench.timing, "median_ms", counting)
    return calls


def test_flops_match_the_anchor_formula():
    # torch SDPA measured on the H200 (2026-11-24): fp16 d64 N512 (B=32, H=32): 0.2048 ms ->
    # 335.49 TFLOP/s
    # forward, causal 0.1558 ms -> 220.59, fwd+bwd 0.8554 ms -> 281.17
    assert bench.problem_size(16384, 2048, 512, 64) == (32, 32)
    for causal, pass_, ms, tflops in ((False, "fwd", 0.2048, 335.49),
                                      (True, "fwd", 0.1558, 220.59),
                                      (False, "fwdbwd", 0.8554, 281.17)):
        got = bench.flops(32, 32, 512, 64, causal, pass_) / ms / 1e9
        assert got == pytest.approx(tflops, rel=1e-3)
    assert bench.flops(1, 1, 8, 8, False, "bwd") == 2.5 * 4 * 8 * 8 * 8


def test_rotation_copies_and_names():
    assert bench.copies_for(1) == bench.MAX_COPIES
    assert bench.copies_for(10**9) == bench.MIN_COPIES
    assert bench.copies_for(40e6) == 4          # 4 x 40 MB > 150 MB
    assert bench.gpu_short_name("NVIDIA H200") == "h200"
    assert bench.gpu_short_name("NVIDIA GeForce RTX 4090") == "rtx-4090"


def test_tiny_grid_records_every_point_checked_and_timed(tmp_path):
    out = tmp_path / "b.json"
    doc = bench.run(impls=(KERNEL, "naive"), out=out, **TINY)
    recs = doc["records"]
    assert len(recs) == 2 * 2 * 3                       # impls x causal x passes
    for r in recs:
        assert all(f in r for f in FIELDS), r
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["tflops"] > 0
        assert (r["B"], r["H"], r["N"], r["d"], r["dtype"]) == (1, 2, 8, 8, "float32")
        assert set(r["max_err"]) == ({"o"} if r["pass"] == "fwd" else {"o", "dq", "dk", "dv"})
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    meta = doc["meta"]
    assert meta["gpu"] == ("simulator" if nbflash.MODE != "gpu" else nbflash.info()["gpu"])
    assert meta["versions"]["numpy"] and meta["date"] and meta["git_commit"] and meta["command"]


def test_resume_skips_finished_points_and_reruns_errors(tmp_path, count_timings):
    out = tmp_path / "b.json"
    grid = {**TINY, "impls": ("naive",), "passes": ("fwd", "bwd")}
    bench.run(out=out, **grid)
    assert len(count_timings) == 4
    first = out.read_bytes()
    bench.run(out=out, **grid)
    assert len(count_timings) == 4                      # nothing timed again
    assert out.read_bytes() == first                    # a run that changes nothing: no write
    doc = json.loads(out.read_text())
    doc["records"][0]["status"] = "error"
    out.write_text(json.dumps(doc))
    doc = bench.run(out=out, **grid)
    assert len(count_timings) == 5                      # only the error point
    assert len(doc["records"]) == 4 and all(r["status"] == "ok" for r in doc["records"])
    assert len(doc["meta"]["earlier_runs"]) == 1        # the first (the second wrote nothing)
    bench.run(out=out, resume=False, **grid)
    assert len(count_timings) == 9                      # --no-resume: all again


def test_interrupted_fresh_run_leaves_the_last_complete_file(tmp_path, monkeypatch):
    """--no-resume over a complete file, Ctrl-C after 2 of 4 points: the file is byte for byte
    as it was, the 2 points are in the side file; a rerun resumes them and, finished,
    replaces the file (without the old run's records: it started afresh)."""
    out = tmp_path / "b.json"
    grid = {**TINY, "impls": ("naive",), "passes": ("fwd", "bwd")}     # 2 problems x 2 passes
    bench.run(out=out, **grid)
    before = out.read_bytes()
    real, calls = bench.timing.median_ms, []

    def timed(*args, **kw):
        calls.append(1)
        if len(calls) == 3:                           # the second problem's first pass
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(bench.timing, "median_ms", timed)
    with pytest.raises(KeyboardInterrupt):
        bench.run(out=out, resume=False, **grid)
    assert out.read_bytes() == before
    side = json.loads((tmp_path / "b.partial.json").read_text())
    assert len(side["records"]) == 2
    assert side["meta"]["complete"] is False and side["meta"]["planned"] == 4
    doc = bench.run(out=out, **grid)
    assert len(calls) == 5                            # the two points left
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert len(doc["records"]) == 4 and doc["meta"]["complete"] is True
    assert len(doc["meta"]["earlier_runs"]) == 1      # the interrupted run, not the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]


def test_corrupt_output_is_named_and_no_resume_sets_it_aside(tmp_path):
    """A benchmark file cut short: the error names it and says --no-resume, which renames it
    aside (the bytes kept next to it) and measures again."""
    from nbflash.bench.store import CorruptData
    out = tmp_path / "b.json"
    grid = {**TINY, "impls": ("naive",), "passes": ("fwd",), "causal": (False,)}
    bench.run(out=out, **grid)
    damaged = out.read_bytes()[:100]
    out.write_bytes(damaged)
    with pytest.raises(CorruptData) as got:
        bench.run(out=out, **grid)
    assert str(out) in str(got.value) and "--no-resume" in str(got.value)
    assert got.value.__cause__ is None and got.value.__suppress_context__
    assert out.read_bytes() == damaged                # a failed resume touches nothing
    doc = bench.run(out=out, resume=False, **grid)
    (aside,) = tmp_path.glob("b.corrupt-*.json")
    assert aside.read_bytes() == damaged
    assert json.loads(out.read_text())["records"] == doc["records"] and len(doc["records"]) == 1


def test_write_json_cleans_up_and_never_shares_a_temporary_file(tmp_path):
    """write_json: when json.dump fails the old file is intact and no temporary file is left;
    its temporary file is its own (a leftover of the old fixed name does not get in the way)."""
    path = tmp_path / "x.json"
    bench.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        bench.write_json(path, {"a": 2, "b": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    other = tmp_path / "sub" / "y.json"
    other.parent.mkdir()
    (other.parent / "y.json.tmp").mkdir()             # what another writer could hold
    bench.write_json(other, {"b": 1})
    assert json.loads(other.read_text()) == {"b": 1}
    assert sorted(p.name for p in other.parent.iterdir()) == ["y.json", "y.json.tmp"]


def test_out_of_memory_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real = nbflash.attention_forward

    def forward(q, k, v, **kw):
        if q.shape[2] == 16:
            raise MemoryError("pretend the N=16 problem does not fit")
        return real(q, k, v, **kw)
    monkeypatch.setattr(nbflash, "attention_forward", forward)
    out = tmp_path / "b.json"
    doc = bench.run(impls=("naive",), out=out, **{**TINY, "Ns": (16, 8), "tokens": 16})
    recs = by_point(doc)
    assert len(recs) == 2 * 2 * 3
    for (_, _, _, N), r in recs.items():
        if N == 16:
            assert r["status"] == "oom" and "does not fit" in r["error"], r
            assert r["median_ms"] is None
        else:
            assert r["status"] == "ok", r
    assert len(json.loads(out.read_text())["records"]) == 12


def test_wrong_output_is_an_error_and_not_timed(monkeypatch, count_timings):
    real = nbflash.attention_forward
    forwards = []

    def wrong_forward(q, k, v, **kw):
        forwards.append(kw["impl"])
        o, lse = real(q, k, v, **kw)
        return o + 1, lse
    monkeypatch.setattr(nbflash, "attention_forward", wrong_forward)
    doc = bench.run(impls=("naive",), causal=(False,), **TINY)
    assert forwards == ["naive"]                        # the check run, nothing timed
    assert not count_timings
    for r in doc["records"]:
        assert r["status"] == "error" and r["median_ms"] is None and r["tflops"] is None
        assert "correctness check failed" in r["error"]
        assert r["max_err"]["o"] > r["tolerance"]["o"]


def test_wrong_gradient_fails_only_the_backward_points(monkeypatch):
    real = nbflash.attention_backward

    def wrong_backward(*args, **kw):
        dq, dk, dv = real(*args, **kw)
        return dq * 2, dk, dv
    monkeypatch.setattr(nbflash, "attention_backward", wrong_backward)
    doc = bench.run(impls=("naive",), causal=(True,), **TINY)
    status = {r["pass"]: r["status"] for r in doc["records"]}
    assert status == {"fwd": "ok", "bwd": "error", "fwdbwd": "error"}
    bad = next(r for r in doc["records"] if r["pass"] == "bwd")
    assert "dq" in bad["error"] and "dk" not in bad["error"]


def test_peers_that_cannot_run_are_recorded_unsupported(monkeypatch):
    real = nbflash.attention_forward

    def refuse(q, k, v, **kw):
        if q.dtype.name == "float16":
            raise nbflash.InputError("pretend float16 is refused")
        return real(q, k, v, **kw)
    monkeypatch.setattr(nbflash, "attention_forward", refuse)
    impls = ("naive",) if nbflash.MODE == "gpu" else ("torch", "torch-flash", "naive")
    doc = bench.run(impls=impls, passes=("fwd",), causal=(False,),
                    **{**TINY, "dtypes": ("float32", "float16")})
    for r in doc["records"]:
        if r["impl"] == "naive":
            assert r["status"] == ("ok" if r["dtype"] == "float32" else "unsupported"), r
        else:
            assert r["status"] == "unsupported" and "torch" in r["error"], r


def test_host_overhead_has_forward_and_backward_per_impl():
    got = bench.measure_host_overhead(("naive",), {**bench.SIM_HOST, "calls": 3})
    assert got["naive"]["forward"] > 0 and got["naive"]["backward"] > 0


def test_cli_writes_the_json(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "nbflash", "bench", "--impls", "naive", "--dtypes", "float32",
         "--N", "8", "--d", "8", "--tokens", "8", "--hidden", "16", "--causal", "on",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "NBFLASH_DEVICE": "sim"})
    assert done.returncode == 0, done.stderr
    assert "TFLOP/s" in done.stdout and f"wrote {out}" in done.stdout.replace("\n", "")
    doc = json.loads(out.read_text())
    assert [r["pass"] for r in doc["records"]] == list(bench.PASSES)
    assert all(r["status"] == "ok" and r["causal"] for r in doc["records"])
    assert doc["host_overhead_us"]["naive"]["forward"] > 0
    assert doc["meta"]["command"].startswith("python -m nbflash bench --impls naive")


def options_of(r):
    return (r["dropout_p"], r["padding"], r["density"], r["block_size"])


def test_dropout_and_padding_points_are_checked_and_resumed_by_options(tmp_path,
                                                                       count_timings):
    out = tmp_path / "b.json"
    grid = {**TINY, "causal": (True,), "passes": ("fwd", "bwd")}
    doc = bench.run(impls=(KERNEL, "naive"), out=out, dropout=0.2, padding=True, **grid)
    assert len(doc["records"]) == len(count_timings) == 2 * 2         # impls x passes
    for r in doc["records"]:
        assert options_of(r) == (0.2, True, None, None), r
        assert r["status"] == "ok" and "check_skipped" not in r, r
        assert set(r["max_err"]) == ({"o"} if r["pass"] == "fwd" else {"o", "dq", "dk", "dv"})
        assert all(r["max_err"][n] <= r["tolerance"][n] for n in r["max_err"])
    params = doc["meta"]["params"]
    assert (params["dropout_p"], params["padding"], params["densities"]) == (0.2, True, None)
    bench.run(impls=(KERNEL, "naive"), out=out, dropout=0.2, padding=True, **grid)
    assert len(count_timings) == 4                      # the same options: nothing timed again
    doc = bench.run(impls=("naive",), out=out, dropout=0.1, padding=True, **grid)
    assert len(count_timings) == 6                      # another dropout: measured anew
    doc = bench.run(impls=("naive",), out=out, **grid)
    assert len(count_timings) == 8                      # neither: also new points
    assert len(doc["records"]) == 8
    assert {options_of(r) for r in doc["records"]} == {
        (0.2, True, None, None), (0.1, True, None, None), (0.0, False, None, None)}


def test_the_check_sees_a_different_dropout_mask(monkeypatch):
    real = nbflash.attention_forward

    def other_seed(q, k, v, **kw):
        return real(q, k, v, **{**kw, "seed": kw["seed"] + 1})
    monkeypatch.setattr(nbflash, "attention_forward", other_seed)
    doc = bench.run(impls=("naive",), causal=(False,), passes=("fwd",), dropout=0.5, **TINY)
    (r,) = doc["records"]
    assert r["status"] == "error" and "correctness check failed" in r["error"], r


def test_block_sparse_points_record_their_density_and_resume_by_it(tmp_path, count_timings):
    out = tmp_path / "b.json"
    grid = {**TINY, "causal": (False,), "passes": ("fwd", "bwd"), "block_size": 4}
    doc = bench.run(impls=(KERNEL, "naive"), out=out, densities=(1.0, 0.5), **grid)
    assert len(doc["records"]) == len(count_timings) == 2 * 2 * 2     # densities x impls x passes
    for r in doc["records"]:
        assert options_of(r)[:2] == (0.0, False) and r["block_size"] == 4, r
        assert r["density"] in (1.0, 0.5) and r["block_density"] == r["density"], r  # 2x2 blocks
        assert r["status"] == "ok" and r["max_err"]["o"] <= r["tolerance"]["o"], r
        dense = bench.flops(1, 2, 8, 8, False, r["pass"]) / r["median_ms"] / 1e9
        assert r["tflops"] == pytest.approx(dense)      # TFLOP/s of dense FLOPs at any density
    bench.run(impls=(KERNEL, "naive"), out=out, densities=(1.0, 0.5), **grid)
    assert len(count_timings) == 8                      # the same densities: nothing again
    bench.run(impls=("naive",), out=out, densities=(0.5, 0.25), **grid)
    assert len(count_timings) == 10                     # only density 0.25 is new
    doc = bench.run(impls=("naive",), out=out, densities=(0.5,), **{**grid, "block_size": 2})
    assert len(count_timings) == 12                     # another block size: new points
    assert len(doc["records"]) == 12


def test_records_without_option_fields_count_as_without_options(tmp_path, count_timings):
    out = tmp_path / "b.json"
    grid = {**TINY, "impls": ("naive",), "causal": (False,), "passes": ("fwd",)}
    doc = bench.run(out=out, **grid)
    for r in doc["records"]:                            # a file from before the options
        for name in ("dropout_p", "padding", "density", "block_size"):
            del r[name]
    out.write_text(json.dumps(doc))
    bench.run(out=out, **grid)
    assert len(count_timings) == 1
    doc = bench.run(out=out, padding=True, **grid)
    assert len(count_timings) == 2 and len(doc["records"]) == 2


def test_cli_takes_the_options(tmp_path, capsys):
    from nbflash.__main__ import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--impls", "naive", "--dtypes", "float32", "--N", "8", "--d", "8",
                 "--tokens", "8", "--hidden", "16", "--causal", "on", "--passes", "fwd",
                 "--dropout", "0.1", "--padding", "--density", "0.5", "--block-size", "4",
                 "--no-host-overhead", "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["records"]
    assert options_of(r) == (0.1, True, 0.5, 4) and r["status"] == "ok", r
    assert "dropout 0.1, padded, density 0.5 block 4" in capsys.readouterr().out


def test_resuming_a_side_file_after_the_file_changed_is_refused(tmp_path):
    """An unfinished run's side file, then the data file changes (a pull, a copy, another run):
    resuming the side file would put its older data in place of the newer file, so the store
    refuses, naming both, and the newer file stays as it is."""
    from nbflash.bench.store import Store  # noqa: PLC0415
    out = tmp_path / "d.json"
    with Store(out, {"gpu": "g"}, key=("a",)) as first:
        first.add({"a": 1, "status": "ok"})
    unfinished = Store(out, {"gpu": "g"}, key=("a",))
    unfinished.add({"a": 2, "status": "ok"})            # interrupted: never finished
    assert (tmp_path / "d.partial.json").exists()
    newer = json.loads(out.read_text())
    newer["points"].append({"a": 3, "status": "ok"})
    out.write_text(json.dumps(newer))
    before = out.read_bytes()
    with pytest.raises(bench.StaleData, match="d.partial.json"):
        Store(out, {"gpu": "g"}, key=("a",))
    assert out.read_bytes() == before
    (tmp_path / "d.partial.json").unlink()              # as the message says: resume the file
    again = Store(out, {"gpu": "g"}, key=("a",))
    assert again.done(a=3) is not None and again.done(a=2) is None
