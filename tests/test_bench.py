"""fastdl-bench (issue #12): the machine limits are ceilings, the honesty flags, --report,
--compare and --suite. The report test runs every suite in its quick form with a tiny budget."""
import argparse
import json
import os

import pytest
import torch

import fastdl
from fastdl import _C
from fastdl.bench import cli, compare, harness, machine


@pytest.mark.parametrize("kernel", machine.KERNELS)
def test_stream_kernels_measure(kernel):
    gbps = _C.measure_stream_bandwidth(kernel, 1 << 20, 2)
    assert 0.1 < gbps < 1e5


@pytest.mark.parametrize("args,match", [(("triads", 1 << 20, 2), "triads"),
                                        (("read", 100, 2), "footprint_bytes"),
                                        (("read", 1 << 20, 0), "reps")])
def test_stream_kernel_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        _C.measure_stream_bandwidth(*args)


def _tiers(*pairs):
    tiers = [{"footprint_bytes": fp, "GBps": bw, "kernel": "update"} for fp, bw in pairs]
    tiers[-1]["dram"] = True
    return {"bandwidth_name": "dram (update)", "bandwidth_GBps": tiers[-1]["GBps"],
            "tiers": tiers, "peak_GFLOPs": 100.0}


def test_bandwidth_tier_is_the_largest_footprint_not_above_the_working_set():
    lim = _tiers((1 << 20, 300.0), (64 << 20, 80.0), (1 << 30, 40.0))
    assert machine.bandwidth_limit(lim, 10 << 10) == (300.0, "mem@1M")   # below every tier
    assert machine.bandwidth_limit(lim, 100 << 20) == (80.0, "mem@64M")
    assert machine.bandwidth_limit(lim, 3 << 30) == (40.0, "dram")
    lim["llc_bytes"] = 32 << 20                      # tiers inside the LLC are cache-hot
    assert machine.bandwidth_limit(lim, 10 << 20) == (300.0, "cache@1M")
    assert machine.bandwidth_limit(lim, 100 << 20) == (80.0, "mem@64M")


def test_tiers_are_made_monotone():
    tiers = _tiers((1 << 20, 30.0), (64 << 20, 80.0), (1 << 30, 40.0))["tiers"]
    machine._monotone(tiers)
    assert [t["GBps"] for t in tiers] == [80.0, 80.0, 40.0]


def test_llc_is_the_largest_any_source_reports(monkeypatch):
    monkeypatch.setattr(machine, "_sysfs_llc", lambda: 32 << 20)
    monkeypatch.setattr(machine, "_sysconf_llc", lambda: 320 << 20)
    assert machine.llc_bytes() == 320 << 20
    assert machine.dram_footprint() == 1280 << 20          # 4x the largest LLC, above 1 GiB
    monkeypatch.setattr(machine, "_sysconf_llc", lambda: 0)
    assert machine.dram_footprint() == 1 << 30             # at least 1 GiB


def test_sysconf_llc_is_what_getconf_prints():
    import shutil
    import subprocess
    if not shutil.which("getconf"):
        pytest.skip("getconf (glibc's libc-bin) is not installed")
    out = subprocess.run(["getconf", "LEVEL3_CACHE_SIZE"], capture_output=True, text=True).stdout
    expected = int(out.strip() or 0) if out.strip().lstrip("-").isdigit() else 0
    assert machine._sysconf_llc() == max(0, expected)
    assert machine.llc_bytes() >= expected


def _case(fastdl_s, torch_s, **kw):
    c = harness.Case("s", "c", lambda: None, {"torch": lambda: None}, **kw)
    c.results = {"fastdl": [fastdl_s] * 5, "torch": [torch_s] * 5}
    return c


def test_limit_check_flags_a_row_above_100_percent():
    lim = _tiers((1 << 20, 300.0), (1 << 30, 40.0))
    # 80 GB in 1 s = 80 GB/s on a 1 GiB+ working set: twice the 40 GB/s DRAM limit.
    row = harness.summarize(_case(1.0, 4.0, bytes=80e9, working_set=2 << 30), lim)
    assert row["limit_error"] == ["fastdl"]            # torch's 20 GB/s is a result
    assert row["frac"]["torch"] == pytest.approx(0.5)
    table = harness.format_table([row], lim)
    assert "measuring error" in table and "200%" not in table
    ok = harness.summarize(_case(4.0, 8.0, bytes=80e9, working_set=2 << 30), lim)
    assert ok["limit_error"] == [] and ok["frac"]["fastdl"] == pytest.approx(0.5)


def test_equivalent_flops_above_peak_are_not_a_limit_error():
    """Conv rows count direct-convolution FLOPs: a Winograd pass does fewer multiplies, so its
    equivalent rate may pass the FMA peak. Such a row keeps its fraction (marked *) and is not
    flagged; a row of real FLOPs above the peak still is."""
    lim = {"peak_GFLOPs": 100.0}
    row = harness.summarize(_case(1.0, 4.0, flops=150e9, flops_equivalent=True), lim)
    assert row["limit_error"] == [] and row["frac"]["fastdl"] == pytest.approx(1.5)
    table = harness.format_table([row], lim)
    assert "150% fma*" in table and "measuring error" not in table and "Winograd" in table
    real = harness.summarize(_case(1.0, 4.0, flops=150e9), lim)
    assert real["limit_error"] == ["fastdl"]
    assert "measuring error" in harness.format_table([real], lim)


def test_spread_above_limit_is_marked_unreliable():
    c = _case(1.0, 1.0, bytes=1e6)
    c.results["fastdl"] = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    row = harness.summarize(c, _tiers((1 << 30, 40.0)))
    assert row["unreliable"] and "?" in harness.format_table([row], {})


def _doc(rows, commit):
    return {"meta": {"commit": commit, "date": "d", "device": "cpu"}, "rows": rows}


def _row(case, ms, speedup):
    return {"suite": "pool", "case": case, "fastdl_ms": ms, "speedup": {"torch": speedup}}


def test_compare_flags_a_2x_slowdown(tmp_path, capsys):
    a = [_row("fast", 1.0, 3.0), _row("slow", 2.0, 1.5)]
    b = [_row("fast", 1.05, 2.9), _row("slow", 4.0, 0.75)]   # 'slow' became 2x slower
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(_doc(a, "aaa")))
    pb.write_text(json.dumps(_doc(b, "bbb")))
    assert cli.main(["--compare", str(pa), str(pb)]) == 1
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("pool") and " slow " in ln][0]
    assert "REGRESSION" in line and "2.00x" in line
    assert "REGRESSION" not in [ln for ln in out.splitlines() if " fast " in ln][0]
    assert cli.main(["--compare", str(pa), str(pa)]) == 0
    assert "no regressions" in capsys.readouterr().out


def test_compare_without_baselines_uses_time():
    e = compare.compare_rows([{"suite": "x", "case": "c", "fastdl_ms": 1.0, "speedup": {}}],
                             [{"suite": "x", "case": "c", "fastdl_ms": 2.0, "speedup": {}}])
    assert e[0]["verdict"] == "REGRESSION"


def test_unknown_suite_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as ex:
        cli.main(["--suite", "optim,nope"])
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert "unknown suite 'nope'" in err and "known: " + ", ".join(cli.SUITES) in err


def test_suite_list_is_comma_separated_and_repeatable():
    import argparse
    ap = argparse.ArgumentParser()
    assert cli._suites(ap, ["pool,optim"]) == ["optim", "pool"]
    assert cli._suites(ap, ["pool", "gemm"]) == ["gemm", "pool"]
    assert cli._suites(ap, None) == cli.SUITES


def _png_has_data(path):
    from matplotlib.image import imread
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.05          # not a blank canvas


def test_report_from_a_tiny_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib", reason="the report needs matplotlib (fastdl[report])")
    # Limits on small footprints only: this test checks the report, not the machine.
    monkeypatch.setattr(machine, "_CACHE_TIERS", [1 << 20])
    monkeypatch.setattr(machine, "dram_footprint", lambda: 8 << 20)
    machine.cpu_limits.cache_clear()
    threads_before = torch.get_num_threads()
    fd_before = fastdl.get_num_threads()
    # One fastdl thread (a loaded 2-core machine makes 2-thread OpenMP barriers spin for whole
    # time slices); torch starts on 2 and must run on 1, then get its 2 back.
    torch.set_num_threads(2)
    fastdl.set_num_threads(1)
    try:
        rc = cli.main(["--quick", "--budget", "0.001", "--min-reps", "2", "--no-progress",
                       "--report", str(tmp_path)])
        assert rc == 0
        assert torch.get_num_threads() == 2            # restored after the run
    finally:
        torch.set_num_threads(threads_before)
        fastdl.set_num_threads(fd_before)
        machine.cpu_limits.cache_clear()
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["meta"]["torch_threads"] == {"before": 2, "during": 1}
    assert set(doc["families"]) == set(cli.SUITES)     # every built op family has an entry
    for suite, fam in doc["families"].items():
        assert fam["cases"], suite
        assert {r["suite"] for r in doc["rows"]} >= {suite}
        _png_has_data(tmp_path / fam["chart"])
    md = (tmp_path / "report.md").read_text()
    for suite in cli.SUITES:
        assert f"![{suite}]({suite}.png)" in md
    assert doc["meta"]["commit"] in md and torch.__version__ in md
    assert os.path.getsize(tmp_path / "report.md") > 500


def test_a_noisy_case_is_measured_again_and_the_steadier_run_kept(monkeypatch):
    noisy = {"fastdl": [1.0, 1.0, 3.0, 3.0, 5.0], "torch": [1.0] * 5}
    steady = {"fastdl": [2.0] * 5, "torch": [1.0] * 5}
    runs = iter([noisy, steady])
    monkeypatch.setattr(harness, "_measure", lambda *a: next(runs))
    c = harness.Case("s", "c", lambda: None, {"torch": lambda: None})
    harness.run_cases([c], progress=False)
    assert c.remeasured and c.results is steady
    quick = harness.Case("s", "c", lambda: None, {"torch": lambda: None})
    monkeypatch.setattr(harness, "_measure", lambda *a: noisy)
    harness.run_cases([quick], progress=False, quick=True)   # quick: marked, not re-measured
    assert not quick.remeasured
    assert harness.summarize(quick, {})["unreliable"]


def test_cuda_limits_have_an_l2_tier_and_a_dram_tier(monkeypatch):
    """The structure of the CUDA limits (the copies themselves run only on a GPU)."""
    class Props:
        L2_cache_size = 50 << 20
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    # The better of copy and read is each tier's rate.
    rates = {25 << 20: {"copy": 7000.0, "read": 9000.0}, 2 << 30: {"copy": 4000.0, "read": 3800.0}}
    monkeypatch.setattr(machine, "_cuda_rates", lambda fp, reps: rates[fp])
    monkeypatch.setattr(machine, "_cuda_fma_peak", lambda reps: 50000.0)
    machine.cuda_limits.cache_clear()
    try:
        lim = machine.cuda_limits()
    finally:
        machine.cuda_limits.cache_clear()
    assert [t["footprint_bytes"] for t in lim["tiers"]] == [25 << 20, 2 << 30]
    assert lim["bandwidth_GBps"] == 4000.0 and lim["bandwidth_name"] == "dram (copy)"
    assert lim["peak_GFLOPs"] == 50000.0
    assert [t["kernel"] for t in lim["tiers"]] == ["read", "copy"]
    assert machine.bandwidth_limit(lim, 4 << 20) == (9000.0, "cache@25M")
    assert machine.bandwidth_limit(lim, 100 << 20) == (9000.0, "mem@25M")
    assert machine.bandwidth_limit(lim, 3 << 30) == (4000.0, "dram")


def test_compare_reports_unreadable_files_clearly(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for a in (str(tmp_path / "missing.json"), str(bad)):
        with pytest.raises(SystemExit, match="cannot read"):
            cli.main(["--compare", a, a])
    other = tmp_path / "other.json"
    other.write_text("[]")
    with pytest.raises(SystemExit, match="not a fastdl-bench JSON"):
        cli.main(["--compare", str(other), str(other)])


def _write(tmp_path, name, rows, **meta):
    p = tmp_path / name
    doc = _doc(rows, name)
    doc["meta"].update(meta)
    p.write_text(json.dumps(doc))
    return str(p)


def test_compare_unreliable_regression_is_reported_not_counted(tmp_path, capsys):
    a = [_row("noisy", 1.0, 2.0)]
    b = [dict(_row("noisy", 3.0, 0.5), unreliable=True)]          # 4x, but noisy in B
    assert cli.main(["--compare", _write(tmp_path, "a", a), _write(tmp_path, "b", b)]) == 0
    out = capsys.readouterr().out
    assert "REGRESSION (unreliable)" in out and "1 more in unreliable rows" in out


def test_compare_default_threshold_is_above_the_spread_limit():
    assert compare.DEFAULT_THRESHOLD > harness.SPREAD_LIMIT
    # A 30% change is within what two noisy-but-accepted runs can show: not a regression.
    e = compare.compare_rows([_row("c", 1.0, 1.3)], [_row("c", 1.0, 1.0)])
    assert e[0]["verdict"] == "same"


def test_compare_fails_when_a_case_is_gone(tmp_path, capsys):
    a = [_row("kept", 1.0, 2.0), _row("dropped", 1.0, 2.0)]
    b = [_row("kept", 1.0, 2.0)]
    assert cli.main(["--compare", _write(tmp_path, "a", a), _write(tmp_path, "b", b)]) == 1
    assert "FAIL: 1 case(s) of A missing from B: pool/dropped" in capsys.readouterr().out


def test_compare_warns_when_the_runs_differ_in_settings(tmp_path, capsys):
    rows = [_row("c", 1.0, 2.0)]
    pa = _write(tmp_path, "a", rows, threads=2, quick=False, machine="m")
    pb = _write(tmp_path, "b", rows, threads=1, quick=True, machine="m")
    assert cli.main(["--compare", pa, pb]) == 0
    out = capsys.readouterr().out
    assert "differ in threads (A 2, B 1)" in out and "differ in quick" in out
    assert "differ in machine" not in out and "differ in device" not in out


def test_numpy_blas_runs_on_the_given_thread_count():
    threadpoolctl = pytest.importorskip("threadpoolctl", reason="threadpoolctl not installed")
    from fastdl.bench import gemm

    def blas_threads():
        return {i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"}
    if not blas_threads():
        pytest.skip("numpy is linked to no BLAS that threadpoolctl can see")
    before = blas_threads()
    lim = gemm.limit_blas_threads(1)
    try:
        assert blas_threads() == {1}
    finally:
        lim.restore_original_limits()
    assert blas_threads() == before
    assert gemm.numpy_label() == "numpy"


def test_numpy_row_is_labelled_without_threadpoolctl(monkeypatch):
    import sys
    from fastdl.bench import gemm
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)     # import fails
    assert gemm.limit_blas_threads(1) is None
    assert gemm.numpy_label() == "numpy (BLAS default threads)"


def test_stream_bandwidth_counts_only_what_the_threads_it_got_streamed():
    """OMP_THREAD_LIMIT=1 gives one thread where fastdl asks for two: the limit must not count
    the half a missing thread would have streamed (that reads as ~2x the one-thread rate)."""
    import subprocess
    import sys
    # The two thread counts take turns, round after round, and each keeps its best: a slow spell
    # of the shared VM then falls on both. Measured back to back (three 2-thread runs, then three
    # 1-thread runs) the ratio read 1.55 in one CI run where both streamed with one thread; with
    # turns it still read near 2 once under ASan in CI (benchmarks/RESULTS.md, 2026-12-04 13:05).
    # So up to three tries: the defect this guards against reads ~2 in every one.
    code = ("import fastdl\nfrom fastdl import _C\n"
            "best = {1: 0.0, 2: 0.0}\n"
            "for _ in range(5):\n"
            "    for nt in (2, 1):\n"
            "        fastdl.set_num_threads(nt)\n"
            "        best[nt] = max(best[nt], _C.measure_stream_bandwidth('copy', 1 << 20, 5, 0.05))\n"
            "print(best[2] / best[1])\n")
    env = dict(os.environ, OMP_THREAD_LIMIT="1", PYTHONPATH=os.pathsep.join(sys.path))
    ratios = []
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        ratios.append(float(r.stdout))
        if ratios[-1] < 1.5:
            break
    assert ratios[-1] < 1.5, f"2-thread / 1-thread rate under OMP_THREAD_LIMIT=1: {ratios}"


@pytest.mark.parametrize("reps", [2, 3])
def test_too_few_timings_are_unreliable_not_steady(reps):
    c = _case(1.0, 1.0, bytes=1e6)
    c.results = {"fastdl": [1.0] * reps, "torch": [1.0] * 7}
    row = harness.summarize(c, _tiers((1 << 30, 40.0)))
    assert row["unreliable"] and row["too_few_timings"]
    table = harness.format_table([row], {})
    assert "n/a?" in table and f"fewer than {harness.MIN_SPREAD_SAMPLES} timings" in table
    steady = harness.summarize(_case(1.0, 1.0, bytes=1e6), _tiers((1 << 30, 40.0)))
    assert not steady["unreliable"] and not steady["too_few_timings"]


def test_rows_below_the_l2_are_held_against_an_l1_sized_tier(monkeypatch):
    measured = []

    def tier(fp, quick=False):
        measured.append(fp)
        return {"footprint_bytes": fp, "GBps": 1e6 / fp, "kernel": "read", "kernels": {}}
    monkeypatch.setattr(machine, "measure_tier", tier)
    monkeypatch.setattr(machine, "dram_footprint", lambda: 8 << 20)
    monkeypatch.setattr(_C, "measure_peak_gflops", lambda reps: 100.0)
    machine.cpu_limits.cache_clear()
    try:
        lim = machine.cpu_limits(True)
    finally:
        machine.cpu_limits.cache_clear()
    assert measured[0] <= 32 << 10                    # fits a core's L1 on one thread
    rate, label = machine.bandwidth_limit(lim, 20 << 10)
    assert label.endswith("@32K") and rate == lim["tiers"][0]["GBps"]
    assert machine.bandwidth_limit(lim, 300 << 10)[1].endswith("@256K")


def _gpu_check_table_script():
    """The Python that benchmarks/gpu_check.sh runs to print its benchmark table."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "benchmarks", "gpu_check.sh")).read()
    body = text[text.index("== benchmark table =="):]
    body = body[body.index("<<'PY'"):]
    return body[body.index("\n") + 1:body.index("\nPY\n")]


def test_gpu_check_table_blames_only_the_side_over_the_limit(tmp_path):
    import subprocess
    import sys
    row = {"suite": "pool", "case": "c", "fastdl_ms": 1.0, "speedup": {"torch a": 2.0},
           "frac": {"fastdl": 0.5, "torch a": 1.3}, "limit_error": ["torch a"],
           "limit": {"tier": "dram"}}
    bad = dict(row, case="d", frac={"fastdl": 1.2, "torch a": 0.5}, limit_error=["fastdl"])
    doc = {"meta": {"gpu": "fake", "commit": "x", "limits": {"bandwidth_GBps": 1000.0}},
           "rows": [row, bad]}
    path = tmp_path / "bench_cuda.json"
    path.write_text(json.dumps(doc))
    r = subprocess.run([sys.executable, "-c", _gpu_check_table_script(), str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    ok = [ln for ln in lines if ln.startswith("pool") and " c " in ln][0]
    assert "LIMIT ERROR" not in ok and "50% dram" in ok and "over the limit: torch a" in ok
    assert "LIMIT ERROR" in [ln for ln in lines if " d " in ln][0]


def test_conv_passes_harness_parses_layers_and_times_every_variant(capsys):
    """benchmarks/conv_passes.py (the harness behind the conv algorithm rules): layer syntax,
    its errors, and one tiny run printing each algorithm (with the one it ran) and torch."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "conv_passes.py")
    spec = importlib.util.spec_from_file_location("conv_passes", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.parse_layer("8x64x28x28-32k4s2p1g2") == (
        (8, 64, 28, 28), (32, 32, 4, 4), dict(s=2, p=1, d=1, g=2))
    for bad in ("8x64x28-32k3", "8x64x28x28-32", "8x64x28x28-32k3q1", "8x64x28x28-32k3g3"):
        with pytest.raises(argparse.ArgumentTypeError, match="layer"):
            mod.parse_layer(bad)
    # bad arguments stop before anything is timed (a bad second layer included)
    for argv in (["--algos", "fastest", "2x4x6x6-4k3"], ["--rounds", "0", "2x4x6x6-4k3"],
                 ["--threads", "0", "2x4x6x6-4k3"], ["2x4x6x6-4k3", "2x4x6x6-4k3g3"]):
        with pytest.raises(SystemExit):
            mod.main(argv)
        assert "input:" not in capsys.readouterr().out
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("reference")   # the caller's choice survives the run
    try:
        mod.main(["--pass", "input", "--algos", "gemm,winograd,gemm", "--rounds", "2",
                  "2x4x6x6-4k3s2p1"])
        assert fastdl.ops.get_conv_algorithm() == "reference"
    finally:
        fastdl.ops.set_conv_algorithm(before)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    # Winograd does not serve stride 2: the row names what ran instead; the repeated gemm is one
    assert line.startswith("2x4x6x6-4k3s2p1 input: gemm ") and "winograd:" in line
    assert "torch " in line and line.count("x)") == 2 and line.count(" gemm ") == 1
    # --threads: both libraries run at that count, and the caller's counts come back after
    threads = fastdl.get_num_threads(), torch.get_num_threads()
    other = next(t for t in (1, 2, 3) if t not in threads)
    mod.main(["--pass", "weight", "--algos", "gemm", "--rounds", "1", "--threads", str(other),
              "2x4x6x6-4k3"])
    head = capsys.readouterr().out.splitlines()[0]
    assert head.startswith(f"fastdl threads {other}, torch threads {other},"), head
    assert (fastdl.get_num_threads(), torch.get_num_threads()) == threads


def test_an_interrupted_run_keeps_the_cases_measured_so_far(tmp_path, monkeypatch, capsys):
    """SIGINT (Ctrl-C, or benchmarks/gpu_check.sh's stage limit) during the cases: the table and
    --json keep what was measured, the meta says interrupted, and the exit code is 130."""
    from fastdl.bench import harness
    monkeypatch.setattr(machine, "_CACHE_TIERS", [1 << 20])
    monkeypatch.setattr(machine, "dram_footprint", lambda: 8 << 20)
    machine.cpu_limits.cache_clear()
    real = harness.run_cases

    def two_then_interrupt(cases, **kw):
        real(cases[:2], **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "run_cases", two_then_interrupt)
    out = tmp_path / "r.json"
    try:
        rc = cli.main(["--suite", "optim", "--quick", "--budget", "0.001", "--min-reps", "2",
                       "--no-progress", "--json", str(out)])
    finally:
        machine.cpu_limits.cache_clear()
    assert rc == 130
    doc = json.loads(out.read_text())
    assert doc["meta"]["interrupted"] is True and len(doc["rows"]) == 2
    assert "interrupted; 2 measured case(s) kept" in capsys.readouterr().err


def test_cuda_fma_peak_kernel_runs_its_chains(cuda_device):
    """csrc/cuda/peak.cu (the FMA limit of fastdl-bench's CUDA rows): every thread's sum of its 8
    chains after `iters` steps of v = v * a + b, against float64 (a = 1, b = 0.5: each step adds
    exactly 0.5, so every thread's own start, 1e-3 * (its index % 64), stays visible in its sum
    and a mix-up of threads or a skipped step fails); the flop count it returns; bad launch
    shapes refused before any launch."""
    from fastdl import _C, _tensor
    blocks, threads, iters, a, b = 3, 64, 32, 1.0, 0.5
    out = torch.full((blocks * threads,), float("nan"), device=cuda_device)
    stream = _tensor.current_stream(0)
    flops = _C.cuda_fma_peak(0, stream, _tensor.pointer(out), blocks, threads, iters, a, b)
    fastdl.cuda.synchronize()
    assert flops == 2 * 8 * iters * blocks * threads
    t = torch.arange(blocks * threads, dtype=torch.float64) % threads % 64
    total = torch.zeros_like(t)
    for i in range(8):
        v = 1e-3 * t + i
        for _ in range(iters):
            v = v * a + b
        total += v
    torch.testing.assert_close(out.cpu().double(), total, rtol=1e-6, atol=1e-4)
    for bad in (dict(blocks=0), dict(threads=48), dict(iters=20)):
        args = dict(blocks=blocks, threads=threads, iters=iters) | bad
        with pytest.raises(ValueError, match="cuda_fma_peak"):
            _C.cuda_fma_peak(0, stream, _tensor.pointer(out), args["blocks"], args["threads"],
                             args["iters"], a, b)


def test_lm_bound_free_layers_keep_shapes_and_gradients(monkeypatch, capsys):
    """benchmarks/lm_bound.py (the word LM's speedup bound, issue #11): its arithmetic-free layers
    give the real layers' output shapes and a gradient to every parameter (so clipping and SGD
    still run on all of them), and a tiny run prints the bound."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "lm_bound.py")
    spec = importlib.util.spec_from_file_location("lm_bound", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lin, lstm = torch.nn.Linear(6, 5), torch.nn.LSTM(4, 6, 2)
    x = torch.randn(3, 2, 4, requires_grad=True)
    hidden = (torch.randn(2, 2, 6), torch.randn(2, 2, 6))
    out, (h, c) = lstm(x, hidden)
    fout, (fh, fc) = mod.FreeLSTM(lstm)(x, hidden)
    assert (fout.shape, fh.shape, fc.shape) == (out.shape, h.shape, c.shape)
    y = mod.FreeLinear(lin)(fout)
    assert y.shape == lin(out).shape
    (y.sum() + fh.sum() + fc.sum()).backward()
    for p in list(lin.parameters()) + list(lstm.parameters()) + [x]:
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()
    with pytest.raises(SystemExit):
        mod.main(["--rounds", "0"])
    monkeypatch.setattr(mod, "peak_gflops", lambda: 100.0)
    mod.main(["--rounds", "2", "--vocab", "50", "--bptt", "3", "--batch", "2"])
    text = capsys.readouterr().out
    flops = mod.lm_step_flops(50, 3, 2)
    assert f"{flops / 1e9:.2f} GFLOP per step" in text and "bound (free layers" in text


@pytest.mark.skipif(not (fastdl._C.cpu_supports_avx2() and fastdl._C.cpu_supports_avx512()),
                    reason="needs a CPU and build with both the AVX2 and the AVX-512 kernels")
def test_cpu_build_ab_times_both_builds(capsys):
    """benchmarks/cpu_build_ab.py (the A/B behind the kernel build per family): bad arguments
    stop before anything runs; a run prints one row per case and leaves the automatic choice."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cpu_build_ab.py")
    spec = importlib.util.spec_from_file_location("cpu_build_ab", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for argv in (["nosuite"], ["gemm", "--budget", "0"], ["rnn", "--only", "rnn"]):
        with pytest.raises(SystemExit):
            mod.main(argv)
        assert "avx512/avx2" not in capsys.readouterr().out
    auto = dict(fastdl._C.cpu_capability_by_kernel())
    mod.main(["gemm", "--filter", "square 256", "--budget", "0.05"])
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 1 and rows[0].startswith("gemm  square 256 ") and "avx512/avx2" in rows[0]
    mod.main(["rnn", "--filter", "RNN (64,128,32,50) fwd", "--budget", "0.05",
              "--only", "recurrent_backward"])
    assert len(capsys.readouterr().out.strip().splitlines()) == 2   # fwd and fwd+bwd
    assert dict(fastdl._C.cpu_capability_by_kernel()) == auto
    # the two fastdl turns run on the two builds (with --only: that family alone), torch's on
    # the automatic choice
    seen = {"fastdl": [], "torch": []}
    case = harness.Case("x", "x", lambda: seen["fastdl"].append(
        dict(fastdl._C.cpu_capability_by_kernel())), {"torch": lambda: seen["torch"].append(
            dict(fastdl._C.cpu_capability_by_kernel()))})
    mod._time_case(case, None, 0.0)
    assert {frozenset(c.values()) for c in seen["fastdl"]} == {frozenset({"avx2"}),
                                                               frozenset({"avx512"})}
    assert all(c == auto for c in seen["torch"])
    seen["fastdl"].clear()
    mod._time_case(case, "recurrent_backward", 0.0)
    assert {c["recurrent_backward"] for c in seen["fastdl"]} == {"avx2", "avx512"}
    assert all(v == "avx512" for c in seen["fastdl"] for f, v in c.items()
               if f != "recurrent_backward")
    assert dict(fastdl._C.cpu_capability_by_kernel()) == auto


def test_building_the_suites_cases_warns_nothing():
    """fastdl-bench's output is a table: building the kernel suites' cases (the sparse optimizer
    row's gradient included: torch warns once per process where a sparse tensor's invariant
    check is left unset) raises no warning, in a fresh process."""
    import subprocess
    import sys
    code = ("import warnings\n"
            "from fastdl.bench import conv, gemm, optim, pool, rnn\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    for m in (conv, gemm, optim, pool, rnn): m.cases('cpu', quick=True)\n"
            "assert not w, [str(x.message) for x in w]\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_settle_pause_is_followed_by_untimed_calls_for_wake_s(monkeypatch):
    """Case.settle_s: after each pause the callable runs untimed for harness.WAKE_S (a libgomp
    team's first calls after a pause can wait out the OpenMP spin, ~4 ms), then `block` timed
    calls: the first timed call of each turn starts at least WAKE_S after its pause ended (one
    untimed call had left that stall inside the timings). Clock-based, so load cannot fail it."""
    import time
    import types

    log = []   # ("pause", end time) and ("call", name, start time), in order

    def sleep(s):
        time.sleep(s)
        log.append(("pause", time.perf_counter()))

    def fn(name):
        return lambda: log.append(("call", name, time.perf_counter()))

    # (harness.time is the time module: patch the harness's reference, not the module)
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(
        sleep=sleep, perf_counter=time.perf_counter))
    case = harness.Case("x", "x", fn("fastdl"), {"torch": fn("torch")}, settle_s=0.001, block=2)
    times = harness._measure(case, min_reps=3, max_reps=3, budget_s=0.0)
    assert [len(v) for v in times.values()] == [6, 6]   # 3 rounds of 2 timed calls
    turns, current = [], None
    for entry in log:
        if entry[0] == "pause":
            current = [entry[1], []]
            turns.append(current)
        elif current is not None:
            current[1].append(entry[2])
    assert len(turns) == 6   # one pause per callable per round
    for pause_end, starts in turns:
        # the last `block` calls are the timed ones; before them, >= WAKE_S of untimed calls
        assert len(starts) >= 3 and starts[-2] - pause_end >= harness.WAKE_S, (pause_end, starts)


@pytest.mark.skipif(harness._resource is None, reason="needs getrusage (the resource module)")
def test_page_faults_per_call_recorded_and_listed():
    # A callable that maps and touches 8 MiB of fresh anonymous memory per call takes ~2048 minor
    # faults a call; the other side none. The row carries both medians and the table lists it.
    import mmap

    def fresh():
        m = mmap.mmap(-1, 8 << 20)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):   # 4 KiB faults even where THP is "always"
            m.madvise(mmap.MADV_NOHUGEPAGE)
        for off in range(0, 8 << 20, mmap.PAGESIZE):
            m[off] = 1
        m.close()

    c = harness.Case("x", "faulting", fresh, {"torch": lambda: None})
    harness.run_cases([c], min_reps=5, max_reps=5, budget_s=0.0, progress=False)
    assert [len(v) for v in c.results.faults.values()] == [len(v) for v in c.results.values()]
    row = harness.summarize(c, {})
    faults = row["faults_per_call"]
    assert faults["fastdl"] >= (8 << 20) // mmap.PAGESIZE * 0.9, faults
    assert faults["torch"] < harness.FAULTS_NOTED, faults
    text = harness.format_table([row], {})
    assert "page faults per timed call" in text and "x/faulting fastdl" in text, text
    quiet = harness.Case("x", "quiet", lambda: None, {"torch": lambda: None})
    harness.run_cases([quiet], min_reps=5, max_reps=5, budget_s=0.0, progress=False)
    assert "page faults" not in harness.format_table([harness.summarize(quiet, {})], {})
