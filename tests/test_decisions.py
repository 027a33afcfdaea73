"""Decisions that hold across categories: one calibrated threshold per category (issue 17, first part),
chosen by `category=` in the pipeline, the ONNX runtime and `cnc-hf predict`, a normalised score, and
decision quality per category in the evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tiny_models import tiny_cnc_config
from cnc_hf.evaluation import category_decisions, threshold_decisions
from cnc_hf.modeling import CNCConfig, CNCModel
from cnc_hf.modeling.configuration_cnc import threshold_for
from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor
from cnc_hf.pipeline import AnomalyMapPipeline, save_model_dir

THRESHOLDS = {"brick": 0.2, "gravel": 50.0}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CNCModel(tiny_cnc_config(threshold=1.0, category_thresholds=THRESHOLDS)).eval()


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 36, 3), dtype=np.uint8)


def test_threshold_rule_category_then_pooled_and_unknown_names_refused():
    assert threshold_for(1.0, THRESHOLDS, "gravel") == (50.0, "category")
    assert threshold_for(1.0, THRESHOLDS, None) == (1.0, "pooled")
    assert threshold_for(1.0, None, "anything") == (1.0, "pooled")  # a model without per-category thresholds
    with pytest.raises(ValueError, match=r"category 'brik'.*\['brick', 'gravel'\]"):
        threshold_for(1.0, THRESHOLDS, "brik")
    with pytest.raises(ValueError, match="category_thresholds"):
        CNCConfig(category_thresholds={"brick": float("nan")})


def test_pipeline_decides_at_the_named_categorys_threshold(model):
    pipe = AnomalyMapPipeline(model=model, image_processor=CNCImageProcessor(size=32))
    pooled = pipe(image(1))
    brick, gravel = pipe(image(1), category="brick"), pipe(image(1), category="gravel")
    score = pooled["score"]
    assert brick["score"] == gravel["score"] == score and 0.2 < score < 50.0  # the tiny model scores ~1-2
    assert (pooled["threshold"], pooled["threshold_source"], pooled["category"]) == (1.0, "pooled", None)
    assert (brick["threshold"], brick["is_anomaly"], brick["category"]) == (0.2, True, "brick")
    assert (gravel["threshold"], gravel["is_anomaly"], gravel["threshold_source"]) == (50.0, False, "category")
    assert gravel["normalized_score"] == pytest.approx(score / 50.0) and brick["normalized_score"] > 1.0
    assert pipe(image(1), category="gravel", threshold=0.1)["threshold_source"] == "call"  # the call wins
    with pytest.raises(ValueError, match="category 'glass'"):
        pipe(image(1), category="glass")


def test_category_thresholds_survive_save_and_remote_code_load(model, tmp_path):
    save_model_dir(model, CNCImageProcessor(size=32), tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["category_thresholds"] == THRESHOLDS
    from transformers import pipeline

    remote = pipeline("image-anomaly-detection", model=str(tmp_path / "m"), trust_remote_code=True)
    assert remote(image(2), category="gravel")["threshold"] == 50.0


def test_onnx_runtime_and_predict_take_the_category(model, tmp_path):
    from PIL import Image

    from cnc_hf import cli
    from cnc_hf.onnx_export import export_onnx
    from cnc_hf.onnx_runtime import OnnxAnomalyDetector

    onnx_path = export_onnx(model, tmp_path / "m.onnx")
    result = OnnxAnomalyDetector(onnx_path)(image(3), category="brick")
    assert (result["threshold"], result["category"], result["is_anomaly"]) == (0.2, "brick", True)
    with pytest.raises(ValueError, match="category 'x'"):
        OnnxAnomalyDetector(onnx_path)(image(3), category="x")
    Image.fromarray(image(4)).save(tmp_path / "a.png")
    save_model_dir(model, CNCImageProcessor(size=32), tmp_path / "m")
    out = tmp_path / "pred"
    assert cli.main(["predict", str(tmp_path / "a.png"), "--model", str(tmp_path / "m"), "--category", "gravel",
                     "--output_dir", str(out), "--no_progress"]) == 0
    (record,) = json.loads((out / "predictions.json").read_text())
    assert (record["category"], record["threshold"]) == ("gravel", 50.0)
    assert record["normalized_score"] == pytest.approx(record["score"] / 50.0)
    with pytest.raises(SystemExit, match="category 'grvel'"):
        cli.main(["predict", str(tmp_path / "a.png"), "--model", str(tmp_path / "m"), "--category", "grvel"])


def test_decision_quality_per_category_by_hand():
    scores = np.array([0.1, 0.3, 0.25, 0.9, 40.0, 60.0, 70.0, 45.0])
    labels = np.array([0, 1, 1, 0, 0, 1, 1, 1])
    categories = ["brick"] * 4 + ["gravel"] * 4
    config = CNCConfig(threshold=1.0, category_thresholds=THRESHOLDS)
    result = category_decisions(scores, labels, categories, config)
    brick = result["per_category"]["brick"]  # threshold 0.2: TP 2, FP 1 (0.9), TN 1, FN 0
    assert (brick["precision"], brick["recall"]) == (pytest.approx(2 / 3), 1.0)
    assert brick["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    gravel = result["per_category"]["gravel"]  # threshold 50: TP 2 (60, 70), FN 1 (45), TN 1 (40)
    assert gravel["balanced_accuracy"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert result["mean"]["balanced_accuracy"] == pytest.approx((0.75 + 5 / 6) / 2)
    pooled_at_one = threshold_decisions(scores, labels, 1.0)  # the pooled threshold: every gravel image "anomalous"
    # TP 3 (gravel 60, 70, 45), FP 1 (gravel 40), FN 2 (brick 0.3, 0.25), TN 2 (brick 0.1, 0.9)
    assert pooled_at_one["balanced_accuracy"] == pytest.approx((3 / 5 + 2 / 3) / 2)
    assert result["pooled"]["balanced_accuracy"] > pooled_at_one["balanced_accuracy"]
