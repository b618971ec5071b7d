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

import torch
from torch import Tensor, nn

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
