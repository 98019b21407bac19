"""Few-shot linear probes: k training examples per class, several seeds (CLIP paper, section 3.2).

The paper compares zero-shot CLIP with linear probes fitted on k examples per class. With so few
examples there is no validation split worth the name, so λ is chosen by a fixed rule:

* k >= 2: cross-validation within the k-shot set. Fold f holds out the examples whose position in
  their class's draw is f mod F (F = min(k, MAX_FOLDS) folds, so each fold validates on every
  class); every λ of the coarse grid 1e6..1e-6 is fitted on the rest, the λ with the best mean
  fold accuracy wins (ties to the larger λ), and the probe is refit on all k-shot examples.
* k = 1: nothing can be held out, so λ = ONE_SHOT_L2. For unit-norm features (what clipforge
  extracts) that is strong regularisation, where the probe ranks classes much as the class
  prototypes (the single examples) do.

Passing ``l2`` fixes λ for every k instead. Draws are nested: under one seed, the k-shot set is the
first k of a per-class shuffle, so the 2-shot set contains the 1-shot set.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

from clipforge.errors import ClipforgeError
from clipforge.evaluation.linear_probe import (COARSE_GRID, DEFAULT_MAX_ITER, DEFAULT_TOL, _check_features,
                                               _check_labels, fit_probe, predict)

ONE_SHOT_L2 = 1.0
MAX_FOLDS = 4


def parse_shots(text: str) -> tuple[int, ...]:
    """``"1+2+4"`` -> (1, 2, 4): the eval-spec form, where commas already separate options."""
    try:
        shots = tuple(int(part) for part in str(text).split("+"))
    except ValueError:
        shots = ()
    if not shots or any(k < 1 for k in shots) or len(set(shots)) != len(shots):
        raise ClipforgeError(f"shots must be distinct positive whole numbers joined by '+', e.g. 1+2+4, got {text!r}")
    return shots


def _draw(labels: torch.Tensor, classes: list[int], seed: int) -> dict[int, torch.Tensor]:
    """Per class, a seeded shuffle of its sample indices; the k-shot set is the first k of each."""
    generator = torch.Generator().manual_seed(seed)
    order = {}
    for cls in classes:
        idx = torch.nonzero(labels == cls).flatten()
        order[cls] = idx[torch.randperm(len(idx), generator=generator)]
    return order


def _accuracy(weight: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> float:
    return (predict(weight, features).cpu() == labels.cpu()).double().mean().item()


def _cross_validate(x: torch.Tensor, y: torch.Tensor, position: torch.Tensor, k: int, num_classes: int,
                    max_iter: int, tol: float) -> tuple[float, list[list[float]], bool]:
    """(best λ, per-λ fold accuracies, every fit converged) for one k-shot set."""
    folds = min(k, MAX_FOLDS)
    scores: list[list[float]] = [[] for _ in COARSE_GRID]
    converged = True
    for fold in range(folds):
        held = position % folds == fold
        previous = None
        for i, l2 in enumerate(COARSE_GRID):  # strong to weak, each fit warm-started from the last
            fit = fit_probe(x[~held], y[~held], l2, num_classes, max_iter=max_iter, tol=tol, init=previous)
            previous, converged = fit.weight, converged and fit.converged
            scores[i].append(_accuracy(fit.weight, x[held], y[held]))
    means = [sum(s) / len(s) for s in scores]
    best = max(range(len(COARSE_GRID)), key=lambda i: (means[i], COARSE_GRID[i]))  # ties -> larger λ
    return COARSE_GRID[best], scores, converged


def few_shot_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, shots: Sequence[int] = (1, 2, 4, 8, 16),
                   seeds: int | Sequence[int] = 3, *, l2: float | None = None, max_iter: int = DEFAULT_MAX_ITER,
                   tol: float = DEFAULT_TOL) -> dict:
    """Test accuracy of k-shot linear probes, mean and sample standard deviation over seeds, per k.

    ``seeds`` is a count (seeds 0..n-1) or the seeds themselves. A k larger than the smallest
    class's training count is left out and listed under ``skipped_shots``. Returns a JSON-ready dict.
    """
    _check_features(train_features, "training")
    _check_labels(train_labels, train_features, "training")
    _check_features(test_features, "test", dim=train_features.shape[1])
    _check_labels(test_labels, test_features, "test")
    shots = [int(k) for k in shots]
    if not shots or any(k < 1 for k in shots) or len(set(shots)) != len(shots):
        raise ClipforgeError(f"shots must be distinct positive whole numbers, got {list(shots)}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ClipforgeError("few-shot probes need at least one seed")
    if l2 is not None and not (l2 >= 0 and math.isfinite(l2)):
        raise ClipforgeError(f"the L2 strength must be a finite non-negative number, got {l2}")
    labels = train_labels.cpu()
    classes = torch.unique(labels).tolist()
    num_classes = int(labels.max()) + 1
    if int(test_labels.max()) >= num_classes:
        raise ClipforgeError(f"test label {int(test_labels.max())} never occurs in training "
                             f"(training labels go up to {num_classes - 1})")
    counts = {cls: int((labels == cls).sum()) for cls in classes}
    smallest = min(counts, key=counts.get)
    rule = (f"fixed l2={l2}" if l2 is not None else
            f"k>=2: {MAX_FOLDS}-fold (at most) cross-validation within the k-shot set over 1e6..1e-6, "
            f"ties to the larger l2; k=1: fixed l2={ONE_SHOT_L2}")
    out: dict = {"shots": [], "seeds": seed_list, "l2_rule": rule, "num_classes_present": len(classes),
                 "num_test": len(test_labels), "results": {}, "skipped_shots": {}}
    draws = {seed: _draw(labels, classes, seed) for seed in seed_list}
    for k in shots:
        if k > counts[smallest]:
            out["skipped_shots"][str(k)] = f"class {smallest} has only {counts[smallest]} training examples"
            continue
        accuracies, chosen, converged = [], [], True
        for seed in seed_list:
            index = torch.cat([draws[seed][cls][:k] for cls in classes])
            position = torch.arange(k).repeat(len(classes))  # each example's place in its class's draw
            x, y = train_features[index.to(train_features.device)], labels[index]
            if l2 is not None or k == 1:
                lam = l2 if l2 is not None else ONE_SHOT_L2
            else:
                lam, _, cv_converged = _cross_validate(x, y, position, k, num_classes, max_iter, tol)
                converged = converged and cv_converged
            fit = fit_probe(x, y, lam, num_classes, max_iter=max_iter, tol=tol)
            converged = converged and fit.converged
            accuracies.append(_accuracy(fit.weight, test_features, test_labels))
            chosen.append(lam)
        out["shots"].append(k)
        out["results"][str(k)] = {
            "k": k, "num_train": k * len(classes), "mean_accuracy": statistics.fmean(accuracies),
            "std_accuracy": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "accuracies": accuracies, "l2": chosen, "converged": converged}
    return out
