"""The suite's own guards: it must not pass by not running."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow  # starts processes
def test_a_missing_dataset_skips_on_a_laptop_but_fails_under_ci(tmp_path):
    """About 90 tests (the exactness oracles among them) need the real MNIST: a checkout
    without it may skip them, but CI must go red, not green."""
    test = "tests/test_replicas.py::test_one_process_refuses_replicas"
    for ci, outcome in (("", "1 skipped"), ("true", "1 error")):
        env = {**os.environ, "CI": ci, "LOCALPIPE_TEST_MNIST": str(tmp_path / "no-mnist")}
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 test], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
        assert outcome in result.stdout.splitlines()[-1], result.stdout[-2000:]
        if ci:
            assert "CI needs it" in result.stdout
