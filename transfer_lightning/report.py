"""``python -m transfer_lightning report [LOGDIR ...]``: a table and a plot of finished runs, and with
``--html`` one page of everything (:mod:`~transfer_lightning.html_report`).

Reads only the TensorBoard event files of each run (``lightning_logs/version_N``), the same files
that TensorBoard reads, so any run that TensorBoard shows can be reported.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

from transfer_lightning.errors import UserInputError  # noqa: E402
from transfer_lightning.files import atomic_path  # noqa: E402

#: Table columns, in order.
COLUMNS = [
    "run",
    "backbone",
    "mode",
    "optimizer",
    "epochs",
    "best val acc",
    "test acc",
    "test macro-F1",
    "wall time",
    "train images/s",
]
#: (tag of the training curve, tag of the validation curve, axis label) per plot panel; multi-label runs
#: have no accuracy, and show their validation mAP in the accuracy panel.
CURVES = [("train/loss_epoch", "val/loss", "loss"), ("train/acc_epoch", "val/acc", "accuracy (multi-label: mAP)")]
#: Tags of accuracy, and the multi-label runs' metric that takes its place.
IN_PLACE_OF_ACCURACY = {"val/acc": "val/mAP", "test/acc": "test/mAP"}


@dataclass
class Run:
    """What one run's event files say."""

    name: str
    hparams: dict[str, object]
    scalars: dict[str, list[float]]
    wall_seconds: float
    notes: list[str] = field(default_factory=list)
    #: The last PNG of each TensorBoard image tag (confusion matrix, top losses, training batch).
    images: dict[str, bytes] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return len(self.scalars.get("train/loss_epoch", []))

    @property
    def optimizer(self) -> str:
        # LearningRateMonitor's tag (lr-SGD) names it too, for runs whose hyperparameters lack it.
        lr_tags = [tag.removeprefix("lr-").split("/")[0] for tag in self.scalars if tag.startswith("lr-")]
        return str(self.hparams.get("optimizer") or next(iter(lr_tags), "?"))

    @property
    def mode(self) -> str:
        if "freeze_backbone" not in self.hparams:
            return "?"
        start = self.hparams.get("trainable_from")
        after = "" if start in (None, "None") else f" from {start}"
        if not _is_true(self.hparams["freeze_backbone"]):
            return f"fine-tune{after}"
        if self.hparams.get("unfreeze_at_epoch") not in (None, "None"):
            return f"unfrozen{after} at epoch {self.hparams['unfreeze_at_epoch']}"
        return "frozen (BN drifts)" if _is_true(self.hparams.get("update_bn_stats")) else "frozen"

    @property
    def multilabel(self) -> bool:
        return "val/mAP" in self.scalars or "test/mAP" in self.scalars

    def curve(self, tag: str) -> list[float]:
        """The values of ``tag``; of val/mAP for val/acc (and test/mAP for test/acc) in multi-label runs."""
        return self.scalars.get(IN_PLACE_OF_ACCURACY.get(tag, tag) if self.multilabel else tag, [])

    def best_val_acc(self) -> float | None:
        """The best validation accuracy, or mAP for a multi-label run."""
        values = self.curve("val/acc")
        return max(values) if values else None

    def test_acc(self) -> float | None:
        """The test accuracy, or mAP for a multi-label run."""
        values = self.curve("test/acc")
        return values[-1] if values else None

    def test_macro_f1(self) -> float | None:
        return self.last("test/f1_macro")  # runs before 2026-11-28 did not log it

    def last(self, tag: str) -> float | None:
        values = self.scalars.get(tag)
        return values[-1] if values else None

    def images_per_sec(self) -> float | None:
        values = self.scalars.get("train/images_per_sec")
        return sum(values) / len(values) if values else None


def find_runs(log_dirs: list[Path]) -> list[Path]:
    """Every folder under ``log_dirs`` (or the folder itself) that holds TensorBoard event files."""
    runs = set()
    for log_dir in log_dirs:
        if not log_dir.is_dir():
            raise UserInputError(f"{log_dir} is not a folder. Pass folders of runs, e.g. lightning_logs.")
        runs.update(path.parent for path in log_dir.rglob("events.out.tfevents.*"))
    return sorted(runs, key=_natural_key)


def read_run(run_dir: Path, root: Path | None = None) -> Run:
    """Load one run's scalars and hyperparameters from its event files."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 1}).Reload()
    tags = events.Tags()
    scalar_events = {tag: events.Scalars(tag) for tag in tags["scalars"]}
    scalars = {tag: [event.value for event in logged] for tag, logged in scalar_events.items()}
    times = [event.wall_time for logged in scalar_events.values() for event in logged]
    try:
        start = events.FirstEventTimestamp()
    except ValueError:  # no event at all yet
        start = min(times, default=0.0)
    run = Run(
        name=str(run_dir.relative_to(root)) if root and run_dir != root else run_dir.name,
        hparams=_read_hparams(events),
        scalars=scalars,
        wall_seconds=max(times, default=start) - start,
        images={tag: events.Images(tag)[-1].encoded_image_string for tag in tags["images"]},
    )
    if run.test_acc() is None:
        run.notes.append("not tested")
    if not run.epochs:
        run.notes.append("no finished epoch")
    return run


def _is_true(value: object) -> bool:
    """A boolean hparam: "true" as logged now, or True as runs of older versions logged it."""
    return value is True or value == "true"


def _read_hparams(events: EventAccumulator) -> dict[str, object]:
    try:
        content = events.PluginTagToContent("hparams")
    except KeyError:  # the run has not logged its hyperparameters
        return {}
    if "_hparams_/session_start_info" not in content:
        return {}
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = {}
    for name, value in data.session_start_info.hparams.items():
        kind = value.WhichOneof("kind")
        values[name] = getattr(value, kind) if kind else None
    return values


def markdown_table(runs: list[Run]) -> str:
    """One row per run; missing values are shown as an em dash, with a note on why."""
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for run in runs:
        test = _percent(run.test_acc()) + (" mAP" if run.multilabel and run.test_acc() is not None else "")
        if run.notes:
            test = f"{test} ({', '.join(run.notes)})"
        cells = [
            run.name,
            str(run.hparams.get("backbone", "?")),
            run.mode,
            run.optimizer,
            str(run.epochs),
            _percent(run.best_val_acc()) + (" mAP" if run.multilabel and run.best_val_acc() is not None else ""),
            test,
            _percent(run.test_macro_f1()),
            duration(run.wall_seconds),
            "—" if run.images_per_sec() is None else f"{run.images_per_sec():.0f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_runs(runs: list[Run]) -> Figure:
    """Loss and accuracy per epoch: one colour per run, training solid, validation dashed."""
    figure, axes = plt.subplots(1, len(CURVES), figsize=(12, 4.5 + 0.25 * len(runs)), layout="constrained")
    colours = plt.get_cmap("tab10")
    legend = [
        Line2D([], [], color="black", linestyle="-", label="train"),
        Line2D([], [], color="black", linestyle="--", label="val"),
    ]
    for index, run in enumerate(runs):
        label = f"{run.name}: {run.hparams.get('backbone', '?')}, {run.mode}, {run.optimizer}"
        legend.append(Line2D([], [], color=colours(index % 10), marker=".", label=label))
        for axis, (train_tag, val_tag, _) in zip(axes, CURVES, strict=True):
            for tag, style, split in ((train_tag, "-", "train"), (val_tag, "--", "val")):
                values = run.curve(tag)
                if values:
                    epochs = range(len(values))  # from 0, as Lightning's bar, checkpoints and logs count
                    axis.plot(epochs, values, style, color=colours(index % 10), marker=".", label=f"{label} ({split})")
    for axis, (_, _, name) in zip(axes, CURVES, strict=True):
        axis.set_xlabel("epoch (from 0)")
        axis.set_ylabel(name)
        axis.set_title(f"{name} per epoch (train solid, val dashed)")
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
    figure.legend(handles=legend, loc="outside lower center", ncols=min(3, len(legend)), fontsize="small")
    return figure


def _percent(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _natural_key(path: Path) -> list[object]:
    parts = path.name.replace("_", " ").split()
    return [str(path.parent)] + [int(p) if p.isdigit() else p for p in parts]


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
        from transfer_lightning.html_report import write_html

        with atomic_path(args.html) as partial:
            partial.write_text(write_html(runs, run_dirs), encoding="utf-8")
        print(f"Report: {args.html}")


def _root_of(run_dir: Path, log_dirs: list[Path]) -> Path | None:
    return next((log_dir for log_dir in log_dirs if run_dir.is_relative_to(log_dir)), None)
