"""`make test`'s two pytest passes (tools/pytest_passes.py) and the fast-run detection.

The passes run for real on a tiny suite of their own in a temp dir: a serial test, a spread one,
a failing one where a case needs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, leaves_out_slow
from tools.pytest_passes import Outcome, closing_line, narrowed, split_markexpr, verdict

SUITE = {
    "pytest.ini": "[pytest]\nmarkers =\n    serial: alone\n    slow: slow\n",
    "test_spread.py": "def test_a():\n    pass\n\ndef test_b():\n    pass\n",
    "test_alone.py": (
        "import pytest\n\n@pytest.mark.serial\ndef test_alone():\n"
        "    import os\n    assert 'PYTEST_XDIST_WORKER' not in os.environ\n"
    ),
}


def passes(suite: Path, *args: str, workers: str = "2") -> subprocess.CompletedProcess[str]:
    """The script on `suite`; pytest loads only xdist (this venv's other plugins cost seconds).

    Not as a worker of this run's pytest-xdist: its PYTEST_XDIST_* variables are left out.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env |= {"PYTHONPATH": str(REPO), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    cmd = [sys.executable, "-m", "tools.pytest_passes", "--workers", workers, "--", *args]
    return subprocess.run(
        [*cmd, "-p", "xdist.plugin", "-p", "no:cacheprovider"],
        check=False,
        cwd=suite,
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    for name, text in SUITE.items():
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.slow
def test_the_serial_tests_run_after_the_others_in_one_process(suite: Path) -> None:
    done = passes(suite)
    assert done.returncode == 0, done.stdout + done.stderr
    first, second = done.stdout.index("pass 1, not serial"), done.stdout.index("pass 2, serial")
    assert "-n 2 --dist loadgroup -m not serial" in done.stdout[first:second]
    assert "2 passed" in done.stdout[first:second]
    assert "1 passed" in done.stdout[second:]
    assert done.stdout.splitlines()[-1] == "tests: 3 passed, 0 failed, 0 skipped"


@pytest.mark.slow
def test_one_empty_pass_is_fine_but_both_empty_fail(suite: Path) -> None:
    only_spread = passes(suite, "test_spread.py")
    assert only_spread.returncode == 0, only_spread.stdout
    assert "pass 2, serial: exit 5" in only_spread.stdout
    nothing = passes(suite, "-m", "slow")
    assert nothing.returncode == 5
    assert "no pass collected any test" in nothing.stderr
    assert nothing.stdout.splitlines()[-1] == "tests: 0 passed, 0 failed, 0 skipped"


@pytest.mark.slow
def test_a_failure_in_either_pass_fails_the_whole(suite: Path) -> None:
    (suite / "test_alone.py").write_text(
        "import pytest\n\n@pytest.mark.serial\ndef test_alone():\n    assert False\n"
    )
    done = passes(suite)
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1] == "tests: 2 passed, 1 failed, 0 skipped"


@pytest.mark.slow
def test_workers_0_runs_everything_in_one_process(suite: Path) -> None:
    (suite / "test_alone.py").unlink()
    done = passes(suite, workers="0")
    assert done.returncode == 0, done.stdout
    assert "pass 1" not in done.stdout
    assert "all tests, one process" in done.stdout
    assert done.stdout.splitlines()[-1] == "tests: 2 passed, 0 failed, 0 skipped"


def test_a_users_marker_expression_narrows_both_passes() -> None:
    assert split_markexpr(["-x", "-m", "not slow", "tests/a.py"]) == (
        "not slow",
        ["-x", "tests/a.py"],
    )
    assert split_markexpr(["-mbrowser", "-q"]) == ("browser", ["-q"])
    assert split_markexpr(["--maxfail=1"]) == (None, ["--maxfail=1"])
    assert narrowed(None, serial=False) == "not serial"
    assert narrowed("not slow or browser", serial=True) == "(not slow or browser) and serial"


def test_the_verdict_and_the_closing_line() -> None:
    ok, empty, failed = Outcome("a", 0, 1.0), Outcome("b", 5, 1.0), Outcome("c", 1, 1.0)
    assert verdict([ok, empty]) == 0
    assert verdict([empty, empty]) == 5
    assert verdict([empty, failed]) == 1
    runs = [
        Outcome("a", 1, 1.0, {"passed": 7, "failed": 1, "skipped": 2}),
        Outcome("b", 1, 1.0, {"passed": 3, "errors": 2}),
    ]
    assert closing_line(runs) == "tests: 10 passed, 3 failed, 2 skipped"


@pytest.mark.parametrize(
    ("markexpr", "fast"),
    [
        ("not slow", True),
        ("not slow and not serial", True),
        ("not serial and not slow", True),
        ("(not slow) and not browser", True),
        ("", False),
        ("not serial", False),
        ("serial", False),
        ("slow", False),
        ("slow or not slow", False),
        ("browser", False),
    ],
)
def test_a_fast_run_is_told_by_what_the_expression_selects(markexpr: str, fast: bool) -> None:
    assert leaves_out_slow(markexpr) is fast
