"""Linear probe: agreement with scikit-learn, convergence, the λ sweep protocol and input errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipforge.errors import ClipforgeError
from clipforge.evaluation.few_shot import ONE_SHOT_L2, few_shot_probe
from clipforge.evaluation.linear_probe import (COARSE_GRID, DEFAULT_MAX_ITER, REFINE_STEPS, LinearProbeResult,
                                               _stratified_split, fit_logistic_regression, fit_probe, linear_probe,
                                               predict)

FASHION_MNIST = Path("/work/shared/data/fashion-mnist")


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
    assert w.grad.abs().max() <= 1e-7  # the default relative tol drives the gradient below this
    fit = fit_probe(x, y, l2)
    assert torch.equal(fit.weight, weight) and fit.converged and not fit.hit_cap and 0 < fit.iterations
    assert fit.grad_max == pytest.approx(float(w.grad.abs().max()), rel=1e-3, abs=1e-13)
    assert fit.objective == pytest.approx(float(objective(weight, x, y, l2)), rel=1e-12)
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


def ill_conditioned(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping classes, feature scales spread over three decades and a large common offset."""
    means = torch.randn(5, 20, generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=generator)
    z = means[labels] + 2.0 * torch.randn(n, 20, generator=generator)
    return (z * torch.logspace(0, -3, 20) + 5.0).double(), labels


def fashion_mnist(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First n images through a fixed random projection to 64 unit-norm "features", like CLIP's."""
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = torch.frombuffer(bytearray(f.read()[16:16 + n * 784]), dtype=torch.uint8).view(n, 784)
    with gzip.open(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = torch.frombuffer(bytearray(f.read()[8:8 + n]), dtype=torch.uint8).long()
    projection = torch.randn(784, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    features = (images.double() / 255) @ projection
    return features / features.norm(dim=1, keepdim=True), labels


def assert_matches_sklearn_at_small_l2(x, y, x_test, y_test, l2: float = 1e-7) -> None:
    sklearn = pytest.importorskip("sklearn.linear_model")
    fit = fit_probe(x, y, l2)
    assert fit.converged and not fit.hit_cap and fit.iterations < DEFAULT_MAX_ITER
    # scikit-learn gets centred features (an exact reparametrisation: its intercept is unpenalised
    # too); on the raw ones it stops at its evaluation limit 2% above the optimum of the synthetic set
    mean = x.mean(dim=0)
    reference = sklearn.LogisticRegression(C=1.0 / (l2 * len(y)), solver="lbfgs", tol=1e-12, max_iter=100_000)
    reference.fit((x - mean).numpy(), y.numpy())
    coef = torch.from_numpy(reference.coef_).t()
    theirs = torch.cat([coef, (torch.from_numpy(reference.intercept_) - mean.double() @ coef)[None]])
    ours_objective = float(objective(fit.weight, x, y, l2))
    theirs_objective = float(objective(theirs, x, y, l2))
    assert ours_objective == pytest.approx(fit.objective, rel=1e-10)
    assert abs(ours_objective - theirs_objective) / theirs_objective < 1e-8  # the same optimum
    ours_accuracy = (predict(fit.weight, x_test) == y_test).double().mean().item()
    theirs_accuracy = (predict(theirs, x_test) == y_test).double().mean().item()
    assert abs(ours_accuracy - theirs_accuracy) <= 0.001


def test_small_l2_on_badly_conditioned_features_reaches_sklearns_optimum() -> None:
    x, y = ill_conditioned(1000, seed=0)
    x_test, y_test = ill_conditioned(1000, seed=1)
    assert_matches_sklearn_at_small_l2(x, y, x_test, y_test)


def test_small_l2_on_fashion_mnist_projection_reaches_sklearns_optimum() -> None:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found under {FASHION_MNIST}; the synthetic test covers the solver")
    x, y = fashion_mnist("train", 2000)
    x_test, y_test = fashion_mnist("test", 1000)
    assert_matches_sklearn_at_small_l2(x, y, x_test, y_test)


def test_probe_result_records_convergence_and_the_searched_range() -> None:
    x, y = ill_conditioned(400, seed=2)
    x_test, y_test = ill_conditioned(200, seed=3)
    result = linear_probe(x, y, x_test, y_test)
    record = json.loads(json.dumps(result.to_dict()))
    assert len(record["convergence"]) == len(record["sweep"])
    assert [c["l2"] for c in record["convergence"]] == [l2 for l2, _ in record["sweep"]]
    assert record["converged"] and all(c["converged"] and not c["hit_cap"] for c in record["convergence"])
    assert record["refit_convergence"]["l2"] == record["best_l2"] and record["refit_convergence"]["converged"]
    assert record["l2_range_searched"] == [min(l2 for l2, _ in result.sweep), max(l2 for l2, _ in result.sweep)]
    assert record["l2_range_searched"][0] <= 1e-6 and record["l2_range_searched"][1] >= 1e6
    # a cap that is hit is reported, not hidden
    capped = fit_probe(x, y, 1e-7, max_iter=3)
    assert capped.hit_cap and not capped.converged and capped.iterations == 3


def test_few_shot_reports_mean_and_std_per_k_over_seeds() -> None:
    x, y = mixture(400, classes=4, dim=8, spread=1.5, balanced=True)
    x_test, y_test = mixture(300, classes=4, dim=8, spread=1.5, seed=1)
    out = few_shot_probe(x, y, x_test, y_test, shots=(1, 2, 4, 200), seeds=3)
    record = json.loads(json.dumps(out))
    assert record["shots"] == [1, 2, 4] and record["seeds"] == [0, 1, 2] and record["num_test"] == 300
    assert record["skipped_shots"] == {"200": "class 0 has only 100 training examples"}
    for k in (1, 2, 4):
        entry = record["results"][str(k)]
        accuracies = entry["accuracies"]
        assert entry["num_train"] == 4 * k and len(accuracies) == 3 and entry["converged"]
        assert entry["mean_accuracy"] == pytest.approx(sum(accuracies) / 3)
        mean = sum(accuracies) / 3
        assert entry["std_accuracy"] == pytest.approx((sum((a - mean) ** 2 for a in accuracies) / 2) ** 0.5)
        assert all(0 <= a <= 1 for a in accuracies)
    assert record["results"]["1"]["l2"] == [ONE_SHOT_L2] * 3  # k = 1: the fixed rule
    assert all(l2 in COARSE_GRID for l2 in record["results"]["4"]["l2"])  # k >= 2: cross-validated on the grid
    assert record["results"]["4"]["mean_accuracy"] > 0.4  # well above chance (0.25)
    assert few_shot_probe(x, y, x_test, y_test, shots=(1, 2, 4, 200), seeds=3) == out  # seeded, deterministic
    fixed = few_shot_probe(x, y, x_test, y_test, shots=(2,), seeds=[5, 6], l2=1e-2)
    assert fixed["seeds"] == [5, 6] and fixed["results"]["2"]["l2"] == [1e-2, 1e-2] and "fixed" in fixed["l2_rule"]


def test_few_shot_bad_inputs_raise_clipforge_error() -> None:
    x, y = mixture(40, classes=2, dim=4, balanced=True)
    with pytest.raises(ClipforgeError, match="shots"):
        few_shot_probe(x, y, x, y, shots=(0, 2))
    with pytest.raises(ClipforgeError, match="shots"):
        few_shot_probe(x, y, x, y, shots=())
    with pytest.raises(ClipforgeError, match="seed"):
        few_shot_probe(x, y, x, y, seeds=[])
    with pytest.raises(ClipforgeError, match="never occurs in training"):
        few_shot_probe(x, y, x, y + 1)
    with pytest.raises(ClipforgeError, match="L2 strength"):
        few_shot_probe(x, y, x, y, l2=float("nan"))


def test_eval_spec_shots_runs_few_shot_probes_next_to_the_linear_probe(tmp_path) -> None:
    import numpy as np
    from PIL import Image

    import clipforge
    from clipforge.evaluation.runner import EvalSpec, run_eval
    from clipforge.models import create_model
    from clipforge.models.config import config_from_dict
    from conftest import TINY_VIT, randomize_

    for c in range(3):
        (tmp_path / f"class{c}").mkdir()
        for i in range(6):
            pixels = np.random.default_rng(10 * c + i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / f"class{c}" / f"{i}.png")
    spec = EvalSpec.parse("linear_probe", f"imagefolder={tmp_path},shots=1+2+4")
    assert spec.shots == "1+2+4"
    model = randomize_(create_model(config_from_dict(TINY_VIT, "tiny")), seed=3).eval()
    result = run_eval(spec, model, clipforge.image_transform(model.image_size), model_name="tiny", num_workers=0,
                      progress=False)
    few = result["metrics"]["few_shot"]  # 3 of each class in the fitting half: k = 4 is left out
    assert few["shots"] == [1, 2] and "4" in few["skipped_shots"] and len(few["results"]["2"]["accuracies"]) == 3
    assert result["metrics"]["converged"] and "l2_range_searched" in result["metrics"]
    for bad in ("shots=0+2", "shots=two", "shots=1+1"):
        with pytest.raises(ClipforgeError, match="shots"):
            EvalSpec.parse("linear_probe", f"imagefolder={tmp_path},{bad}")
    with pytest.raises(ClipforgeError, match="linear probes only"):
        EvalSpec.parse("zero_shot", f"imagefolder={tmp_path},shots=1")
