"""Linear-probe evaluation as in the CLIP paper (Radford et al. 2021, appendix A.3).

Frozen image features feed a multinomial logistic regression fitted with L-BFGS. The L2
strength λ is chosen on a stratified validation split carved from the training set, then the
model is refit on train+val at that λ and scored on test. Features are used as given (the
paper neither standardises nor centres them); the solver whitens them internally only as an exact
change of variables, so the optimum is that of the problem below. Each fit records its iterations,
final gradient and whether it converged (``ProbeFit``), and the JSON result carries them.

Scaling of λ: we minimise ``mean_i CE(x_i, y_i) + (λ/2)·||W||²`` over the weights W (the
bias is not penalised). scikit-learn minimises ``C·Σ_i CE + ½·||W||²``; dividing by ``C·n``
shows the two agree when ``C = 1 / (λ · n_train)``. Because our loss is a mean, a given λ
means roughly the same thing whatever the training-set size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm import tqdm

from clipforge.errors import ClipforgeError

COARSE_GRID = [10.0 ** e for e in range(6, -7, -1)]  # 1e6 .. 1e-6, one per decade, strong to weak
REFINE_STEPS = 4  # halvings of the log-step around the best: 0.5, 0.25, 0.125, 0.0625 decades
DEFAULT_TOL = 1e-7  # stop when the largest gradient entry falls below this fraction of its cold-start value
_LOSS_SCALE = 1e4  # the solver sees the objective scaled so that its cold-start gradient is this large
DEFAULT_MAX_ITER = 10_000  # a safety cap: fits converge long before it, and each fit reports whether it did


@dataclass
class ProbeFit:
    """One fit's weights and how the solver ended, so a JSON result can show that it converged."""

    weight: torch.Tensor = field(repr=False)
    l2: float
    iterations: int
    evaluations: int
    objective: float
    grad_max: float  # largest entry of the gradient of the (unpreconditioned) objective at the solution
    relative_grad: float  # the solver's (preconditioned) largest gradient entry / its cold-start value
    converged: bool
    hit_cap: bool

    def to_dict(self) -> dict:
        return {"l2": self.l2, "iterations": self.iterations, "evaluations": self.evaluations,
                "objective": self.objective, "grad_max": self.grad_max, "relative_grad": self.relative_grad,
                "converged": self.converged, "hit_cap": self.hit_cap}


@dataclass
class LinearProbeResult:
    """Test metrics, the chosen λ, the whole sweep and each fit's convergence; ``weight`` is the refit model."""

    accuracy: float
    mean_per_class_recall: float
    best_l2: float
    val_accuracy: float
    sweep: list[tuple[float, float]]
    num_train: int
    num_val: int
    num_test: int
    weight: torch.Tensor | None = field(default=None, repr=False, compare=False)
    fits: list[ProbeFit] = field(default_factory=list, repr=False)  # one per sweep entry, same order
    refit: ProbeFit | None = field(default=None, repr=False)

    @property
    def l2_range_searched(self) -> tuple[float, float]:
        """Smallest and largest λ actually fitted: refinement can step past the coarse grid's ends."""
        values = [l2 for l2, _ in self.sweep]
        return min(values), max(values)

    @property
    def converged(self) -> bool:
        return all(f.converged for f in self.fits) and (self.refit is None or self.refit.converged)

    def to_dict(self) -> dict:
        """JSON-ready metrics and convergence records (the weight tensor is left out)."""
        return {"accuracy": self.accuracy, "mean_per_class_recall": self.mean_per_class_recall,
                "best_l2": self.best_l2, "val_accuracy": self.val_accuracy,
                "sweep": [[l2, acc] for l2, acc in self.sweep], "num_train": self.num_train,
                "num_val": self.num_val, "num_test": self.num_test,
                "l2_range_searched": list(self.l2_range_searched), "converged": self.converged,
                "convergence": [f.to_dict() for f in self.fits],
                "refit_convergence": self.refit.to_dict() if self.refit is not None else None}


def _check_features(features: torch.Tensor, name: str, dim: int | None = None) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ClipforgeError(f"{name} features must be a 2-D tensor [samples, dim], got "
                             f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)}")
    if features.shape[0] == 0:
        raise ClipforgeError(f"{name} set is empty; a linear probe needs at least one sample")
    if not features.is_floating_point():
        raise ClipforgeError(f"{name} features must be floating point, got {features.dtype}")
    if dim is not None and features.shape[1] != dim:
        raise ClipforgeError(f"{name} features have dimension {features.shape[1]} but the training features have {dim}")
    if not torch.isfinite(features).all():
        raise ClipforgeError(f"{name} features contain NaN or infinite values; check the feature extraction")


def _check_labels(labels: torch.Tensor, features: torch.Tensor, name: str) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise ClipforgeError(f"{name} labels must be a 1-D integer tensor of class ids")
    if labels.shape[0] != features.shape[0]:
        raise ClipforgeError(f"{name} has {features.shape[0]} feature rows but {labels.shape[0]} labels; they must match")
    if labels.numel() and int(labels.min()) < 0:
        raise ClipforgeError(f"{name} labels must be non-negative class ids, found {int(labels.min())}")


def _logits(weight: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return torch.addmm(weight[-1], features.to(weight.device, weight.dtype), weight[:-1])


def _preconditioner(x: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean μ, eigenvectors V, scales d) that whiten x, damped by λ; the transform is T = V·diag(d).

    Fitting on (x - μ)·T with weights W' and bias b' is the same problem as fitting x with
    W = T·W', b = b' - μ·W: centring is absorbed by the unpenalised bias and V is orthogonal, so
    (λ/2)·||W||² = (λ/2)·Σ_i d_i²·||W'_i||². Only the solver's view changes, not the optimum.
    """
    mean = x.mean(dim=0)
    centred = x - mean
    eigenvalues, vectors = torch.linalg.eigh(centred.t() @ centred / x.shape[0])
    eigenvalues = eigenvalues.clamp(min=0)
    damping = max(l2, 1e-12 * float(eigenvalues.max()), 1e-30)  # floor keeps d finite on rank-deficient data
    scale = (eigenvalues + damping).rsqrt()
    return mean, vectors, scale


def fit_probe(features: torch.Tensor, labels: torch.Tensor, l2: float, num_classes: int | None = None,
              max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL,
              init: torch.Tensor | None = None) -> ProbeFit:
    """Multinomial logistic regression with its convergence record; ``weight`` is [D+1, C], bias last.

    Minimises mean cross-entropy + (l2/2)·||W||² (bias unpenalised) in float64 with L-BFGS and a
    strong-Wolfe line search on internally whitened features (an exact reparametrisation, see
    ``_preconditioner``): at λ ≈ 1e-7 the raw problem is too badly conditioned to solve in
    reasonable time. It stops when the largest gradient entry is below ``tol`` times its value at
    the cold start (W = 0), a criterion that does not depend on the scale of the features (or below
    √(eps·f), where float64 can no longer see the objective improve).
    ``init`` warm-starts from an earlier solution, which makes a λ sweep several times cheaper.
    """
    _check_features(features, "training")
    _check_labels(labels, features, "training")
    if not (l2 >= 0 and math.isfinite(l2)):
        raise ClipforgeError(f"the L2 strength must be a finite non-negative number, got {l2}")
    if not (tol > 0 and max_iter >= 1):
        raise ClipforgeError(f"tol must be positive and max_iter at least 1, got tol={tol}, max_iter={max_iter}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if int(labels.max()) >= num_classes:
        raise ClipforgeError(f"label {int(labels.max())} is out of range for {num_classes} classes")
    raw = features.detach().to(torch.float64)
    dim = raw.shape[1]
    shape = (dim + 1, num_classes)
    if init is not None and tuple(init.shape) != shape:
        raise ClipforgeError(f"the initial weight has shape {tuple(init.shape)} but this problem needs {shape}")
    mean, vectors, scale = _preconditioner(raw, l2)
    transform, penalty = vectors * scale, scale.square()
    x = torch.cat([(raw - mean) @ transform, raw.new_ones(raw.shape[0], 1)], dim=1)  # bias as a constant feature
    penalty = torch.cat([penalty, penalty.new_zeros(1)]).unsqueeze(1)  # the bias row is not regularised
    y = labels.to(x.device, torch.long)
    rows, n = torch.arange(x.shape[0], device=x.device), x.shape[0]
    # W = 0 with biases at the log class frequencies is the exact optimum as λ → ∞ and the cold start.
    log_prior = torch.bincount(y, minlength=num_classes).clamp(min=1).double().log()
    log_prior -= log_prior.mean()
    weight = torch.zeros(shape, dtype=torch.float64, device=x.device)
    weight[-1] = log_prior

    def loss_and_grad(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Hand-written loss and gradient: about twice as fast as autograd for this tiny graph.
        log_probs = (x @ w).log_softmax(dim=1)
        loss = -log_probs[rows, y].mean() + 0.5 * l2 * (penalty * w.square()).sum()
        residual = log_probs.exp_()
        residual[rows, y] -= 1
        return loss, torch.addmm(penalty * w, x.t(), residual, beta=l2, alpha=1.0 / n)

    cold_loss, cold_grad = loss_and_grad(weight)
    reference = max(float(cold_grad.abs().max()), 1e-15)  # floor: features without signal
    # Below √(eps·f) a smaller gradient no longer changes the float64 objective: also converged.
    threshold = max(tol * reference, math.sqrt(torch.finfo(torch.float64).eps * float(cold_loss)))
    if init is not None:
        start = init.detach().to(x.device, torch.float64)
        weight[:-1] = (vectors.t() @ start[:-1]) / scale.unsqueeze(1)  # W' = T⁻¹·W = diag(1/d)·Vᵀ·W
        weight[-1] = start[-1] + mean @ start[:-1]  # b' = b + μ·W
    # torch's L-BFGS skips curvature pairs with yᵀs < 1e-10 (an absolute threshold), which froze
    # its Hessian estimate long before convergence; scaling the objective keeps the pairs coming.
    boost = _LOSS_SCALE / reference
    optimizer = torch.optim.LBFGS([weight], lr=1, max_iter=max_iter, max_eval=2 * max_iter,
                                  tolerance_grad=threshold * boost, tolerance_change=1e-18, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        loss, grad = loss_and_grad(weight)
        weight.grad = grad * boost
        return loss * boost

    threads = torch.get_num_threads()
    if x.device.type == "cpu":
        # Each step is a few small matmuls: intra-op threads barely help on an idle machine
        # and, on one shared with a training run, they made the whole probe 3-4x slower.
        torch.set_num_threads(1)
    try:
        optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    state = optimizer.state[weight]
    solved = weight.detach().clone()  # a fresh tensor: the closure's .grad must not leak to callers
    loss, grad = loss_and_grad(solved)
    relative = float(grad.abs().max()) / reference
    result = torch.empty(shape, dtype=torch.float64, device=x.device)
    result[:-1] = transform @ solved[:-1]
    result[-1] = solved[-1] - mean @ result[:-1]
    result[-1] -= result[-1].mean()  # softmax ignores a common shift of the biases; fix it for reproducibility
    original = _objective_grad(result, raw, y, l2)
    iterations, evaluations = int(state.get("n_iter", 0)), int(state.get("func_evals", 1))
    return ProbeFit(weight=result, l2=l2, iterations=iterations, evaluations=evaluations, objective=float(loss),
                    grad_max=original, relative_grad=relative,
                    converged=float(grad.abs().max()) <= threshold,
                    hit_cap=iterations >= max_iter or evaluations >= 2 * max_iter)


def _objective_grad(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2: float) -> float:
    """Largest entry of the gradient of the original objective, for the record."""
    probs = _logits(weight, x).softmax(dim=1)
    probs[torch.arange(len(y)), y] -= 1
    grad_w = x.t() @ probs / len(y) + l2 * weight[:-1]
    return max(float(grad_w.abs().max()), float(probs.mean(dim=0).abs().max()))


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, l2: float, num_classes: int | None = None,
                            max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL,
                            init: torch.Tensor | None = None) -> torch.Tensor:
    """``fit_probe`` without the convergence record: just the [D+1, C] weight, bias last."""
    return fit_probe(features, labels, l2, num_classes, max_iter=max_iter, tol=tol, init=init).weight


@torch.no_grad()
def predict(weight: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Class ids (argmax of the logits) for each row of ``features``."""
    return _logits(weight, features).argmax(dim=1)


def _stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded per-class split: round(val_fraction·n_c) to validation, ≥1 if the class has ≥2 samples."""
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    train, val = [], []
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_val = 0 if len(idx) < 2 else min(max(1, round(val_fraction * len(idx))), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _accuracy(weight: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> float:
    return (predict(weight, features).cpu() == labels.cpu()).double().mean().item()


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, *, val_fraction: float = 0.2, l2_values: Sequence[float] | None = None,
                 seed: int = 0, max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL,
                 progress: bool = False) -> LinearProbeResult:
    """The paper's protocol: pick λ on a validation split, refit on train+val, score on test.

    Default search (in the spirit of OpenAI's parametric binary search over the paper's 1e-6..1e6
    range): one fit per decade from 1e6 down to 1e-6, then ``REFINE_STEPS`` rounds that try the
    best λ times 10^(±h) with h halving from 0.5 decades — 21 fits in all. With ``l2_values`` only
    those are tried, in the given order. Ties in validation accuracy go to the larger λ. The
    refinement may step up to 0.94 decades past the grid's ends; ``l2_range_searched`` says how far.
    Each fit warm-starts from the nearest λ already fitted (the coarse grid runs strong to weak),
    and records its convergence (see ``fit_probe``); ``result.weight`` is the refit model.
    """
    _check_features(train_features, "training")
    _check_labels(train_labels, train_features, "training")
    _check_features(test_features, "test", dim=train_features.shape[1])
    _check_labels(test_labels, test_features, "test")
    if not 0 < val_fraction < 1:
        raise ClipforgeError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    num_classes = int(train_labels.max()) + 1
    if int(test_labels.max()) >= num_classes:
        raise ClipforgeError(f"test label {int(test_labels.max())} never occurs in training "
                             f"(training labels go up to {num_classes - 1})")
    if l2_values is not None:
        l2_values = [float(v) for v in l2_values]
        if not l2_values or not all(v >= 0 and math.isfinite(v) for v in l2_values):
            raise ClipforgeError("l2_values must be a non-empty list of finite non-negative numbers")

    train_idx, val_idx = _stratified_split(train_labels, val_fraction, seed)
    if len(val_idx) == 0:
        raise ClipforgeError("no class has two or more training samples, so there is nothing to validate on")
    device = train_features.device
    x_tr, y_tr = train_features[train_idx.to(device)], train_labels[train_idx.to(train_labels.device)]
    x_val, y_val = train_features[val_idx.to(device)], train_labels[val_idx.to(train_labels.device)]

    solutions: dict[float, torch.Tensor] = {}
    sweep: list[tuple[float, float]] = []
    fits: list[ProbeFit] = []
    total = len(l2_values) if l2_values is not None else len(COARSE_GRID) + 2 * REFINE_STEPS
    bar = tqdm(total=total, desc="linear probe λ sweep", unit="fit") if progress else None

    def evaluate(l2: float) -> float:
        if l2 in solutions:
            return dict(sweep)[l2]
        # warm start from the solution at the nearest λ (in log space) already fitted
        near = min(solutions, key=lambda s: abs(math.log10(max(s, 1e-300)) - math.log10(max(l2, 1e-300))),
                   default=None)
        fit = fit_probe(x_tr, y_tr, l2, num_classes, max_iter=max_iter, tol=tol,
                        init=solutions[near] if near is not None else None)
        solutions[l2] = fit.weight
        fits.append(fit)
        sweep.append((l2, _accuracy(fit.weight, x_val, y_val)))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(l2=f"{l2:.3g}", val_acc=f"{sweep[-1][1]:.4f}")
        return sweep[-1][1]

    def best() -> tuple[float, float]:
        return max(sweep, key=lambda item: (item[1], item[0]))  # ties -> larger λ

    try:
        for l2 in (l2_values if l2_values is not None else COARSE_GRID):
            evaluate(l2)
        if l2_values is None:
            step = 0.5
            for _ in range(REFINE_STEPS):
                center = math.log10(best()[0])
                for exponent in (center + step, center - step):
                    evaluate(10.0 ** exponent)
                step /= 2
    finally:
        if bar is not None:
            bar.close()

    best_l2, val_accuracy = best()
    x_all, y_all = train_features[torch.cat([train_idx, val_idx]).to(device)], torch.cat([y_tr, y_val])
    refit = fit_probe(x_all, y_all, best_l2, num_classes, max_iter=max_iter, tol=tol, init=solutions[best_l2])
    weight = refit.weight
    predictions, truth = predict(weight, test_features).cpu(), test_labels.cpu()
    correct = (predictions == truth).double()
    recalls = [correct[truth == c].mean().item() for c in torch.unique(truth).tolist()]
    return LinearProbeResult(accuracy=correct.mean().item(), mean_per_class_recall=sum(recalls) / len(recalls),
                             best_l2=best_l2, val_accuracy=val_accuracy, sweep=sweep, num_train=len(train_idx),
                             num_val=len(val_idx), num_test=len(truth), weight=weight, fits=fits, refit=refit)
