"""Guidance as model_fn transformations."""

from diffjax.guidance.classifier_free import classifier_free_guidance, drop_labels

__all__ = ["classifier_free_guidance", "drop_labels"]
