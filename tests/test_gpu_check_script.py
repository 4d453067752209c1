"""benchmarks/gpu_check.sh, read without a GPU: it must parse, fit the device tool's 600 s per
command with slack, stop stages so that they still report (SIGINT, not SIGTERM), and keep the
sanitizer stages away from the test that trips a device assert on purpose."""
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
    """The seconds of every stage: literal `timeout ... N` calls and the stage helpers' arguments."""
    limits = [int(n) for n in re.findall(r"\btimeout [^\n]*?(\d+) (?:python|fastdl)", TEXT)]
    limits += [int(n) for n in re.findall(r"^pytest_stage(?:_sanitized)? \S+ (\d+)", TEXT, re.M)]
    return limits


def test_stage_limits_leave_slack():
    limits = stage_limits()
    # build, suite, memcheck, initcheck, racecheck, synccheck, bench
    assert len(limits) == 7, limits
    assert sum(limits) + KILL_GRACE * len(limits) <= 540, limits


def test_every_timeout_interrupts_then_kills():
    calls = re.findall(r"\btimeout [^\n]*", TEXT)
    assert calls
    for call in calls:
        assert call.startswith(f"timeout -s INT -k {KILL_GRACE} "), call


def test_bench_is_quick():
    (bench,) = re.findall(r"timeout [^\n]*fastdl-bench [^\n]*", TEXT)
    assert "--quick" in bench


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
