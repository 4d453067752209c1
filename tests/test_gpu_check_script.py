"""benchmarks/gpu_check.sh, read without a GPU: it must parse, fit the device tool's 600 s per
command with slack, stop stages so that they still report (SIGINT, not SIGTERM), and keep the
sanitizer stages away from the test that trips a device assert on purpose."""
import os
import pathlib
import re
import subprocess

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
# the script's code: comment lines dropped (the header names the commands it describes)
TEXT = "\n".join(l for l in SCRIPT.read_text().splitlines() if not l.lstrip().startswith("#"))
KILL_GRACE = 15


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def stage_limits():
    """Every stage's limit: the numbers passed to lim, bench_stage and the pytest stage helpers."""
    limits = [int(n) for n in re.findall(r"\$\(lim (\d+)\)", TEXT)]
    limits += [int(n) for n in re.findall(
        r"^(?:\w+=\S+ )?(?:pytest_stage(?:_sanitized)?|bench_stage|script_stage) \S+ (\d+)", TEXT,
        re.M)]
    return limits


def test_deadline_fits_the_device_tools_600_s():
    """Stages take the smaller of their limit and the time left before DEADLINE (less a reserve
    that covers a timeout's kill grace), so the script ends by DEADLINE + KILL_GRACE."""
    (deadline,) = re.findall(r"DEADLINE=\$\{DEADLINE:-(\d+)\}", TEXT)
    (reserve,) = re.findall(r"^RESERVE=(\d+)$", TEXT, re.M)
    assert int(deadline) + KILL_GRACE <= 560 and int(reserve) >= KILL_GRACE
    # build, conv, rnn, rnn per step, CUDA tests, profile, tiles, memcheck, racecheck, CPU
    # tests, other suites, initcheck, synccheck
    assert len(stage_limits()) == 13, stage_limits()


def test_every_timeout_interrupts_then_kills_within_the_stage_limit():
    calls = re.findall(r"\btimeout [^\n]*", TEXT)
    assert len(calls) == 5   # build, and the bench, script, pytest and sanitizer helpers
    for call in calls:
        assert call.startswith(f'timeout -s INT -k {KILL_GRACE} "$t" '), call
    # every $t the timeouts read comes from lim
    lims = set(re.findall(r"\bt=(\S+(?: \S+)?)$", TEXT, re.M))
    assert lims <= {"$(lim 150)", "$(lim \"$limit\")"}, lims


def test_issue_benchmarks_run_full_size_first():
    benches = re.findall(r"^bench_stage (\S+) \d+ (.*)$", TEXT, re.M)
    assert benches[:2] == [("bench_conv", "--suite conv"), ("bench_rnn", "--suite rnn")]
    assert all("--quick" in args for _, args in benches[2:])
    # the issue figures come before the tests, which come before the sanitizers
    pos = {name: TEXT.index(name) for name in ("bench_stage bench_conv", "bench_stage bench_rnn",
                                               "pytest_stage tests_cuda",
                                               "pytest_stage_sanitized memcheck")}
    assert list(pos.values()) == sorted(pos.values()), pos


def _stub(path, text):
    path.write_text("#!/bin/bash\n" + text)
    path.chmod(0o755)


def _stubbed_run(tmp_path, env_extra, python3_body):
    """The script with nvidia-smi, nvcc, compute-sanitizer and python3 replaced by stubs."""
    stub = tmp_path / "bin"
    stub.mkdir(parents=True)
    _stub(stub / "nvidia-smi", "echo 9.0\n")
    _stub(stub / "nvcc", "echo nvcc stub\n")
    _stub(stub / "compute-sanitizer", "exit 0\n")
    _stub(stub / "python3", python3_body)
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{stub}{os.pathsep}{os.environ['PATH']}", OUT=str(out),
               **env_extra)
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    return r, out


def test_skips_every_stage_past_the_deadline(tmp_path):
    """DEADLINE=0: the build is skipped, the script exits non-zero, and the summary and logs
    still come back (the EXIT trap)."""
    r, out = _stubbed_run(tmp_path, {"DEADLINE": "0"}, "exit 0\n")
    assert r.returncode == 1, r.stdout + r.stderr
    summary = (out / "summary.txt").read_text()
    assert "SKIPPED, deadline reached" in summary and (out / "logs.tar.gz").exists()
    assert not (out / "bench_table.txt").exists()


def test_sanitizers_skip_the_device_assert_test():
    assert '--deselect "tests/test_pool.py::test_max_unpool2d_invalid_index[cuda]"' in TEXT
    assert "--target-processes application-only" in TEXT
    assert "not sweep" not in TEXT  # the GEMM sweep's misaligned and edge-tile cases run there


def test_conv_kernels_run_under_race_and_sync_checks():
    """The tiled conv kernels' shared memory under racecheck and synccheck, and one chunk of the
    randomized conv2d sweep (gemm) kept in memcheck (review-convcuda items 5)."""
    for tool in ("racecheck", "synccheck"):
        assert re.search(rf'^pytest_stage_sanitized {tool} \d+ "\$\{{conv_shared\[@\]\}}"$',
                         TEXT, re.M), tool
    assert re.search(r'^pytest_stage_sanitized memcheck \d+ "\$\{small_memcheck\[@\]\}"$',
                     TEXT, re.M)
    assert "test_conv2d_sweep[default-gemm-cuda-0]" in TEXT


def test_a_stage_past_its_limit_is_interrupted_noted_and_fails_the_run(tmp_path):
    """DEADLINE=37 leaves the benchmark stage 17 s (less a second or two when the stubs' start
    crosses a second boundary on a loaded machine); the stub benchmark sleeps through it: the
    stage is interrupted, noted as timed out after the limit its header announced, the later
    stages are skipped, the logs come back and the script exits 1."""
    r, out = _stubbed_run(tmp_path, {"DEADLINE": "37", "STAGES": "bench_conv,tests_cuda"},
                          'case "$*" in *fastdl.bench*) sleep 60;; *) exit 0;; esac\n')
    assert r.returncode == 1, r.stdout + r.stderr
    summary = (out / "summary.txt").read_text()
    assert "build: ok" in summary
    (limit,) = re.findall(r"== bench_conv \(limit (\d+) s", r.stdout)
    assert 15 <= int(limit) <= 17 and f"bench_conv: TIMED OUT after {limit} s" in summary
    assert "tests_cuda: SKIPPED, deadline reached" in summary
    assert (out / "logs.tar.gz").exists()


def test_unknown_stage_names_are_refused(tmp_path):
    r, out = _stubbed_run(tmp_path, {"STAGES": "bench_conv,tests_cdua"}, "exit 0\n")
    assert r.returncode == 2 and "unknown stage 'tests_cdua'" in r.stderr


def test_a_clean_run_exits_0_and_a_failed_test_stage_exits_1(tmp_path):
    body = 'case "$*" in *pytest*) exit {rc};; *) exit 0;; esac\n'
    ok, _ = _stubbed_run(tmp_path / "a", {"STAGES": "tests_cuda"}, body.format(rc=0))
    bad, out = _stubbed_run(tmp_path / "b", {"STAGES": "tests_cuda"}, body.format(rc=1))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert bad.returncode == 1 and "tests_cuda: rc=1" in (out / "summary.txt").read_text()
