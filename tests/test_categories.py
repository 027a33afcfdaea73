"""Category recognition (issue 17): prototypes of the frozen CLIP features, stored in the weights; the
pipeline and the ONNX runtime name the category (and use its threshold) when the caller does not, and
an image unlike every training category gets category None, a warning and the pooled threshold."""

from __future__ import annotations

import json
import logging

import numpy as np
import PIL.Image
import pytest
import torch

from tiny_models import COLOURS, colour_split, coloured, tiny_cnc_config
from cnc_hf.modeling import CNCModel
from cnc_hf.modeling.category import embed, prototypes_from, recognise
from cnc_hf.modeling.decision import decide
from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor

THRESHOLDS = {"blue": 0.5, "green": 5.0, "red": 50.0}


def unlike_any(seed: int = 99) -> PIL.Image.Image:
    """High-contrast gray noise: unlike every flat-colour category."""
    gray = np.random.default_rng(seed).integers(0, 256, (32, 32), dtype=np.uint8)
    return PIL.Image.fromarray(np.stack([gray] * 3, axis=-1))


def test_prototypes_and_limits_by_hand():
    embeddings = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=-1)
    names, prototypes, limits = prototypes_from(embeddings, ["b", "b", "a"], factor=2.0)
    assert names == ["a", "b"]
    mean = torch.tensor([0.9, 0.3]) / torch.tensor([0.9, 0.3]).norm()
    assert torch.allclose(prototypes, torch.stack([torch.tensor([0.0, 1.0]), mean]), atol=1e-6)
    own_b = 1.0 - float(torch.tensor([1.0, 0.0]) @ mean)  # both b images lie at the same angle from their mean
    assert limits["b"] == pytest.approx(2.0 * own_b) and limits["a"] == pytest.approx(1e-4)  # a: one image, floor
    assert recognise([0.2, 1.0 - own_b], names, limits) == ("b", "b", pytest.approx(own_b))
    # Farther than the limit from the nearest prototype: unrecognised, but the nearest is still reported.
    assert recognise([0.1, 0.5], names, limits)[:2] == (None, "b")
    assert recognise([0.1, 0.5], names, None)[0] == "b"  # no limits: always the nearest
    with pytest.raises(ValueError, match="2 values for 3 categories"):
        recognise([0.1, 0.5], ["a", "b", "c"], None)


def test_decide_uses_the_recognised_categorys_threshold():
    from types import SimpleNamespace

    config = SimpleNamespace(threshold=1.0, category_thresholds={"a": 0.2, "b": 9.0}, categories=["a", "b"],
                             category_distance_limits={"a": 0.1, "b": 0.1})
    recognised = decide(3.0, config, similarity=[0.5, 0.95])
    assert (recognised["category"], recognised["category_source"], recognised["threshold"]) == ("b", "recognised", 9.0)
    assert recognised["is_anomaly"] is False and recognised["normalized_score"] == pytest.approx(3.0 / 9.0)
    unknown = decide(3.0, config, similarity=[0.5, 0.6])
    assert (unknown["category"], unknown["category_source"], unknown["nearest_category"]) == (None, "unrecognised", "b")
    assert (unknown["threshold"], unknown["threshold_source"], unknown["is_anomaly"]) == (1.0, "pooled", True)
    given = decide(3.0, config, category="a", similarity=[0.5, 0.95])  # the caller's category wins
    assert (given["category"], given["category_source"], given["threshold"]) == ("a", "given", 0.2)


@pytest.fixture(scope="module")
def fitted():
    """A tiny CNC model with prototypes fitted on 6 images of each colour category."""
    from cnc_hf.calibration import fit_category_prototypes

    torch.manual_seed(0)
    model = CNCModel(tiny_cnc_config(threshold=1.0, category_thresholds=THRESHOLDS)).eval()
    processor = CNCImageProcessor(size=32)
    split = colour_split()
    summary = fit_category_prototypes(model, processor, [split.select(range(0, 18, 2)), split.select(range(1, 18, 2))],
                                      batch_size=4, progress=False)
    return model, processor, summary


def test_fitted_prototypes_are_the_normalised_mean_embeddings(fitted):
    model, processor, summary = fitted
    assert model.config.categories == sorted(COLOURS) and set(summary["per_category"]) == set(COLOURS)
    assert all(row["num_images"] == 6 for row in summary["per_category"].values())
    with torch.no_grad():  # brute force: every image on its own
        red = torch.cat([embed(model.encode_image(processor(coloured("red", s), return_tensors="pt")["pixel_values"]))
                         for s in range(6)])
    expected = torch.nn.functional.normalize(red.mean(dim=0), dim=0)
    assert torch.allclose(model.category_prototypes[model.config.categories.index("red")], expected, atol=1e-5)
    assert model.config.category_distance_limits["red"] == pytest.approx(
        4.0 * float((1 - red @ expected).max()), rel=1e-4)


def test_pipeline_names_the_category_and_flags_an_unknown_image(fitted, caplog):
    from cnc_hf.pipeline import AnomalyMapPipeline

    model, processor, _ = fitted
    pipe = AnomalyMapPipeline(model=model, image_processor=processor)
    for name in COLOURS:
        result = pipe(coloured(name, 1000))  # not a training image
        assert (result["category"], result["category_source"]) == (name, "recognised")
        assert (result["threshold"], result["threshold_source"]) == (THRESHOLDS[name], "category")
        assert result["category_distance"] <= model.config.category_distance_limits[name]
    with caplog.at_level(logging.WARNING):
        odd = pipe(unlike_any())
    assert odd["category"] is None and odd["category_source"] == "unrecognised" and odd["nearest_category"] in COLOURS
    assert odd["category_distance"] > model.config.category_distance_limits[odd["nearest_category"]]
    assert (odd["threshold"], odd["threshold_source"]) == (1.0, "pooled")
    assert "unlike every training category" in caplog.text
    given = pipe(unlike_any(), category="red")  # the caller knows better: no recognition
    assert (given["category"], given["category_source"], given["threshold"]) == ("red", "given", 50.0)


def test_prototypes_survive_save_load_and_onnx(fitted, tmp_path):
    pytest.importorskip("onnxruntime")
    from cnc_hf.onnx_export import export_onnx
    from cnc_hf.onnx_runtime import OnnxAnomalyDetector
    from cnc_hf.pipeline import AnomalyMapPipeline, save_model_dir

    model, processor, _ = fitted
    save_model_dir(model, processor, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["categories"] == sorted(COLOURS) and set(saved["category_distance_limits"]) == set(COLOURS)
    loaded = CNCModel.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.category_prototypes, model.category_prototypes)
    pipe = AnomalyMapPipeline(model=loaded, image_processor=processor)
    runtime = OnnxAnomalyDetector(export_onnx(loaded, tmp_path / "m.onnx", processor))
    for image in (coloured("green", 7), unlike_any()):
        eager, onnx = pipe(image), runtime(image)
        assert (onnx["category"], onnx["category_source"], onnx["threshold"]) == \
            (eager["category"], eager["category_source"], eager["threshold"])
        assert onnx["category_distance"] == pytest.approx(eager["category_distance"], abs=1e-4)


def test_recognised_decisions_and_accuracy_by_hand():
    from types import SimpleNamespace

    from cnc_hf.decisions import category_decisions

    config = SimpleNamespace(threshold=1.0, category_thresholds={"a": 0.5, "b": 4.0}, categories=["a", "b"],
                             category_distance_limits={"a": 0.5, "b": 0.5})
    scores = np.array([0.4, 0.6, 3.0, 5.0])
    labels = np.array([0, 1, 0, 1])
    truth = ["a", "a", "b", "b"]
    # Image 2 (a normal b, score 3.0) is taken for an a: threshold 0.5, a false alarm; image 3 is unrecognised:
    # the pooled threshold 1.0, still a hit.
    similarities = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.2], [0.2, 0.3]])
    given = category_decisions(scores, labels, truth, config)
    recognised = category_decisions(scores, labels, truth, config, similarities=similarities)
    assert given["pooled"]["balanced_accuracy"] == 1.0
    assert recognised["pooled"]["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert recognised["recognition"] == {"accuracy": 0.5, "unrecognised": 1, "num_images": 4}
    assert recognised["per_category"]["b"]["category_accuracy"] == 0.0
    assert recognised["per_category"]["a"]["threshold"] == 0.5  # the category's own, for the table
