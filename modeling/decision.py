"""The yes/no for one image, with what decided it: shared by the pipeline and the ONNX Runtime path.

Order: the category is the caller's when given ("given"), else the one the model recognises from the
image ("recognised", modeling/category.py), else None ("unrecognised": farther than every category's
distance limit, or a model without prototypes). The threshold is the caller's `threshold=` when
given, else that category's calibrated one, else the pooled `config.threshold`. No torch here.
"""

from __future__ import annotations

from typing import Sequence

from .category import recognise
from .configuration_cnc import threshold_for


def decide(score: float, config, category: str | None = None, similarity: Sequence[float] | None = None,
           threshold: float | None = None) -> dict:
    """The decision fields of a result: category (+ source, distance to the nearest prototype), threshold
    (+ source), is_anomaly (score >= threshold; None without a threshold), normalized_score
    (score / threshold, so 1.0 is every category's decision boundary)."""
    source, distance, nearest = ("given" if category is not None else None), None, None
    categories = getattr(config, "categories", None)
    if category is None and similarity is not None and categories:
        category, nearest, distance = recognise(similarity, categories, getattr(config, "category_distance_limits", None))
        source = "recognised" if category is not None else "unrecognised"
    value, threshold_source = threshold_for(config.threshold, getattr(config, "category_thresholds", None), category,
                                            threshold, strict=source == "given")
    return {
        "category": category,
        "category_source": source,
        "category_distance": distance,
        "nearest_category": nearest if source == "unrecognised" else category,
        "threshold": value,
        "threshold_source": threshold_source if value is not None else None,
        "is_anomaly": None if value is None else bool(score >= value),
        "normalized_score": score / value if value is not None and value > 0 else None,
    }
