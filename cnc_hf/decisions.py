"""Decision quality at the calibrated thresholds: what a user acting on the pipeline's yes/no gets.

Every image is decided by `cnc_hf.modeling.decision.decide`, the pipeline's own rule, either with its
category given (as `detector(image, category=...)`) or recognised from the image (as `detector(image)`),
and the results are reported per (true) category, pooled over all images, and as the mean over categories.
"""

from __future__ import annotations

import numpy as np


def threshold_decisions(scores: np.ndarray, labels: np.ndarray, threshold) -> dict:
    """Image-level precision, recall, F1, accuracy and balanced accuracy of `score >= threshold` (the
    pipeline's rule); `threshold` is one number or one per image (each image's category threshold)."""
    pred, truth = scores >= threshold, labels.astype(bool)
    tp, fp = int((pred & truth).sum()), int((pred & ~truth).sum())
    fn, tn = int((~pred & truth).sum()), int((~pred & ~truth).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    specificity = tn / (tn + fp) if tn + fp else None
    balanced = (recall + specificity) / 2 if tp + fn and specificity is not None else None
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": (tp + tn) / max(1, tp + fp + fn + tn),
            "balanced_accuracy": balanced, "false_positive_rate": fp / (fp + tn) if fp + tn else 0.0,
            "num_images": tp + fp + fn + tn}


def category_decisions(scores: np.ndarray, labels: np.ndarray, categories: list[str], config,
                       similarities: np.ndarray | None = None) -> dict:
    """Decisions at the calibrated thresholds per category (its true name), pooled and their mean.

    Without `similarities` each image is decided with its category given; with them ((N, K), the
    model's `category_similarity`) the category is recognised from the image first, as the pipeline does
    when no category is passed, and a "recognition" entry says how often it named the right one.
    Returns {} when no threshold exists."""
    from cnc_hf.modeling.configuration_cnc import threshold_for
    from cnc_hf.modeling.decision import decide

    categories = np.asarray(categories)
    rows = [decide(float(s), config, category=None if similarities is not None else str(c),
                   similarity=None if similarities is None else similarities[i])
            for i, (s, c) in enumerate(zip(scores, categories))]
    if any(row["threshold"] is None for row in rows):
        return {}
    per_image = np.asarray([row["threshold"] for row in rows], dtype=np.float64)
    named = np.asarray([row["category"] for row in rows], dtype=object)
    per_category = {}
    for name in sorted(set(categories.tolist())):
        chosen = categories == name
        own, source = threshold_for(config.threshold, getattr(config, "category_thresholds", None), name)
        per_category[name] = {"threshold": float(own), "threshold_source": source,
                              **threshold_decisions(scores[chosen], labels[chosen], per_image[chosen])}
        if similarities is not None:
            per_category[name]["category_accuracy"] = float(np.mean(named[chosen] == name))
    keys = ("balanced_accuracy", "precision", "recall", "f1")
    mean = {key: float(np.mean([d[key] for d in per_category.values() if d[key] is not None]))
            if any(d[key] is not None for d in per_category.values()) else None for key in keys}
    result = {"per_category": per_category, "mean": mean, "pooled": threshold_decisions(scores, labels, per_image)}
    if similarities is not None:
        result["recognition"] = {"accuracy": float(np.mean(named == categories)),
                                 "unrecognised": int(sum(n is None for n in named)), "num_images": len(rows)}
    return result


def format_decisions_table(decisions: dict, recognised: bool = False) -> str:
    """The yes/no decisions at the calibrated thresholds, per category, their mean and pooled (percent)."""
    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}"

    how = ("the pipeline without `category=`: the category recognised from the image" if recognised
           else "the pipeline with `category=` given")
    extra = " category named |" if recognised else ""
    lines = [f"Decisions at the calibrated thresholds ({how}; percent):", "",
             f"| Category | threshold | balanced acc. | precision | recall | F1 |{extra}",
             "|---|---|---|---|---|---|" + ("---|" if recognised else "")]
    for name, row in decisions["per_category"].items():
        named = f" {pct(row.get('category_accuracy'))} |" if recognised else ""
        lines.append(f"| {name} | {row['threshold']:.4g} ({row['threshold_source']}) | {pct(row['balanced_accuracy'])} "
                     f"| {pct(row['precision'])} | {pct(row['recall'])} | {pct(row['f1'])} |{named}")
    mean, pooled = decisions["mean"], decisions["pooled"]
    lines.append(f"| **Mean** | | {pct(mean['balanced_accuracy'])} | {pct(mean['precision'])} | {pct(mean['recall'])} "
                 f"| {pct(mean['f1'])} |" + (" |" if recognised else ""))
    named = f" {pct(decisions['recognition']['accuracy'])} |" if recognised else ""
    lines.append(f"| **All images** | | {pct(pooled['balanced_accuracy'])} | {pct(pooled['precision'])} "
                 f"| {pct(pooled['recall'])} | {pct(pooled['f1'])} |{named}")
    return "\n".join(lines)
