"""The linear probe done as Kornblith et al. (2019) do it: the head on frozen features is an L2-regularised
logistic regression fitted to convergence by full-batch L-BFGS, its strength chosen on validation.

:class:`~transfer_lightning.model.TransferClassifier` with ``head_solver: lbfgs`` spends one epoch per
strength, from the strongest to the weakest (log-spaced), each fit warm-started from the one before
and validated as usual, so the best checkpoint by validation is the best strength, and the test after
``fit`` scores that one. torch's :class:`~torch.optim.LBFGS` with the strong-Wolfe line search does the
fitting; scikit-learn's ``LogisticRegression`` would solve the same problem, but would add a
dependency and move the features off the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from transfer_lightning.errors import UserInputError

#: L-BFGS settings per strength: curvature pairs kept, and when the solve counts as converged.
HISTORY_SIZE = 20
TOLERANCE_GRAD = 1e-6
TOLERANCE_CHANGE = 1e-10


class HeadFit(NamedTuple):
    """The result of :func:`fit_head`: the penalised loss and the logits at the end, and the iterations run."""

    loss: float
    logits: Tensor
    iterations: int


def l2_strengths(strongest: float, weakest: float, count: int) -> list[float]:
    """``count`` strengths spaced evenly in log scale from ``strongest`` down to ``weakest``."""
    if count == 1:
        return [strongest]
    ratio = math.log(weakest / strongest) / (count - 1)
    return [strongest * math.exp(ratio * step) for step in range(count)]


def make_lbfgs(parameters: list[nn.Parameter], max_iter: int) -> torch.optim.LBFGS:
    return torch.optim.LBFGS(
        parameters,
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 2,
        history_size=HISTORY_SIZE,
        tolerance_grad=TOLERANCE_GRAD,
        tolerance_change=TOLERANCE_CHANGE,
        line_search_fn="strong_wolfe",
    )


def penalised_loss(loss: Tensor, head: nn.Linear, l2: float) -> Tensor:
    """The data loss plus ``l2 / 2 * ||W||^2`` of the head's weights (the bias is not penalised, as in
    scikit-learn's ``LogisticRegression``)."""
    return loss + 0.5 * l2 * head.weight.square().sum()


def fit_head(
    optimizer: torch.optim.Optimizer,
    block: nn.Module,
    head: nn.Linear,
    features: Tensor,
    labels: Tensor,
    data_loss: Callable[[Tensor, Tensor], Tensor],
    l2: float,
    backward: Callable[[Tensor], None] = Tensor.backward,
) -> HeadFit:
    """Minimise ``data_loss(block(features), labels)`` + the L2 penalty over ``head`` with ``optimizer``,
    starting from the head's current weights and a fresh curvature history. ``block`` runs in eval mode
    (no dropout: the line search needs one function)."""
    was_training = block.training
    block.eval()
    lbfgs = getattr(optimizer, "optimizer", optimizer)  # Lightning's LightningOptimizer wraps it
    lbfgs.state.clear()  # curvature pairs of another strength describe another function

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = penalised_loss(data_loss(block(features), labels), head, l2)
        backward(loss)
        return loss

    try:
        optimizer.step(closure)
        with torch.no_grad():
            logits = block(features)
            loss = float(penalised_loss(data_loss(logits, labels), head, l2))
    finally:
        block.train(was_training)
    return HeadFit(loss, logits, lbfgs.state[lbfgs.param_groups[0]["params"][0]].get("n_iter", 0))


class LBFGSHead(pl.Callback):
    """Drives ``head_solver: lbfgs``: each training epoch is one full-batch :func:`fit_head` at the next strength.

    The model hands its training step and its optimizer to this object (:meth:`step`, :meth:`optimizer`)
    and adds it as a callback. Its hooks run in Lightning's order, whatever the callbacks' order: at
    ``on_fit_start`` it checks the run and makes each epoch one step; at ``on_train_start``, after every
    callback's ``on_fit_start`` (the frozen-feature cache swaps the features in there), it gathers the
    training features once for every epoch.

    Args:
        strongest: The first (strongest) L2 strength.
        weakest: The last (weakest) L2 strength.
        max_iter: L-BFGS iterations at most per strength.
    """

    def __init__(self, strongest: float, weakest: float, max_iter: int) -> None:
        if not (strongest >= weakest > 0) or max_iter < 1:
            raise UserInputError(
                f"lbfgs_l2 is [strongest, weakest], both > 0 (e.g. [0.1, 1.0e-6]), and lbfgs_max_iter >= 1; "
                f"got {[strongest, weakest]} and {max_iter}."
            )
        self.strongest, self.weakest, self.max_iter = strongest, weakest, max_iter
        #: Every training feature and label, on the model's device, during fit.
        self._rows: tuple[Tensor, Tensor] | None = None

    def strengths(self, epochs: int) -> list[float]:
        return l2_strengths(self.strongest, self.weakest, epochs)

    def optimizer(self, pl_module: pl.LightningModule) -> torch.optim.LBFGS:
        rank_zero_info("L-BFGS head: model.optimizer and model.scheduler are not used.")
        return make_lbfgs(list(pl_module.head.parameters()), self.max_iter)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.inputs_are_features:
            raise UserInputError(
                "head_solver lbfgs fits the head on the cached features of the whole training set, but the "
                "frozen-feature cache is off (the log line 'Frozen-feature cache off' says why): enable it, with "
                "data.augment false and tta_flip false."
            )
        if not trainer.max_epochs or trainer.max_epochs < 1:
            raise UserInputError("head_solver lbfgs tries one L2 strength per epoch: set trainer.max_epochs >= 1.")
        # Lightning's loop would give each epoch one step per batch; the step fits on the whole training set.
        # (Returning -1 from on_train_batch_start would skip the epoch's validation too.)
        trainer.limit_train_batches = 1
        strengths = ", ".join(f"{l2:.3g}" for l2 in self.strengths(trainer.max_epochs))
        rank_zero_info(f"L-BFGS head: one full-batch fit per epoch, L2 strengths {strengths}; picked on validation.")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        features, labels = trainer.datamodule.train_set.to_arrays()
        self._rows = features.to(pl_module.device), labels.to(pl_module.device)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = None

    def step(self, pl_module: pl.LightningModule) -> dict[str, Tensor | int]:
        """Fit the head on every training feature at this epoch's strength, from the last fit; log it, and
        return the loss and how many images that was (for ``train/images_per_sec``)."""
        features, labels = self._rows
        l2 = self.strengths(pl_module.trainer.max_epochs)[pl_module.current_epoch]
        loss, logits, iterations = fit_head(
            pl_module.optimizers(),
            pl_module.classifier_block,
            pl_module.head,
            features,
            labels,
            pl_module.training_loss,
            l2,
            pl_module.manual_backward,
        )
        pl_module.log_training(logits, labels, torch.tensor(loss))
        pl_module.log_dict({"train/l2": l2, "train/lbfgs_iterations": float(iterations)}, on_step=False, on_epoch=True)
        if iterations >= self.max_iter:
            rank_zero_info(
                f"L-BFGS head: strength {l2:.3g} stopped at the {iterations}-iteration cap before converging; "
                "raise model.lbfgs_max_iter for a fully converged fit."
            )
        return {"loss": torch.tensor(loss), "images": len(labels)}
