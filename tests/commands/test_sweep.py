"""sweep: an Optuna study of fit runs on tiny data, its storage, continuation, pruning, best config and plots."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from transfer_lightning.commands.main import main
from transfer_lightning.model import TransferClassifier
from transfer_lightning.training.feature_cache import FrozenFeatureCache

optuna = pytest.importorskip("optuna", reason="the [tune] extra is not installed")

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "feature_extractor_adam.yaml"
SWEEP_DIR = Path("lightning_logs") / "sweeps" / "sweep"


def write_space(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space))
    return path


def trials_table(root: Path) -> list[dict[str, str]]:
    with open(root / SWEEP_DIR / "trials.csv") as file:
        return list(csv.DictReader(file))


def test_a_sweep_stores_its_study_and_a_second_command_continues_it(run_dir, small_run_args, monkeypatch, capsys):
    """3 trials of a frozen head: the study in SQLite, the backbone run for the first trial only, no test
    run; the table, plots and best config, which runs as it is; then 2 more trials numbered 3 and 4."""
    space = write_space(
        run_dir / "space.yaml",
        {"model.optimizer.init_args.lr": {"low": 1.0e-3, "high": 1.0e-1, "log": True}, "trainer.max_epochs": [1, 2]},
    )
    computed, tested = [], []
    compute, test_step = FrozenFeatureCache.compute, TransferClassifier.test_step
    monkeypatch.setattr(
        FrozenFeatureCache, "compute", lambda self, *a, **k: computed.append(1) or compute(self, *a, **k)
    )
    monkeypatch.setattr(TransferClassifier, "test_step", lambda self, *a: tested.append(1) or test_step(self, *a))
    command = ["sweep", f"--config={CONFIG}", *small_run_args, f"--sweep={space}", "--seed=0", "--pruner=none"]
    main([*command, "--trials=3"])
    assert len(computed) == 2 and not tested  # train and val features, once; the test set never ran

    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{run_dir / SWEEP_DIR / 'study.db'}")
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    rows = trials_table(run_dir)
    assert [row["number"] for row in rows] == ["0", "1", "2"]
    values = {float(row["val/acc"]) for row in rows}
    assert max(values) == pytest.approx(study.best_value, abs=1e-4)
    for name in ("history.png", "importance.png"):
        with Image.open(run_dir / SWEEP_DIR / name) as image:
            assert image.format == "PNG" and image.width > 200

    best = yaml.safe_load((run_dir / SWEEP_DIR / "best_config.yaml").read_text())
    assert best["model"]["optimizer"]["init_args"]["lr"] == pytest.approx(
        study.best_params["model.optimizer.init_args.lr"]
    )
    assert best["trainer"]["max_epochs"] == study.best_params["trainer.max_epochs"] and best["test_after_fit"]
    main(["fit", f"--config={run_dir / SWEEP_DIR / 'best_config.yaml'}"])  # as it is: trains, then tests once
    assert tested and len(computed) == 3  # the test set's features, the only new ones
    assert (run_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()

    main([*command, "--trials=2"])
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{run_dir / SWEEP_DIR / 'study.db'}")
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert [row["number"] for row in trials_table(run_dir)] == ["0", "1", "2", "3", "4"]
    assert len(computed) == 3  # the second command reused the stored features too

    (run_dir / SWEEP_DIR / "study.db").unlink()  # a new study in the same folder would overwrite trial_0
    with pytest.raises(SystemExit):
        main([*command, "--trials=1"])
    assert "is left from another study" in capsys.readouterr().err


def test_a_sweep_may_choose_the_head_and_each_trains_on_its_own_stored_features(run_dir, small_run_args, monkeypatch):
    """Trial 0 the linear head, trial 1 the mlp head: each trial's checkpoint holds the head it was given, and the
    features are computed once per pooling (average; average and maximum), not once per trial."""
    space = write_space(run_dir / "space.yaml", {"model.head": ["linear", "mlp"]})
    storage = f"sqlite:///{run_dir / 'heads.db'}"
    study = optuna.create_study(study_name="sweep", storage=storage, direction="maximize")
    for head in ("linear", "mlp", "linear"):
        study.enqueue_trial({"model.head": head})
    computed = []
    compute = FrozenFeatureCache.compute
    monkeypatch.setattr(
        FrozenFeatureCache, "compute", lambda self, *a, **k: computed.append(1) or compute(self, *a, **k)
    )
    command = ["sweep", f"--config={CONFIG}", *small_run_args, f"--sweep={space}", f"--storage={storage}"]
    main([*command, "--trials=3", "--pruner=none"])
    assert [row["model.head"] for row in trials_table(run_dir)] == ["linear", "mlp", "linear"]
    for number, head in enumerate(("linear", "mlp", "linear")):
        checkpoint = run_dir / SWEEP_DIR / "trials" / f"trial_{number}" / "checkpoints" / "last.ckpt"
        assert torch.load(checkpoint, weights_only=False)["hyper_parameters"]["head"] == head
    assert len(computed) == 4  # train and val features of each pooling; trial 2 reused trial 0's
    best = yaml.safe_load((run_dir / SWEEP_DIR / "best_config.yaml").read_text())
    assert best["model"]["head"] == study.best_params["model.head"]


def test_a_trial_that_falls_behind_is_pruned_and_marked(run_dir, small_run_args):
    """Trial 0 learns (lr 0.05); trial 1 cannot (lr 1e-9) and is pruned after its first epoch."""
    space = write_space(run_dir / "space.yaml", {"model.optimizer.init_args.lr": [0.05, 1.0e-9]})
    storage = f"sqlite:///{run_dir / 'shared.db'}"
    study = optuna.create_study(study_name="sweep", storage=storage, direction="maximize")
    study.enqueue_trial({"model.optimizer.init_args.lr": 0.05})
    study.enqueue_trial({"model.optimizer.init_args.lr": 1.0e-9})
    main(
        [
            "sweep",
            f"--config={CONFIG}",
            *small_run_args,
            "--trainer.max_epochs=3",
            f"--sweep={space}",
            f"--storage={storage}",
            "--trials=2",
            "--startup_trials=1",
            "--warmup_epochs=0",
        ]
    )
    rows = trials_table(run_dir)
    assert [(row["state"], row["epochs"]) for row in rows] == [("COMPLETE", "3"), ("PRUNED", "1")]
    trial_dir = run_dir / SWEEP_DIR / "trials" / "trial_1" / "checkpoints"
    assert not (trial_dir / "last.ckpt").exists()  # pruned, not interrupted: nothing to resume


def test_without_optuna_the_error_names_the_extra(run_dir, small_run_args, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", f"--config={CONFIG}", *small_run_args, "--sweep=space.yaml", "--trials=1"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "pip install -e '.[tune]'" in error and len(error.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("space", "extra", "message"),
    [
        ({"model.optimizer.init_args.lr": {"low": 0.1, "high": 0.01}}, [], "needs low < high"),
        ({"model.optimizer.init_args.lr": {"low": 0.0, "high": 0.1, "log": True}}, [], "low must be > 0"),
        ({"trainer.max_epochs": []}, [], "non-empty list"),
        ({"data.not_an_option": [1, 2]}, [], "fit rejects the values"),
        ({"trainer.max_epochs": [1]}, ["--storage=nosuchdb://x"], "--storage nosuchdb://x"),
    ],
)
def test_a_bad_search_space_or_storage_is_one_clear_error(run_dir, small_run_args, space, extra, message, capsys):
    path = write_space(run_dir / "space.yaml", space)
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", f"--config={CONFIG}", *small_run_args, f"--sweep={path}", "--trials=1", *extra])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
