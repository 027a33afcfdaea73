"""What training derives from normal images after it has trained: the decision thresholds and the
category prototypes that recognise an image's category.

Decision threshold (`calibrate_threshold`): the CNC paper evaluates threshold-free metrics only,
but a deployed detector needs a yes/no. Without test labels the one honest source is normal
images the model has not trained on: the trainer holds out a fraction of the normal training
images, scores them and takes a high quantile (0.99, linear interpolation) of their image scores.
The quantile targets a ~1% false-alarm rate on normal images; unlike the maximum it is not set by
a single odd image once there are more than a handful of held-out images (with few it is close to
the maximum). The same quantile is also taken per category (`config.category_thresholds`): normal
images of one product can score far above those of another, so a pooled threshold decides badly for
some categories.

Category prototypes (`fit_category_prototypes`): the mean embedding of each category's normal
training images (modeling/category.py), so the pipeline can pick the category's threshold when the
caller does not name the category.
"""

from __future__ import annotations

import numpy as np
import torch

from cnc_hf.scoring import gather, predict_image_scores, sharded_batches

DEFAULT_THRESHOLD_QUANTILE = 0.99
THRESHOLD_METHOD = "quantile of the image scores of held-out normal training images (linear interpolation)"


def calibrate_threshold(model, processor, normal_split, quantile: float = DEFAULT_THRESHOLD_QUANTILE,
                        batch_size: int = 8, accelerator=None, num_workers: int = 0, progress: bool = True,
                        return_details: bool = False) -> float | tuple[float, dict]:
    """The decision threshold: the `quantile` (linear interpolation) of the image scores of
    `normal_split`, normal images the model has not trained on (see the module docstring).

    `quantile=1.0` is the maximum. With `return_details` also returns a dict for metrics.json
    (method, quantile, image count, per-category quantiles and maxima).
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if len(normal_split) == 0:
        raise ValueError("calibrate_threshold: the normal split is empty; hold out at least one normal image.")
    if "label" in normal_split.column_names and any(int(v) != 0 for v in normal_split["label"]):
        raise ValueError("calibrate_threshold: the calibration split must hold normal images only (label 0).")
    scores, categories = predict_image_scores(model, processor, normal_split, batch_size, accelerator, num_workers,
                                              progress)
    threshold = float(np.quantile(scores, quantile, method="linear"))
    if not return_details:
        return threshold
    per_category = {}
    for name in sorted(set(categories)):
        s = scores[np.asarray(categories) == name]
        per_category[name] = {"num_images": int(s.size), "quantile": float(np.quantile(s, quantile)),
                              "max": float(s.max())}
    details = {"value": threshold, "method": THRESHOLD_METHOD, "quantile": quantile,
               "num_calibration_images": int(scores.size), "calibration_score_max": float(scores.max()),
               "per_category": per_category}
    return threshold, details


def fit_category_prototypes(model, processor, splits, batch_size: int = 8, accelerator=None, num_workers: int = 0,
                            progress: bool = True, factor: float | None = None) -> dict:
    """Compute the category prototypes from the normal images of `splits` (datasets with `image` and
    `category`), store them in the model (`set_category_prototypes`) and return a summary for
    metrics.json: per category the image count, the largest own distance and the distance limit
    (`factor` x that distance; default `cnc_hf.modeling.category.DEFAULT_DISTANCE_FACTOR`).

    Only the frozen vision tower runs (up to the deepest tapped layer), once per image."""
    from cnc_hf.modeling.category import DEFAULT_DISTANCE_FACTOR, embed, prototypes_from

    factor = DEFAULT_DISTANCE_FACTOR if factor is None else factor
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    device = accelerator.device if accelerator is not None else next(unwrapped.parameters()).device
    embeddings, labels = [], []
    for split in (s for s in splits if s is not None and len(s)):
        names = sorted(set(split["category"]))
        with torch.no_grad():
            for batch in sharded_batches(split, processor, batch_size, device, accelerator, num_workers, progress,
                                         desc="category prototypes"):
                emb = embed(unwrapped.encode_image(batch["pixel_values"].to(device)))
                ids = torch.tensor([names.index(c) for c in batch["categories"]], device=emb.device)
                emb, ids = gather(accelerator, (emb, ids))
                embeddings.append(emb.cpu())
                labels += [names[i] for i in ids.tolist()]
    if not embeddings:
        raise ValueError("fit_category_prototypes: no images to compute the category prototypes from")
    embeddings = torch.cat(embeddings)
    names, prototypes, limits = prototypes_from(embeddings, labels, factor)
    unwrapped.set_category_prototypes(names, prototypes, limits)
    own = 1.0 - (embeddings * prototypes[[names.index(c) for c in labels]]).sum(dim=-1)
    return {"method": f"nearest prototype (mean normalised patch-token embedding); limit = {factor:g} x the "
                      "largest distance of the category's own training images",
            "factor": factor,
            "per_category": {name: {"num_images": int(sum(c == name for c in labels)),
                                    "max_distance": float(own[np.asarray(labels) == name].max()),
                                    "distance_limit": limits[name]} for name in names}}
