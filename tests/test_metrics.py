"""cnc_hf.metrics: exact against scikit-learn and against AUPRO written from its definition."""
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from cnc_hf.metrics import (
    EVALUATE_MODULE_PATH,
    METRIC_KEYS,
    AnomalyMetricAccumulator,
    compute_anomaly_metrics,
    format_metrics_table,
)

TOL = 1e-6


def assert_close(actual, expected, abs=1e-12):
    """pytest.approx for the nested result dicts (per_category, mean)."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected)
        for k in expected:
            assert_close(actual[k], expected[k], abs)
    else:
        assert actual == pytest.approx(expected, abs=abs)


def _f1_max_sklearn(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return f1.max()


def _aupro_brute_force(maps, masks, fpr_limit=0.3):
    """AUPRO straight from its definition, one threshold at a time."""
    regions = []  # (image, boolean region) for the 8-connected regions of each image
    for i, m in enumerate(masks):
        labels, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, labels == k) for k in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        fpr = np.sum((maps >= t) & normal) / normal.sum()
        pro = np.mean([np.mean(maps[i][r] >= t) for i, r in regions])
        points.append((fpr, pro))
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # interpolate linearly at the limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def _random_set(rng, n=6, size=16, decimals=1, dtype=np.float32):
    """Maps with many ties, blob masks (some blobs touching only diagonally), both classes."""
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n // 2, n):
        blobs = ndimage.binary_dilation(rng.random((size, size)) < 0.02, iterations=int(rng.integers(0, 2)))
        masks[i] = blobs
        masks[i, 2, 2] = masks[i, 3, 3] = True  # two pixels touching at a corner: one region
    maps = rng.random((n, size, size)) + 0.5 * masks
    maps = np.round(maps, decimals).astype(dtype)
    scores = maps.reshape(n, -1).max(axis=1) + np.round(rng.random(n), decimals)
    labels = masks.reshape(n, -1).any(axis=1).astype(int)
    return scores, labels, maps, masks


# ----------------------------------------------------------------------------- exactness


def test_tiny_hand_computed_example():
    # The scikit-learn doc example: AUROC 0.75, AP 0.8333; F1 is best at threshold 0.35.
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    # The same 4 values as pixels: a normal image (0.1, 0.4), an anomalous one with a
    # 2-pixel region (0.35, 0.8). PRO is 1/2 from FPR 0 to 1/2, so AUPRO = 0.5.
    maps = np.array([[[0.1, 0.4]], [[0.35, 0.8]]], dtype=np.float32)
    masks = np.array([[[0, 0]], [[1, 1]]])
    out = compute_anomaly_metrics(scores, labels)
    assert out["image_auroc"] == pytest.approx(0.75)
    assert out["image_ap"] == pytest.approx(5 / 6)
    assert out["image_f1_max"] == pytest.approx(0.8)
    out = compute_anomaly_metrics([0.4, 0.8], [0, 1], maps, masks)
    assert out["pixel_auroc"] == pytest.approx(0.75)
    assert out["pixel_ap"] == pytest.approx(5 / 6)
    assert out["aupro"] == pytest.approx(0.5)


def test_ties_get_half_credit():
    out = compute_anomaly_metrics([0.5, 0.5, 0.5, 0.9], [0, 1, 0, 1])
    # (1 positive tied with 2 negatives -> 1/2 each, 1 positive above both) / 4 pairs
    assert out["image_auroc"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_equals_sklearn_with_ties(seed, dtype):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    labels = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(int)
    labels[:2] = [0, 1]
    scores = np.round(rng.random(n) + 0.3 * labels, 1).astype(dtype)  # many ties
    masks = rng.random((n, 5, 7)) < rng.uniform(0.02, 0.5)
    maps = np.round(rng.normal(size=masks.shape) + masks, int(rng.integers(0, 3))).astype(dtype)
    out = compute_anomaly_metrics(scores, labels, maps, masks)
    y, s = masks.ravel(), maps.ravel()
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert out["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=TOL)
    assert out["image_f1_max"] == pytest.approx(_f1_max_sklearn(labels, scores), abs=TOL)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=TOL)
    assert out["pixel_f1_max"] == pytest.approx(_f1_max_sklearn(y, s), abs=TOL)


def test_equals_sklearn_with_negative_and_signed_zero_scores():
    rng = np.random.default_rng(0)
    masks = rng.random((8, 6, 6)) < 0.3
    maps = np.round(rng.normal(size=masks.shape) + masks, 1).astype(np.float32)
    maps[maps == 0] = np.float32(-0.0) * rng.integers(0, 2, size=int((maps == 0).sum()))  # mix -0.0 and 0.0
    out = compute_anomaly_metrics(np.arange(8.0), [0, 1] * 4, maps, masks)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=TOL)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=TOL)
    assert out["aupro"] == pytest.approx(_aupro_brute_force(maps, masks), abs=TOL)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [1, 2, 3])
def test_aupro_equals_definition(seed, decimals):
    scores, labels, maps, masks = _random_set(np.random.default_rng(seed), decimals=decimals)
    out = compute_anomaly_metrics(scores, labels, maps, masks)
    assert out["aupro"] == pytest.approx(_aupro_brute_force(maps, masks), abs=TOL)


def test_aupro_with_fpr_exactly_at_the_limit():
    # 10 normal pixels, 3 of them above the region: FPR reaches exactly 0.3, no interpolation.
    maps = np.array([[[9, 8, 7, 1, 1, 1, 1, 1, 1, 1, 5, 5]]], dtype=np.float32).repeat(2, axis=0)
    masks = np.zeros_like(maps, dtype=bool)
    masks[1, 0, 10:] = True
    maps[1, 0, 10] = 6  # half of the region above FPR 0.3's threshold
    out = compute_anomaly_metrics([0, 1], [0, 1], maps, masks)
    assert out["aupro"] == pytest.approx(_aupro_brute_force(maps, masks), abs=TOL)


def test_aupro_regions_are_8_connected_per_image():
    # One region of two diagonal pixels (scores 1 and 0) and one single pixel (score 0):
    # at threshold 1, PRO = mean(1/2, 0) = 1/4 (with 4-connectivity it would be 1/3).
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[1, 0, 0] = masks[1, 1, 1] = masks[1, 3, 3] = True
    maps[1, 0, 0] = 1.0
    maps[0] = 0.5  # normal image: all its pixels at FPR < 1 for threshold 0.5
    out = compute_anomaly_metrics([0, 1], [0, 1], maps, masks)
    assert out["aupro"] == pytest.approx(_aupro_brute_force(maps, masks), abs=TOL)
    # FPR(1) = 0, FPR(0.5) = 16/29: PRO is 1/4 over [0, 0.3].
    assert out["aupro"] == pytest.approx(0.25, abs=TOL)


def test_reference_aupro_of_the_benchmark_agrees():
    from cnc_hf_train.bench_metrics import reference_aupro

    scores, labels, maps, masks = _random_set(np.random.default_rng(3), decimals=2)
    assert reference_aupro(maps, masks) == pytest.approx(_aupro_brute_force(maps, masks), abs=TOL)


def test_values_in_unit_interval_and_extremes():
    rng = np.random.default_rng(1)
    masks = rng.random((4, 8, 8)) < 0.3
    labels = np.array([0, 1, 0, 1])
    perfect = compute_anomaly_metrics(labels * 1.0, labels, masks * 1.0, masks)
    worst = compute_anomaly_metrics(-1.0 * labels, labels, -1.0 * masks, masks)
    for key in METRIC_KEYS:
        assert perfect[key] == pytest.approx(1.0)
        assert 0.0 <= worst[key] <= 1.0
    assert worst["image_auroc"] == worst["pixel_auroc"] == worst["aupro"] == 0.0
    for seed in range(5):
        out = compute_anomaly_metrics(*_random_set(np.random.default_rng(seed)))
        assert all(0.0 <= out[k] <= 1.0 for k in METRIC_KEYS)


# ----------------------------------------------------------------------------- structure


def _category_set(rng, n_per=(6, 8, 5)):
    parts = [_random_set(rng, n=n) for n in n_per]
    cats = np.concatenate([[c] * n for c, n in zip(["bottle", "cable", "zipper"], n_per)])
    scores, labels, maps, masks = (np.concatenate(x) for x in zip(*parts))
    return scores, labels, maps, masks, cats


def test_per_category_results_and_mean():
    scores, labels, maps, masks, cats = _category_set(np.random.default_rng(0))
    order = np.random.default_rng(1).permutation(len(scores))  # categories interleaved
    scores, labels, maps, masks, cats = scores[order], labels[order], maps[order], masks[order], cats[order]
    out = compute_anomaly_metrics(scores, labels, maps, masks, categories=list(cats))
    assert list(out["per_category"]) == ["bottle", "cable", "zipper"]
    pooled = compute_anomaly_metrics(scores, labels, maps, masks)
    for key in METRIC_KEYS:
        assert out[key] == pytest.approx(pooled[key], abs=1e-12)
        values = [out["per_category"][c][key] for c in out["per_category"]]
        assert out["mean"][key] == pytest.approx(np.mean(values))
    for c in ["bottle", "cable", "zipper"]:
        i = cats == c
        alone = compute_anomaly_metrics(scores[i], labels[i], maps[i], masks[i])
        assert_close(out["per_category"][c], alone)


def test_integer_categories_with_names():
    scores, labels, maps, masks, cats = _category_set(np.random.default_rng(2))
    names = ["zipper", "cable", "bottle"]  # the order of the names is the order of the results
    ids = np.array([names.index(c) for c in cats])
    by_id = compute_anomaly_metrics(scores, labels, maps, masks, ids, category_names=names)
    by_name = compute_anomaly_metrics(scores, labels, maps, masks, cats)
    assert list(by_id["per_category"]) == names
    assert_close(by_id, by_name)
    by_name_ordered = compute_anomaly_metrics(scores, labels, maps, masks, cats, category_names=names)
    assert list(by_name_ordered["per_category"]) == names
    with pytest.raises(ValueError, match="not in category_names"):
        compute_anomaly_metrics(scores, labels, maps, masks, cats, category_names=names[:2])


def test_image_metrics_only():
    out = compute_anomaly_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], categories=["a", "b", "a", "b"])
    assert set(out) == {"image_auroc", "image_ap", "image_f1_max", "num_images", "num_anomalous", "per_category",
                        "mean"}
    assert out["per_category"]["a"]["num_images"] == 2 and out["per_category"]["a"]["num_anomalous"] == 1
    assert out["mean"]["num_categories"] == 2
    assert "| - |" in format_metrics_table(out)


# ----------------------------------------------------------------------------- images without masks


def _without_masks(rng, n=8, size=8):
    """n images (every other one anomalous) with a square defect; the maps find it, plus noise."""
    labels = np.array([0, 1] * (n // 2))
    masks = np.zeros((n, size, size), dtype=bool)
    masks[labels == 1, 2:5, 2:5] = True
    maps = (rng.random((n, size, size)) + 0.6 * masks).astype(np.float32)
    return maps.reshape(n, -1).max(axis=1).astype(np.float64), labels, maps, masks


def test_pixel_metrics_use_only_images_with_pixel_ground_truth():
    scores, labels, maps, masks = _without_masks(np.random.default_rng(0))
    has_mask = np.array([False, True, True, False, False, True, False, False])  # anomalous: 1, 5 with; 3, 7 without
    placeholder = masks.copy()
    placeholder[~has_mask & (labels == 1)] = False  # what a batch holds for them: all-zero masks
    out = compute_anomaly_metrics(scores, labels, maps, placeholder, has_mask=has_mask)
    keep = (labels == 0) | has_mask  # good images count whatever has_mask says: all their pixels are normal
    expected = compute_anomaly_metrics(scores[keep], labels[keep], maps[keep], masks[keep])
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"):
        assert out[key] == pytest.approx(expected[key], abs=1e-12)
    wrong = compute_anomaly_metrics(scores, labels, maps, placeholder)  # placeholders read as "no defect pixel"
    assert wrong["pixel_auroc"] != pytest.approx(out["pixel_auroc"], abs=1e-6)
    for key in ("image_auroc", "image_ap", "image_f1_max"):  # image metrics: every image
        assert out[key] == compute_anomaly_metrics(scores, labels)[key]
    assert (out["num_images"], out["num_anomalous"], out["num_images_pixel"], out["num_anomalous_with_mask"]) == \
        (8, 4, 6, 2)


def test_pixel_metrics_are_none_without_any_anomalous_mask_never_zero():
    scores, labels, maps, masks = _without_masks(np.random.default_rng(1))
    cats = np.array(["with"] * 4 + ["without"] * 4)
    has_mask = np.array([True] * 4 + [False] * 4)
    zeros = np.where(has_mask[:, None, None], masks, False)
    out = compute_anomaly_metrics(scores, labels, maps, zeros, categories=cats, has_mask=has_mask)
    without, with_ = out["per_category"]["without"], out["per_category"]["with"]
    assert all(without[k] is None for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"))
    assert without["image_auroc"] is not None and without["num_anomalous_with_mask"] == 0
    assert without["num_images_pixel"] == 2  # its good images still count in the pooled pixel metrics
    alone = compute_anomaly_metrics(scores[:4], labels[:4], maps[:4], masks[:4])
    assert with_["pixel_auroc"] == pytest.approx(alone["pixel_auroc"])
    assert out["mean"]["pixel_auroc"] == pytest.approx(with_["pixel_auroc"])  # over the categories that have it
    assert out["mean"]["num_categories"] == 2 and out["mean"]["num_categories_pixel"] == 1
    keep = (labels == 0) | has_mask
    pooled = compute_anomaly_metrics(scores[keep], labels[keep], maps[keep], masks[keep])
    assert out["aupro"] == pytest.approx(pooled["aupro"])

    table = format_metrics_table(out)
    lines = table.splitlines()
    assert lines[3].startswith("| without |") and lines[3].split(" | ")[2:4] == ["-", "-"]  # P-AUROC, AUPRO
    assert lines[3].split(" | ")[6] == "-"  # mTotal
    assert lines[4].split(" | ")[6] == "-"  # Mean row: pixel metrics over 1 of 2 categories, no mTotal
    assert "- without: 4 / 2 (0 of 2 anomalous with a mask), pixel metrics absent" in table
    assert "pixel metrics over the 1 of 2 categories" in table and " 0.0 " not in table

    nothing = compute_anomaly_metrics(scores, labels, maps, np.zeros_like(masks), has_mask=np.zeros(8, bool))
    assert [nothing[k] for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")] == [None] * 4
    assert nothing["num_anomalous_with_mask"] == 0 and nothing["image_auroc"] is not None
    import json

    assert json.loads(json.dumps(nothing))["aupro"] is None  # null in metrics.json


def test_accumulator_and_evaluate_module_take_has_mask(tmp_path, monkeypatch):
    scores, labels, maps, masks = _without_masks(np.random.default_rng(2))
    has_mask = np.array([True, True, True, False, True, True, False, True])
    expected = compute_anomaly_metrics(scores, labels, maps, masks, has_mask=has_mask)
    acc = AnomalyMetricAccumulator()
    acc.update(scores[:4], labels[:4], maps[:4], masks[:4])  # no has_mask: all of them have their mask
    acc.update(scores[4:], labels[4:], maps[4:], masks[4:], has_mask=has_mask[4:])
    partial = has_mask.copy()
    partial[:4] = True
    assert_close(acc.compute(), compute_anomaly_metrics(scores, labels, maps, masks, has_mask=partial))
    with pytest.raises(ValueError, match="has_mask must have one entry per image"):
        compute_anomaly_metrics(scores, labels, maps, masks, has_mask=has_mask[:3])

    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(EVALUATE_MODULE_PATH, cache_dir=str(tmp_path))
    out = metric.compute(image_scores=scores, image_labels=labels, anomaly_maps=maps, masks=masks,
                         has_mask=list(has_mask))
    assert_close(out, expected)


def test_accumulator_equals_one_shot_with_torch_batches():
    torch = pytest.importorskip("torch")
    scores, labels, maps, masks, cats = _category_set(np.random.default_rng(4))
    names = ["bottle", "cable", "zipper"]
    ids = np.array([names.index(c) for c in cats])
    acc = AnomalyMetricAccumulator(category_names=names)
    for start in range(0, len(scores), 4):  # batches as a model gives them: tensors, (B, 1, H, W) maps
        b = slice(start, start + 4)
        acc.update(
            torch.from_numpy(scores[b]).float(),
            torch.from_numpy(labels[b]),
            torch.from_numpy(maps[b]).unsqueeze(1),
            torch.from_numpy(masks[b]).unsqueeze(1).float(),
            categories=torch.from_numpy(ids[b]),
        )
    assert len(acc) == len(scores)
    maps_seen = maps.copy()
    maps[:] = 0  # the tensors shared this memory: the accumulator must keep its own copy
    expected = compute_anomaly_metrics(scores.astype(np.float32), labels, maps_seen, masks, cats)
    assert_close(acc.compute(), expected)
    acc.reset()
    with pytest.raises(ValueError, match="update"):
        acc.compute()


def test_accumulator_after_accelerate_gather():
    torch = pytest.importorskip("torch")
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    scores, labels, maps, masks = _random_set(np.random.default_rng(5))
    acc = AnomalyMetricAccumulator()
    for b in (slice(0, 3), slice(3, 6)):
        batch = tuple(torch.from_numpy(x[b]) for x in (scores, labels, maps, masks))
        acc.update(*accelerator.gather_for_metrics(batch))
    assert_close(acc.compute(), compute_anomaly_metrics(scores, labels, maps, masks))


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def good():
    return _random_set(np.random.default_rng(0))


def test_error_shape_mismatch(good):
    scores, labels, maps, masks = good
    with pytest.raises(ValueError, match="image_scores and image_labels"):
        compute_anomaly_metrics(scores[:-1], labels, maps, masks)
    with pytest.raises(ValueError, match="anomaly_maps and masks"):
        compute_anomaly_metrics(scores, labels, maps, masks[:, :-1])
    with pytest.raises(ValueError, match="anomaly_maps and masks"):
        compute_anomaly_metrics(scores[:-1], labels[:-1], maps, masks)
    with pytest.raises(ValueError, match="anomaly_maps and masks"):
        compute_anomaly_metrics(scores, labels, maps, None)
    with pytest.raises(ValueError, match="categories"):
        compute_anomaly_metrics(scores, labels, maps, masks, categories=["a"])


def test_error_single_class(good):
    scores, labels, maps, masks = good
    with pytest.raises(ValueError, match="image_labels.*only one class"):
        compute_anomaly_metrics(scores, np.zeros_like(labels), maps, masks)
    with pytest.raises(ValueError, match="masks has no anomalous pixel"):
        compute_anomaly_metrics(scores, labels, maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="masks has no normal pixel"):
        compute_anomaly_metrics(scores, labels, maps, np.ones_like(masks))
    cats = ["a"] * 3 + ["b"] * 3  # category "a" holds only the normal images
    with pytest.raises(ValueError, match="image_labels of category 'a'"):
        compute_anomaly_metrics(scores, labels, maps, masks, cats)


def test_error_non_finite_and_non_binary(good):
    scores, labels, maps, masks = good
    bad = scores.copy()
    bad[0] = np.nan
    with pytest.raises(ValueError, match="image_scores contains NaN"):
        compute_anomaly_metrics(bad, labels, maps, masks)
    bad = maps.copy()
    bad[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="anomaly_maps contains NaN or infinite"):
        compute_anomaly_metrics(scores, labels, bad, masks)
    with pytest.raises(ValueError, match="masks must be binary"):
        compute_anomaly_metrics(scores, labels, maps, masks * 0.7)
    with pytest.raises(ValueError, match="image_labels must be binary"):
        compute_anomaly_metrics(scores, labels * 2, maps, masks)


def test_inputs_are_not_modified(good):
    scores, labels, maps, masks = good
    copies = [x.copy() for x in good]
    compute_anomaly_metrics(scores, labels, maps, masks, categories=["a", "b"] * 3)
    for x, y in zip(good, copies):
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- table, evaluate, bench


def test_format_metrics_table():
    per = {"bottle": dict(zip(METRIC_KEYS, [1.0, 0.9, 0.8, 0.97, 0.5, 0.4, 0.9])),
           "cable": dict(zip(METRIC_KEYS, [0.9, 0.8, 0.7, 0.95, 0.6, 0.5, 0.8]))}
    mean = {k: (per["bottle"][k] + per["cable"][k]) / 2 for k in METRIC_KEYS}
    table = format_metrics_table({**mean, "per_category": per, "mean": mean})
    lines = table.splitlines()
    assert lines[0] == "| Category | I-AUROC | P-AUROC | AUPRO | I-AP | P-AP | mTotal | I-F1max | P-F1max |"
    # bottle: I-AUROC 100, P-AUROC 97, AUPRO 90, I-AP 100... mTotal = mean(1, .97, .9, .9, .5)
    assert lines[2] == "| bottle | 100.0 | 97.0 | 90.0 | 90.0 | 50.0 | 85.4 | 80.0 | 40.0 |"
    assert lines[-1].startswith("| **Mean** | 95.0 | 96.0 | 85.0 | 85.0 | 55.0 | 83.2 |")
    assert len(lines) == 5
    assert format_metrics_table(mean).splitlines()[2].startswith("| all | 95.0 |")


def test_evaluate_module_loads_offline(tmp_path, monkeypatch):
    # In process: a subprocess would pay evaluate's import (it imports transformers) again.
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)  # read at import time otherwise
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scores, labels, maps, masks = _random_set(np.random.default_rng(6))
    metric = evaluate.load(EVALUATE_MODULE_PATH, cache_dir=str(tmp_path))
    assert metric.name == "cnc_anomaly_metrics"
    metric.add_batch(image_scores=scores[:3], image_labels=labels[:3])
    metric.add_batch(image_scores=scores[3:], image_labels=labels[3:])
    out = metric.compute(anomaly_maps=maps, masks=masks, categories=["a", "b"] * 3)
    assert_close(out, compute_anomaly_metrics(scores, labels, maps, masks, categories=["a", "b"] * 3))
    one_call = metric.compute(image_scores=[0.1, 0.4, 0.35, 0.8], image_labels=[0, 0, 1, 1])
    assert one_call == pytest.approx({"image_auroc": 0.75, "image_ap": 5 / 6, "image_f1_max": 0.8, "num_images": 4,
                                      "num_anomalous": 2})


def test_benchmark_smoke():
    from cnc_hf_train.bench_metrics import format_benchmark, run_metrics_benchmark

    result = run_metrics_benchmark(n_images=20, size=32, reference_aupro_check=True)
    assert result["max_abs_diff_vs_sklearn"] < TOL and result["abs_diff_vs_reference_aupro"] < TOL
    assert result["n_categories"] == 5 and "| computation |" in format_benchmark(result)


def test_empty_and_ragged_inputs_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="image_scores is empty"):
        compute_anomaly_metrics([], [])
    maps = [np.zeros((4, 4), np.float32), np.zeros((4, 5), np.float32)]  # two sizes: numpy would say "inhomogeneous"
    masks = [np.zeros((4, 4), bool), np.zeros((4, 5), bool)]
    with pytest.raises(ValueError, match=r"anomaly_maps: entries of different shapes"):
        compute_anomaly_metrics([0.1, 0.9], [0, 1], maps, masks)
