"""The L-BFGS head (model.head_solver lbfgs): L2 logistic regression fitted to convergence, strength picked on val."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.commands.main import main
from transfer_lightning.model import TransferClassifier
from transfer_lightning.optim.linear_probe import LBFGSHead, fit_head, l2_strengths, make_lbfgs
from transfer_lightning.training import TrainingSpeed

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "feature_extractor_adam.yaml"


def by_hand_logistic_regression(x: np.ndarray, y: np.ndarray, l2: float, steps: int = 50) -> np.ndarray:
    """Multinomial logistic regression by Newton's method in float64: minimises the mean cross-entropy plus
    l2 / 2 * ||W||^2 (bias not penalised). Returns [W | b] of shape (classes, features + 1), the biases
    centred (adding one constant to every class's bias changes no probability)."""
    n, d = x.shape
    k = int(y.max()) + 1
    design = np.hstack([x, np.ones((n, 1))])
    onehot = np.eye(k)[y]
    penalty = np.full(d + 1, l2)
    penalty[-1] = 0.0
    theta = np.zeros((k, d + 1))
    for _ in range(steps):
        logits = design @ theta.T
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        gradient = ((p - onehot).T @ design) / n + theta * penalty
        # The Hessian of the flattened parameters: blocks (i, j) = X^T diag(p_i (delta_ij - p_j)) X / n.
        hessian = np.zeros((k * (d + 1), k * (d + 1)))
        for i in range(k):
            for j in range(k):
                weight = p[:, i] * ((i == j) - p[:, j])
                hessian[i * (d + 1) : (i + 1) * (d + 1), j * (d + 1) : (j + 1) * (d + 1)] = (
                    (design.T * weight) @ design / n
                )
        hessian += np.diag(np.tile(penalty, k)) + 1e-12 * np.eye(k * (d + 1))
        step = np.linalg.solve(hessian, gradient.reshape(-1)).reshape(k, d + 1)
        theta -= step
        if np.abs(step).max() < 1e-11:
            break
    return centred(theta)


def penalised_gradient(x: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray, l2: float):
    """The gradient of the mean cross-entropy plus l2 / 2 * ||W||^2, with respect to W and b."""
    logits = x @ weight.T + bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = (p - np.eye(weight.shape[0])[y]) / len(x)
    return residual.T @ x + l2 * weight, residual.sum(0)


def centred(theta: np.ndarray) -> np.ndarray:
    return np.hstack([theta[:, :-1], theta[:, -1:] - theta[:, -1:].mean()])


def separable_blobs(per_class: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    x = torch.cat([c + torch.randn(per_class, 4, generator=generator) * 0.5 for c in centres])
    y = torch.arange(3).repeat_interleave(per_class)
    return x, y


@pytest.mark.parametrize("l2", [1e-1, 1e-3])
def test_fit_head_matches_newtons_method(l2):
    """On separable data (where, without the penalty, no minimum exists) the fit equals Newton's method
    by hand, both in float64, and the data are classified perfectly. (In float32 the minimum is found to
    about sqrt(eps) = 3e-4 relative: closer, the loss changes less than float32 can show.)"""
    x, y = separable_blobs()
    x, head = x.double(), nn.Linear(4, 3).double()
    lbfgs = make_lbfgs(list(head.parameters()), 500)
    lbfgs.param_groups[0].update(tolerance_grad=1e-12, tolerance_change=0)  # float64 goes further than float32
    iterations = fit_head(lbfgs, head, head, x, y, F.cross_entropy, l2).iterations
    expected = by_hand_logistic_regression(x.double().numpy(), y.numpy(), l2)
    fitted = centred(torch.cat([head.weight, head.bias[:, None]], dim=1).detach().double().numpy())
    np.testing.assert_allclose(fitted, expected, atol=1e-5, rtol=1e-5)
    assert (head(x).argmax(1) == y).all() and 0 < iterations <= 500


def test_strengths_are_log_spaced_from_strongest():
    assert l2_strengths(1.0, 1e-4, 5) == pytest.approx([1.0, 0.1, 0.01, 1e-3, 1e-4])
    assert l2_strengths(0.5, 1e-6, 1) == [0.5]


def test_fit_tries_a_strength_per_epoch_and_keeps_the_best_on_validation(small_run_args, run_dir, monkeypatch):
    """Through the CLI on cached features: epoch k fits strength k, never running the backbone in training;
    the best checkpoint is the epoch of the highest val/acc, and its head equals Newton's method by hand on
    the training features at that strength; the test after fit scored it."""
    forwards, during_steps = [], []
    forward, lbfgs_step = TransferClassifier.forward, LBFGSHead.step
    monkeypatch.setattr(TransferClassifier, "forward", lambda self, x: forwards.append(1) or forward(self, x))
    monkeypatch.setattr(
        LBFGSHead, "step", lambda self, model: during_steps.append(len(forwards)) or lbfgs_step(self, model)
    )
    cli = TransferLightningCLI(
        args=[
            "fit",
            f"--config={CONFIG}",
            *small_run_args,
            "--model.head_solver=lbfgs",
            "--model.lbfgs_l2=[1.0, 0.001]",
            "--trainer.max_epochs=4",
            "--feature_cache.store=false",
        ]
    )
    (speed,) = [c for c in cli.trainer.callbacks if isinstance(c, TrainingSpeed)]
    assert speed._images == 100  # the last epoch trained on all 100 training images, in one step
    # The backbone ran to compute the features, then never again during the 4 epochs of training.
    assert len(during_steps) == 4 and during_steps[0] > 0 and len(set(during_steps)) == 1
    version = run_dir / "lightning_logs" / "version_0"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version)).Reload()
    strengths = [event.value for event in events.Scalars("train/l2")]
    assert strengths == pytest.approx([1.0, 0.1, 0.01, 0.001], rel=1e-6)
    accuracies = [event.value for event in events.Scalars("val/acc")]
    best = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert best["epoch"] == int(np.argmax(accuracies))  # the first of equal accuracies, as ModelCheckpoint keeps

    images, labels = cli.datamodule.train_set.to_arrays()
    features = cli.model.classifier_inputs(cli.datamodule.batch_transform(images, train=False)).double().numpy()
    head = cli.model.parts.head
    weight, bias = (best["state_dict"][f"network.{head}.{name}"].double().numpy() for name in ("weight", "bias"))
    # The objective is strictly convex in the weights: its minimum is where its gradient, computed here
    # in numpy, vanishes. At the neighbouring strength it does not: the check can tell strengths apart.
    gradients = [penalised_gradient(features, labels.numpy(), weight, bias, l2) for l2 in strengths]
    assert max(np.abs(g).max() for g in gradients[best["epoch"]]) < 1e-4
    others = [i for i in range(4) if i != best["epoch"]]
    assert all(max(np.abs(g).max() for g in gradients[i]) > 1e-3 for i in others)
    assert "test/acc" in cli.trainer.callback_metrics


def test_lbfgs_without_cached_features_is_one_line(small_run_args, run_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={CONFIG}", *small_run_args, "--model.head_solver=lbfgs", "--data.augment=true"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "frozen-feature cache is off" in error and "Traceback" not in error
    with pytest.raises(SystemExit):
        main(["fit", f"--config={CONFIG}", *small_run_args, "--model.head_solver=lbfgs", "--model.freeze_backbone=no"])
    assert "fits a linear head on frozen features" in capsys.readouterr().err


def test_a_fit_stopped_by_the_iteration_cap_says_so(small_run_args, run_dir, caplog):
    caplog.set_level("INFO")
    args = ["--model.head_solver=lbfgs", "--model.lbfgs_max_iter=2", "--trainer.max_epochs=1", "--test_after_fit=false"]
    main(["fit", f"--config={CONFIG}", *small_run_args, *args, "--feature_cache.store=false"])
    assert "stopped at the 2-iteration cap before converging" in caplog.text
