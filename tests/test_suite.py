"""The suite's own promises (tests/conftest.py): it runs without pytest-xdist, and under CI it refuses to pass
without the shared CIFAR-10 copy, the data its accuracy, export and gate tests need."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from conftest import ROOT


def pytest_in(cwd, *args, env=None):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})
    return proc, time.monotonic() - t0


def test_ci_without_the_shared_copy_stops_at_once_with_one_line(tmp_path):
    """A checkout whose ../shared is missing (this suite's conftest and pyproject, one test that needs no data) under
    CI=true: pytest exits at configuration, before any test, with one line naming the missing copy; without CI the
    same checkout runs, the tests that need the copy skipping and saying why."""
    checkout = tmp_path / "checkout"
    (checkout / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", checkout)
    shutil.copy(ROOT / "tests" / "conftest.py", checkout / "tests")
    (checkout / "tests" / "test_x.py").write_text("def test_x():\n    pass\n")
    proc, seconds = pytest_in(checkout, "-p", "no:cacheprovider", env={"CI": "true"})
    missing = checkout.parent / "shared" / "data" / "cifar10" / "cifar10-jpeg.tar.gz"
    assert proc.returncode == 4 and seconds < 60, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        f"ERROR: CI=true and the shared CIFAR-10 copy is missing: {missing} (the tests of accuracy, export and the "
        "gate need it; see ../shared/data/cifar10/README.md)"], proc.stderr
    assert "passed" not in proc.stdout
    proc, _ = pytest_in(checkout, "-p", "no:cacheprovider", "-n", "0", env={"CI": ""})
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-2000:]


def test_the_suite_collects_without_xdist():
    """pyproject's addopts need no plugin (the two workers are conftest's default, where pytest-xdist is loaded):
    ``-p no:xdist`` collects every test in one process."""
    proc, _ = pytest_in(ROOT, "-p", "no:xdist", "-p", "no:cacheprovider", "--collect-only", "-q")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "unrecognized arguments" not in proc.stderr
    assert "tests/test_suite.py::test_the_suite_collects_without_xdist" in proc.stdout
    assert "tests/test_export_zoo.py::test_zoo_model_exports_every_variant[keras3_modern]" in proc.stdout
