"""The global state of one process, set once at its start: seeds, threads, determinism, the
float32 precision of GPU matmuls and convolutions."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch
import torch.utils.deterministic

from localpipe.stages.config import Config

CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs to be deterministic
# where float32 may run as TF32 on a GPU: cuBLAS matmuls and cuDNN (torch's own defaults mix
# them: matmuls in full float32, cuDNN in TF32). A run sets them through torch's older API
# (``set_float32_matmul_precision``, ``cudnn.allow_tf32``), which torch 2.11 to 2.14 read back
# consistently; setting part of the newer per-op ``fp32_precision`` API instead leaves a mix
# that makes torch raise wherever the older settings are read. A user may have set either:
# ``kept`` puts back whichever describes the user's state.
PER_OP = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)


def configure(cfg: Config, threads_per_process: int = 0) -> None:
    """Seed the global generators (for anything outside localpipe's own seeded streams), set
    the torch threads (--threads, else ``threads_per_process`` if given), deterministic
    kernels with --deterministic, and the float32 precision of GPU matmuls and convolutions
    (TF32 for both with --tf32, else full float32 for both); call before any CUDA work."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    if cfg.threads or threads_per_process:
        torch.set_num_threads(cfg.threads or threads_per_process)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    if torch.are_deterministic_algorithms_enabled() != cfg.deterministic:
        torch.use_deterministic_algorithms(cfg.deterministic)
    # deterministic mode also fills every torch.empty with NaN so that reads of memory never
    # written show up: slow, and no part of determinism (deterministic kernels are)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = cfg.tf32


def precision() -> str:
    """The float32 precision of GPU matmuls now, "tf32" or "fp32" (for a run's provenance)."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def pin_thread() -> None:
    """Give the calling thread the process's torch thread count now; call first in every
    thread that computes. torch hands the count to a new thread lazily, at the thread's first
    parallel ATen op, and a BLAS call before that (a GEMM) runs with the BLAS library's own
    default, every core: a GEMM's sums depend on its thread count, so --threads would not pin
    the arithmetic of a thread's first GEMMs."""
    torch.set_num_threads(torch.get_num_threads())


@contextlib.contextmanager
def kept():
    """What ``configure`` changes (the global generators, the torch thread count,
    deterministic mode and its fill of new memory, the float32 precision) put back as it was
    after the block: a run started from a user's own program (``lp.fit``) leaves the
    program's state alone."""
    torch_rng, numpy_rng, python_rng = torch.get_rng_state(), np.random.get_state(), \
        random.getstate()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    per_op = [backend.fp32_precision for backend in PER_OP]  # never raises
    try:
        legacy = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    except RuntimeError:  # the user's settings mix the two APIs: the per-op ones say it all
        legacy = None
    try:
        yield
    finally:
        torch.set_rng_state(torch_rng)
        np.random.set_state(numpy_rng)
        random.setstate(python_rng)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy[0])
            torch.backends.cudnn.allow_tf32 = legacy[1]
        else:
            for backend, saved in zip(PER_OP, per_op):
                backend.fp32_precision = saved
