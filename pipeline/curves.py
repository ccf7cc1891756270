"""Curves of a run, and of several runs side by side, as PNG files.

``curves.png`` in a run folder has six panels: train and test error (validation too, with
--val-split), each block's local-head test error, every unit's local loss over the training
batches, samples per second, each stage's time split, and each stage's own memory. Drawn with
matplotlib's object API (no pyplot state), so it is safe on a thread of its own. The titles of
the panels are also written into the PNG's Description.
"""
from __future__ import annotations

import json
import math
import os
from typing import BinaryIO

from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MiB = 2**20
PANELS = ("error", "local-head test error", "local loss", "samples/s", "stage time",
          "stage memory")


def read(folder: str, name: str) -> list[dict]:
    """The records of a run's ``name``, skipping a line a killed writer cut short (as the
    trainer does on resume)."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return [r for r in records if isinstance(r, dict)]


def run_figure(folder: str) -> Figure:
    epochs, steps = read(folder, "metrics.jsonl"), read(folder, "steps.jsonl")
    fig = Figure(figsize=(16, 9), layout="constrained")
    axes = dict(zip(PANELS, fig.subplots(2, 3).flat))
    x = [r["epoch"] for r in epochs]

    ax = axes["error"]
    for key, style in (("train_error", "-"), ("val_error", ":"), ("test_error", "--")):
        values = [r.get(key) for r in epochs]
        if any(v is not None for v in values):
            ax.plot(x, values, style, marker="o", ms=3, label=key.replace("_", " "))
    _errors(ax, "error of the output layer", x)

    ax = axes["local-head test error"]
    for i, name in enumerate(epochs[-1]["blocks"] if epochs else []):
        values = [r["blocks"][i].get("test_error") for r in epochs]
        if any(v is not None for v in values):
            ax.plot(x, values, marker="o", ms=3, label=f"block {name['block']}")
    ax.plot(x, [r["test_error"] for r in epochs], "k--", marker="o", ms=3, label="output")
    _errors(ax, "test error of each block's local head", x)

    ax = axes["local loss"]
    units = sorted({u for r in steps for u in r["loss"]}, key=int)
    few = len(steps) <= 20  # a point each, or a lone logged batch draws nothing
    for u in units:
        name = "output" if u == units[-1] else f"block {u}"
        ax.plot([r["steps"] for r in steps], [r["loss"].get(u) for r in steps], lw=1,
                marker="o" if few else None, ms=3, label=name)
    ax.set(title="local loss of each unit, per logged batch", xlabel="training batches")
    if steps:
        _log_axis(ax)
    else:
        ax.text(0.5, 0.5, "no batch logged yet (--log-every)", ha="center", va="center",
                transform=ax.transAxes, color="gray")
        ax.set(xticks=[], yticks=[])
    _legend(ax)

    ax = axes["samples/s"]
    ax.plot(x, [r["samples_per_s"] for r in epochs], marker="o", ms=3, label="epoch")
    rated = [r for r in steps if r["samples_per_s"]]
    batches = max((r["step"] for r in steps), default=0) + 1  # an epoch's, about
    at = [r["epoch"] - 1 + (r["step"] + 1) / batches for r in rated]
    if rated:
        ax.plot(at, [r["samples_per_s"] for r in rated], lw=0.6, alpha=0.5,
                label="logged batches")
    rates = [r["samples_per_s"] or 0 for r in epochs] + [r["samples_per_s"] for r in rated]
    ax.set(title="training samples per second", xlabel="epoch",
           ylim=(0, 1.1 * max(rates, default=0) or None))  # no point on the top border
    _epoch_axis(ax, x + at)
    _legend(ax)

    last = epochs[-1] if epochs else {"stages": []}
    ax = axes["stage time"]
    left = [0.0] * len(last["stages"])
    names = [f"stage {s['stage']}" for s in last["stages"]]
    for key, color in (("busy_s", "tab:green"), ("recv_wait_s", "tab:orange"),
                       ("send_wait_s", "tab:red")):
        totals = [max(1e-12, s["busy_s"] + s["recv_wait_s"] + s["send_wait_s"])
                  for s in last["stages"]]
        share = [100 * s[key] / t for s, t in zip(last["stages"], totals)]
        ax.barh(names, share, left=left, color=color, label=key[:-2].replace("_", " "))
        left = [a + b for a, b in zip(left, share)]
    ax.set(title=f"where each stage's time went (epoch {last.get('epoch', '-')})",
           xlabel="% of the stage's time", xlim=(0, 100))
    _bar_legend(ax, len(names), columns=3)

    ax = axes["stage memory"]
    left = [0.0] * len(last["stages"])
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes",
                "queue_bytes"):
        width = [s["memory"][key] / MiB for s in last["stages"]]
        ax.barh(names, width, left=left, label=key[:-6])
        left = [a + b for a, b in zip(left, width)]
    ax.set(title="each stage's own memory at its peak", xlabel="MiB")
    _bar_legend(ax, len(names), columns=3)

    fig.suptitle(_title(folder))
    return fig


def _errors(ax, title: str, epochs: list[int]) -> None:
    ax.set(title=title, xlabel="epoch", ylabel="error %")
    _log_axis(ax)
    _epoch_axis(ax, epochs)
    _legend(ax)


def _log_axis(ax) -> None:
    """A log y axis labelled with plain numbers (0.5, 1, 2, 5, ...), not powers of ten, and
    fewer of them the more decades it spans, so that they never crowd."""
    ax.set_yscale("log")

    def label(v: float, _) -> str:
        low, high = ax.get_ylim()
        decades = math.log10(high / low) if 0 < low < high else 0.0
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6) if v > 0 else 0
        shown = (1, 2, 5) if decades > 1 else (1, 2, 3, 5) if decades > 0.5 else None
        return f"{v:g}" if shown is None or mantissa in shown else ""

    ax.yaxis.set_major_formatter(ticker.FuncFormatter(label))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(label))
    ax.grid(True, which="both", alpha=0.3)


def _epoch_axis(ax, epochs: list[int]) -> None:
    """Whole epochs on the x axis; one epoch alone is a tick at its number, not 0.945-1.05."""
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, min_n_ticks=1))
    if epochs and max(epochs) == min(epochs):
        ax.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _bar_legend(ax, bars: int, columns: int) -> None:
    """Stage 0's bar on top, and the legend in a strip of its own above the bars, so that it
    never hides one (a full bar reaches the right edge)."""
    rows = -(-len(ax.get_legend_handles_labels()[0]) // columns)
    strip = 0.02 + 0.075 * rows  # of the axes' height
    ax.set_ylim(bars - 0.5, bars - 0.5 - bars / (1 - strip))
    if rows:
        ax.legend(fontsize=8, ncol=columns, loc="upper center", frameon=False)


def _title(folder: str) -> str:
    try:
        with open(os.path.join(folder, "args.json")) as f:
            args = json.load(f)
    except (OSError, ValueError):
        return os.path.basename(os.path.normpath(folder))
    loss = "backprop" if args.get("backprop") else args.get("loss_sup")
    return (f"{os.path.basename(os.path.normpath(folder))}: {args.get('model')} on "
            f"{args.get('dataset')}, {loss}, {args.get('stages')} stage(s)")


def draw_run(folder: str, out: BinaryIO) -> None:
    """Write ``folder``'s curves as a PNG to the file ``out``."""
    save(run_figure(folder), out)


def compare_figure(folders: list[str], labels: list[str]) -> Figure:
    """Several runs in one figure: test and train error and speed against epochs."""
    fig = Figure(figsize=(16, 5), layout="constrained")
    axes = fig.subplots(1, 3)
    every = []
    for folder, label in zip(folders, labels):
        epochs = read(folder, "metrics.jsonl")
        x = [r["epoch"] for r in epochs]
        every += x
        axes[0].plot(x, [r["test_error"] for r in epochs], marker="o", ms=3, label=label)
        axes[1].plot(x, [r["train_error"] for r in epochs], marker="o", ms=3, label=label)
        axes[2].plot(x, [r["samples_per_s"] for r in epochs], marker="o", ms=3, label=label)
    _errors(axes[0], "test error", every)
    _errors(axes[1], "train error", every)
    axes[2].set(title="training samples per second", xlabel="epoch", ylim=(0, None))
    _epoch_axis(axes[2], every)
    _legend(axes[2])
    fig.suptitle(f"{len(folders)} runs")
    return fig


def save(fig: Figure, out: BinaryIO) -> None:
    titles = "; ".join(ax.get_title() for ax in fig.axes if ax.get_title())
    FigureCanvasAgg(fig).print_png(out, metadata={"Description": f"panels: {titles}"})
