"""Anomaly detection metrics of the CNC paper (Tables 1 and 3) and the multi-class benchmarks.

Image level: AUROC, AP, F1-max of per-image scores against per-image labels.
Pixel level: AUROC, AP, F1-max of anomaly maps against ground-truth masks, and AUPRO.

Everything is exact (no binning): AUROC and AP equal scikit-learn's ``roc_auc_score`` and
``average_precision_score`` (ties included), AUPRO is the MVTec AD definition computed over
every distinct threshold. It is also fast enough for a whole MVTec AD test set (86M pixels)
in a few seconds, because of one observation: every curve here only changes shape at the
scores of *positive* samples. Between two consecutive positive scores only false positives
are added, so

* AUROC is the probability that a positive outscores a negative (ties count 1/2), i.e. for
  each positive, the number of negatives below it -- a count in the sorted negatives;
* AP and F1-max only need precision and recall at the positive scores;
* the PRO curve is flat between positive scores, so its vertices at positive scores (and
  just above them) carry the whole area.

So the negatives (97% of the pixels) are only sorted, a plain float sort that numpy does with
SIMD, and counted with a binary search; only the positives are arg-sorted.

The paper's "Mean" row is the mean over categories (each category evaluated on its own), not
the metric of all images pooled; :func:`compute_anomaly_metrics` returns both.

Images without pixel ground truth (your own folders often label defects per image only): a good
image's missing mask is ground truth (all its pixels are normal), a defect image without a mask has
none. Pass ``has_mask`` and pixel metrics use only the images with pixel ground truth (good images and
defect images with a mask); where no defect image has a mask they are ``None`` (null in JSON, "-" in
tables), never computed on placeholder all-zero masks. Every result says how many images it used.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "METRIC_KEYS",
    "METRIC_NAMES",
    "IMAGE_KEYS",
    "PIXEL_KEYS",
    "PAPER_KEYS",
    "AUPRO_FPR_LIMIT",
    "COUNT_KEYS",
    "compute_anomaly_metrics",
    "AnomalyMetricAccumulator",
    "format_metrics_table",
    "pixel_coverage_note",
    "EVALUATE_MODULE_PATH",
]

METRIC_KEYS = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "aupro",
)
# The short name of each metric as the paper's tables write it (tables, model cards).
METRIC_NAMES = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1_max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "pixel_f1_max": "P-F1max",
    "aupro": "AUPRO",
}
IMAGE_KEYS = METRIC_KEYS[:3]  # from image scores alone
PIXEL_KEYS = METRIC_KEYS[3:]  # need anomaly maps and masks
# The five numbers the paper averages into "mTotal", in the paper's column order.
PAPER_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap")
AUPRO_FPR_LIMIT = 0.3
# How many images a result used: all of them for the image metrics; for the pixel metrics (with maps) those
# with pixel ground truth, of which so many defect images with a mask. The mean row counts categories.
COUNT_KEYS = ("num_images", "num_anomalous", "num_images_pixel", "num_anomalous_with_mask")
MEAN_COUNT_KEYS = ("num_categories", "num_categories_pixel")

# `evaluate.load(EVALUATE_MODULE_PATH)` gives the same metrics as an `evaluate` module.
EVALUATE_MODULE_PATH = str(Path(__file__).with_name("evaluate_metric") / "cnc_anomaly_metrics.py")

# 8-connectivity within an image, none across the images of a stack (N, H, W).
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


# ----------------------------------------------------------------------------- the math


@dataclass
class _Ranking:
    """Counts at each distinct positive score t_1 > t_2 > ... > t_K.

    tp[k]: positives scoring >= t_k; fp[k]: negatives scoring >= t_k; fp_gt[k]: negatives
    scoring > t_k; pro[k]: mean over ground-truth regions of the fraction of the region
    scoring >= t_k (only for pixels).
    """

    tp: np.ndarray
    fp: np.ndarray
    fp_gt: np.ndarray
    n_pos: int
    n_neg: int
    pro: Optional[np.ndarray] = None


def _argsort_descending(x: np.ndarray) -> np.ndarray:
    """Indices that sort `x` descending (any order within ties).

    For float32 this packs (score, index) into one int64 and sorts that: numpy's SIMD sort of
    int64 is several times faster than its argsort.
    """
    if x.dtype != np.float32 or x.size >= 2**31:
        return np.argsort(x)[::-1]
    key = x.view(np.int32).astype(np.int64)
    key ^= (key >> 31) & 0x7FFFFFFF  # IEEE bits -> int with the float's order (negatives flipped)
    key <<= 32
    key |= np.arange(x.size, dtype=np.int64)
    key.sort()
    return (key & 0xFFFFFFFF)[::-1]


def _rank(pos: np.ndarray, neg_sorted: np.ndarray, pos_weights: Optional[np.ndarray] = None) -> _Ranking:
    """Build the :class:`_Ranking` of positive scores `pos` against ascending `neg_sorted`."""
    if pos_weights is None:
        desc = np.sort(pos)[::-1]
        weights = None
    else:
        order = _argsort_descending(pos)
        desc = pos[order]
        weights = pos_weights[order]
    # Last index of each run of equal scores: a threshold admits all of its ties at once.
    ends = np.flatnonzero(desc[1:] != desc[:-1])
    ends = np.append(ends, desc.size - 1)
    thresholds = desc[ends]

    n_neg = neg_sorted.size
    # searchsorted is fastest with ascending queries; thresholds are descending.
    below = np.searchsorted(neg_sorted, thresholds[::-1], side="left")[::-1]
    fp = n_neg - below
    # Negatives tied with a threshold: usually few, so look up only where one is present.
    fp_gt = fp.copy()
    tied = np.flatnonzero(below < n_neg)
    tied = tied[neg_sorted[below[tied]] == thresholds[tied]]
    if tied.size:
        fp_gt[tied] = n_neg - np.searchsorted(neg_sorted, thresholds[tied][::-1], side="right")[::-1]

    pro = None
    if weights is not None:
        pro = np.cumsum(weights)[ends]
    return _Ranking(tp=ends + 1, fp=fp, fp_gt=fp_gt, n_pos=int(pos.size), n_neg=int(n_neg), pro=pro)


def _auroc(r: _Ranking) -> float:
    """P(positive scores above a negative) + 1/2 P(tie): the area under the ROC trapezoids."""
    new_pos = np.diff(r.tp, prepend=0)
    # Twice the credit of each positive (2 per negative below it, 1 per tied negative),
    # in integers so that the sum is exact.
    credit = new_pos * (2 * r.n_neg - r.fp - r.fp_gt)
    return float(int(credit.sum()) / (2 * r.n_pos * r.n_neg))


def _average_precision(r: _Ranking) -> float:
    """sum_k (R_k - R_{k-1}) P_k, as scikit-learn (no interpolation)."""
    new_pos = np.diff(r.tp, prepend=0)
    precision = r.tp / (r.tp + r.fp)
    return float(np.dot(new_pos, precision) / r.n_pos)


def _f1_max(r: _Ranking) -> float:
    """max_t 2PR/(P+R) = max_t 2TP/(TP+FP+P); the max is at a positive score."""
    return float(np.max(2 * r.tp / (r.tp + r.fp + r.n_pos)))


def _aupro(r: _Ranking, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """Area under PRO(FPR) from 0 to `fpr_limit`, divided by `fpr_limit` (MVTec AD)."""
    fpr_gt = r.fp_gt / r.n_neg
    # Thresholds past the limit add no area: keep them up to the first one beyond it.
    k = min(int(np.searchsorted(fpr_gt, fpr_limit, side="right")) + 1, fpr_gt.size)
    # Clip as the MVTec AD reference does: the float sum of region weights may pass 1.
    pro = np.minimum(r.pro[:k], 1.0)
    # Curve vertices: (0, 0); then for each t_k, (FPR just above t_k, PRO_{k-1}) and
    # (FPR(t_k), PRO_k); then flat to FPR 1. The vertices of the other thresholds lie on
    # the flat parts and add no area.
    fpr = np.empty(2 * k + 2)
    fpr[0], fpr[-1] = 0.0, 1.0
    fpr[1:-1:2] = fpr_gt[:k]
    fpr[2:-1:2] = r.fp[:k] / r.n_neg
    pro_curve = np.empty(2 * k + 2)
    pro_curve[0], pro_curve[-1] = 0.0, pro[-1]
    pro_curve[1:-1:2] = np.concatenate(([0.0], pro[:-1]))
    pro_curve[2:-1:2] = pro

    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))  # vertices with FPR <= limit
    x, y = fpr[:inside], pro_curve[:inside]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2)
    if x[-1] < fpr_limit:
        # Linear interpolation of the segment that crosses the limit.
        x1, y1 = fpr[inside], pro_curve[inside]
        y_limit = y[-1] + (y1 - y[-1]) * (fpr_limit - x[-1]) / (x1 - x[-1])
        area += (y[-1] + y_limit) / 2 * (fpr_limit - x[-1])
    return float(min(max(area / fpr_limit, 0.0), 1.0))


def _image_metrics(scores: np.ndarray, labels: np.ndarray, where: str = "") -> dict:
    positive = labels.astype(bool)
    n_pos = int(positive.sum())
    if n_pos in (0, positive.size):
        raise ValueError(
            f"image_labels{where} contains only one class (all {int(positive[0])}): image AUROC/AP are "
            "undefined; evaluate on a set with both normal (0) and anomalous (1) images."
        )
    r = _rank(scores[positive], np.sort(scores[~positive]))
    return {"image_auroc": _auroc(r), "image_ap": _average_precision(r), "image_f1_max": _f1_max(r)}


def _pixel_parts(maps: np.ndarray, masks: np.ndarray, regions: np.ndarray) -> tuple:
    """(sorted normal-pixel scores, anomalous-pixel scores, their region ids)."""
    neg = maps[~masks]
    neg.sort()  # in place: `neg` is already a copy
    return neg, maps[masks], regions[masks]


def _pixel_metrics(neg_sorted: np.ndarray, pos: np.ndarray, region_ids: np.ndarray, where: str = "") -> dict:
    """Pixel AUROC/AP/F1-max and AUPRO from the parts of :func:`_pixel_parts`."""
    if pos.size == 0 or neg_sorted.size == 0:
        state = "no anomalous pixel" if pos.size == 0 else "no normal pixel"
        raise ValueError(
            f"masks{where} has {state}: pixel AUROC/AP and AUPRO are undefined; evaluate on a set "
            "with both normal (0) and anomalous (1) pixels."
        )
    region_sizes = np.bincount(region_ids)  # 0 for the ids of regions not in this set
    n_regions = np.count_nonzero(region_sizes)
    # PRO(t) = mean over regions of the region's fraction >= t = sum of these pixel weights.
    weights = 1.0 / (n_regions * region_sizes[region_ids])
    r = _rank(pos, neg_sorted, weights)
    return {
        "pixel_auroc": _auroc(r),
        "pixel_ap": _average_precision(r),
        "pixel_f1_max": _f1_max(r),
        "aupro": _aupro(r),
    }


def _pooled_pixel_metrics(parts: list) -> dict:
    neg = np.concatenate([p[0] for p in parts])
    neg.sort()
    return _pixel_metrics(neg, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))


def _label_regions(masks: np.ndarray) -> np.ndarray:
    """8-connected ground-truth regions of each image, numbered across the stack (0 = normal)."""
    regions, _ = ndimage.label(masks, structure=_REGION_STRUCTURE)
    return regions


# ----------------------------------------------------------------------------- inputs


def _to_numpy(x: Any, name: str = "input") -> np.ndarray:
    """numpy view of a numpy array, list or torch tensor (without importing torch)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() < 4:  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    if isinstance(x, (list, tuple)):
        shapes = {np.shape(item) for item in x}
        if len(shapes) > 1:  # numpy's own message ("inhomogeneous shape") names no argument
            raise ValueError(f"{name}: entries of different shapes {sorted(shapes)[:4]}; resize them to one size "
                             "(e.g. the masks' size) before computing metrics")
    return np.asarray(x)


def _as_binary(x: np.ndarray, name: str) -> np.ndarray:
    if x.dtype == bool:
        return x
    if not ((x == 0) | (x == 1)).all():
        raise ValueError(f"{name} must be binary (bool or 0/1); threshold it first, e.g. `{name} > 0.5`.")
    return x.astype(bool)


def _as_scores(x: np.ndarray, name: str, dtype=None) -> np.ndarray:
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}.")
    if dtype is None:
        # Keep float32 and float64 as they are: casting float64 down could merge distinct scores.
        dtype = np.float32 if (np.issubdtype(x.dtype, np.floating) and x.itemsize <= 4) else np.float64
    x = np.ascontiguousarray(x, dtype=dtype)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values; scores must be finite.")
    return x


def _squeeze_channel(x: np.ndarray) -> np.ndarray:
    return x[:, 0] if x.ndim == 4 and x.shape[1] == 1 else x


def _validate(image_scores, image_labels, anomaly_maps, masks, categories, category_names, has_mask=None):
    scores = _to_numpy(image_scores, "image_scores")
    labels = _to_numpy(image_labels, "image_labels")
    if scores.size == 0:
        raise ValueError("image_scores is empty: metrics need at least one normal and one anomalous image.")
    if scores.ndim != 1 or labels.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(
            "image_scores and image_labels must be 1-D of the same length, got shapes "
            f"{scores.shape} and {labels.shape}."
        )
    scores = _as_scores(scores, "image_scores", np.float64)
    labels = _as_binary(labels, "image_labels")

    if (anomaly_maps is None) != (masks is None):
        raise ValueError("anomaly_maps and masks go together: pass both or neither.")
    if anomaly_maps is not None:
        maps = _squeeze_channel(_to_numpy(anomaly_maps, "anomaly_maps"))
        masks = _squeeze_channel(_to_numpy(masks, "masks"))
        if maps.ndim != 3 or maps.shape != masks.shape or maps.shape[0] != scores.shape[0]:
            raise ValueError(
                "anomaly_maps and masks must both be (N, H, W) (or (N, 1, H, W)) with N = len(image_scores) "
                f"= {scores.shape[0]}, got shapes {maps.shape} and {masks.shape}."
            )
        maps = _as_scores(maps, "anomaly_maps")
        masks = _as_binary(masks, "masks")
    else:
        maps = None
    if has_mask is not None:
        has_mask = _to_numpy(has_mask, "has_mask")
        if has_mask.shape != scores.shape:
            raise ValueError(f"has_mask must have one entry per image ({scores.shape[0]}), got shape {has_mask.shape}.")
        has_mask = _as_binary(has_mask, "has_mask")

    if categories is not None:
        categories = _to_numpy(categories)
        if categories.shape != scores.shape:
            raise ValueError(
                f"categories must have one entry per image ({scores.shape[0]}), got shape {categories.shape}."
            )
        if category_names is not None and np.issubdtype(categories.dtype, np.integer):
            categories = np.asarray(category_names, dtype=object)[categories]
        categories = categories.astype(str)
        if category_names is not None and not set(categories) <= set(map(str, category_names)):
            unknown = sorted(set(categories) - set(map(str, category_names)))
            raise ValueError(f"categories {unknown} are not in category_names.")
    return scores, labels, maps, masks, categories, has_mask


# ----------------------------------------------------------------------------- public API


def _subset(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """x[idx] without a copy when idx is a contiguous run (images grouped by category)."""
    if idx[-1] - idx[0] + 1 == idx.size:
        return x[idx[0] : idx[-1] + 1]
    return x[idx]


def _image_counts(labels: np.ndarray) -> dict:
    return {"num_images": int(labels.size), "num_anomalous": int(labels.sum())}


def _pixel_rows(labels: np.ndarray, known: Optional[np.ndarray], idx: np.ndarray) -> tuple[np.ndarray, dict]:
    """The images of `idx` with pixel ground truth, and their counts."""
    rows = idx if known is None else idx[known[idx]]
    return rows, {"num_images_pixel": int(rows.size), "num_anomalous_with_mask": int(labels[rows].sum())}


def _no_pixel_metrics() -> dict:
    return {key: None for key in PIXEL_KEYS}


# Over 60 lines only for its docstring, the reference of every metric; the code is ~25 lines of steps.
def compute_anomaly_metrics(
    image_scores,
    image_labels,
    anomaly_maps=None,
    masks=None,
    categories=None,
    *,
    category_names: Optional[Sequence[str]] = None,
    has_mask=None,
) -> dict:
    """Image and pixel metrics of an anomaly detector, exact and fast.

    Args:
        image_scores: (N,) anomaly score per image (higher = more anomalous).
        image_labels: (N,) 1 for an anomalous image, 0 for a normal one.
        anomaly_maps: (N, H, W) or (N, 1, H, W) pixel scores; optional together with `masks`.
            float32 maps are evaluated in float32, float64 maps in float64.
        masks: same shape, ground truth (bool or 0/1); its 8-connected regions define AUPRO.
        categories: optional (N,) category per image (strings, or integer ids with
            `category_names`); adds per-category metrics and their mean.
        category_names: names of the integer category ids; also the order of the results
            (default: sorted names).
        has_mask: optional (N,) bool, whether each image came with a mask (default: all did).
            An anomalous image without one has no pixel ground truth: pixel metrics leave it out
            (its `masks` entry is ignored). Normal images always count: their pixels are all normal.

    Arrays may be numpy arrays, lists or torch tensors.

    Returns:
        ``{key: value for key in METRIC_KEYS}`` over all images pooled (pixel keys only with
        maps), every value in [0, 1], plus the counts ``num_images`` and ``num_anomalous`` and,
        with maps, ``num_images_pixel`` (images with pixel ground truth, which the pixel metrics
        use) and ``num_anomalous_with_mask``. With `categories` also
        ``"per_category": {name: {...}}`` and ``"mean": {...}``, the mean over categories -- the
        paper's "Mean" row -- with ``num_categories`` and, with maps, ``num_categories_pixel``.

        Pixel metrics are ``None`` for a set (or category) in which no anomalous image has a mask;
        the mean of a pixel metric is over the categories that have it (``None`` if none has).

    AUPRO follows MVTec AD: FPR over all normal pixels, PRO the mean over all ground-truth
    regions (8-connected, per image) of the fraction of the region at or above the threshold,
    area under PRO(FPR) up to FPR 0.3 (linearly interpolated there), divided by 0.3.

    Raises:
        ValueError: on mismatched shapes, non-finite scores, non-binary labels/masks, or a set
            (or category) with a single class, naming the offending argument. Anomalous images
            with masks that hold no anomalous pixel at all are refused too.
    """
    scores, labels, maps, masks, categories, has_mask = _validate(
        image_scores, image_labels, anomaly_maps, masks, categories, category_names, has_mask
    )
    # Images with pixel ground truth; None = all of them (keeps contiguous slices, no copies).
    known = None if has_mask is None or has_mask.all() else (has_mask | ~labels)
    result = {**_image_metrics(scores, labels), **_image_counts(labels)}
    regions = _label_regions(masks) if maps is not None else None
    if categories is None:
        if maps is not None:
            result.update(_whole_set_pixel_metrics(maps, masks, regions, labels, known))
        return _in_key_order(result)

    groups = _category_groups(categories, category_names)
    per_category = {
        name: {**_image_metrics(scores[idx], labels[idx], f" of category {name!r}"), **_image_counts(labels[idx])}
        for name, idx in groups.items()
    }
    if maps is not None:
        pooled, pixel_by_name = _category_pixel_metrics(groups, maps, masks, regions, labels, known)
        result.update(pooled)
        for name in groups:
            per_category[name].update(pixel_by_name[name])
    result["per_category"] = {name: _in_key_order(values) for name, values in per_category.items()}
    result["mean"] = _mean_over_categories(per_category, [k for k in METRIC_KEYS if k in result], maps is not None)
    return _in_key_order(result)


def _category_groups(categories: np.ndarray, category_names: Optional[Sequence[str]]) -> dict[str, np.ndarray]:
    """{name: indices of its images} in `category_names` order (default sorted); names without images left out."""
    names = [str(n) for n in (dict.fromkeys(category_names) if category_names is not None else sorted(set(categories)))]
    return {name: idx for name in names if (idx := np.flatnonzero(categories == name)).size}


def _rows_pixel_parts(maps: np.ndarray, masks: np.ndarray, regions: np.ndarray, rows: np.ndarray) -> tuple:
    """:func:`_pixel_parts` of the images `rows`."""
    return _pixel_parts(_subset(maps, rows), _subset(masks, rows), _subset(regions, rows))


def _whole_set_pixel_metrics(maps, masks, regions, labels: np.ndarray, known: Optional[np.ndarray]) -> dict:
    """Pixel metrics and counts over every image with pixel ground truth (None metrics if no anomaly has a mask)."""
    rows, counts = _pixel_rows(labels, known, np.arange(labels.size))
    pixel = (_pixel_metrics(*_rows_pixel_parts(maps, masks, regions, rows))
             if counts["num_anomalous_with_mask"] else _no_pixel_metrics())
    return {**pixel, **counts}


def _category_pixel_metrics(groups: Mapping[str, np.ndarray], maps, masks, regions, labels: np.ndarray,
                            known: Optional[np.ndarray]) -> tuple[dict, dict[str, dict]]:
    """(pooled pixel metrics and counts, {category: its pixel metrics and counts}).

    numpy releases the GIL in the heavy steps (masking, sorting, searching), so the categories run in
    parallel threads. A category's pixels are extracted once; the pooled metrics sort them again.
    """
    by_name, pixel_rows = {}, {}
    for name, idx in groups.items():
        rows, by_name[name] = _pixel_rows(labels, known, idx)
        if rows.size:
            pixel_rows[name] = rows
    with_truth = [name for name in pixel_rows if by_name[name]["num_anomalous_with_mask"]]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        parts = dict(zip(pixel_rows, pool.map(
            lambda rows: _rows_pixel_parts(maps, masks, regions, rows), pixel_rows.values()
        )))
        # Pooled over every image with pixel ground truth, also the normal images of categories without masks.
        pooled = pool.submit(_pooled_pixel_metrics, list(parts.values())) if with_truth else None
        per_pixel = pool.map(lambda name: _pixel_metrics(*parts[name], f" of category {name!r}"), with_truth)
        pixel_by_name = dict(zip(with_truth, per_pixel))
        for name in groups:
            by_name[name].update(pixel_by_name.get(name) or _no_pixel_metrics())
        _, counts = _pixel_rows(labels, known, np.arange(labels.size))
        return {**(pooled.result() if pooled is not None else _no_pixel_metrics()), **counts}, by_name


def _in_key_order(result: dict) -> dict:
    """Metrics first (METRIC_KEYS order), then counts, then the rest: metrics.json reads top to bottom."""
    order = {key: i for i, key in enumerate(METRIC_KEYS + COUNT_KEYS + MEAN_COUNT_KEYS)}
    return dict(sorted(result.items(), key=lambda item: order.get(item[0], len(order))))


def _mean_over_categories(per_category: Mapping[str, dict], keys: Sequence[str], pixel: bool) -> dict:
    """The paper's "Mean" row: each metric's mean over the categories that have it (a pixel metric is
    None in a category without masks; None here when no category has it)."""
    mean = {}
    for key in keys:
        values = [m[key] for m in per_category.values() if m.get(key) is not None]
        mean[key] = float(np.mean(values)) if values else None
    mean["num_categories"] = len(per_category)
    if pixel:
        mean["num_categories_pixel"] = sum(m.get("pixel_auroc") is not None for m in per_category.values())
    return mean


class AnomalyMetricAccumulator:
    """Collects an evaluation loop batch by batch; :meth:`compute` runs once at the end.

    Storage is compact and exact: scores as float64, maps in float32 (float64 if given so),
    labels and masks as bool. With several processes, gather each batch first -- Accelerate's
    ``gather_for_metrics`` drops the padding duplicates of the last batch. Categories must be
    tensors to be gathered, so pass integer ids and give the names here::

        metric = AnomalyMetricAccumulator(category_names=["bottle", "cable", ...])
        for batch in loader:
            out = model(**batch)
            scores, labels, maps, masks, cats, has_mask = accelerator.gather_for_metrics(
                (out.image_scores, batch["label"], out.anomaly_maps, batch["mask"], batch["category_id"],
                 batch["has_mask"])
            )
            metric.update(scores, labels, maps, masks, categories=cats, has_mask=has_mask)
        if accelerator.is_main_process:
            results = metric.compute()
    """

    def __init__(self, category_names: Optional[Sequence[str]] = None):
        self.category_names = list(category_names) if category_names is not None else None
        self.reset()

    def reset(self) -> None:
        self._scores, self._labels, self._maps, self._masks, self._categories = [], [], [], [], []
        self._has_mask = []

    def __len__(self) -> int:
        return sum(s.shape[0] for s in self._scores)

    def update(self, image_scores, image_labels, anomaly_maps=None, masks=None, categories=None,
               has_mask=None) -> None:
        """Add one batch; same arguments as :func:`compute_anomaly_metrics` (categories as ids
        into `category_names` if given, else strings; `has_mask` None = every image has its mask)."""
        scores, labels, maps, masks, _, has_mask = _validate(image_scores, image_labels, anomaly_maps, masks, None,
                                                             None, has_mask)
        if self._scores:
            if (maps is None) != (not self._maps):
                raise ValueError("anomaly_maps were given for some batches and not for others.")
            if (categories is None) != (not self._categories):
                raise ValueError("categories were given for some batches and not for others.")
            if maps is not None and maps.shape[1:] != self._maps[0].shape[1:]:
                raise ValueError(f"anomaly_maps of shape {maps.shape[1:]} after {self._maps[0].shape[1:]}.")
        if categories is not None:
            categories = _to_numpy(categories)
            if categories.shape != scores.shape:
                raise ValueError(f"categories must have one entry per image, got shape {categories.shape}.")
            self._categories.append(categories.copy())
        # Copies: the arrays may share memory with the caller's tensors or reused buffers.
        self._scores.append(scores.copy())
        self._labels.append(labels.copy())
        self._has_mask.append(np.ones(scores.shape, dtype=bool) if has_mask is None else has_mask.copy())
        if maps is not None:
            self._maps.append(maps.copy())
            self._masks.append(masks.copy())

    def compute(self) -> dict:
        """:func:`compute_anomaly_metrics` on everything added since the last :meth:`reset`."""
        if not self._scores:
            raise ValueError("no batch was added: call update() before compute().")
        cat = lambda xs: np.concatenate(xs) if xs else None  # noqa: E731
        return compute_anomaly_metrics(
            cat(self._scores),
            cat(self._labels),
            cat(self._maps),
            cat(self._masks),
            cat(self._categories),
            category_names=self.category_names,
            has_mask=cat(self._has_mask),
        )


# ----------------------------------------------------------------------------- the table

# The paper's five columns, their mean (mTotal), then the F1-max ones.
_TABLE_COLUMNS = (
    *((METRIC_NAMES[key], key) for key in PAPER_KEYS),
    ("mTotal", None),
    *((METRIC_NAMES[key], key) for key in METRIC_KEYS if key not in PAPER_KEYS),
)


def _table_row(label: str, metrics: Mapping[str, float], total: bool = True) -> str:
    """One row; "-" where a metric is absent (None, e.g. pixel metrics without masks), never 0.
    `total=False`: no mTotal (a Mean row whose pixel metrics cover only some categories)."""
    cells = [label]
    for _, key in _TABLE_COLUMNS:
        if key is None:  # mTotal: mean of the paper's five numbers
            complete = total and all(metrics.get(k) is not None for k in PAPER_KEYS)
            value = np.mean([metrics[k] for k in PAPER_KEYS]) if complete else None
        else:
            value = metrics.get(key)
        cells.append("-" if value is None else f"{100 * value:.1f}")
    return "| " + " | ".join(cells) + " |"


def _count_text(counts: Mapping[str, Any]) -> str:
    text = (f"{counts['num_images']} / {counts['num_images_pixel']} "
            f"({counts['num_anomalous_with_mask']} of {counts['num_anomalous']} anomalous with a mask)")
    return text + (", pixel metrics absent" if not counts["num_anomalous_with_mask"] else "")


def pixel_coverage_note(metrics: Mapping[str, Any]) -> str | None:
    """Below the table, when some anomalous images have no mask: what the pixel metrics used, per row.

    None when every image has pixel ground truth (MVTec AD, VisA) or the counts are not there (metrics
    written before they were), so those tables stay as they were.
    """
    per_category = list(metrics.get("per_category", {}).items())
    rows = per_category + ([("all", metrics)] if len(per_category) != 1 else [])  # one category: "all" repeats it
    rows = [(name, m) for name, m in rows if all(k in m for k in COUNT_KEYS)]
    if not any(m["num_images_pixel"] < m["num_images"] for _, m in rows):
        return None
    lines = ["Pixel metrics (P-AUROC, AUPRO, P-AP, P-F1max) use only the images with pixel ground truth: good images "
             "and anomalous images with a mask. \"-\" = absent: no anomalous image there has a mask (it is not 0); "
             "mTotal needs all five of its metrics (in the Mean row, over every category).", "",
             "Images used, all (image metrics) / with pixel ground truth (pixel metrics):"]
    lines += [f"- {name}: {_count_text(m)}" for name, m in rows]
    mean = metrics.get("mean") or {}
    if 0 < mean.get("num_categories_pixel", 0) < mean.get("num_categories", 0):
        lines.append(f"- Mean: pixel metrics over the {mean['num_categories_pixel']} of {mean['num_categories']} "
                     "categories that have them")
    return "\n".join(lines)


def format_metrics_table(metrics: Mapping[str, Any]) -> str:
    """Markdown table in the paper's layout (percent, 1 decimal).

    One row per category and a "Mean" row (mean over categories, as in the paper) when
    `metrics` has per-category results, else one "all" row. mTotal is the mean of I-AUROC,
    P-AUROC, AUPRO, I-AP and P-AP; F1-max columns come after it (ADer's extra metrics).
    Absent metrics show as "-"; when some anomalous images had no mask, a note after the table
    says how many images the pixel metrics used (`pixel_coverage_note`).
    """
    header = "| Category | " + " | ".join(name for name, _ in _TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(_TABLE_COLUMNS) + 1)]
    if "per_category" in metrics:
        lines += [_table_row(name, m) for name, m in metrics["per_category"].items()]
        mean = metrics["mean"]
        partial = mean.get("num_categories_pixel", mean.get("num_categories")) != mean.get("num_categories")
        lines.append(_table_row("**Mean**", mean, total=not partial))
    else:
        lines.append(_table_row("all", metrics))
    note = pixel_coverage_note(metrics)
    if note:
        lines += ["", note]
    return "\n".join(lines)
