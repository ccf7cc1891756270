"""Draw runs: one run's curves, or several runs in one figure to compare them.

    python launch/plot.py runs/latest                         # its curves.png, drawn again
    python launch/plot.py runs/a runs/b --labels 1 4 -o compare.png
"""
from __future__ import annotations

import argparse
import os
import sys

from localpipe.pipeline.files import atomic_write
from localpipe.pipeline.console import say
from localpipe.pipeline.curves import compare_figure, read, run_figure, save


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/plot.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (each with its metrics.jsonl)")
    p.add_argument("--labels", nargs="+", default=None,
                   help="a name for each run in the legend (default: the folders' names)")
    p.add_argument("-o", "--out", default=None,
                   help="the PNG to write (default: the run's curves.png for one run, "
                        "compare.png for several)")
    args = p.parse_args(argv)
    missing = [r for r in args.runs if not read(r, "metrics.jsonl")]
    if missing:
        say(f"error: no epoch records (metrics.jsonl) in {', '.join(missing)}")
        return 2
    labels = args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(labels) != len(args.runs):
        say(f"error: {len(labels)} labels for {len(args.runs)} runs")
        return 2
    if len(args.runs) == 1:
        fig, out = run_figure(args.runs[0]), args.out or os.path.join(args.runs[0], "curves.png")
    else:
        fig, out = compare_figure(args.runs, labels), args.out or "compare.png"
    atomic_write(out, lambda f: save(fig, f))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
