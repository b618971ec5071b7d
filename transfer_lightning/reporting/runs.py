"""Finished runs read back from their TensorBoard event files (``lightning_logs/version_N``), the same files
that TensorBoard reads, so any run that TensorBoard shows can be reported: a table and a plot of curves."""

from __future__ import annotations

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
from transfer_lightning.tasks import TASKS, Task  # noqa: E402

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
#: (tag of the training curve, tag of the validation curve) per plot panel: the loss, then each run's task's
#: score (``acc``: accuracy; ``mAP`` for multi-label runs, which have no training score).
CURVES = [("train/loss_epoch", "val/loss"), ("train/{score}_epoch", "val/{score}")]


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
    def task(self) -> type[Task]:
        """The run's task, as its hyperparameters say (older runs did not log it: those that logged a mAP were
        multi-label)."""
        name = self.hparams.get("task")
        if name not in TASKS:
            name = "multilabel" if "val/mAP" in self.scalars or "test/mAP" in self.scalars else "multiclass"
        return TASKS[name]

    def curve(self, tag: str) -> list[float]:
        """The values of ``tag``, where ``{score}`` in it stands for the task's score (acc or mAP)."""
        return self.scalars.get(tag.format(score=self.task.score), [])

    def best_val_score(self) -> float | None:
        """The best validation score of the run's task (accuracy, or mAP)."""
        values = self.curve("val/{score}")
        return max(values) if values else None

    def test_score(self) -> float | None:
        """The test score of the run's task (accuracy, or mAP)."""
        values = self.curve("test/{score}")
        return values[-1] if values else None

    def test_macro_f1(self) -> float | None:
        return self.last("test/f1_macro")  # older runs did not log it

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
    if run.test_score() is None:
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
        test = _score(run, run.test_score())
        if run.notes:
            test = f"{test} ({', '.join(run.notes)})"
        cells = [
            run.name,
            str(run.hparams.get("backbone", "?")),
            run.mode,
            run.optimizer,
            str(run.epochs),
            _score(run, run.best_val_score()),
            test,
            _percent(run.test_macro_f1()),
            duration(run.wall_seconds),
            "—" if run.images_per_sec() is None else f"{run.images_per_sec():.0f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_runs(runs: list[Run]) -> Figure:
    """Loss and the task's score per epoch: one colour per run, training solid, validation dashed."""
    figure, axes = plt.subplots(1, len(CURVES), figsize=(12, 4.5 + 0.25 * len(runs)), layout="constrained")
    colours = plt.get_cmap("tab10")
    legend = [
        Line2D([], [], color="black", linestyle="-", label="train"),
        Line2D([], [], color="black", linestyle="--", label="val"),
    ]
    for index, run in enumerate(runs):
        label = f"{run.name}: {run.hparams.get('backbone', '?')}, {run.mode}, {run.optimizer}"
        legend.append(Line2D([], [], color=colours(index % 10), marker=".", label=label))
        for axis, (train_tag, val_tag) in zip(axes, CURVES, strict=True):
            for tag, style, split in ((train_tag, "-", "train"), (val_tag, "--", "val")):
                values = run.curve(tag)
                if values:
                    epochs = range(len(values))  # from 0, as Lightning's bar, checkpoints and logs count
                    axis.plot(epochs, values, style, color=colours(index % 10), marker=".", label=f"{label} ({split})")
    scores = " / ".join(sorted({run.task.score_title for run in runs}))  # one title, unless the tasks differ
    for axis, name in zip(axes, ["loss", scores], strict=True):
        axis.set_xlabel("epoch (from 0)")
        axis.set_ylabel(name)
        axis.set_title(f"{name} per epoch (train solid, val dashed)")
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
    renderer = figure.canvas.get_renderer()
    for columns in range(min(3, len(legend)), 0, -1):  # fewer columns while long labels make it wider than the figure
        drawn = figure.legend(handles=legend, loc="outside lower center", ncols=columns, fontsize="small")
        if columns == 1 or drawn.get_window_extent(renderer).width <= figure.bbox.width:
            break
        drawn.remove()
    return figure


def _score(run: Run, value: float | None) -> str:
    """A run's score as a percentage, marked as mAP where that is the task's score."""
    return _percent(value) + ("" if value is None or run.task.score == "acc" else f" {run.task.score}")


def _percent(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _natural_key(path: Path) -> list[object]:
    parts = path.name.replace("_", " ").split()
    return [str(path.parent)] + [int(p) if p.isdigit() else p for p in parts]
