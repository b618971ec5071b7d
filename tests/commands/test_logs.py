"""What a run prints into a log file: a few plain lines per epoch, none of the known noise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "feature_extractor_sgd.yaml"
NOISE = ("💡 Tip: For seamless", "LeafSpec", "module(s) in eval mode")


def test_a_fit_logged_to_a_file_is_small_plain_and_free_of_noise(small_run_args, run_dir):
    args = [arg for arg in small_run_args if "enable_progress_bar" not in arg]
    log = run_dir / "fit.log"
    with open(log, "w") as file:  # not a terminal, as under CI, nohup or SLURM
        command = [sys.executable, "-m", "transfer_lightning", "fit", f"--config={CONFIG}", *args]
        command += ["--trainer.max_epochs=2", "--trainer.limit_train_batches=3"]
        result = subprocess.run(command, stdout=file, stderr=subprocess.STDOUT, cwd=run_dir, timeout=300)
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    assert len(text.encode()) < 20_000
    assert not [noise for noise in NOISE if noise in text]
    assert "BatchNorm layers stay in eval mode" in text
    assert "Epoch 0 (1 of 2) done in" in text and "Epoch 1 (2 of 2) done in" in text and "val/acc" in text
    assert "best-epoch00-" in text or "best-epoch01-" in text  # checkpoint names count from 0 too
    # Lightning's bars are off; tqdm's own (decoding, feature caching) draw at most at start and end.
    assert text.count("\r") <= 4 * text.count("100%")
