"""localpipe: local error signal learning (Nøkland & Eidnes, 2019) run as a pipeline.

    import localpipe as lp
    net = lp.LocalNet(my_sequential, num_classes=10, input_shape=(1, 28, 28))
    result = lp.fit(net, train_set, test_set, epochs=1, batch_size=128, stages=2)
    lp.evaluate(net.module, test_set)             # plain PyTorch: the same error
    lp.load(result.run_dir, into=fresh_copy)      # a run's weights into your own network
    model, cfg, transform = lp.load("runs/latest")  # a run of the paper's models
    lp.main(["--recipe", "mnist-mlp-predsim"])    # the command line, from Python

The installed distribution has this one import name; its parts live in the checkout's folders
``stages/`` (what a stage computes), ``pipeline/`` (how stages run and talk), ``launch/`` (the
command line) and ``benchmarks/``, and are imported as ``localpipe.stages`` and so on. Only the
names in ``__all__`` are the public API; everything else may change.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["Config", "ConfigError", "DataError", "FitResult", "LocalHead", "LocalNet",
           "StageFailed", "evaluate", "fit", "load", "main"]

# In a checkout (PYTHONPATH=. or `pip install -e .`) the parts are the folders beside this one;
# an installed wheel holds them inside this package.
_here = Path(__file__).resolve().parent
if not (_here / "stages").is_dir() and (_here.parent / "setup.cfg").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 (a package's own __path__)

_API = {"Config": "localpipe.stages.config", "ConfigError": "localpipe.stages.config",
        "DataError": "localpipe.pipeline.data", "StageFailed": "localpipe.pipeline.channel",
        "LocalNet": "localpipe.stages.localnet", "LocalHead": "localpipe.stages.localnet",
        "fit": "localpipe.launch.fit", "evaluate": "localpipe.launch.fit",
        "FitResult": "localpipe.launch.fit", "load": "localpipe.launch.evaluate",
        "main": "localpipe.launch.pipeline"}


def __getattr__(name: str):
    """The API on first use: ``import localpipe`` alone costs nothing (no torch import)."""
    if name not in _API:
        raise AttributeError(f"module 'localpipe' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
