"""The command line and the device-mode switch, as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

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


# --- every user error is one line on stderr, exit status 2 (nbflash.cli_util) -----------------

def call(main, argv):
    """main(argv) in this process: its exit status (argparse's errors exit with SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def assert_one_line_error(main, argv, capsys, *words):
    """main(argv) exits 2 with one line on stderr that names the problem (`words`), and no
    traceback."""
    capsys.readouterr()
    status = call(main, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, (status, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert ": error: " in lines[0] and all(w in lines[0] for w in words), err
    return lines[0]


def nbflash_main(argv):
    from nbflash.__main__ import main  # noqa: PLC0415
    return main(argv)


@pytest.mark.parametrize("argv, words", [
    (["check", "--N", "-5"], ["--N", "positive", "-5"]),
    (["check", "--N", "0"], ["--N", "positive", "0"]),          # was silently N = 32
    (["check", "--d", "x"], ["--d", "integer"]),
    (["check", "--repeats", "0"], ["--repeats", "positive"]),
    (["check", "--impls", "nope"], ["--impls", "nope"]),
    (["check", "--dtype", "float64"], ["--dtype", "float64"]),
    (["bench", "--N", "0"], ["--N", "positive", "0"]),          # was a ZeroDivisionError
    (["bench", "--N", "-5"], ["--N", "positive", "-5"]),        # was a run of errors, status 0
    (["bench", "--repeats", "0"], ["--repeats", "positive"]),   # was silently the default
    (["bench", "--warmup", "-1"], ["--warmup", ">= 0"]),
    (["bench", "--tokens", "0"], ["--tokens", "positive"]),
    (["bench", "--hidden", "0"], ["--hidden", "positive"]),
    (["bench", "--block-size", "0"], ["--block-size", "positive"]),
    (["bench", "--dropout", "1.5"], ["--dropout", "[0, 1)", "1.5"]),
    (["bench", "--dropout", "nan"], ["--dropout"]),
    (["bench", "--density", "0"], ["--density", "(0, 1]"]),
    (["bench", "--density", "1.5"], ["--density", "(0, 1]"]),
    (["bench", "--impls", "nope"], ["--impls", "nope"]),
    (["compile", "--cc", "0"], ["--cc"]),
    (["compile", "--head-dims", "0"], ["--head-dims", "positive"]),
    (["sass", "--head-dims", "-64"], ["--head-dims", "positive"]),
    (["sanitize", "--time-limit", "-1"], ["--time-limit", "> 0"]),
    (["sanitize", "--impls", "naive"], ["--impls", "naive"]),   # naive has no kernels
    (["report", "/nonexistent-dir/x.json"], ["/nonexistent-dir/x.json", "no such file"]),
    (["nosuchverb"], ["nosuchverb"]),
    ([], ["command"]),
])
def test_bad_argument_is_one_line(capsys, argv, words):
    line = assert_one_line_error(nbflash_main, argv, capsys, *words)
    assert line.startswith("python -m nbflash"), line


def unwritable_paths(tmp_path):
    """Output paths no one can write, root included: under a regular file, under /proc; and a
    read-only folder where permissions bind (not for root)."""
    (tmp_path / "file").write_text("")
    paths = [tmp_path / "file" / "x.json", tmp_path / "file" / "sub" / "x.json", tmp_path]
    if os.path.isdir("/proc"):
        paths.append(Path("/proc/nbflash-no-such-dir/x.json"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if not os.access(ro, os.W_OK):
        paths.append(ro / "x.json")
    return paths


@pytest.mark.parametrize("verb, option", [
    (["check", "--impls", "naive", "--N", "4", "--d", "4"], "--json"),
    (["bench", "--impls", "naive"], "--out"),
    (["compile"], "--json"), (["compile"], "--ptx"), (["sass"], "--out"),
])
def test_unwritable_output_is_refused_before_anything_runs(capsys, tmp_path, monkeypatch,
                                                           verb, option):
    import nbflash.bench  # noqa: PLC0415
    ran = []
    monkeypatch.setattr(nbflash.bench, "run", lambda **kw: ran.append(kw))
    monkeypatch.setattr(nbflash.naive, "attention_forward", lambda *a, **k: ran.append(a))
    for path in unwritable_paths(tmp_path):
        assert_one_line_error(nbflash_main, [*verb, option, str(path)], capsys, option,
                              str(path))
    assert not ran


def test_unwritable_log_dir_is_refused(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    assert_one_line_error(nbflash_main, ["sanitize", "--log-dir", str(tmp_path / "file")],
                          capsys, "--log-dir", "not a directory")


def test_unwritable_default_bench_output_is_refused(capsys, tmp_path, monkeypatch):
    """bench's default --out (figures/data/bench_sim.json here) is checked first thing too."""
    import importlib  # noqa: PLC0415
    import nbflash.bench  # noqa: PLC0415
    bench_run = importlib.import_module("nbflash.bench.run")   # the module, not the function
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(bench_run, "default_out", lambda: tmp_path / "file" / "bench.json")
    monkeypatch.setattr(nbflash.bench, "run", lambda **kw: pytest.fail("it ran"))
    assert_one_line_error(nbflash_main, ["bench", "--impls", "naive"], capsys, "--out",
                          "not a directory")


def test_writable_output_check_leaves_nothing_behind(tmp_path):
    from nbflash import cli_util  # noqa: PLC0415
    target = tmp_path / "new" / "deeper" / "x.json"
    assert cli_util.output_file(str(target)) == str(target)
    assert list(tmp_path.iterdir()) == []          # no folder made, no test file left


@pytest.fixture
def tiny_bench():
    """bench at the smallest grid: naive only, one point."""
    return ["bench", "--impls", "naive", "--dtypes", "float32", "--N", "4", "--d", "4",
            "--tokens", "4", "--hidden", "4", "--causal", "off", "--passes", "fwd",
            "--no-host-overhead"]


def test_bench_refuses_data_from_another_gpu(capsys, tmp_path, tiny_bench):
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"meta": {"gpu": "Another GPU 9000"}, "records": []}))
    assert_one_line_error(nbflash_main, [*tiny_bench, "--out", str(out)], capsys,
                          str(out), "Another GPU 9000")


@pytest.mark.parametrize("text", ["{", "", "\xff\xfe"])
def test_unreadable_data_file_is_one_line(capsys, tmp_path, tiny_bench, text):
    path = tmp_path / "bench.json"
    path.write_bytes(text.encode("latin-1"))
    assert_one_line_error(nbflash_main, [*tiny_bench, "--out", str(path)], capsys, str(path))
    assert_one_line_error(nbflash_main, ["report", str(path)], capsys, str(path))


def test_report_refuses_what_is_not_a_bench_file(capsys, tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    assert_one_line_error(nbflash_main, ["report", str(path)], capsys, str(path), "records")
    path.write_text(json.dumps({"meta": {}, "records": []}))
    assert_one_line_error(nbflash_main, ["report", str(path), "--markdown", "fa2"], capsys,
                          "fa2")


def test_check_with_no_impl_taking_the_inputs_is_one_line(capsys):
    """check --d 300 --impls fa2: fa2 takes head dims up to 256."""
    assert_one_line_error(nbflash_main, ["check", "--d", "300", "--N", "4", "--impls", "fa2"],
                          capsys, "fa2", "head_dim 300")


def test_input_error_escaping_a_verb_is_one_line(capsys, monkeypatch):
    """An nbflash.InputError that reaches main (here from the reference) is a user error."""
    def refuse(*args, **kwargs):
        raise nbflash.InputError("q has 200 heads;\n  too many")
    monkeypatch.setattr(nbflash.naive, "attention_forward", refuse)
    line = assert_one_line_error(nbflash_main, ["check", "--impls", "naive", "--N", "4",
                                                "--d", "4"], capsys, "200 heads; too many")
    assert line.startswith("python -m nbflash: error: ")


def test_a_bug_still_shows_its_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(nbflash.naive, "attention_forward", broken)
    with pytest.raises(ZeroDivisionError):
        nbflash_main(["check", "--impls", "naive", "--N", "4", "--d", "4"])


def test_check_exit_status_follows_the_tolerance_rule(capsys, monkeypatch):
    """check exits 0 when every impl is within the tolerance rule (nbflash.tolerance) and 1
    when one is over it, saying so in the table and on stderr."""
    argv = ["check", "--impls", "naive", "--N", "8", "--d", "4"]
    assert nbflash_main(argv) == 0
    out = capsys.readouterr().out
    assert "tolerance" in out and "over tolerance" not in out

    right = nbflash.attention_backward

    def wrong(*args, **kwargs):          # dq off by 1e-3: over the rule's bound at float32
        dq, dk, dv = right(*args, **kwargs)
        return dq + 1e-3, dk, dv
    monkeypatch.setattr(nbflash, "attention_backward", wrong)
    assert nbflash_main(argv) == 1
    captured = capsys.readouterr()
    assert "over tolerance" in captured.out
    assert "over tolerance" in captured.err and "naive" in captured.err and "dq" in captured.err


def test_check_unsupported_impl_is_not_a_failure(capsys):
    """An impl that does not take the inputs is a row saying why, not a failure."""
    assert nbflash_main(["check", "--impls", "naive", "tc", "--N", "4", "--d", "4"]) == 0
    assert "does not run" in capsys.readouterr().out


def test_experiments_unknown_name_is_one_line(capsys):
    from experiments.__main__ import main  # noqa: PLC0415
    assert_one_line_error(main, ["no_such_experiment"], capsys, "no_such_experiment")
    assert_one_line_error(main, ["all", "no_such_experiment"], capsys, "no_such_experiment")
    assert_one_line_error(main, ["--nope"], capsys, "--nope")


def test_tuning_unknown_name_is_one_line(capsys):
    from experiments.tuning.__main__ import main  # noqa: PLC0415
    assert_one_line_error(main, ["no_such_sweep"], capsys, "no_such_sweep")
    assert_one_line_error(main, [], capsys, "NAME")


def test_user_error_from_the_command_line_end_to_end():
    """As a user runs it: one line on stderr, status 2, no traceback."""
    done = run("-m", "nbflash", "bench", "--N", "0")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "python -m nbflash bench: error: argument --N: must be a positive integer, got '0'"]


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_compile_same_ptx_as_a_bad_file_is_one_line_before_compiling(tmp_path, text):
    """--same-ptx-as with a file that --ptx did not write: one line, status 2, found before
    any kernel is compiled (it used to be a traceback after minutes of compiling)."""
    bad = tmp_path / "ptx.json"
    bad.write_text(text)
    done = run("-m", "nbflash", "compile", "--impls", "fa2", "--head-dims", "64",
               "--same-ptx-as", str(bad))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in done.stderr, lines
    assert "kernels compiled" not in done.stdout


def test_experiments_exit_2_when_every_failure_is_a_users_error(monkeypatch, capsys):
    """An experiment refused for a user's reason (data from another GPU) exits 2, not 1."""
    import experiments.__main__ as em  # noqa: PLC0415
    from nbflash import bench  # noqa: PLC0415

    def refuse(*args, **kwargs):
        raise bench.StaleData("figures/data/x.json was measured on Another GPU 9000")
    monkeypatch.setattr(em, "run_one", refuse)
    assert em.main(["io_complexity"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Another GPU 9000" in err[0]
