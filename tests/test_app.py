"""The Gradio app (cnc_hf/app.py) and its Space (cnc_hf/space.py).

Most tests call the app's functions directly. `test_app_in_headless_chromium` starts the real
command (`cnc-hf app`) on 127.0.0.1 and drives Debian's Chromium with Playwright: a non-image
upload gets a readable error and the app keeps serving, the score shown equals the pipeline's
score, the heat map is displayed, the slider re-decides. Set CNC_HF_APP_SCREENSHOT=path to also
save its screenshot there (docs/app_screenshot.png is made that way).
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

from tiny_models import tiny_cnc_config

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
    assert cnc_app.results_table(results, 0.5) == [["a.png", "0.500000", "ANOMALY"], ["b.png", "0.250000", "normal"]]
    assert cnc_app.results_table(results, None) == [["a.png", "0.500000", "-"], ["b.png", "0.250000", "-"]]
    summary = cnc_app.summary_markdown(results, 0.3, ["c.txt is not an image this app can read (x)."])
    assert "**1 anomalous**, 1 normal at threshold 0.300000" in summary and "**Error**: c.txt" in summary
    assert "no decision" in cnc_app.summary_markdown(results, None)


def test_score_files_reports_unreadable_files_and_scores_the_rest(detector, example_images, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    results, errors = cnc_app.score_files(detector, [str(notes), str(example_images / "plain.png")], None)
    assert [r["name"] for r in results] == ["plain.png"]
    assert results[0]["score"] == pytest.approx(detector(str(example_images / "plain.png"))["score"], abs=1e-7)
    assert results[0]["anomaly_map"].shape == (48, 64) and results[0]["heatmap"].size == (64, 48)
    assert len(errors) == 1 and errors[0].startswith("notes.txt is not an image this app can read")
    assert str(tmp_path) not in errors[0]  # no server temp paths in the page


def test_raw_map_rendering_has_a_legend_and_marks_the_threshold():
    amap = np.tile(np.linspace(0.0, 1.0, 48, dtype=np.float32), (32, 1))  # left to right
    image = cnc_app.render_raw_map(amap, threshold=0.5, max_side=96)
    assert image.mode == "RGB" and image.width == 96 and image.height > 64  # 96 x 64 map + legend below
    pixels = np.asarray(image)
    assert pixels[:64, 0].max() < 10 and pixels[:64, -1].min() > 245  # black = min (left), white = max (right)
    red = (pixels[64:, :, 0] > 200) & (pixels[64:, :, 1] < 60)
    assert red.any() and abs(np.nonzero(red.any(axis=0))[0].mean() - 47.5) < 3  # the tick at the middle
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
        "README.md", "app.py", "cnc_app.py", "examples/plain.png", "examples/red_spot.png", "requirements.txt"]
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
score = cnc_app.load_detector("model", trust_remote_code=True)({str(example_images / "red_spot.png")!r})["score"]
print(json.dumps({{"launched": launched, "score": score,
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
    assert sorted(upload["allow_patterns"]) == ["README.md", "app.py", "cnc_app.py", "examples/plain.png",
                                               "examples/red_spot.png", "requirements.txt"]
    assert push_space("org/cnc", "org/cnc-demo", examples=False, dry_run=True) == [
        "README.md", "app.py", "cnc_app.py", "requirements.txt"]
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
    return [row for row in rows if len(row) == 3 and all(row)]


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
                rows = {row[0]: row for row in _table(page)}
                assert set(rows) == set(expected), rows
                for name, result in expected.items():
                    shown = float(rows[name][1])
                    assert abs(shown - result["score"]) <= 0.5 * 10 ** -cnc_app.SCORE_DIGITS + 1e-9, (name, shown)
                    assert rows[name][2] == ("ANOMALY" if result["is_anomaly"] else "normal")
                assert {row[2] for row in rows.values()} == {"ANOMALY", "normal"}  # the model's own threshold

                # The heat maps and the raw map are displayed (decoded images, not placeholders).
                heatmaps = page.locator("#heatmaps img")
                assert heatmaps.count() == 2
                for i in range(2):
                    assert heatmaps.nth(i).is_visible()
                    assert heatmaps.nth(i).evaluate(LOADED_WIDTH) > 0
                raw = page.locator("#raw-map img")
                assert raw.is_visible() and raw.evaluate(LOADED_WIDTH) > 0
                screenshot = page.screenshot(full_page=True)

                # The slider re-decides from the kept scores.
                threshold = page.locator("#threshold input[type=number]")
                threshold.fill(str(max(r["score"] for r in expected.values()) + 1.0))
                threshold.press("Enter")
                page.wait_for_function("document.querySelector('#status').innerText.includes('0 anomalous')")
                assert [row[2] for row in _table(page)] == ["normal", "normal"]
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
