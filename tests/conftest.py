"""Shared fixtures: the real MNIST copied somewhere writable, and helpers to run the CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# LOCALPIPE_TEST_MNIST lets the suite test its own guard against a missing dataset
SHARED_MNIST = Path(os.environ.get("LOCALPIPE_TEST_MNIST",
                                   ROOT.parent / "shared" / "data" / "MNIST"))
LAUNCH = ROOT / "launch" / "pipeline.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs the real MNIST is slow (it trains on it); tests that start
    processes carry the mark themselves. ``-m "not slow"`` is the quick part of the suite."""
    for item in items:
        if "mnist_root" in item.fixturenames:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> str:
    """torchvision unpacks beside the .gz files, so work on a copy. Without the data the tests
    that need it skip on a developer's machine, but fail under CI (``CI=true``): a checkout
    without the data must not turn the exactness oracles green by skipping them."""
    if not SHARED_MNIST.exists():
        missing = f"real MNIST not found at {SHARED_MNIST}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{missing}; CI needs it (../shared/data beside the checkout)")
        pytest.skip(missing)
    root = tmp_path_factory.mktemp("data")
    shutil.copytree(SHARED_MNIST, root / "MNIST")
    for path in (root / "MNIST").rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return str(root)


def cli_command(*args: str, torchrun: int = 0, torchrun_args: tuple = ()) -> list[str]:
    """launch/pipeline.py with ``args``, under torchrun with N processes if asked."""
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torchrun),
                "--master-port", str(_free_port()), *torchrun_args, str(LAUNCH), *args]
    return [sys.executable, str(LAUNCH), *args]


def cli_env(env: dict | None = None) -> dict:
    """A child's environment: this checkout's ``localpipe`` first, whatever else is installed."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path,
            **(env or {})}


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, torchrun: int = 0,
            torchrun_args: tuple = ()) -> subprocess.CompletedProcess:
    """Run launch/pipeline.py in a fresh process and wait for it."""
    return subprocess.run(cli_command(*args, torchrun=torchrun, torchrun_args=torchrun_args),
                          capture_output=True, text=True, timeout=timeout, env=cli_env(env),
                          cwd=ROOT)


class Timed:
    """A command's exit code and its stderr lines, each with the time it arrived, so that a
    test can time what happened from an event in the run, not from a launch whose own
    duration depends on the machine."""

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 300,
                 torchrun: int = 0) -> None:
        import threading
        import time

        proc = subprocess.Popen(cli_command(*args, torchrun=torchrun), cwd=ROOT, text=True,
                                env=cli_env(env), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        self.lines: list[tuple[float, str]] = []
        reader = threading.Thread(target=lambda: self.lines.extend(
            (time.monotonic(), line.rstrip()) for line in proc.stderr), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        finally:
            proc.kill()
        self.ended = time.monotonic()
        reader.join(timeout=10)
        self.returncode = proc.returncode

    def ours(self) -> list[tuple[float, str]]:
        """localpipe's own lines (not torchrun's)."""
        return [(t, text) for t, text in self.lines if text.startswith("localpipe:")]

    @property
    def text(self) -> str:
        return "\n".join(text for _, text in self.lines)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(save_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(save_dir) / "metrics.jsonl")]


def load_model(save_dir) -> dict[str, torch.Tensor]:
    return torch.load(Path(save_dir) / "model.pt")


def assert_same_model(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"
