"""``report`` on small generated runs: its table equals what the runs logged; its plot has every curve."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.commands.main import main
from transfer_lightning.reporting.runs import COLUMNS, find_runs, plot_runs, read_run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PARTIAL = "--model.trainable_from=layer3"  # the third run fine-tunes from layer3 on


@pytest.fixture(scope="module")
def runs(image_folder, tmp_path_factory):
    """Three runs in one lightning_logs: frozen SGD (tested), fine-tune Adam (tested), SGD from layer3 (not tested)."""
    root = tmp_path_factory.mktemp("report")
    common = [
        f"--data.data_dir={image_folder}",
        f"--data.cache_dir={root / 'cache'}",
        "--data.val_size=20",
        "--data.batch_size=16",
        "--model.weights=null",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={root}",
    ]
    clis = [
        TransferLightningCLI(args=["fit", f"--config={CONFIGS / 'feature_extractor_sgd.yaml'}", *common]),
        TransferLightningCLI(args=["fit", f"--config={CONFIGS / 'finetune_adam.yaml'}", *common]),
        TransferLightningCLI(
            args=["fit", f"--config={CONFIGS / 'finetune_sgd.yaml'}", *common, "--test_after_fit=false", PARTIAL]
        ),
    ]
    return root / "lightning_logs", clis


def table_rows(output: str) -> dict[str, dict[str, str]]:
    lines = [line for line in output.splitlines() if line.startswith("| version_")]
    return {
        cells[0]: dict(zip(COLUMNS, cells, strict=True)) for cells in (line.strip("| ").split(" | ") for line in lines)
    }


def test_table_cells_equal_what_was_logged(runs, capsys):
    log_dir, clis = runs
    main(["report", str(log_dir)])
    rows = table_rows(capsys.readouterr().out)
    assert list(rows) == ["version_0", "version_1", "version_2"]
    expected_modes = ["frozen", "fine-tune", "fine-tune from layer3"]
    expected_optimizers = ["SGD", "Adam", "SGD"]
    for index, cli in enumerate(clis):
        row = rows[f"version_{index}"]
        assert row["backbone"] == "resnet18"
        assert row["mode"] == expected_modes[index]
        assert row["optimizer"] == expected_optimizers[index]
        assert row["epochs"] == "2"
        best_val = cli.trainer.checkpoint_callback.best_model_score.item()
        assert row["best val acc"] == f"{100 * best_val:.2f}%"
        assert float(row["train images/s"]) > 0
        assert row["wall time"].endswith(" s")
    for index in (0, 1):
        test_acc = clis[index].trainer.callback_metrics["test/acc"].item()
        assert rows[f"version_{index}"]["test acc"] == f"{100 * test_acc:.2f}%"
        macro_f1 = clis[index].trainer.callback_metrics["test/f1_macro"].item()
        assert rows[f"version_{index}"]["test macro-F1"] == f"{100 * macro_f1:.2f}%"
    assert rows["version_2"]["test acc"] == "— (not tested)" and rows["version_2"]["test macro-F1"] == "—"


def test_plot_has_one_line_per_run_and_split(runs, tmp_path, capsys):
    log_dir, _ = runs
    png = tmp_path / "curves.png"
    main(["report", str(log_dir), "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = plot_runs([read_run(run, log_dir) for run in find_runs([log_dir])])
    for axis in figure.axes:
        labels = sorted(line.get_label() for line in axis.get_lines())
        assert len(labels) == 3 * 2
        assert sum(label.endswith("(train)") for label in labels) == 3
        assert all(list(line.get_xdata()) == [0, 1] for line in axis.get_lines())  # epochs from 0, as checkpoints
        styles = {line.get_label().rsplit(" ", 1)[1]: line.get_linestyle() for line in axis.get_lines()}
        assert styles == {"(train)": "-", "(val)": "--"}


def test_the_legend_of_runs_with_long_names_fits_in_the_figure(tmp_path):
    """Three columns of long labels (local-dir: backbones, nested log folders) were wider than the figure, and the
    PNG cut them off at both sides."""
    log_dir = tmp_path / "lightning_logs"
    for index in range(6):
        SummaryWriter(str(log_dir / f"a_long_experiment_name_with_its_settings_spelled_out_{index}")).close()
    figure = plot_runs([read_run(run, log_dir) for run in find_runs([log_dir])])
    (legend,) = figure.legends
    assert legend.get_window_extent(figure.canvas.get_renderer()).width <= figure.bbox.width


def test_a_run_without_any_epoch_is_shown_not_fatal(tmp_path, capsys):
    SummaryWriter(str(tmp_path / "lightning_logs" / "version_7")).close()
    main(["report", str(tmp_path / "lightning_logs")])
    row = table_rows(capsys.readouterr().out)["version_7"]
    assert row["epochs"] == "0" and "not tested" in row["test acc"] and "no finished epoch" in row["test acc"]


def test_no_runs_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "No TensorBoard event files" in capsys.readouterr().err
