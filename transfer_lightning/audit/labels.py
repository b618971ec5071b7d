"""Wrong labels: out-of-sample class probabilities from K-fold linear probes on the frozen features, judged by
cleanlab's confident learning (Northcutt et al., 2021).

Each image's probabilities come from a probe that never saw it (the project's L-BFGS probe,
:func:`~transfer_lightning.optim.linear_probe.fit_head`, on the other folds), so an image whose given label the
rest of the data contradicts gets a low probability for it. cleanlab then flags the images whose label is
likely wrong (``find_label_issues``) and scores every image's label (``get_label_quality_scores``): it is not
written here by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfer_lightning.errors import UserInputError
from transfer_lightning.logs import progress_bar
from transfer_lightning.optim.linear_probe import fit_head, make_lbfgs

#: L2 strength of the probes (per image, as ``model.lbfgs_l2``): the frozen recipes' best on CIFAR-10.
PROBE_L2 = 1e-3
#: L-BFGS iterations at most per probe.
PROBE_ITERATIONS = 300


@dataclass(frozen=True)
class LabelFindings:
    """Per image: the suggested labels (0/1 per class), the quality of the given label (lower: more likely wrong)
    and whether cleanlab flags it."""

    suggested: Tensor
    quality: np.ndarray
    is_issue: np.ndarray


def fold_of_each(labels: Tensor, folds: int, seed: int = 0) -> Tensor:
    """(N,) a fold per image, each class spread evenly over the folds (stratified, seeded); multi-label images by
    their first label."""
    keys = labels.argmax(dim=1) if labels.ndim == 2 else labels
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed))
    order = order[torch.argsort(keys[order], stable=True)]  # shuffled within each class
    fold = torch.empty(len(keys), dtype=torch.int64)
    fold[order] = torch.arange(len(keys)) % folds
    return fold


def check_folds(labels: Tensor, class_names: list[str], folds: int) -> None:
    """Refuse, in one line, fewer than two folds or a class with fewer images than folds."""
    if folds < 2:
        raise UserInputError(
            f"--folds must be at least 2 (each image is judged by a probe trained on the others); got {folds}."
        )
    counts = labels.sum(dim=0) if labels.ndim == 2 else torch.bincount(labels, minlength=len(class_names))
    few = [f"{name} ({int(n)})" for name, n in zip(class_names, counts, strict=True) if n < folds]
    if few:
        raise UserInputError(
            f"{folds} folds need at least {folds} images of every class; these have fewer: {', '.join(few)}. "
            "Use fewer --folds, or add images."
        )


def out_of_sample_probabilities(
    features: Tensor, labels: Tensor, num_classes: int, folds: int, multilabel: bool
) -> Tensor:
    """(N, classes) each image's probabilities from a linear probe fitted on the other folds (softmax, or a sigmoid
    per class for several labels per image)."""
    fold = fold_of_each(labels, folds)
    probabilities = torch.empty(len(features), num_classes)
    loss = (lambda z, y: F.binary_cross_entropy_with_logits(z, y.float())) if multilabel else F.cross_entropy
    scale = features.norm(dim=1).mean()  # features of any backbone on one scale, so that one L2 strength fits all
    for k in progress_bar(range(folds), desc="Linear probes (one per fold)", unit="fold"):
        held_out = fold == k
        torch.manual_seed(k)
        head = nn.Linear(features.shape[1], num_classes)
        fitted_on = features[~held_out].div_(scale)  # indexing copies: scaled in place
        fit_head(
            make_lbfgs(list(head.parameters()), PROBE_ITERATIONS),
            head,
            head,
            fitted_on,
            labels[~held_out],
            loss,
            PROBE_L2,
        )
        del fitted_on
        with torch.no_grad():
            logits = head(features[held_out].div_(scale))
        probabilities[held_out] = logits.sigmoid() if multilabel else logits.softmax(dim=-1)
    return probabilities


def find_label_issues(probabilities: Tensor, labels: Tensor, multilabel: bool) -> LabelFindings:
    """cleanlab's verdict on every image's given label(s), from out-of-sample ``probabilities``."""
    pred_probs = probabilities.double().numpy()
    if multilabel:
        from cleanlab.multilabel_classification.filter import find_label_issues as find
        from cleanlab.multilabel_classification.rank import get_label_quality_scores as score

        given = [np.flatnonzero(row).tolist() for row in labels.numpy()]
        suggested = (probabilities >= 0.5).long()
    else:
        from cleanlab.filter import find_label_issues as find
        from cleanlab.rank import get_label_quality_scores as score

        given = labels.numpy()
        suggested = F.one_hot(probabilities.argmax(dim=-1), probabilities.shape[1])
    return LabelFindings(suggested, score(given, pred_probs), find(given, pred_probs))
