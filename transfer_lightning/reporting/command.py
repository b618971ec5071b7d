"""``python -m transfer_lightning report [LOGDIR ...]``: a table and a plot of finished runs
(:mod:`.runs`), and with ``--html`` one page of everything (:mod:`.html`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib.pyplot as plt

from transfer_lightning.errors import UserInputError
from transfer_lightning.files import atomic_path
from transfer_lightning.reporting.html import write_html
from transfer_lightning.reporting.runs import find_runs, markdown_table, plot_runs, read_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m transfer_lightning report",
        description="Print a markdown table of the runs under LOGDIR and write a PNG of their curves.",
    )
    parser.add_argument("log_dirs", nargs="*", type=Path, default=[Path("lightning_logs")], metavar="LOGDIR")
    parser.add_argument("--plot", type=Path, default=None, help="PNG to write (default: LOGDIR/report.png)")
    parser.add_argument(
        "--html",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write one self-contained HTML page: settings, curves, classification report, confusion matrix, "
        "top losses with activation maps and the training batch of each run (the comparison first)",
    )
    args = parser.parse_args(argv)
    run_dirs = find_runs(args.log_dirs)
    if not run_dirs:
        raise UserInputError(f"No TensorBoard event files under {', '.join(map(str, args.log_dirs))}. Run fit first.")
    runs = [read_run(run_dir, _root_of(run_dir, args.log_dirs)) for run_dir in run_dirs]
    print(markdown_table(runs))
    plot_path = args.plot or args.log_dirs[0] / "report.png"
    figure = plot_runs(runs)
    with atomic_path(plot_path) as partial:  # never leave half a PNG behind
        figure.savefig(partial, dpi=90, format="png")
    plt.close(figure)
    print(f"\nCurves: {plot_path}")
    if args.html is not None:
        with atomic_path(args.html) as partial:
            partial.write_text(write_html(runs, run_dirs), encoding="utf-8")
        print(f"Report: {args.html}")


def _root_of(run_dir: Path, log_dirs: list[Path]) -> Path | None:
    return next((log_dir for log_dir in log_dirs if run_dir.is_relative_to(log_dir)), None)
