"""Evaluation: metrics over whole evaluation sets."""

from shpeft_jax.evaluation.metrics import classification_metrics

__all__ = ["classification_metrics"]
