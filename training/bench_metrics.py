"""Benchmark cnc_hf.metrics on an MVTec-AD-sized test set against scikit-learn.

    python training/bench_metrics.py                       # 1725 maps of 224x224, 15 categories
    python training/bench_metrics.py --reference-aupro     # also time an MVTec-style AUPRO
    python training/bench_metrics.py --output bench.json

The data are synthetic but shaped like MVTec AD's test set: the 15 categories with their real
numbers of normal / anomalous test images, 1 to 3 ellipse defects per anomalous image with radii
from 2 px to a sixth of the image, maps made of smooth patch-level noise bilinearly upsampled
(as a ViT's patch map is) plus a bump of random strength on each defect, clipped at 0 (so many
pixels tie at 0), image score = max of the map.

`run_metrics_benchmark()` returns the numbers as a dict for the combined benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from scipy import ndimage

from cnc_hf.metrics import METRIC_KEYS, _label_regions, compute_anomaly_metrics, format_metrics_table

# MVTec AD test set: category -> (normal images, anomalous images); 467 + 1258 = 1725.
MVTEC_TEST_COUNTS = {
    "bottle": (20, 63), "cable": (58, 92), "capsule": (23, 109), "carpet": (28, 89), "grid": (21, 57),
    "hazelnut": (40, 70), "leather": (32, 92), "metal_nut": (22, 93), "pill": (26, 141),
    "screw": (41, 119), "tile": (33, 84), "toothbrush": (12, 30), "transistor": (60, 40),
    "wood": (19, 60), "zipper": (32, 119),
}


def _category_plan(n_images: int) -> list[tuple[str, int, int]]:
    """(category, normal, anomalous) counts: MVTec AD's own at 1725 images, else scaled."""
    if n_images == sum(a + b for a, b in MVTEC_TEST_COUNTS.values()):
        return [(c, a, b) for c, (a, b) in MVTEC_TEST_COUNTS.items()]
    n_cat = max(1, min(len(MVTEC_TEST_COUNTS), n_images // 4))
    plan = []
    for c, chunk in zip(MVTEC_TEST_COUNTS, np.array_split(np.arange(n_images), n_cat)):
        normal = max(1, round(0.27 * chunk.size))  # MVTec AD is 27% normal
        plan.append((c, normal, chunk.size - normal))
    return plan


def make_synthetic_test_set(n_images: int = 1725, size: int = 224, seed: int = 0) -> dict:
    """Image scores/labels, float32 maps, bool masks and category names, MVTec-AD-like."""
    rng = np.random.default_rng(seed)
    plan = _category_plan(n_images)
    categories = np.concatenate([[c] * (a + b) for c, a, b in plan])
    labels = np.concatenate([[0] * a + [1] * b for _, a, b in plan]).astype(np.int64)

    masks = np.zeros((n_images, size, size), dtype=bool)
    strength = np.zeros((n_images, size, size), dtype=np.float32)
    for i in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            ry, rx = rng.uniform(2, max(3, size / 6), size=2)
            cy, cx = rng.uniform(ry, size - ry), rng.uniform(rx, size - rx)
            theta = rng.uniform(0, np.pi)
            # Draw inside the bounding box of the circle of the larger radius.
            r = max(rx, ry)
            y0, y1 = max(0, int(cy - r)), min(size, int(cy + r) + 1)
            x0, x1 = max(0, int(cx - r)), min(size, int(cx + r) + 1)
            dy, dx = (np.arange(y0, y1) - cy)[:, None], (np.arange(x0, x1) - cx)[None, :]
            u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
            v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
            region = u * u + v * v <= 1
            region[int(cy) - y0, int(cx) - x0] = True  # at least one pixel for the tiniest ellipses
            masks[i, y0:y1, x0:x1] |= region
            # Defects of varied visibility: some barely above the noise.
            box = strength[i, y0:y1, x0:x1]
            box[region] = np.maximum(box[region], rng.uniform(0.1, 1.5))

    grid = max(2, size // 8)  # patch-level noise, bilinearly upsampled like a ViT patch map
    noise = rng.standard_normal((n_images, grid, grid)).astype(np.float32)
    noise = ndimage.zoom(noise, (1, size / grid, size / grid), order=1)[:, :size, :size]
    bumps = ndimage.gaussian_filter(strength, sigma=(0, 2, 2))
    maps = np.maximum(0.3 * noise + bumps, 0).astype(np.float32)  # clipped: many ties at 0
    scores = maps.reshape(n_images, -1).max(axis=1).astype(np.float64)
    return {"image_scores": scores, "image_labels": labels, "anomaly_maps": maps, "masks": masks,
            "categories": categories}


def reference_aupro(anomaly_maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """AUPRO as the MVTec AD evaluation code computes it: argsort of all pixels, cumulative
    sums, one curve point per distinct threshold, trapezoid with interpolation at the limit."""
    regions = _label_regions(masks)
    sizes = np.bincount(regions.ravel())
    n_regions = sizes.size - 1
    fp_change = (regions == 0).ravel()
    pro_change = np.where(regions > 0, 1.0 / (n_regions * sizes[regions]), 0.0).ravel()
    scores = anomaly_maps.ravel()
    order = np.argsort(scores)[::-1]
    scores = scores[order]
    fpr = np.cumsum(fp_change[order]) / fp_change.sum()
    pro = np.minimum(np.cumsum(pro_change[order]), 1.0)
    keep = np.append(scores[1:] != scores[:-1], True)
    fpr = np.concatenate(([0.0], fpr[keep], [1.0]))
    pro = np.concatenate(([0.0], pro[keep], [1.0]))
    i = int(np.searchsorted(fpr, fpr_limit, side="right"))
    area = np.trapezoid(pro[:i], fpr[:i])
    if fpr[i - 1] < fpr_limit:
        y = pro[i - 1] + (pro[i] - pro[i - 1]) * (fpr_limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        area += (pro[i - 1] + y) / 2 * (fpr_limit - fpr[i - 1])
    return float(area / fpr_limit)


def _timed(fn):
    """(value, wall seconds, CPU seconds of this process); CPU time tells what a busy machine hides."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def run_metrics_benchmark(n_images: int = 1725, size: int = 224, seed: int = 0, sklearn: bool = True,
                          reference_aupro_check: bool = False) -> dict:
    """Time the whole metric suite (pooled + per category) and, side by side, scikit-learn on
    the pooled pixel metrics. Returns timings (seconds), the metrics and the largest difference
    to the references."""
    data = make_synthetic_test_set(n_images, size, seed)
    args = (data["image_scores"], data["image_labels"], data["anomaly_maps"], data["masks"])
    seconds, cpu_seconds = {}, {}

    def timed(name, fn):
        value, seconds[name], cpu_seconds[name] = _timed(fn)
        return value

    full = timed("cnc_hf_full_suite", lambda: compute_anomaly_metrics(*args, categories=data["categories"]))
    pooled = timed("cnc_hf_pooled_only", lambda: compute_anomaly_metrics(*args))
    out = {
        "n_images": n_images, "size": size, "n_pixels": int(data["masks"].size),
        "anomalous_pixel_fraction": float(data["masks"].mean()),
        "n_categories": len(full["per_category"]),
        "cpu_count": os.cpu_count(), "load_average_before": os.getloadavg()[0],
        "seconds": seconds, "cpu_seconds": cpu_seconds,
        "metrics": {k: full[k] for k in METRIC_KEYS}, "mean": full["mean"],
        "table": format_metrics_table(full),
    }
    if sklearn:
        from sklearn.metrics import average_precision_score, roc_auc_score

        y, s = data["masks"].ravel(), data["anomaly_maps"].ravel()
        auroc = timed("sklearn_pixel_auroc", lambda: roc_auc_score(y, s))
        ap = timed("sklearn_pixel_ap", lambda: average_precision_score(y, s))
        out["max_abs_diff_vs_sklearn"] = max(abs(auroc - pooled["pixel_auroc"]), abs(ap - pooled["pixel_ap"]))
    if reference_aupro_check:
        aupro = timed("reference_aupro", lambda: reference_aupro(data["anomaly_maps"], data["masks"]))
        out["abs_diff_vs_reference_aupro"] = abs(aupro - pooled["aupro"])
    return out


def format_benchmark(result: dict) -> str:
    s, c = result["seconds"], result["cpu_seconds"]
    rows = [
        ("whole suite: 7 metrics pooled + per category + mean", "cnc_hf_full_suite", None),
        ("7 metrics pooled", "cnc_hf_pooled_only", None),
        ("pixel AUROC pooled", None, "sklearn_pixel_auroc"),
        ("pixel AP pooled", None, "sklearn_pixel_ap"),
        ("AUPRO pooled (MVTec AD reference method)", None, "reference_aupro"),
    ]
    fmt = lambda k: "-" if k is None else f"{s[k]:.2f} s (CPU {c[k]:.2f} s)"  # noqa: E731
    lines = [
        f"{result['n_images']} maps of {result['size']}x{result['size']} ({result['n_pixels'] / 1e6:.1f}M pixels, "
        f"{100 * result['anomalous_pixel_fraction']:.1f}% anomalous), {result['n_categories']} categories; "
        f"{result['cpu_count']} CPUs, load average {result['load_average_before']:.1f} before the run",
        "",
        "| computation | cnc_hf.metrics | reference (sklearn / MVTec AD method) |",
        "|---|---|---|",
        *[f"| {name} | {fmt(a)} | {fmt(b)} |" for name, a, b in rows if a in s or b in s],
    ]
    if "max_abs_diff_vs_sklearn" in result:
        lines.append(f"\nmax |difference| to scikit-learn: {result['max_abs_diff_vs_sklearn']:.2e}")
    if "abs_diff_vs_reference_aupro" in result:
        lines.append(f"|difference| to the reference AUPRO: {result['abs_diff_vs_reference_aupro']:.2e}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=1725)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-sklearn", action="store_true", help="skip the (slow) scikit-learn timings")
    parser.add_argument("--reference-aupro", action="store_true", help="also time an MVTec-style AUPRO")
    parser.add_argument("--output", help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    result = run_metrics_benchmark(args.n_images, args.size, args.seed, sklearn=not args.no_sklearn,
                                   reference_aupro_check=args.reference_aupro)
    print(format_benchmark(result))
    print("\nmetrics of the synthetic set:\n" + result["table"])
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
