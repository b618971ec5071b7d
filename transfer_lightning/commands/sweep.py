"""``python -m transfer_lightning sweep --config CFG --sweep SPACE.yaml --trials N``: Optuna studies of fit's settings.

Each trial is a ``fit`` of the config with the trial's values, validated every epoch and pruned by Optuna's
pruner when its validation metric falls behind; the test set is never run. The study lives in ``--storage``
(default: an SQLite file in the sweep's folder; any Optuna storage URL), so a second command on the same
storage, here or on another machine, adds trials to the same study: that is how sweeps run in parallel.
With a frozen backbone the first trial stores the features and every later one reuses them, so a trial
costs the head's training only. At the end: ``best_config.yaml`` (a ready ``fit --config``), ``trials.csv``,
and Optuna's plots of the history and the parameter importances.

The search space is YAML, one line per option as ``--print_config`` spells it::

    model.optimizer.init_args.lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # a range (float, or int)
    trainer.max_epochs: [2, 3]                                            # a choice
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import warnings
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.utilities import rank_zero_info

from transfer_lightning.commands.cli import TransferLightningCLI, program_name
from transfer_lightning.errors import UserInputError
from transfer_lightning.files import atomic_path
from transfer_lightning.training import CheckpointOnInterrupt, FrozenFeatureCache

EXTRA = "pip install -e '.[tune]'"
#: Trials listed in the log at the end (all of them are in trials.csv).
TABLE_ROWS = 10
#: Keys of a range in the search space; anything else is a typo.
RANGE_KEYS = {"low", "high", "log", "step"}


def import_optuna():
    """Optuna and its Lightning pruning callback, or one line naming the extra that installs them."""
    try:
        import optuna
        from optuna_integration import PyTorchLightningPruningCallback
    except ImportError as error:
        raise UserInputError(f"sweep needs Optuna ({error.name} is missing): {EXTRA}") from None
    return optuna, PyTorchLightningPruningCallback


def read_space(path: Path) -> dict[str, Any]:
    """The search space: ``{option: {low, high[, log, step]}}`` for ranges, ``{option: [choices]}`` for choices."""
    try:
        space = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserInputError(f"--sweep {path}: no such file.") from None
    except yaml.YAMLError as error:
        raise UserInputError(f"--sweep {path} is not valid YAML: {error}") from None
    if not isinstance(space, dict) or not space:
        raise UserInputError(
            f"--sweep {path} must map options to ranges or choices, e.g. "
            "'model.optimizer.init_args.lr: {low: 1.0e-4, high: 1.0e-2, log: true}' or 'trainer.max_epochs: [2, 3]'."
        )
    for key, spec in space.items():
        if isinstance(spec, list):
            if not spec or not all(value is None or isinstance(value, str | int | float | bool) for value in spec):
                raise UserInputError(f"--sweep {path}: {key} needs a non-empty list of plain values, got {spec!r}.")
        elif isinstance(spec, dict):
            unknown = set(spec) - RANGE_KEYS
            low, high = spec.get("low"), spec.get("high")
            if unknown or not isinstance(low, int | float) or not isinstance(high, int | float) or not low < high:
                raise UserInputError(
                    f"--sweep {path}: {key} needs low < high (and optionally log, step), got {spec!r}"
                    + (f"; unknown keys {sorted(unknown)}" if unknown else "")
                )
            if spec.get("log") and low <= 0:
                raise UserInputError(f"--sweep {path}: {key} has log: true, so low must be > 0, got {low}.")
        else:
            raise UserInputError(f"--sweep {path}: {key} must be a range {{low, high}} or a list, got {spec!r}.")
    return space


def suggest(trial, key: str, spec: Any) -> Any:
    """The trial's value of ``key``: a choice, an int range (both bounds ints, as in YAML) or a float range."""
    if isinstance(spec, list):
        return trial.suggest_categorical(key, spec)
    low, high, log, step = spec["low"], spec["high"], bool(spec.get("log", False)), spec.get("step")
    if isinstance(low, int) and isinstance(high, int) and not isinstance(step, float):
        return trial.suggest_int(key, low, high, step=step or 1, log=log)
    return trial.suggest_float(key, float(low), float(high), log=log, step=step)


def as_argument(key: str, value: Any) -> str:
    """``--key=value`` as fit's command line reads it (YAML scalars)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return f"--{key}={text}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog=f"{program_name()} sweep",
        description="An Optuna study over fit's settings: each trial fits the config with values from the search "
        "space, monitored on validation and pruned when it falls behind. Every other option is fit's (--config, "
        "--model.*, --data.*, --trainer.*). Run the same command again, here or elsewhere, on the same --storage "
        "to add trials to the study.",
    )
    parser.add_argument("--sweep", type=Path, required=True, metavar="SPACE.yaml", help="the search space")
    parser.add_argument("--trials", type=int, default=20, help="trials this command adds to the study (default 20)")
    parser.add_argument("--study_name", default="sweep", help="the study's name in the storage (default sweep)")
    parser.add_argument(
        "--sweep_dir", type=Path, default=None, help="its folder (default lightning_logs/sweeps/STUDY_NAME)"
    )
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///SWEEP_DIR/study.db)")
    parser.add_argument("--pruner", choices=["median", "none"], default="median", help="Optuna's MedianPruner, or none")
    parser.add_argument("--startup_trials", type=int, default=3, help="trials that are never pruned (default 3)")
    parser.add_argument("--warmup_epochs", type=int, default=1, help="epochs of each trial never pruned (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed of Optuna's TPE sampler (default: random)")
    args, fit_args = parser.parse_known_args(argv)
    if args.trials < 1:
        raise UserInputError("--trials must be at least 1.")
    optuna, pruning_callback = import_optuna()
    space = read_space(args.sweep)
    sweep_dir = args.sweep_dir or Path("lightning_logs") / "sweeps" / args.study_name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    storage = args.storage or f"sqlite:///{sweep_dir / 'study.db'}"
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=args.startup_trials, n_warmup_steps=args.warmup_epochs)
        if args.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    try:
        study = optuna.create_study(
            study_name=args.study_name,
            storage=storage,
            direction="maximize",
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=args.seed),
            pruner=pruner,
        )
    except Exception as error:  # SQLAlchemy's and Optuna's errors for a URL they cannot open have no common base
        raise UserInputError(f"--storage {storage}: {error}") from None
    before = len(study.trials)
    rank_zero_info(
        f"Sweep {args.study_name!r} in {storage}: {before} trials so far, {args.trials} to add; "
        f"trial runs in {sweep_dir / 'trials'}. The test set is not used."
    )
    objective = Objective(fit_args, space, sweep_dir, pruning_callback)
    study.optimize(objective, n_trials=args.trials, catch=())
    write_results(optuna, study, sweep_dir, objective.monitor)


class Objective:
    """One trial: ``fit`` with the trial's values; its value is the best validation score of the run."""

    def __init__(self, fit_args: list[str], space: dict[str, Any], sweep_dir: Path, pruning_callback) -> None:
        self.fit_args = fit_args
        self.space = space
        self.sweep_dir = sweep_dir
        self.pruning_callback = pruning_callback
        self.monitor = "val/acc"
        #: Whether no trial of this command has started yet.
        self._first = True

    def __call__(self, trial) -> float:
        run_dir = self.sweep_dir / "trials" / f"trial_{trial.number}"
        if run_dir.exists():
            raise UserInputError(
                f"{run_dir} is left from another study in {self.sweep_dir}: give this one its own --study_name or "
                "--sweep_dir (or delete the old trials)."
            )
        values = {key: suggest(trial, key, spec) for key, spec in self.space.items()}
        logger = [
            f"--trainer.logger.init_args.save_dir={self.sweep_dir}",
            "--trainer.logger.init_args.name=trials",
            f"--trainer.logger.init_args.version={run_dir.name}",
        ]
        quiet = [] if self._first else ["--trainer.enable_model_summary=false"]  # the same table every trial
        arguments = [*self.fit_args, *(as_argument(k, v) for k, v in values.items()), *logger, *quiet]
        try:
            cli = TransferLightningCLI(args=arguments, run=False)
        except SystemExit:  # fit's parser printed what is wrong
            raise UserInputError(
                f"trial {trial.number}: fit rejects the values {values} (see the error above)."
            ) from None
        trainer = cli.trainer
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or checkpoint.mode != "max":
            raise UserInputError("sweep maximises the checkpoint's monitored metric: keep checkpoint.mode max.")
        self.monitor = checkpoint.monitor
        pruning = self.pruning_callback(trial, monitor=self.monitor)
        # A pruned trial is over, not interrupted: it leaves no last.ckpt "to resume from".
        trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, CheckpointOnInterrupt)] + [pruning]
        cli.match_learning_rate_logging()
        if self._first:
            self.say_if_features_are_reused(cli)
            self._first = False
        trial.set_user_attr("run_dir", str(run_dir))
        trainer.fit(cli.model, datamodule=cli.datamodule)
        pruning.check_pruned()  # under DDP the processes agree on pruning here
        score = checkpoint.best_model_score
        if score is None or not math.isfinite(float(score)):
            raise UserInputError(f"trial {trial.number} logged no finite {self.monitor}: does fit validate?")
        trial.set_user_attr("best_checkpoint", checkpoint.best_model_path)
        # The resolved config LightningCLI saved for the run, kept in the study so that any machine can write
        # best_config.yaml, whichever machine ran the trial.
        trial.set_user_attr("config", (run_dir / "config.yaml").read_text())
        return float(score)

    @staticmethod
    def say_if_features_are_reused(cli) -> None:
        for callback in cli.trainer.callbacks:
            if isinstance(callback, FrozenFeatureCache) and callback.store:
                reason = callback.reason_not_to_cache(cli.model, cli.datamodule)
                if reason is None:
                    rank_zero_info(
                        "Sweep on a frozen backbone: the features are computed once and stored, and every later trial "
                        "(of any sweep on this machine) reuses them and trains only the head, unless a swept option "
                        "changes the images or the backbone."
                    )


def write_results(optuna, study, sweep_dir: Path, monitor: str) -> None:
    """trials.csv, best_config.yaml, history.png and importance.png in ``sweep_dir``; a summary in the log."""
    trials = study.get_trials(deepcopy=False)
    parameters = sorted({key for trial in trials for key in trial.params})
    rows = [
        {
            "number": trial.number,
            "state": trial.state.name,
            monitor: "" if trial.value is None else f"{trial.value:.4f}",
            "epochs": len(trial.intermediate_values),
            "seconds": "" if trial.duration is None else f"{trial.duration.total_seconds():.1f}",
            **{key: trial.params.get(key, "") for key in parameters},
        }
        for trial in trials
    ]
    with atomic_path(sweep_dir / "trials.csv") as partial, open(partial, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ranked = sorted(rows, key=lambda row: -float(row[monitor] or "-inf"))[:TABLE_ROWS]
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += [
        "| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |"
        for row in ranked
    ]
    rank_zero_info(f"The best {len(ranked)} trials by {monitor}:\n" + "\n".join(lines))
    counts = {state: sum(row["state"] == state for row in rows) for state in ("COMPLETE", "PRUNED", "FAIL")}
    rank_zero_info(
        f"Sweep {study.study_name!r}: {len(rows)} trials ({counts['COMPLETE']} complete, {counts['PRUNED']} pruned, "
        f"{counts['FAIL']} failed); table in {sweep_dir / 'trials.csv'}."
    )
    completed = [trial for trial in trials if trial.state.name == "COMPLETE"]
    if not completed:
        rank_zero_info("No trial completed, so there is no best config.")
        return
    best = study.best_trial
    config = yaml.safe_load(best.user_attrs["config"])
    config.get("trainer", {}).pop("logger", None)  # the default logger: lightning_logs/version_N
    config["test_after_fit"] = True  # run alone, the best config tests once, like a recipe
    config.pop("ckpt_path", None)
    header = (
        f"# The best trial of sweep {study.study_name!r}: trial {best.number}, {monitor} {best.value:.4f}\n"
        f"# (best checkpoint: {best.user_attrs.get('best_checkpoint')}), values: {best.params}.\n"
        f"# Run it alone (it tests once at the end): fit --config {sweep_dir / 'best_config.yaml'}\n"
    )
    with atomic_path(sweep_dir / "best_config.yaml") as partial:
        partial.write_text(header + yaml.safe_dump(config, sort_keys=False))
    rank_zero_info(
        f"Best: trial {best.number}, {monitor} {best.value:.4f}, {best.params}; config {sweep_dir / 'best_config.yaml'}"
    )
    write_plots(optuna, study, sweep_dir, monitor)


def write_plots(optuna, study, sweep_dir: Path, monitor: str) -> None:
    """Optuna's matplotlib plots of the optimisation history and of the parameter importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # PED-ANOVA, named: Optuna 4's default (fANOVA) needs scikit-learn, which the tune extra does not install.
    importance = functools.partial(
        plots.plot_param_importances, evaluator=optuna.importance.PedAnovaImportanceEvaluator()
    )
    for name, draw in (("history", plots.plot_optimization_history), ("importance", importance)):
        try:
            axes = draw(study, target_name=monitor)
        except (ValueError, RuntimeError) as error:  # e.g. importances of a single value, or too few trials
            rank_zero_info(f"No {name}.png: {error}")
            continue
        path = sweep_dir / f"{name}.png"
        with atomic_path(path) as partial:
            axes.figure.savefig(partial, format="png", dpi=90, bbox_inches="tight")
        plt.close(axes.figure)
        rank_zero_info(f"Plot: {path}")
