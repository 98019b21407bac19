"""Zero-shot transfer (linear probes and retrieval build on the same features)."""

from clipforge.evaluation.zero_shot import build_zero_shot_classifier, get_templates

__all__ = ["build_zero_shot_classifier", "get_templates"]
