"""Draw runs: one run's curves, or several runs in one figure to compare them.

    python launch/plot.py runs/latest                         # its curves.png, drawn again
    python launch/plot.py runs/a runs/b --labels 1 4 -o compare.png
"""
from __future__ import annotations

import os
import sys

from localpipe.launch.options import Parser, program
from localpipe.pipeline.console import say
from localpipe.pipeline.curves import compare_figure, read, run_figure, save
from localpipe.pipeline.files import WriteError, atomic_write


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog=program("launch/plot.py", "localpipe-plot"),
               description=__doc__.split("\n\n")[0])
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
    out = args.out or (os.path.join(args.runs[0], "curves.png") if len(args.runs) == 1
                       else "compare.png")
    if os.path.isdir(out) or not out.lower().endswith(".png"):
        say(f"error: -o {out}: a plot is a PNG file; name one ending in .png")
        return 2
    try:
        fig = run_figure(args.runs[0]) if len(args.runs) == 1 else \
            compare_figure(args.runs, labels)
    except (KeyError, TypeError) as exc:  # a record without a figure the plot needs
        say(f"error: the records in {', '.join(args.runs)} lack a figure the plot needs "
            f"({type(exc).__name__}: {exc}); were they written by localpipe?")
        return 2
    try:
        atomic_write(out, lambda f: save(fig, f))
    except WriteError as exc:
        say(f"error: {exc}")
        return 1
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
