"""The Gradio app (cnc_hf/app.py) and its Space (cnc_hf/space.py).

Most tests call the app's functions directly. `test_app_in_headless_chromium` starts the real
command (`cnc-hf app`) on 127.0.0.1 and drives Debian's Chromium with Playwright: a non-image
upload gets a readable error and the app keeps serving, the score and threshold shown equal the
pipeline's, the heat maps and the selected image's panel are displayed, the slider re-decides. Set
CNC_HF_APP_SCREENSHOT=path to also save its screenshot there (docs/app_screenshot.png is made that way).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from tiny_models import COLOURS, colour_split, coloured, tiny_cnc_config

gr = pytest.importorskip("gradio", reason="the app needs gradio: pip install -e '.[app]'")

from cnc_hf import app as cnc_app  # noqa: E402
from cnc_hf.space import REQUIREMENTS, push_space, write_space_files  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
# Chromium must only talk to 127.0.0.1: no background services, no QUIC, no sync, fresh profile.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def example_images(tmp_path_factory) -> Path:
    """Two 64x48 images (not square, not the model size) named by what they show, plus a text file."""
    folder = tmp_path_factory.mktemp("app_examples")
    rng = np.random.default_rng(0)
    smooth = np.clip(rng.normal(128, 10, (48, 64, 3)), 0, 255).astype(np.uint8)
    spotted = smooth.copy()
    spotted[10:30, 20:40] = [255, 0, 0]
    PIL.Image.fromarray(smooth).save(folder / "plain.png")
    PIL.Image.fromarray(spotted).save(folder / "red_spot.png")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, example_images) -> Path:
    """A tiny random CNC model dir whose calibrated threshold sits between the two images' scores,
    so that the page must show one ANOMALY and one normal at the model's own threshold."""
    from cnc_hf.modeling import CNCModel
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor

    from cnc_hf.pipeline import AnomalyMapPipeline, save_model_dir

    torch.manual_seed(0)
    model = CNCModel(tiny_cnc_config()).eval()
    processor = CNCImageProcessor(size=32)
    pipe = AnomalyMapPipeline(model=model, image_processor=processor)
    scores = sorted(pipe(str(example_images / name), threshold=0.0)["score"] for name in ("plain.png", "red_spot.png"))
    assert scores[0] < scores[1], "the two example images must score differently for this fixture"
    model.config.threshold = (scores[0] + scores[1]) / 2
    return save_model_dir(model, processor, tmp_path_factory.mktemp("tiny_app_model"))


@pytest.fixture(scope="module")
def detector(model_dir):
    from cnc_hf.hub import load_pipeline

    return load_pipeline(model_dir)


def _component(app, elem_id):
    return next(block for block in app.blocks.values() if getattr(block, "elem_id", None) == elem_id)


# --------------------------------------------------------------------------- functions of the page
def test_decisions_follow_the_pipeline_rule():
    results = [{"name": "a.png", "score": 0.5}, {"name": "b.png", "score": 0.25}]
    assert cnc_app.TABLE_HEADERS == ["image", "category", "score", "threshold", "decision"]
    assert cnc_app.results_table(results, 0.5) == [["a.png", "-", "0.500000", "0.500000", "ANOMALY"],
                                                   ["b.png", "-", "0.250000", "0.500000", "normal"]]
    assert cnc_app.results_table(results, None) == [["a.png", "-", "0.500000", "-", "-"],
                                                    ["b.png", "-", "0.250000", "-", "-"]]
    summary = cnc_app.summary_markdown(results, 0.3, ["c.txt is not an image this app can read (x)."])
    assert "**1 anomalous**, 1 normal at threshold 0.300000" in summary and "**Error**: c.txt" in summary
    assert "no decision" in cnc_app.summary_markdown(results, None)


def test_per_category_rule_is_each_images_own_threshold_times_the_factor():
    results = [{"name": "a.png", "score": 0.5, "category": "brick", "threshold": 0.4},
               {"name": "b.png", "score": 3.0, "category": "gravel", "threshold": 4.0},
               {"name": "c.png", "score": 9.0, "category": None, "threshold": None}]  # no threshold anywhere
    assert [cnc_app.image_threshold(r, 1.5, per_category=True) for r in results] == [pytest.approx(0.6), 6.0, None]
    assert cnc_app.image_threshold(results[1], 1.5) == 1.5  # one threshold for all: the slider's value itself
    assert cnc_app.results_table(results, 1.0, per_category=True) == [
        ["a.png", "brick", "0.500000", "0.400000", "ANOMALY"], ["b.png", "gravel", "3.000000", "4.000000", "normal"],
        ["c.png", "-", "9.000000", "-", "-"]]
    assert [row[4] for row in cnc_app.results_table(results, 0.5, per_category=True)] == ["ANOMALY", "ANOMALY", "-"]
    assert [row[4] for row in cnc_app.results_table(results, 2.0, per_category=True)] == ["normal", "normal", "-"]
    summary = cnc_app.summary_markdown(results, 1.0, per_category=True)
    assert "**1 anomalous**, 1 normal at each image's own threshold x 1.000 (1.0 = as calibrated)" in summary
    assert "1 without a threshold (no decision)" in summary


def test_score_files_reports_unreadable_files_and_scores_the_rest(detector, example_images, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    results, errors = cnc_app.score_files(detector, [str(notes), str(example_images / "plain.png")], None)
    assert [r["name"] for r in results] == ["plain.png"]
    assert results[0]["score"] == pytest.approx(detector(str(example_images / "plain.png"))["score"], abs=1e-7)
    assert results[0]["anomaly_map"].shape == (48, 64) and results[0]["heatmap"].size == (64, 48)
    assert len(errors) == 1 and errors[0].startswith("notes.txt is not an image this app can read")
    assert str(tmp_path) not in errors[0]  # no server temp paths in the page


def test_deprecated_raw_map_colours_as_the_pipeline_above_the_figures_colour_bar():
    from cnc_hf.figures import colour_bar
    from cnc_hf.modeling.heatmap import jet_colormap

    amap = np.tile(np.linspace(0.0, 1.0, 48, dtype=np.float32), (32, 1))  # left to right
    with pytest.warns(FutureWarning, match="render_raw_map is deprecated"):
        image = cnc_app.render_raw_map(amap, threshold=0.5, max_side=96)
    assert image.mode == "RGB" and image.width == 96 and image.height > 64  # 96 x 64 map + colour bar below
    pixels = np.asarray(image).astype(int)
    # The pipeline's scale: blue = 0 (left), green = the threshold (middle), red = twice it (right).
    for x, value in ((0, 0.0), (48, 0.5), (95, 1.0)):
        assert np.abs(pixels[32, x] - jet_colormap(np.float32(value))).max() <= 12, (x, pixels[32, x])
    bar = colour_bar(96, thresholds_known=True)
    assert np.array_equal(pixels[-bar.height:], np.asarray(bar))  # the legend is figures' own colour bar
    with pytest.warns(FutureWarning):
        flat = cnc_app.render_raw_map(np.ones((8, 8), np.float32), threshold=1.0)  # constant map: no crash
    assert flat.width == cnc_app.RAW_MAP_SIDE


def test_slider_limit_is_round_and_above_the_values():
    assert cnc_app.slider_limit([0.0]) == 1.0
    assert cnc_app.slider_limit([3.0]) == 5.0
    assert cnc_app.slider_limit([0.021, 0.03]) == 0.05
    assert all(cnc_app.slider_limit([v]) > v for v in (0.001, 0.7, 12.5, 900.0))


def test_build_app_starts_at_the_calibrated_threshold(model_dir, detector, example_images):
    app = cnc_app.build_app(model_dir, examples=example_images)
    assert isinstance(app, gr.Blocks)
    assert _component(app, "threshold").value == pytest.approx(detector.model.config.threshold)
    assert "calibrated" in _component(app, "threshold-source").value
    app = cnc_app.build_app(detector, threshold=1.5)  # a pipeline object works too
    assert _component(app, "threshold").value == 1.5 and "set when the app was started" in _component(
        app, "threshold-source").value


def test_build_app_without_threshold_uses_the_example_median_and_says_so(example_images):
    from cnc_hf.modeling import CNCModel

    torch.manual_seed(0)
    model = CNCModel(tiny_cnc_config()).eval()
    assert model.config.threshold is None
    app = cnc_app.build_app(model, examples=example_images)
    scores = [cnc_app.load_detector(model)(str(p))["score"] for p in sorted(example_images.glob("*.png"))]
    assert _component(app, "threshold").value == pytest.approx(float(np.median(scores)))
    assert "median score of the 2 example images" in _component(app, "threshold-source").value


# --------------------------------------------------------------------------- per-category decisions, the panel
@pytest.fixture(scope="module")
def category_images(tmp_path_factory) -> Path:
    """One unseen image per colour category, plus gray noise that is unlike every category."""
    folder = tmp_path_factory.mktemp("category_images")
    for name in COLOURS:
        coloured(name, 1000).save(folder / f"{name}.png")
    gray = np.random.default_rng(99).integers(0, 256, (32, 32), dtype=np.uint8)
    PIL.Image.fromarray(np.stack([gray] * 3, axis=-1)).save(folder / "noise.png")
    return folder


@pytest.fixture(scope="module")
def category_detector(category_images):
    """A tiny model that recognises its three colour categories, with per-category thresholds set so that
    every decision at its own category's threshold is the opposite of the decision at the pooled one."""
    from cnc_hf.calibration import fit_category_prototypes
    from cnc_hf.modeling import CNCModel
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor
    from cnc_hf.pipeline import AnomalyMapPipeline

    torch.manual_seed(0)
    model = CNCModel(tiny_cnc_config()).eval()
    processor = CNCImageProcessor(size=32)
    fit_category_prototypes(model, processor, [colour_split()], batch_size=6, progress=False)
    pipe = AnomalyMapPipeline(model=model, image_processor=processor)
    scores = {name: pipe(str(category_images / f"{name}.png"))["score"] for name in COLOURS}
    low, *_, high = sorted(COLOURS, key=scores.get)
    assert scores[low] < scores[high]
    model.config.threshold = (scores[low] + scores[high]) / 2  # pooled: low normal, high ANOMALY
    # Own thresholds: low ANOMALY (half its score), the others normal (twice theirs).
    model.config.category_thresholds = {name: scores[name] * (0.5 if name == low else 2.0) for name in COLOURS}
    return pipe, low, high


def test_app_decides_each_image_at_its_categorys_threshold(category_detector, category_images):
    pipe, low, high = category_detector
    rule = cnc_app.starting_rule(pipe)
    assert rule["per_category"] and rule["start"] == 1.0 and rule["heatmap_range"] is None
    assert "own category's calibrated threshold" in rule["source"] and "1.0 = as calibrated" in rule["source"]
    paths = [str(category_images / f"{name}.png") for name in (low, high, "noise")]
    results, errors = cnc_app.score_files(pipe, paths, rule["heatmap_range"])
    assert errors == []
    own = pipe.model.config.category_thresholds
    pooled = pipe.model.config.threshold
    rows = {row[0]: dict(zip(cnc_app.TABLE_HEADERS, row)) for row in cnc_app.results_table(results, 1.0, True)}
    for name in (low, high):  # recognised, decided at its own threshold as the pipeline decides it
        expected = pipe(str(category_images / f"{name}.png"))
        assert (rows[f"{name}.png"]["category"], expected["category"]) == (name, name)
        assert rows[f"{name}.png"]["threshold"] == cnc_app.format_score(own[name]) == \
            cnc_app.format_score(expected["threshold"])
        assert rows[f"{name}.png"]["decision"] == ("ANOMALY" if expected["is_anomaly"] else "normal")
    assert (rows[f"{low}.png"]["decision"], rows[f"{high}.png"]["decision"]) == ("ANOMALY", "normal")
    # At the pooled threshold for all (the old slider) both decisions flip: per category is not a relabelling.
    at_pooled = {row[0]: row[4] for row in cnc_app.results_table(results, pooled)}
    assert (at_pooled[f"{low}.png"], at_pooled[f"{high}.png"]) == ("normal", "ANOMALY")
    # An image unlike every category: no category, the pooled threshold.
    assert (rows["noise.png"]["category"], rows["noise.png"]["threshold"]) == ("-", cnc_app.format_score(pooled))


def test_the_slider_moves_a_factor_on_each_images_own_threshold(category_detector, category_images):
    pipe, low, high = category_detector
    results, _ = cnc_app.score_files(pipe, [str(category_images / f"{name}.png") for name in (low, high)], None)
    own = pipe.model.config.category_thresholds
    for factor in (0.25, 1.0, 3.0):
        table = cnc_app.results_table(results, factor, per_category=True)
        assert [row[3] for row in table] == [cnc_app.format_score(own[n] * factor) for n in (low, high)]
        assert [row[4] for row in table] == ["ANOMALY" if r["score"] >= own[n] * factor else "normal"
                                             for r, n in zip(results, (low, high))]
    assert [row[4] for row in cnc_app.results_table(results, 0.25, True)] == ["ANOMALY", "ANOMALY"]  # 0.5x its score
    assert [row[4] for row in cnc_app.results_table(results, 3.0, True)] == ["normal", "normal"]  # 1.5x its score
    # The page: a factor slider starting at 1.0 that says which rule decides.
    app = cnc_app.build_app(pipe)
    slider = _component(app, "threshold")
    assert slider.value == 1.0 and "factor" in slider.label
    assert "own category's calibrated threshold" in _component(app, "threshold-source").value
    menu = _component(app, "category")  # the caller's category=, for all images of the upload
    assert [c[0] for c in menu.choices] == [cnc_app.RECOGNISE, *sorted(COLOURS)] and menu.value == cnc_app.RECOGNISE
    (named,), _ = cnc_app.score_files(pipe, [str(category_images / "noise.png")], None, category=high)
    assert (named["category"], named["threshold"], named["threshold_source"]) == (high, own[high], "category")
    # threshold= at start wins, as the pipeline's threshold= does: one threshold for all, said so.
    app = cnc_app.build_app(pipe, threshold=0.5)
    assert _component(app, "threshold").value == 0.5 and "one threshold for all" in _component(
        app, "threshold-source").value
    assert not cnc_app.starting_rule(pipe, threshold=0.5)["per_category"]
    assert not any(getattr(block, "elem_id", None) == "category" for block in app.blocks.values())


def test_the_panel_is_the_figures_renderers_output(category_detector, category_images):
    from cnc_hf.figures import Example, caption_lines, render_examples

    pipe, low, _ = category_detector
    path = str(category_images / f"{low}.png")
    (result,), _ = cnc_app.score_files(pipe, [path], None)
    expected = pipe(path)
    threshold = expected["threshold"] * 0.5
    example = Example(image=result["image"], overlay=result["heatmap"], score=expected["score"], threshold=threshold,
                      threshold_source="category x 0.500", is_anomaly=True, category=low, name=f"{low}.png")
    # The pipeline coloured the map 0..2x the calibrated threshold: at factor 0.5 the bar says those numbers.
    value_range = (0.0, 2.0 * expected["threshold"])
    panel = cnc_app.selected_panel(result, 0.5, per_category=True)
    assert np.array_equal(np.asarray(panel), np.asarray(render_examples([example], tile=cnc_app.PANEL_TILE,
                                                                        value_range=value_range)))
    lines = caption_lines(cnc_app.panel_example(result, 0.5, per_category=True))
    assert lines[0] == f"{low} / {low}.png"
    assert f"vs threshold {threshold:.3f} (category x 0.500) -> ANOMALY" in lines[1]
    assert cnc_app.panel_value_range(result, 1.0, per_category=True) is None  # at 1.0: 0 / threshold / 2x labels
    # Where cnc_hf is not installed (a Space) the panel is the pipeline's heat map itself.
    original = cnc_app._figures
    try:
        cnc_app._figures = lambda: None
        assert cnc_app.selected_panel(result, 1.0, per_category=True) is result["heatmap"]
    finally:
        cnc_app._figures = original


def test_the_panel_of_a_one_threshold_model(detector, example_images):
    from cnc_hf.figures import Example, render_examples

    start = detector.model.config.threshold
    path = str(example_images / "red_spot.png")
    (result,), _ = cnc_app.score_files(detector, [path], (0.0, 2.0 * start))
    example = Example(image=result["image"], overlay=result["heatmap"], score=result["score"], threshold=start,
                      threshold_source="slider", is_anomaly=result["score"] >= start, category=None,
                      name="red_spot.png")
    assert np.array_equal(np.asarray(cnc_app.selected_panel(result, start)),
                          np.asarray(render_examples([example], tile=cnc_app.PANEL_TILE)))
    # The slider moved away from the colouring's threshold: the colour bar gives the numbers the colours span.
    assert cnc_app.panel_value_range(result, start * 1.5) == (0.0, 2.0 * start)


def test_demo_examples_are_six_named_images(tmp_path):
    folder = cnc_app.demo_examples(tmp_path)
    names = sorted(p.name for p in folder.glob("*.png"))
    assert names == ["brick_good.png", "brick_scratch.png", "grass_good.png", "grass_hole.png", "gravel_good.png",
                     "gravel_stain.png"]
    assert cnc_app.demo_examples(tmp_path) == folder  # made once, then reused
    assert cnc_app.find_examples(folder) == [str(folder / n) for n in names]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        cnc_app.find_examples(tmp_path / "empty")


def test_main_reports_a_missing_model_without_starting(tmp_path, capsys):
    assert cnc_app.main(["--model", str(tmp_path / "no_such_model"), "--no_examples"]) == 1
    assert "cnc-hf app:" in capsys.readouterr().err
    args = cnc_app.build_parser().parse_args(["--model", "m"])
    assert (args.host, args.port, args.share, args.examples) == ("127.0.0.1", 7860, False, None)


# --------------------------------------------------------------------------- the Space
def _front_matter(readme: str) -> dict:
    from huggingface_hub import SpaceCard

    return SpaceCard(readme).data.to_dict()


def test_space_files_for_a_hub_id(tmp_path, example_images):
    files = write_space_files("org/cnc-mvtec", tmp_path, title="Try CNC", examples=example_images)
    assert sorted(str(f.relative_to(tmp_path)) for f in files) == [
        "README.md", "app.py", "cnc_app.py", "cnc_figures.py", "cnc_heatmap.py", "examples/plain.png", "examples/red_spot.png", "requirements.txt"]
    meta = _front_matter((tmp_path / "README.md").read_text())
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["models"] == ["org/cnc-mvtec"]
    assert meta["sdk_version"] == gr.__version__ and meta["title"] == "Try CNC"
    assert {"emoji", "colorFrom", "colorTo", "pinned"} <= set(meta) and len(meta["short_description"]) <= 60
    launcher = (tmp_path / "app.py").read_text()
    assert len(launcher.strip().splitlines()) == 3 and "trust_remote_code=True" in launcher and "'org/cnc-mvtec'" in launcher
    compile(launcher, "app.py", "exec")
    # The Space runs the package's app file as it is, and installs no cnc-hf and no second gradio.
    assert (tmp_path / "cnc_app.py").read_bytes() == Path(cnc_app.__file__).read_bytes()
    requirements = (tmp_path / "requirements.txt").read_text().split()
    assert requirements == REQUIREMENTS and not any(r.startswith(("gradio", "cnc")) for r in requirements)


def test_space_refuses_a_local_dir_unless_bundled(tmp_path, model_dir):
    with pytest.raises(ValueError, match="Push it first"):
        write_space_files(model_dir, tmp_path / "space", examples=False)
    with pytest.raises(ValueError, match="neither a Hub id"):
        write_space_files("not a repo id", tmp_path / "space", examples=False)


def test_bundled_space_runs_without_cnc_hf(tmp_path, model_dir, example_images):
    """The Space's app.py, run with cnc_hf (and any modeling package) made unimportable, scores like the pipeline."""
    space = tmp_path / "space"
    write_space_files(model_dir, space, examples=example_images, bundle_model=True)
    assert "models" not in _front_matter((space / "README.md").read_text())
    script = f"""
import importlib.abc, json, sys
class NoCncHf(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("cnc_hf", "cnc_hf_train", "modeling"):
            raise ImportError("cnc_hf is not installed in a Space")
sys.meta_path.insert(0, NoCncHf())
sys.path.insert(0, ".")
import gradio
launched = []
gradio.Blocks.launch = lambda self, **kwargs: launched.append(type(self).__name__)
import runpy
runpy.run_path("app.py", run_name="__main__")
import cnc_app
detector = cnc_app.load_detector("model", trust_remote_code=True)
result = detector({str(example_images / "red_spot.png")!r})
score = result["score"]
# The labelled panel of the one renderer (the vendored cnc_figures), not the bare heat map.
panel = cnc_app.selected_panel(cnc_app.score_files(detector, [{str(example_images / "red_spot.png")!r}], None)[0][0], 1.0)
print(json.dumps({{"launched": launched, "score": score, "panel": list(panel.size),
                  "heatmap": list(result["heatmap"].size),
                  "cnc_modules": [m for m in sys.modules if m.split(".")[0] in ("cnc_hf", "cnc_hf_train", "modeling")]}}))
"""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=space, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    from cnc_hf.hub import load_pipeline

    expected = load_pipeline(model_dir)(str(example_images / "red_spot.png"))["score"]
    assert report["launched"] == ["Blocks"] and report["cnc_modules"] == []
    assert report["score"] == pytest.approx(expected, abs=1e-6)
    from cnc_hf.app import PANEL_TILE

    assert report["panel"][0] == 2 * PANEL_TILE + 12 and report["panel"][1] > PANEL_TILE  # image | heat map + caption


def test_push_space_uploads_the_written_files(tmp_path, monkeypatch, example_images):
    from huggingface_hub import HfApi

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, **kw: calls.setdefault("create_repo", kw))

    def upload_folder(self, **kw):
        calls["upload_folder"] = dict(kw, files=sorted(p.name for p in Path(kw["folder_path"]).rglob("*")))
        return "commit"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert push_space("org/cnc", "org/cnc-demo", examples=example_images) == "commit"
    assert calls["create_repo"]["repo_type"] == "space" and calls["create_repo"]["space_sdk"] == "gradio"
    upload = calls["upload_folder"]
    assert upload["repo_type"] == "space" and upload["repo_id"] == "org/cnc-demo"
    assert sorted(upload["allow_patterns"]) == ["README.md", "app.py", "cnc_app.py", "cnc_figures.py", "cnc_heatmap.py",
                                               "examples/plain.png", "examples/red_spot.png", "requirements.txt"]
    assert push_space("org/cnc", "org/cnc-demo", examples=False, dry_run=True) == [
        "README.md", "app.py", "cnc_app.py", "cnc_figures.py", "cnc_heatmap.py", "requirements.txt"]
    with pytest.raises(ValueError, match="space_id"):
        push_space("org/cnc", "no spaces allowed", dry_run=True)


# --------------------------------------------------------------------------- the real page in a real browser
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_app(model_dir: Path, examples: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`cnc-hf app` in its own process, exactly as a user starts it; returns once it answers HTTP."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", NO_PROXY="127.0.0.1,localhost")
    log = open(log_path, "w")
    server = subprocess.Popen([sys.executable, "-m", "cnc_hf.cli", "app", "--model", str(model_dir), "--host",
                               "127.0.0.1", "--port", str(port), "--examples", str(examples)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"cnc-hf app exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise AssertionError(f"cnc-hf app did not answer on {url} within 180 s:\n{log_path.read_text()[-3000:]}")


def _table(page) -> list[list[str]]:
    """The results table's rows as the user sees them.

    Gradio 6 draws the rows as ARIA grid rows (`div[role=row]` > `[role=gridcell]`) and keeps a
    hidden `<tbody>` only to measure column widths, so the hidden table is not what is read.
    """
    rows = page.evaluate(
        "() => Array.from(document.querySelectorAll('#results [role=row]')).map("
        "row => Array.from(row.querySelectorAll('[role=gridcell]')).map(cell => cell.innerText.trim()))")
    return [row for row in rows if len(row) == len(cnc_app.TABLE_HEADERS) and all(row)]


def _save_small_png(path: Path, png: bytes) -> None:
    """Screenshots for the docs: 256-colour PNG, well under 300 KB."""
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    image = PIL.Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=256, method=PIL.Image.Quantize.MEDIANCUT).save(path, optimize=True)


# An <img> can be visible before its data has loaded (a CI run once read naturalWidth 0 there): wait for
# its load event, up to 10 s, and return its decoded width (0 if it is broken or never loads).
LOADED_WIDTH = """img => img.complete ? img.naturalWidth : new Promise(resolve => {
    img.addEventListener("load", () => resolve(img.naturalWidth), {once: true});
    img.addEventListener("error", () => resolve(0), {once: true});
    setTimeout(() => resolve(img.naturalWidth), 10000);
})"""

@pytest.mark.slow
@pytest.mark.browser
def test_app_in_headless_chromium(model_dir, detector, example_images, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: scripts/install_browser.sh (run by `make test`) installs Debian's "
                    "chromium where it runs as root with apt-get; it could not here")
    sync_playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright").sync_playwright
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image")
    images = [example_images / "plain.png", example_images / "red_spot.png"]
    expected = {p.name: detector(str(p)) for p in images}

    server, url = _start_app(model_dir, example_images, tmp_path / "app.log")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium_profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1200, "height": 900})
            try:
                page = browser.new_page()
                page.set_default_timeout(60_000)
                page.goto(url)
                upload = page.locator("#upload input[type=file]")

                # A non-image: a readable error in the page, naming the file.
                upload.set_input_files(str(notes))
                page.wait_for_selector("#status :text('is not an image')")
                assert "notes.txt is not an image this app can read" in page.inner_text("#status")

                # The app keeps serving: clear, upload the images, get their results.
                page.click("#upload button[aria-label=Clear]")
                page.wait_for_function("document.querySelector('#status').innerText.trim() === ''")
                upload.set_input_files([str(p) for p in images])
                page.wait_for_function("document.querySelector('#status').innerText.includes('Scored 2 image')")
                rows = {row[0]: dict(zip(cnc_app.TABLE_HEADERS, row)) for row in _table(page)}
                assert set(rows) == set(expected), rows
                for name, result in expected.items():
                    shown = float(rows[name]["score"])
                    assert abs(shown - result["score"]) <= 0.5 * 10 ** -cnc_app.SCORE_DIGITS + 1e-9, (name, shown)
                    assert rows[name]["decision"] == ("ANOMALY" if result["is_anomaly"] else "normal")
                    assert float(rows[name]["threshold"]) == pytest.approx(result["threshold"], abs=1e-6)
                    assert rows[name]["category"] == "-"  # a model without category prototypes names none
                assert {row["decision"] for row in rows.values()} == {"ANOMALY", "normal"}  # the model's own threshold

                # The heat maps and the selected image's panel are displayed (decoded images, not placeholders).
                heatmaps = page.locator("#heatmaps img")
                assert heatmaps.count() == 2
                for i in range(2):
                    assert heatmaps.nth(i).is_visible()
                    assert heatmaps.nth(i).evaluate(LOADED_WIDTH) > 0
                panel = page.locator("#selected img")
                assert panel.is_visible() and panel.evaluate(LOADED_WIDTH) > 0
                screenshot = page.screenshot(full_page=True)

                # The slider re-decides from the kept scores.
                threshold = page.locator("#threshold input[type=number]")
                threshold.fill(str(max(r["score"] for r in expected.values()) + 1.0))
                threshold.press("Enter")
                page.wait_for_function("document.querySelector('#status').innerText.includes('0 anomalous')")
                assert [row[cnc_app.TABLE_HEADERS.index("decision")] for row in _table(page)] == ["normal", "normal"]
            finally:
                browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    assert "Traceback" not in (tmp_path / "app.log").read_text()
    _save_small_png(tmp_path / "app_screenshot.png", screenshot)
    if os.environ.get("CNC_HF_APP_SCREENSHOT"):
        _save_small_png(Path(os.environ["CNC_HF_APP_SCREENSHOT"]), screenshot)
