"""Linear probe: agreement with scikit-learn, convergence, the λ sweep protocol and input errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from clipforge.errors import ClipforgeError
from clipforge.evaluation.linear_probe import (COARSE_GRID, REFINE_STEPS, LinearProbeResult, _stratified_split,
                                               fit_logistic_regression, linear_probe, predict)


def mixture(n: int, classes: int = 4, dim: int = 8, spread: float = 1.0, seed: int = 0,
            means_seed: int = 100, balanced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around fixed class means (same means for every ``seed``, so train and test match)."""
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(means_seed))
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % classes if balanced else torch.randint(0, classes, (n,), generator=generator))
    features = means[labels] + spread * torch.randn(n, dim, generator=generator)
    return features.float(), labels


def probabilities(weight: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return (features.double() @ weight[:-1] + weight[-1]).softmax(dim=1)


def objective(weight: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, l2: float) -> torch.Tensor:
    logits = features.double() @ weight[:-1] + weight[-1]
    return F.cross_entropy(logits, labels) + 0.5 * l2 * weight[:-1].square().sum()


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_matches_sklearn_multinomial_logistic_regression(l2: float) -> None:
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = mixture(300, classes=4, dim=8, spread=1.5)
    weight = fit_logistic_regression(x, y, l2, max_iter=10_000, tol=1e-10)
    reference = sklearn.LogisticRegression(C=1.0 / (l2 * len(y)), solver="lbfgs", tol=1e-10, max_iter=10_000)
    reference.fit(x.double().numpy(), y.numpy())
    assert weight.shape == (9, 4) and weight.dtype == torch.float64
    x_test, _ = mixture(200, classes=4, dim=8, spread=1.5, seed=1)
    expected = torch.from_numpy(reference.predict_proba(x_test.double().numpy()))
    assert (probabilities(weight, x_test) - expected).abs().max() < 1e-5
    assert torch.equal(predict(weight, x_test), torch.from_numpy(reference.predict(x_test.double().numpy())))
    coef = torch.from_numpy(reference.coef_).t()
    intercept = torch.from_numpy(reference.intercept_)
    assert (weight[:-1] - coef).abs().max() < 1e-5 * coef.abs().max()
    assert (weight[-1] - (intercept - intercept.mean())).abs().max() < 1e-5 * (1 + intercept.abs().max())


def test_solution_is_a_stationary_point_and_warm_start_agrees() -> None:
    x, y = mixture(400, classes=5, dim=12, spread=1.2)
    l2 = 1e-3
    weight = fit_logistic_regression(x, y, l2)
    assert weight.grad is None and not weight.requires_grad
    w = weight.clone().requires_grad_(True)
    objective(w, x, y, l2).backward()
    assert w.grad.abs().max() <= 1e-6 + 1e-12  # the default tol bounds the largest gradient entry
    assert abs(float(weight[-1].sum())) < 1e-10  # biases are centred
    # starting elsewhere (a neighbouring λ's solution) reaches the same optimum
    warm = fit_logistic_regression(x, y, l2, init=fit_logistic_regression(x, y, 1e-1))
    assert (probabilities(warm, x) - probabilities(weight, x)).abs().max() < 1e-4
    # a wrongly shaped warm start is refused
    with pytest.raises(ClipforgeError, match="initial weight"):
        fit_logistic_regression(x, y, l2, init=torch.zeros(3, 3))


def test_sweep_picks_best_validation_lambda_and_refits_on_train_plus_val() -> None:
    x, y = mixture(500, classes=5, dim=16, spread=2.5, seed=0)
    x_test, y_test = mixture(300, classes=5, dim=16, spread=2.5, seed=1)
    result = linear_probe(x, y, x_test, y_test, seed=3)
    assert isinstance(result, LinearProbeResult)
    # the default search: one fit per decade, then two per refinement step, each λ once
    assert len(result.sweep) == len(COARSE_GRID) + 2 * REFINE_STEPS
    assert [l2 for l2, _ in result.sweep[:len(COARSE_GRID)]] == COARSE_GRID
    assert len({l2 for l2, _ in result.sweep}) == len(result.sweep)
    best_accuracy = max(acc for _, acc in result.sweep)
    assert result.val_accuracy == best_accuracy
    assert result.best_l2 == max(l2 for l2, acc in result.sweep if acc == best_accuracy)
    assert 1e-6 <= result.best_l2 <= 1e6 and result.val_accuracy > 0.5
    # the split is stratified and partitions the training set
    counts = torch.bincount(y)
    assert result.num_val == sum(max(1, round(0.2 * int(c))) for c in counts)
    assert result.num_train + result.num_val == len(y) and result.num_test == len(y_test)
    # refit on all training data (train + val) at the chosen λ
    refit = fit_logistic_regression(x, y, result.best_l2)
    assert (probabilities(result.weight, x_test) - probabilities(refit, x_test)).abs().max() < 1e-4
    # test metrics recomputed independently from the returned weights
    predicted = (x_test.double() @ result.weight[:-1] + result.weight[-1]).argmax(dim=1)
    assert result.accuracy == pytest.approx((predicted == y_test).double().mean().item(), abs=1e-12)
    recalls = [(predicted[y_test == c] == c).double().mean().item() for c in range(5)]
    assert result.mean_per_class_recall == pytest.approx(sum(recalls) / 5, abs=1e-12)
    # deterministic, and JSON-ready
    again = linear_probe(x, y, x_test, y_test, seed=3)
    assert again.sweep == result.sweep and again.accuracy == result.accuracy
    assert json.loads(json.dumps(result.to_dict()))["best_l2"] == result.best_l2


def test_given_l2_values_are_swept_in_order_and_ties_go_to_larger_lambda() -> None:
    x, y = mixture(200, classes=3, dim=6, spread=0.05)
    # well-separated classes: every λ here classifies the validation split perfectly
    result = linear_probe(x, y, x, y, l2_values=[1e-3, 1e-1, 1e-2])
    assert result.sweep == [(1e-3, 1.0), (1e-1, 1.0), (1e-2, 1.0)]
    assert result.best_l2 == 1e-1


def test_stratified_split_is_seeded_and_keeps_every_class() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2 + [3])
    train, val = _stratified_split(labels, 0.2, seed=0)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(len(labels)))
    assert torch.bincount(labels[val], minlength=4).tolist() == [2, 1, 1, 0]  # ≥1 per class with ≥2 samples
    assert torch.equal(val, _stratified_split(labels, 0.2, seed=0)[1])
    assert any(not torch.equal(val, _stratified_split(labels, 0.2, seed=s)[1]) for s in range(1, 5))


def test_strong_regularisation_is_uniform_and_separable_data_is_perfect() -> None:
    x, y = mixture(300, classes=3, dim=6, balanced=True)
    heavy = fit_logistic_regression(x, y, 1e6)
    assert (probabilities(heavy, x) - 1 / 3).abs().max() < 1e-3
    x, y = mixture(300, classes=4, dim=16, spread=0.05)
    x_test, y_test = mixture(200, classes=4, dim=16, spread=0.05, seed=1)
    result = linear_probe(x, y, x_test, y_test, l2_values=[1e-2, 1e-4], progress=True)
    assert result.accuracy == 1.0 and result.mean_per_class_recall == 1.0


def test_bad_inputs_raise_clipforge_error() -> None:
    x, y = mixture(50, classes=3, dim=4)
    with pytest.raises(ClipforgeError, match="labels"):
        linear_probe(x, y[:-1], x, y)
    with pytest.raises(ClipforgeError, match="dimension"):
        linear_probe(x, y, x[:, :3], y)
    with pytest.raises(ClipforgeError, match="non-negative"):
        linear_probe(x, y - 1, x, y)
    with pytest.raises(ClipforgeError, match="never occurs in training"):
        linear_probe(x, y, x, y + 1)
    with pytest.raises(ClipforgeError, match="out of range"):
        fit_logistic_regression(x, y, 1e-3, num_classes=2)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ClipforgeError, match="NaN"):
        linear_probe(bad, y, x, y)
    with pytest.raises(ClipforgeError, match="NaN"):
        linear_probe(x, y, bad, y)
    with pytest.raises(ClipforgeError, match="empty"):
        linear_probe(x, y, x[:0], y[:0])
    with pytest.raises(ClipforgeError, match="integer"):
        linear_probe(x, y.float(), x, y)
    with pytest.raises(ClipforgeError, match="2-D"):
        fit_logistic_regression(x[0], y[:1], 1e-3)
    with pytest.raises(ClipforgeError, match="val_fraction"):
        linear_probe(x, y, x, y, val_fraction=1.0)
    with pytest.raises(ClipforgeError, match="l2_values"):
        linear_probe(x, y, x, y, l2_values=[])
    with pytest.raises(ClipforgeError, match="L2 strength"):
        fit_logistic_regression(x, y, -1.0)
