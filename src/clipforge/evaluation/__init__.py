"""Evaluation as in the paper: zero-shot classification, linear probes and retrieval on frozen features,
on native dataset files or CLIP_benchmark's WebDataset copies (``wds/NAME``).

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
from clipforge.evaluation.benchmark import run_benchmark
from clipforge.evaluation.few_shot import few_shot_probe
from clipforge.evaluation.linear_probe import LinearProbeResult, fit_logistic_regression, fit_probe, linear_probe
from clipforge.evaluation.metrics import classification_metrics, clip_benchmark_names, retrieval_metrics
from clipforge.evaluation.multilabel import average_precision_per_class, evaluate_multilabel
from clipforge.evaluation.retrieval import evaluate_retrieval
from clipforge.evaluation.runner import EvalSpec, run_eval, run_evals
from clipforge.evaluation.wds_benchmark import load_wds, read_wds_info
from clipforge.evaluation.zero_shot import (
    build_zero_shot_classifier,
    evaluate_zero_shot,
    get_templates,
    read_classnames,
    read_templates,
)

__all__ = ["ClassificationDataset", "EvalSpec", "LinearProbeResult", "RetrievalDataset",
           "average_precision_per_class", "build_zero_shot_classifier", "classification_metrics",
           "clip_benchmark_names", "dataset_classnames", "dataset_templates", "evaluate_multilabel",
           "evaluate_retrieval", "evaluate_zero_shot", "few_shot_probe", "fit_logistic_regression", "fit_probe", "get_templates", "image_features",
           "linear_probe", "load_classification", "load_retrieval", "load_wds", "read_classnames", "read_templates",
           "read_wds_info", "retrieval_metrics", "run_benchmark", "run_eval", "run_evals", "text_features"]
