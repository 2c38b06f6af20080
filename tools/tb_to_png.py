"""Turn TensorBoard run directories into a PNG of their scalar curves (no browser needed).

Usage::

    python tools/tb_to_png.py RUN_DIR -o curves.png [--tags 'train/*' eval/accuracy]
                              [--smoothing 0.6] [--logy] [--title TEXT]

``RUN_DIR`` is one run or a directory of runs (every sub-directory holding event files is a run,
drawn as one line per subplot). There is one subplot per scalar tag.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: works without a display
import matplotlib.pyplot as plt

from functrain.logging import read_scalars


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average (``weight`` in [0, 1))."""
    if weight <= 0:
        return list(values)
    out, last, count = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            out.append(value)
            continue
        count += 1
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight**count))
    return out


def plot_runs(
    run_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    tags: Sequence[str] | None = None,
    *,
    smoothing: float = 0.0,
    logy: bool = False,
    title: str | None = None,
    dpi: int = 100,
) -> list[str]:
    """Saves one subplot per scalar tag (all runs overlaid) to ``output``; returns the tags."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    runs = read_scalars(run_dir, tags)
    all_tags = sorted({tag for curves in runs.values() for tag in curves})
    if not all_tags:
        wanted = "" if tags is None else f" matching {list(tags)}"
        raise ValueError(f"no scalar curves{wanted} under {os.fspath(run_dir)!r}")
    ncols = min(len(all_tags), 3)
    nrows = math.ceil(len(all_tags) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.4 * nrows), squeeze=False)
    root_name = os.path.basename(os.path.abspath(run_dir))
    for ax, tag in zip(axes.flat, all_tags):
        for i, (run, curves) in enumerate(runs.items()):
            if tag not in curves:
                continue
            steps, values = curves[tag]
            label = root_name if run == "." else run
            color = f"C{i % 10}"
            if smoothing > 0:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
                values = smooth(values, smoothing)
            marker = "o" if len(steps) == 1 else None
            ax.plot(steps, values, color=color, label=label, linewidth=1.5, marker=marker)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if logy and all(v > 0 for c in runs.values() for v in c.get(tag, ((), ()))[1]):
            ax.set_yscale("log")
        if len(runs) > 1:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(all_tags) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output, dpi=dpi, format="png")
    plt.close(fig)
    return all_tags


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a TensorBoard run directory or a directory of runs")
    parser.add_argument("-o", "--output", required=True, help="the PNG file to write")
    parser.add_argument("--tags", nargs="+", help="tags or shell patterns to plot (default: all)")
    parser.add_argument("--smoothing", type=float, default=0.0, help="EMA weight in [0, 1)")
    parser.add_argument("--logy", action="store_true", help="log y axis for positive curves")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        tags = plot_runs(
            args.run_dir,
            args.output,
            args.tags,
            smoothing=args.smoothing,
            logy=args.logy,
            title=args.title,
            dpi=args.dpi,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"tb_to_png: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({len(tags)} tag{'s' * (len(tags) != 1)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
