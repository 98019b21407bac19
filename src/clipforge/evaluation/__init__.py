"""Evaluation as in the paper: zero-shot classification, linear probes and retrieval on frozen features.

``clipforge eval`` (``clipforge.cli.eval_command``) and the training hooks run these through
``runner.run_evals``; each piece is usable on its own.
"""

from clipforge.evaluation.datasets import (
    ClassificationDataset,
    RetrievalDataset,
    dataset_classnames,
    dataset_templates,
    load_classification,
    load_retrieval,
)
from clipforge.evaluation.features import image_features, text_features
from clipforge.evaluation.linear_probe import LinearProbeResult, fit_logistic_regression, linear_probe
from clipforge.evaluation.metrics import classification_metrics, retrieval_metrics
from clipforge.evaluation.retrieval import evaluate_retrieval
from clipforge.evaluation.runner import EvalSpec, run_eval, run_evals
from clipforge.evaluation.zero_shot import (
    build_zero_shot_classifier,
    evaluate_zero_shot,
    get_templates,
    read_classnames,
    read_templates,
)

__all__ = ["ClassificationDataset", "EvalSpec", "LinearProbeResult", "RetrievalDataset", "build_zero_shot_classifier",
           "classification_metrics", "dataset_classnames", "dataset_templates", "evaluate_retrieval",
           "evaluate_zero_shot", "fit_logistic_regression", "get_templates", "image_features", "linear_probe",
           "load_classification", "load_retrieval", "read_classnames", "read_templates", "retrieval_metrics",
           "run_eval", "run_evals", "text_features"]
