"""The global state of one process, set once at its start: seeds, threads, determinism."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from localpipe.stages.config import Config

CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs to be deterministic


def configure(cfg: Config, threads_per_process: int = 0) -> None:
    """Seed the global generators (for anything outside localpipe's own seeded streams), set
    the torch threads (--threads, else ``threads_per_process`` if given) and, with
    --deterministic, deterministic kernels; call before any CUDA work."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    if cfg.threads or threads_per_process:
        torch.set_num_threads(cfg.threads or threads_per_process)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    if torch.are_deterministic_algorithms_enabled() != cfg.deterministic:
        torch.use_deterministic_algorithms(cfg.deterministic)


def pin_thread() -> None:
    """Give the calling thread the process's torch thread count now; call first in every
    thread that computes. torch hands the count to a new thread lazily, at the thread's first
    parallel ATen op, and a BLAS call before that (a GEMM) runs with the BLAS library's own
    default, every core: a GEMM's sums depend on its thread count, so --threads would not pin
    the arithmetic of a thread's first GEMMs."""
    torch.set_num_threads(torch.get_num_threads())


@contextlib.contextmanager
def kept():
    """What ``configure`` changes (the global generators, the torch thread count and
    deterministic mode) put back as it was after the block: a run started from a user's
    own program (``lp.fit``) leaves the program's state alone."""
    torch_rng, numpy_rng, python_rng = torch.get_rng_state(), np.random.get_state(), \
        random.getstate()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        torch.set_rng_state(torch_rng)
        np.random.set_state(numpy_rng)
        random.setstate(python_rng)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
