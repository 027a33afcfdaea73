"""`evaluate` module for the anomaly detection metrics of cnc_hf (a thin wrapper of cnc_hf.metrics).

Load it offline from its file (the path is also `cnc_hf.metrics.EVALUATE_MODULE_PATH`):

    metric = evaluate.load(cnc_hf.metrics.EVALUATE_MODULE_PATH)
    metric.compute(image_scores=s, image_labels=y, anomaly_maps=maps, masks=masks)

Per-image scores and labels are the module's features (so `add_batch` streams them); the
pixel arrays go to `compute` as keyword arguments and reach the math as arrays, because
evaluate's Arrow storage would turn an MVTec AD test set (86M pixels) into Python lists.
To stream maps batch by batch, use `cnc_hf.metrics.AnomalyMetricAccumulator`.
"""
import datasets
import evaluate

from cnc_hf.metrics import compute_anomaly_metrics

_DESCRIPTION = """
Image-level AUROC, AP and F1-max of per-image anomaly scores, and pixel-level AUROC, AP,
F1-max and AUPRO of anomaly maps against ground-truth masks, as reported by CNC (AAAI 2025)
and the multi-class anomaly detection benchmarks. Pixel metrics use only images with pixel
ground truth (normal images, anomalous images with a mask) and are None where there is none. Exact (no binning): AUROC and AP equal
scikit-learn's; AUPRO is the MVTec AD definition (8-connected regions, FPR over all normal
pixels, integrated up to FPR 0.3 and divided by 0.3). With `categories`, per-category results
and their mean (the papers' "Mean" row) are returned too.
"""

_KWARGS_DESCRIPTION = """
Args:
    image_scores (`list` of `float`): anomaly score per image, higher is more anomalous.
    image_labels (`list` of `int`): 1 for an anomalous image, 0 for a normal one.
    anomaly_maps (array (N, H, W), optional): pixel anomaly scores, given to `compute`.
    masks (array (N, H, W), optional): binary ground truth, given to `compute` with the maps.
    categories (`list` of `str`, optional): category per image, given to `compute`.
    has_mask (`list` of `bool`, optional): whether each image came with a mask, given to
        `compute` (default: all did). Anomalous images without one (image-level labels only) are
        left out of the pixel metrics; normal images always count (all their pixels are normal).
Returns:
    image_auroc, image_ap, image_f1_max and, with maps, pixel_auroc, pixel_ap, pixel_f1_max,
    aupro, all in [0, 1], with the counts num_images, num_anomalous and, with maps,
    num_images_pixel, num_anomalous_with_mask; with categories also `per_category` and `mean`.
    Pixel metrics are None (absent, not 0) where no anomalous image has a mask.
Examples:
    >>> metric = evaluate.load(cnc_hf.metrics.EVALUATE_MODULE_PATH)
    >>> metric.compute(image_scores=[0.1, 0.4, 0.35, 0.8], image_labels=[0, 0, 1, 1])["image_auroc"]
    0.75
"""

_CITATION = """
@inproceedings{wang2025cnc,
  title = {CNC: Cross-modal Normality Constraint for Unsupervised Multi-class Anomaly Detection},
  author = {Wang, Xiaolei and Wang, Xiaoyang and Bai, Huihui and Lim, Eng Gee and Xiao, Jimin},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year = {2025}
}
@article{bergmann2021mvtec,
  title = {The MVTec Anomaly Detection Dataset: A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},
  author = {Bergmann, Paul and Batzner, Kilian and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  journal = {International Journal of Computer Vision},
  year = {2021}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CncAnomalyMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"image_scores": datasets.Value("float64"), "image_labels": datasets.Value("int64")}
            ),
            reference_urls=["https://www.mvtec.com/company/research/datasets/mvtec-ad"],
        )

    def _compute(self, image_scores, image_labels, anomaly_maps=None, masks=None, categories=None,
                 category_names=None, has_mask=None):
        return compute_anomaly_metrics(
            image_scores, image_labels, anomaly_maps, masks, categories, category_names=category_names,
            has_mask=has_mask,
        )
