"""The yes/no for one image, with what decided it: shared by the pipeline and the ONNX Runtime path.

Order: the category is the caller's when given ("given"), else the one the model recognises from the
image ("recognised", modeling/category.py), else None ("unrecognised": farther than every category's
distance limit, or a model without prototypes). The threshold is the caller's `threshold=` when
given, else that category's calibrated one, else the pooled `config.threshold`. No torch here: `image_result` builds the pipeline's result dict for both
the pipeline and the ONNX Runtime path.
"""

from __future__ import annotations

from typing import Sequence

from .category import recognise
from .configuration_cnc import threshold_for
from .heatmap import overlay_heatmap, threshold_range


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


def image_result(score: float, small_map, image, size: tuple[int, int], processor, config, category: str | None = None,
                 similarity: Sequence[float] | None = None, threshold: float | None = None,
                 heatmap_range: tuple[float, float] | None = None, return_heatmap: bool = True) -> dict:
    """One image's result: score, decision (`decide`), the map at the image's `size` (height, width) and the heat
    map over the display-size `image`, coloured from the model-resolution `small_map` (the full-size float map is
    never copied for display) on `heatmap_range`, by default 0 to twice the deciding threshold."""
    decision = decide(score, config, category, similarity, threshold)
    heatmap = None
    if return_heatmap:
        heatmap = overlay_heatmap(image, small_map, heatmap_range or threshold_range(decision["threshold"]))
    return {"score": score, "is_anomaly": decision.pop("is_anomaly"),
            "anomaly_map": processor.post_process_anomaly_map(small_map, size), "heatmap": heatmap, **decision}
