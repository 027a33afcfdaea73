"""AnomalyMapPipeline: outputs, inputs, batching, thresholds, bad inputs, huge images, and both ways of
loading it (installed package; remote code in a process without cnc-hf)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import PIL.Image
import pytest
import torch

import cnc_hf.pipeline  # noqa: F401  (registers the task)
from cnc_hf.pipeline import AnomalyMapPipeline, save_model_dir
from cnc_hf.modeling import CNCModel
from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor
from cnc_hf.modeling.pipeline_cnc import HEATMAP_MAX_SIDE, jet_colormap, overlay_heatmap
from tiny_models import BLOCK_CNC_PACKAGES as BLOCK_PACKAGE
from tiny_models import tiny_cnc_config

TASK = "image-anomaly-detection"


def make_model(threshold=None) -> CNCModel:
    torch.manual_seed(0)
    return CNCModel(tiny_cnc_config(threshold=threshold)).eval()


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cnc_model")
    save_model_dir(make_model(threshold=2.0), CNCImageProcessor(size=32), path)
    return path


@pytest.fixture(scope="module")
def pipe(model_dir):
    from transformers import pipeline

    return pipeline(TASK, model=str(model_dir))


# --------------------------------------------------------------------------- the saved dir
def test_save_model_dir_writes_weights_config_processor_and_all_code(tmp_path):
    model = make_model().train()
    out = save_model_dir(model, None, tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "configuration_cnc.py", "modeling_cnc.py",
            "image_processing_cnc.py", "pipeline_cnc.py", "moe.py", "prompts.py"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    config = json.loads((out / "config.json").read_text())
    # The format Pipeline.save_pretrained writes, which pipeline(..., trust_remote_code=True) reads.
    assert config["custom_pipelines"] == {
        TASK: {"impl": "pipeline_cnc.AnomalyMapPipeline", "pt": ["AutoModel"], "type": "image"}
    }
    assert config["auto_map"] == {"AutoConfig": "configuration_cnc.CNCConfig", "AutoModel": "modeling_cnc.CNCModel"}
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["size"] == 32 and processor["auto_map"]["AutoImageProcessor"].startswith("image_processing_cnc.")
    assert model.training and model.device.type == "cpu"  # saving does not change the model's mode or device


# --------------------------------------------------------------------------- outputs
def test_pipeline_by_task_name_uses_installed_code_and_returns_everything(pipe, model_dir):
    assert type(pipe) is AnomalyMapPipeline  # no trust_remote_code needed once cnc_hf is imported
    image = random_image(45, 70)
    result = pipe(image)
    assert set(result) == {"score", "is_anomaly", "anomaly_map", "heatmap", "category", "threshold", "threshold_source",
                           "normalized_score", "category_source", "category_distance", "nearest_category"}
    assert isinstance(result["score"], float) and isinstance(result["is_anomaly"], bool)
    assert result["anomaly_map"].shape == (45, 70) and result["anomaly_map"].dtype == np.float32
    assert isinstance(result["heatmap"], PIL.Image.Image) and result["heatmap"].size == (70, 45)
    assert result["heatmap"].mode == "RGB"
    # Same numbers as the model on the processor's output.
    model = CNCModel.from_pretrained(model_dir).eval()
    processor = CNCImageProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        out = model(**processor(image, return_tensors="pt"))
    assert result["score"] == pytest.approx(float(out.image_score[0]), abs=1e-6)
    expected_map = processor.post_process_anomaly_map(out.anomaly_map[0], (45, 70))
    np.testing.assert_allclose(result["anomaly_map"], expected_map, atol=1e-6)
    assert result["is_anomaly"] == (result["score"] >= 2.0)


def test_direct_construction_with_and_without_a_processor():
    model = make_model(threshold=1.0).train()
    image = random_image(32, 32)
    with_processor = AnomalyMapPipeline(model=model, image_processor=CNCImageProcessor(size=32))
    assert not model.training  # the pipeline switches the model to eval (train mode returns losses)
    default = AnomalyMapPipeline(model=model)  # a CNCImageProcessor at config.image_size
    assert default.image_processor.size == 32
    assert with_processor(image)["score"] == pytest.approx(default(image)["score"], abs=1e-6)


def test_every_input_kind_gives_the_same_result(pipe, tmp_path):
    array = random_image(40, 56, seed=1)
    path = tmp_path / "part.png"
    PIL.Image.fromarray(array).save(path)
    inputs = [array, PIL.Image.fromarray(array), str(path), path, path.read_bytes(),
              torch.from_numpy(array).permute(2, 0, 1), array.astype(np.float32) / 255.0]
    scores = [pipe(item)["score"] for item in inputs]
    assert scores == pytest.approx([scores[0]] * len(scores), abs=1e-5)
    listed = pipe(inputs[:3])
    assert isinstance(listed, list) and len(listed) == 3
    assert [r["score"] for r in listed] == pytest.approx(scores[:3], abs=1e-6)
    assert pipe([]) == []
    batch = np.stack([array, array])  # a 4-D array is a batch, as for the processor
    assert len(pipe(batch)) == 2


def test_batch_size_two_gives_the_same_results_as_one(pipe):
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate([(32, 32), (50, 30), (17, 64), (80, 80), (33, 41)])]
    one = pipe(images, batch_size=1)
    two = pipe(images, batch_size=2)
    assert len(one) == len(two) == 5
    for a, b, image in zip(one, two, images):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert a["is_anomaly"] == b["is_anomaly"]
        assert a["anomaly_map"].shape == b["anomaly_map"].shape == image.shape[:2]
        np.testing.assert_allclose(a["anomaly_map"], b["anomaly_map"], atol=1e-5)
        assert a["heatmap"].size == b["heatmap"].size == (image.shape[1], image.shape[0])


# --------------------------------------------------------------------------- thresholds
def test_threshold_from_config_overridable_per_call_and_at_construction(pipe):
    image = random_image(32, 32, seed=3)
    score = pipe(image)["score"]
    assert pipe(image)["is_anomaly"] == (score >= 2.0)  # config.threshold
    assert pipe(image, threshold=score - 1e-3)["is_anomaly"] is True
    assert pipe(image, threshold=score + 1e-3)["is_anomaly"] is False
    strict = AnomalyMapPipeline(model=pipe.model, image_processor=pipe.image_processor, threshold=score + 1)
    assert strict(image)["is_anomaly"] is False
    assert pipe(image)["is_anomaly"] == (score >= 2.0)  # a per-call value does not stick
    for bad in (float("nan"), float("inf"), "0.5", True):
        with pytest.raises(ValueError, match="threshold"):
            pipe(image, threshold=bad)
    with pytest.raises(ValueError, match="heatmap_range"):
        pipe(image, heatmap_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="unexpected arguments"):
        pipe(image, treshold=0.5)


def test_no_threshold_gives_none_and_warns_once(caplog):
    pipe = AnomalyMapPipeline(model=make_model(threshold=None))
    with caplog.at_level(logging.WARNING):
        results = [pipe(random_image(32, 32, seed=i)) for i in range(3)]
    assert all(r["is_anomaly"] is None for r in results)
    warnings = [r for r in caplog.records if "no calibrated threshold" in r.getMessage()]
    assert len(warnings) == 1
    assert pipe(random_image(32, 32), threshold=0.0)["is_anomaly"] is True


def test_return_heatmap_false_skips_the_overlay(pipe):
    result = pipe(random_image(32, 32), return_heatmap=False)
    assert result["heatmap"] is None and result["anomaly_map"].shape == (32, 32)


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_value_errors_that_name_the_input(pipe, tmp_path):
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    cases = [
        (str(tmp_path / "missing.png"), "missing.png"),
        (str(text_file), "notes.png"),
        (b"\x00\x01 definitely not an image", "bytes input"),
        (b"", "bytes input"),
        (np.zeros((0, 5, 3), np.uint8), "shape (0, 5, 3)"),
        (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
        (torch.full((3, 8, 8), float("nan")), "NaN"),
        (np.ones((8, 8, 3), np.complex64), "complex64"),
        (np.array([["a", "b"]]), "<U1"),
        (np.ones((8, 8, 3), np.float32) * 300.0, "float image"),
        (PIL.Image.new("RGB", (0, 0)), "size (0, 0)"),
        ({"image": "x"}, "type dict"),
    ]
    for item, named in cases:
        with pytest.raises(ValueError) as info:
            pipe(item)
        assert named in str(info.value), (named, str(info.value))
    with pytest.raises(ValueError, match="missing.png"):  # inside a list too
        pipe([random_image(32, 32), str(tmp_path / "missing.png")])


def test_huge_image_is_resized_early_and_the_heat_map_is_capped(pipe):
    height, width = 3000, 4500
    image = np.zeros((height, width, 3), np.uint8)
    image[::7] = 200  # some structure, cheaply
    tracemalloc.start()
    try:
        result = pipe(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result["anomaly_map"].shape == (height, width) and result["anomaly_map"].dtype == np.float32
    assert max(result["heatmap"].size) == HEATMAP_MAX_SIDE
    assert result["heatmap"].size == (HEATMAP_MAX_SIDE, round(height * HEATMAP_MAX_SIDE / width))
    # numpy never allocates an image-sized float array (the one full-size map is torch's buffer);
    # what it does allocate is heat-map sized (<= 2048 px on the long side).
    assert peak < height * width * 4, f"numpy peak {peak / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- heat map helpers
def test_jet_colormap_and_overlay():
    colours = jet_colormap(np.array([0.0, 0.5, 1.0, np.nan, 7.0]))
    assert colours.dtype == np.uint8 and colours.shape == (5, 3)
    assert tuple(colours[0]) == (0, 0, 128)      # low: dark blue
    assert colours[1][1] == 255 and 120 <= colours[1][0] <= 135 and 120 <= colours[1][2] <= 135  # middle: green
    assert tuple(colours[2]) == (128, 0, 0)      # high: dark red
    assert tuple(colours[3]) == tuple(colours[0]) and tuple(colours[4]) == tuple(colours[2])  # NaN low, clipped high
    gray = PIL.Image.new("RGB", (3000, 1000), (128, 128, 128))
    ramp = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (4, 1))
    overlay = overlay_heatmap(gray, ramp, value_range=(0.0, 1.0))
    assert overlay.size == (2048, 683)
    pixels = np.asarray(overlay).astype(int)
    assert pixels[300, 10, 2] > pixels[300, 10, 0]    # left (low): blue over red
    assert pixels[300, -10, 0] > pixels[300, -10, 2]  # right (high): red over blue
    small = overlay_heatmap(PIL.Image.new("RGB", (20, 10)), torch.zeros(1, 4, 4))
    assert small.size == (20, 10)  # never upscaled; a flat map does not divide by zero


# --------------------------------------------------------------------------- remote code
@pytest.mark.parametrize("saved_by", ["save_model_dir", "CNCModel.save_pretrained"])
def test_remote_code_pipeline_in_a_process_without_the_package(pipe, model_dir, tmp_path, saved_by):
    """The folder cnc-hf's trainer writes, and the one the most natural Hugging Face call writes
    (`from_pretrained(d).save_pretrained(out)`, which `push_to_hub` also uses), both serve the pipeline."""
    if saved_by == "CNCModel.save_pretrained":
        from cnc_hf.hub import validate_model_dir

        resaved = tmp_path / "resaved"
        CNCModel.from_pretrained(model_dir).save_pretrained(resaved)
        assert sorted(p.name for p in resaved.iterdir()) == sorted(p.name for p in model_dir.iterdir())
        assert sorted(validate_model_dir(resaved)) == sorted(validate_model_dir(model_dir))
        model_dir = resaved
    images = [random_image(37, 52, seed=5), random_image(64, 30, seed=6)]
    expected = pipe(images)
    for index, image in enumerate(images):
        PIL.Image.fromarray(image).save(tmp_path / f"{index}.png")
    script = BLOCK_PACKAGE + textwrap.dedent(
        f"""
        import json, numpy as np
        from transformers import pipeline
        pipe = pipeline({TASK!r}, model={str(model_dir)!r}, trust_remote_code=True)
        assert type(pipe).__module__.startswith("transformers_modules"), type(pipe).__module__
        assert not [m for m in sys.modules if m.startswith("cnc_hf") or m == "modeling"]
        results = pipe([{str(tmp_path / "0.png")!r}, {str(tmp_path / "1.png")!r}], batch_size=2)
        print("RESULT", json.dumps([[r["score"], r["is_anomaly"], list(r["anomaly_map"].shape),
                                     float(r["anomaly_map"].mean()), list(r["heatmap"].size)] for r in results]))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, run.stderr[-3000:]
    remote = json.loads(lines[0][len("RESULT "):])
    for (score, is_anomaly, shape, mean, size), local in zip(remote, expected):
        assert score == pytest.approx(local["score"], abs=1e-5)
        assert is_anomaly == local["is_anomaly"]
        assert tuple(shape) == local["anomaly_map"].shape
        assert mean == pytest.approx(float(local["anomaly_map"].mean()), abs=1e-5)
        assert tuple(size) == local["heatmap"].size


def test_a_processor_size_other_than_the_models_is_refused_naming_both(model_dir):
    from cnc_hf.modeling import CNCModel

    model = CNCModel.from_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"resizes to 48 px .* trained at 32 px"):
        AnomalyMapPipeline(model=model, image_processor=CNCImageProcessor(size=48))


def test_push_to_hub_uploads_the_complete_model_repo(model_dir, monkeypatch):
    """`model.push_to_hub(repo)` (transformers' own method) uploads what save_pretrained writes: the same
    files as cnc_hf's save_model_dir, pipeline code and processor included. The Hub calls are replaced."""
    import types

    import transformers.utils.hub as hf_hub_utils

    uploaded = {}
    monkeypatch.setattr(hf_hub_utils, "hf_api", lambda: types.SimpleNamespace(
        create_repo=lambda repo_id, **kwargs: types.SimpleNamespace(repo_id=repo_id)))
    monkeypatch.setattr(hf_hub_utils, "create_and_tag_model_card", lambda *args, **kwargs: types.SimpleNamespace(
        save=lambda path: open(path, "w").write("card")))

    def record(self, working_dir, repo_id, **kwargs):
        uploaded[repo_id] = sorted(os.listdir(working_dir))
        return "commit"

    monkeypatch.setattr(CNCModel, "_upload_modified_files", record)
    assert CNCModel.from_pretrained(model_dir).push_to_hub("org/cnc-test") == "commit"
    assert uploaded["org/cnc-test"] == sorted([p.name for p in model_dir.iterdir()] + ["README.md"])


def test_save_pretrained_with_push_to_hub_uploads_the_complete_repo(model_dir, tmp_path, monkeypatch):
    import types

    import transformers.utils.hub as hf_hub_utils

    uploaded = {}
    monkeypatch.setattr(hf_hub_utils, "hf_api", lambda: types.SimpleNamespace(
        create_repo=lambda repo_id, **kwargs: types.SimpleNamespace(repo_id=repo_id)))
    monkeypatch.setattr(hf_hub_utils, "create_and_tag_model_card", lambda *args, **kwargs: types.SimpleNamespace(
        save=lambda path: open(path, "w").write("card")))
    monkeypatch.setattr(CNCModel, "_upload_modified_files",
                        lambda self, working_dir, repo_id, **kwargs: uploaded.setdefault(repo_id, sorted(
                            os.listdir(working_dir))))
    CNCModel.from_pretrained(model_dir).save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="org/cnc-x")
    assert uploaded["org/cnc-x"] == sorted([p.name for p in model_dir.iterdir()] + ["README.md"])
