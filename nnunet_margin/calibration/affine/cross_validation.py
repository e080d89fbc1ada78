"""k-fold cross-validation of a penalised affine calibrator over a grid of penalties (ODIR for matrix scaling).

Each penalty is scored by the mean held-out NLL (unpenalised) over the folds: fitted on the other folds' voxels,
evaluated on the fold's. On a uniform subsample of at most CROSS_VALIDATION_MAX_VOXELS voxels, or twice what the
calibrator needs, beyond that: choosing the penalty needs held-out NLL differences between grid points, not the
final fit's precision.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from .solver import Parametrisation, minimise, nll_sums

# Voxels the cross-validation fits on at most (a uniform subsample of the fit voxels beyond that).
CROSS_VALIDATION_MAX_VOXELS = 2**19


def cross_validation_subsample(num_voxels: int, minimum_voxels: int, seed: int) -> torch.Tensor | slice:
    """The voxels the cross-validation uses: all of them, or a uniform random subset (in increasing order) of
    max(CROSS_VALIDATION_MAX_VOXELS, minimum_voxels) when there are more."""
    needed = max(CROSS_VALIDATION_MAX_VOXELS, minimum_voxels)
    if num_voxels <= needed:
        return slice(None)
    return torch.randperm(num_voxels, generator=torch.Generator().manual_seed(seed))[:needed].sort().values


def cross_validate(parametrisation: Parametrisation, logits: torch.Tensor, labels: torch.Tensor,
                   fold_ids: torch.Tensor, folds: int, penalties: dict[Hashable, torch.Tensor], tolerance: float
                   ) -> tuple[dict[Hashable, float], Hashable, torch.Tensor]:
    """Mean held-out NLL of every penalty (in the order given) over the folds, the best one (the first of equals),
    and the mean over the folds of the parameters fitted with it (a warm start for the final fit).

    The first fold's fits run through the penalties in order, each starting from the previous solution; the other
    folds' start from the first fold's solution with the same penalty.
    """
    held_out_nll = {key: 0.0 for key in penalties}
    solutions: dict[Hashable, list[torch.Tensor]] = {key: [] for key in penalties}
    for fold in range(folds):
        held_out = fold_ids == fold
        fitted = ~held_out
        fit_logits, fit_labels = logits[:, fitted], labels[fitted]
        held_out_logits, held_out_labels = logits[:, held_out], labels[held_out]
        parameters = parametrisation.identity()
        for key, penalty in penalties.items():
            start = parameters if fold == 0 else solutions[key][0]
            parameters = minimise(parametrisation, fit_logits, fit_labels, start, penalty, tolerance).parameters
            held_out_nll[key] += float(nll_sums(parametrisation, parameters, held_out_logits, held_out_labels,
                                                gradient=False)[0])
            solutions[key].append(parameters)
    held_out_nll = {key: value / labels.numel() for key, value in held_out_nll.items()}
    best = min(held_out_nll, key=held_out_nll.__getitem__)
    return held_out_nll, best, torch.stack(solutions[best]).mean(dim=0)
