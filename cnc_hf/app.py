"""`cnc-hf app`: try a CNC anomaly detector in the browser (Gradio).

    pip install -e ".[app]"
    cnc-hf app --model demo_output/model            # or a Hub id; http://127.0.0.1:7860

Drop in one or several images and get, per image, the anomaly score, its category, the threshold
that decides it and the decision, the heat-map overlays, and a labelled panel of the selected image
(image | heat map, caption with category, score, threshold and decision, colour bar), drawn by
`cnc_hf.figures.render_examples`, the renderer of the demo gallery, `evaluate --heatmaps` and the
model card. Moving the slider re-decides from the scores already computed; the model runs only
when images are uploaded. A file that is not an image gets a readable message in the page, and the
other files of the same upload are still scored.

This file is also the app of a Hugging Face Space (`cnc_hf.space.write_space_files` copies it
verbatim as `cnc_app.py`). That is why it imports only gradio, numpy, PIL and transformers at
module level: in a Space cnc-hf is not installed and the model's own code comes from the model
repo (`trust_remote_code=True`). cnc_hf is imported lazily, only where it is installed; without it
(a Space) the selected image's view is the pipeline's heat map alone, its numbers in the table.

Which rule decides, said on the page:
- One threshold for all images (a model without `config.category_thresholds`, or `threshold=`
  given, which wins as in the pipeline's `threshold=`): the slider is that threshold, `score >=
  slider`. It starts at, in this order: `threshold=` (`--threshold`), the model's
  `config.threshold` (calibrated on held-out normal images by cnc-hf's trainer), the median score
  of the example images, the median score of the first upload. Heat-map colours are fixed for the
  whole app so that images compare: blue = 0, green = that starting threshold, red = twice it (the
  pipeline's own scale); they do not follow the slider.
- Per category (a model with `config.category_thresholds`): each image is decided at its own
  threshold, as the pipeline decides it (its category's calibrated one; the pooled `config.threshold`
  for an image of no known category), times the slider's factor: `score >= factor x threshold`,
  1.0 = as calibrated. The slider never replaces the per-category thresholds by one number. Heat
  maps are coloured as the pipeline colours them: blue = 0, green = the image's own threshold, red =
  twice it. A menu names the category of the upload (the pipeline's `category=`) for a model that
  cannot recognise it from the image or a user who knows it; by default the pipeline recognises it.
"""

# No `from __future__ import annotations`: Gradio reads the `evt: gr.SelectData` annotation at
# run time to pass the click event, and a string annotation naming a local import would not resolve.
import argparse
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageOps
import PIL.ImageFont

TASK = "image-anomaly-detection"
SCORE_DIGITS = 6  # the table shows scores with this many decimals (the browser test compares them)
MAX_FILES = 32  # per upload: bounds the work (and the maps kept in memory) of one request
MAX_EXAMPLES = 12
RECOGNISE = "recognise it from each image"  # the category menu's first choice: the pipeline names it
RAW_MAP_SIDE = 384  # display size of the deprecated raw map (the long side)
PANEL_TILE = 256  # tile side of the selected image's panel (image | heat map)
FACTOR_DIGITS = 3  # the per-category slider moves a factor in steps of 10 ** -FACTOR_DIGITS
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DECISIONS = {True: "ANOMALY", False: "normal", None: "-"}
TABLE_HEADERS = ["image", "category", "score", "threshold", "decision"]


# --------------------------------------------------------------------------- model and examples
def load_detector(model_or_dir: Any, trust_remote_code: bool = False, device: Any = None):
    """The anomaly-map pipeline for a model dir / Hub id, a CNCModel, or a pipeline (returned as is).

    With `trust_remote_code=True` the pipeline comes from the code saved in the model repo and
    cnc_hf is not imported at all (the Space path); otherwise the installed cnc_hf serves it.
    """
    if callable(model_or_dir) and hasattr(model_or_dir, "model") and hasattr(model_or_dir, "postprocess"):
        return model_or_dir  # already a pipeline
    if hasattr(model_or_dir, "config") and hasattr(model_or_dir, "forward"):  # a CNCModel instance
        from cnc_hf.modeling.pipeline_cnc import AnomalyMapPipeline

        return AnomalyMapPipeline(model=model_or_dir)
    name = os.fspath(model_or_dir)
    kwargs = {} if device is None else {"device": device}
    if trust_remote_code:
        from transformers import pipeline

        return pipeline(TASK, model=name, trust_remote_code=True, **kwargs)
    try:
        from cnc_hf.hub import load_pipeline
    except ImportError as err:
        raise ImportError(
            f"cnc_hf is not installed ({err}); install it (pip install -e '.[app]' in a cnc-hf clone) or pass "
            "trust_remote_code=True to run the code saved with the model"
        ) from err
    return load_pipeline(name, **kwargs)


def find_examples(examples: Any) -> list[str]:
    """Example image paths from a folder (searched recursively), a list of paths, or None (none)."""
    if examples is None:
        return []
    if isinstance(examples, (str, os.PathLike)):
        folder = Path(examples)
        if not folder.is_dir():
            raise ValueError(f"examples: {folder} is not a directory")
        paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ValueError(f"examples: no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    else:
        paths = [Path(p) for p in examples]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"examples: no such file(s) {missing}")
    return [str(p) for p in paths[:MAX_EXAMPLES]]


def demo_examples(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """A folder of 6 demo test images (one normal and one defective per category), named by content.

    Made once with `cnc_hf.data.make_demo_dataset` (about a second) and kept in
    `cache_dir` (default `~/.cache/cnc_hf/app_examples`, or a temp folder where that is not writable).
    Names like `brick_good.png`, `brick_scratch.png`, so the results table says what each image is.
    """
    import shutil
    import tempfile

    from cnc_hf.data import make_demo_dataset
    from cnc_hf.data.demo import DEFECT_KINDS

    if cache_dir is None:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnc_hf"
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError:
            base = Path(tempfile.mkdtemp(prefix="cnc_hf_app_"))
        cache_dir = base / "app_examples"
    out = Path(cache_dir) / f"seed{seed}"
    if out.is_dir() and len(list(out.glob("*.png"))) >= 6:
        return out
    raw = make_demo_dataset(Path(cache_dir) / f"demo_seed{seed}", seed=seed, n_train=1, n_test_good=1, n_test_defect=1)
    out.mkdir(parents=True, exist_ok=True)
    for i, category in enumerate(sorted(p.name for p in raw.iterdir() if (p / "test").is_dir())):
        defect = DEFECT_KINDS[i % len(DEFECT_KINDS)]
        for kind in ("good", defect):
            shutil.copyfile(raw / category / "test" / kind / "000.png", out / f"{category}_{kind}.png")
    return out


# --------------------------------------------------------------------------- scoring and display
def format_score(score: float) -> str:
    return f"{score:.{SCORE_DIGITS}f}"


def decide(score: float, threshold: float | None) -> bool | None:
    """The pipeline's rule: anomalous when score >= threshold; None without a threshold."""
    return None if threshold is None else bool(score >= threshold)


def image_threshold(result: dict, current: float | None, per_category: bool = False) -> float | None:
    """The threshold that decides one image in the app.

    One threshold for all (`per_category=False`): the slider's value `current`. Per category: the
    image's own threshold as the pipeline chose it (`result["threshold"]`: its category's calibrated
    one, else the pooled one) times the slider's factor `current`; None when either is missing.
    """
    if not per_category:
        return current
    if current is None or result.get("threshold") is None:
        return None
    return float(result["threshold"]) * float(current)


def _display_name(path: str) -> str:
    # Gradio keeps the uploaded file's own name as the last path part (in a per-upload folder).
    return Path(path).name


def _figures():
    """`cnc_hf.figures`, the one renderer of results: in a Space (no cnc_hf) its copy `cnc_figures`, which
    cnc_hf.space writes beside this file; None when neither exists."""
    try:
        from cnc_hf import figures
    except ImportError:
        try:
            import cnc_figures as figures
        except ImportError:
            return None
    return figures


def _thumbnail(path: str) -> PIL.Image.Image:
    """The input image, small (the panel's tile), read as the pipeline reads it where cnc_hf is installed."""
    try:
        from cnc_hf.modeling.image_processing_cnc import load_rgb
    except ImportError:  # a Space: the file was just scored by the pipeline, so PIL reads it
        return _small(PIL.ImageOps.exif_transpose(PIL.Image.open(path)).convert("RGB"))
    return _small(load_rgb(path))


def _small(image: PIL.Image.Image) -> PIL.Image.Image:
    small = image.copy()
    small.thumbnail((PANEL_TILE, PANEL_TILE))
    return small


def score_files(detector, paths: Sequence[str], heatmap_range: tuple[float, float] | None,
                category: str | None = None) -> tuple[list, list[str]]:
    """Run the pipeline on each file on its own, so that one unreadable file does not fail the rest.

    `category`: the product category of every image (the pipeline's `category=`); None: the pipeline
    recognises each image's category where the model can.

    Returns (results, errors): results are dicts {name, score, anomaly_map, heatmap, image (a small
    copy of the input), category, threshold, threshold_source (the pipeline's, see `image_threshold`),
    colour_range (what the heat map's blue..red spans; None: the map's own min..max), map_range (the
    map's min, max)}; errors are readable one-line messages naming the file (without the server's temp path).
    """
    results, errors = [], []
    for path in paths:
        name = _display_name(path)
        kwargs = {k: v for k, v in (("heatmap_range", heatmap_range), ("category", category)) if v}
        try:
            out = detector(path, **kwargs)
        except ValueError as err:  # the pipeline's message for unusable inputs
            # Keep the innermost reason ("cannot identify image file ..."), named by the upload's own name.
            reason = str(err).replace(str(path), name).rsplit(": ", 1)[-1]
            errors.append(f"{name} is not an image this app can read ({reason}).")
            continue
        except Exception as err:  # noqa: BLE001  keep serving; say what happened
            errors.append(f"{name}: could not be scored ({type(err).__name__}: {err})")
            continue
        threshold = out.get("threshold")
        # The pipeline's colour scale: the given range, else 0..2x the threshold that decided, else min..max.
        colour_range = heatmap_range or ((0.0, 2.0 * threshold) if threshold is not None and threshold > 0 else None)
        amap = np.asarray(out["anomaly_map"], dtype=np.float32)
        results.append({"name": name, "score": float(out["score"]), "anomaly_map": out["anomaly_map"],
                        "heatmap": out["heatmap"], "image": _thumbnail(path),
                        "category": out.get("category"), "threshold": threshold,
                        "threshold_source": out.get("threshold_source"), "colour_range": colour_range,
                        "map_range": (float(np.nanmin(amap)), float(np.nanmax(amap)))})
    return results, errors


def results_table(results: Sequence[dict], threshold: float | None, per_category: bool = False) -> list[list[str]]:
    """Rows of TABLE_HEADERS: image, category ("-": none named), score, the threshold that decides it, decision."""
    rows = []
    for r in results:
        t = image_threshold(r, threshold, per_category)
        rows.append([r["name"], r.get("category") or "-", format_score(r["score"]),
                     "-" if t is None else format_score(t), DECISIONS[decide(r["score"], t)]])
    return rows


def rule_text(threshold: float | None, per_category: bool = False) -> str:
    """Which rule decides, in words (the summary line and the panel's caption say it)."""
    if per_category:
        return f"each image's own threshold x {threshold:.{FACTOR_DIGITS}f} (1.0 = as calibrated)"
    return f"threshold {format_score(threshold)}"


def summary_markdown(results: Sequence[dict], threshold: float | None, errors: Sequence[str] = (),
                     per_category: bool = False) -> str:
    """The status line above the results: counts at the threshold (or the factor), then any per-file errors."""
    lines = []
    if results:
        decisions = [decide(r["score"], image_threshold(r, threshold, per_category)) for r in results]
        flagged, undecided = sum(d is True for d in decisions), sum(d is None for d in decisions)
        if undecided == len(results):
            lines.append(f"Scored {len(results)} image(s); no threshold yet, so no decision.")
        else:
            line = (f"Scored {len(results)} image(s): **{flagged} anomalous**, {len(results) - flagged - undecided} "
                    f"normal at {rule_text(threshold, per_category)}")
            lines.append(line + (f"; {undecided} without a threshold (no decision)." if undecided else "."))
    for error in errors:
        lines.append(f"**Error**: {error}")
    if errors and not results:
        lines.append("Upload image files (PNG, JPEG, BMP, TIFF, WebP).")
    return "\n\n".join(lines)


def panel_example(result: dict, threshold: float | None, per_category: bool = False):
    """The selected image as a `cnc_hf.figures.Example`, decided by the app's rule (the slider's)."""
    Example = _figures().Example

    t = image_threshold(result, threshold, per_category)
    if t is None:
        source = None
    elif per_category:  # "threshold x factor", with where the image's own threshold came from
        source = f"{result.get('threshold_source') or 'own'} x {threshold:.{FACTOR_DIGITS}f}"
    else:
        source = "slider"
    return Example(image=result["image"], overlay=result["heatmap"], score=float(result["score"]), threshold=t,
                   threshold_source=source, is_anomaly=decide(result["score"], t), category=result.get("category"),
                   name=result["name"])


def panel_value_range(result: dict, threshold: float | None, per_category: bool = False):
    """`value_range` for the panel's colour bar: None when the heat map spans 0..2x the deciding threshold
    (the bar then says "threshold" at its middle), else the numbers the colours really span."""
    t = image_threshold(result, threshold, per_category)
    colour_range = result.get("colour_range")
    if colour_range is None:  # coloured by the map's own min..max
        return None if t is None else tuple(result["map_range"])
    if t is not None and math.isclose(colour_range[0], 0.0, abs_tol=1e-12) and math.isclose(colour_range[1], 2 * t):
        return None
    return tuple(colour_range)


def selected_panel(result: dict, threshold: float | None, per_category: bool = False) -> PIL.Image.Image:
    """The selected image's view: `cnc_hf.figures.render_examples` of its `panel_example` (image | heat map,
    caption, colour bar). Without cnc_hf (a Space) the pipeline's heat map alone; the table has its numbers."""
    figures = _figures()
    if figures is None:
        return result["heatmap"]
    return figures.render_examples([panel_example(result, threshold, per_category)], tile=PANEL_TILE,
                                   value_range=panel_value_range(result, threshold, per_category))


def render_raw_map(anomaly_map: np.ndarray, threshold: float | None = None, max_side: int = RAW_MAP_SIDE) -> PIL.Image.Image:
    """Deprecated: the app shows `selected_panel` (`cnc_hf.figures.render_examples`) instead of a raw map.

    The map alone, coloured as the pipeline colours it (blue = 0, green = `threshold`, red = twice it;
    without a threshold its own min..max), above `cnc_hf.figures.colour_bar`.
    """
    import warnings

    from cnc_hf.figures import colour_bar
    from cnc_hf.modeling.heatmap import overlay_heatmap, threshold_range

    warnings.warn("cnc_hf.app.render_raw_map is deprecated and will be removed; the app draws the selected image "
                  "with cnc_hf.figures.render_examples (see cnc_hf.app.selected_panel)", FutureWarning, stacklevel=2)
    amap = np.nan_to_num(np.asarray(anomaly_map, dtype=np.float32))
    scale = max_side / max(amap.shape)
    size = (max(1, round(amap.shape[1] * scale)), max(1, round(amap.shape[0] * scale)))
    known = threshold is not None and threshold > 0
    coloured = overlay_heatmap(PIL.Image.new("RGB", size), amap, threshold_range(threshold),
                               alpha=1.0, max_side=max(size))
    bar = colour_bar(coloured.width, thresholds_known=known)
    canvas = PIL.Image.new("RGB", (coloured.width, coloured.height + 4 + bar.height), "white")
    canvas.paste(coloured, (0, 0))
    canvas.paste(bar, (0, coloured.height + 4))
    return canvas


def slider_limit(values: Sequence[float]) -> float:
    """A round upper end for the threshold slider that leaves room above the largest value."""
    top = max([v for v in values if v is not None and math.isfinite(v)] + [0.0])
    if top <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(top * 1.5))
    return math.ceil(top * 1.5 / magnitude) * magnitude


# --------------------------------------------------------------------------- the app
def starting_rule(detector, threshold: float | None = None, example_paths: Sequence[str] = ()) -> dict:
    """Which rule decides in the app, and where the slider starts (said on the page).

    Returns {per_category, start, source, heatmap_range, slider_max}. Per category when the model has
    `config.category_thresholds` and no `threshold=` overrides them (the pipeline's precedence): the
    slider is a factor on each image's own threshold, starting at 1.0. Otherwise one threshold for all,
    starting at `threshold=`, `config.threshold`, or a median score (see the module docstring).
    """
    config = detector.model.config
    if threshold is None and getattr(config, "category_thresholds", None):
        return {"per_category": True, "start": 1.0, "heatmap_range": None, "slider_max": slider_limit([2.0]),
                "source": "each image is decided at its own category's calibrated threshold "
                          "(config.category_thresholds; the pooled config.threshold for an image of no known "
                          "category) times this factor: 1.0 = as calibrated, below 1 flags more, above 1 fewer"}
    calibrated = getattr(config, "threshold", None)
    if threshold is not None:
        start, source = float(threshold), "set when the app was started"
    elif calibrated is not None:
        start, source = float(calibrated), "the model's calibrated threshold (config.threshold)"
    elif example_paths:
        scores = [r["score"] for r in score_files(detector, example_paths, None)[0]]
        start = statistics.median(scores) if scores else None
        source = (f"the model has no calibrated threshold; this is the median score of the {len(scores)} example "
                  "images, a rough default only" if scores else None)
    else:
        start, source = None, None
    if start is None:
        source = ("the model has no calibrated threshold; the slider will start at the median score of your first "
                  "upload, a rough default only, and each heat map is coloured by its own min..max")
    source = "one threshold for all images, " + source
    # Fixed heat-map colours (the pipeline's scale: green at the starting threshold).
    heatmap_range = (0.0, 2.0 * start) if start is not None and start > 0 else None
    return {"per_category": False, "start": start, "source": source, "heatmap_range": heatmap_range,
            "slider_max": slider_limit([start or 0.0])}


def build_app(model_or_dir: Any, threshold: float | None = None, examples: Any = None,
              trust_remote_code: bool = False, device: Any = None, title: str | None = None):
    """Build (not launch) the Gradio app for a model dir, Hub id, CNCModel or anomaly-map pipeline.

    `examples`: a folder or a list of image paths shown as clickable examples (None: none).
    `trust_remote_code=True` runs the code saved with the model instead of the installed cnc_hf
    (what a Space does). Returns a `gr.Blocks`; call `.launch()` on it.
    """
    import gradio as gr

    detector = load_detector(model_or_dir, trust_remote_code=trust_remote_code, device=device)
    example_paths = find_examples(examples)
    config = detector.model.config
    model_name = os.fspath(model_or_dir) if isinstance(model_or_dir, (str, os.PathLike)) else \
        getattr(config, "_name_or_path", "") or type(detector.model).__name__
    rule = starting_rule(detector, threshold, example_paths)
    categories = sorted(config.category_thresholds) if rule["per_category"] else None
    with gr.Blocks(title=title or "CNC anomaly detection") as app:
        parts = _layout(title or "CNC anomaly detection", model_name, rule, categories, example_paths)
        _connect(_AppCallbacks(detector, rule), parts)
    return app


class _AppCallbacks:
    """The app's callbacks. What they share: the detector, and the rule that decides (`starting_rule`).

    Per session state (the kept results, the slider's session start, the selected image) lives in
    `gr.State`s and comes in as arguments.
    """

    def __init__(self, detector, rule: dict):
        self.detector = detector
        self.per_category = rule["per_category"]
        self.start = rule["start"]
        self.heatmap_range = rule["heatmap_range"]
        self.slider_max = rule["slider_max"]

    def slider_values(self, results: Sequence[dict]) -> list[float]:
        """What the slider is compared with: the scores, or per category each score / its own threshold."""
        if not self.per_category:
            return [r["score"] for r in results]
        return [r["score"] / r["threshold"] for r in results if r["threshold"]]

    def score(self, paths, current, session_start, category):
        """Upload (or another category chosen) -> scores, decisions, heat maps, the first image's panel."""
        import gradio as gr

        category = None if category in (None, RECOGNISE) else category
        paths = [p if isinstance(p, str) else getattr(p, "name", str(p)) for p in (paths or [])]
        if not paths:
            return [], [], [], None, "", gr.update(), session_start
        notes = []
        if len(paths) > MAX_FILES:
            notes.append(f"only the first {MAX_FILES} of {len(paths)} files were scored (one upload is capped)")
            paths = paths[:MAX_FILES]
        results, errors = score_files(self.detector, paths, self.heatmap_range, category)
        errors = notes + errors
        for error in errors:
            gr.Warning(error)
        slider, current, session_start = self._slider_update(results, current, session_start)
        threshold_now = current if (self.start is not None or session_start is not None) else None
        gallery = [(r["heatmap"], f"{r['name']}  {r['category'] or ''}  {format_score(r['score'])}") for r in results]
        # Kept per session: small copies only (the panel draws tiles), no full-size map or overlay.
        kept = [dict({k: v for k, v in r.items() if k != "anomaly_map"}, heatmap=_small(r["heatmap"]))
                for r in results]
        panel = selected_panel(kept[0], threshold_now, self.per_category) if kept else None
        return (kept, results_table(results, threshold_now, self.per_category), gallery, panel,
                summary_markdown(results, threshold_now, errors, self.per_category), slider, session_start)

    def _slider_update(self, results: Sequence[dict], current, session_start):
        """(slider update, slider value, session start): a model without a starting threshold starts at the
        median score of the session's first upload; the slider grows to hold every value it is compared with."""
        import gradio as gr

        if self.start is None and session_start is None and results:
            session_start = current = float(statistics.median(r["score"] for r in results))
            return gr.update(value=current, maximum=slider_limit([current] + [r["score"] for r in results])), \
                current, session_start
        if results and max(self.slider_values(results) + [0.0]) > self.slider_max:
            return gr.update(maximum=slider_limit([current] + self.slider_values(results))), current, session_start
        return gr.update(), current, session_start

    def redecide(self, results, current, selected):
        """Slider moved: new decisions from the kept scores; the model does not run again."""
        results = results or []
        panel = selected_panel(results[selected], current, self.per_category) \
            if results and selected < len(results) else None
        table_rows = results_table(results, current, self.per_category)
        return table_rows, summary_markdown(results, current, (), self.per_category), panel

    def select(self, results, current, index):
        """A heat map or a table row was clicked (`index` from the event): show that image's panel."""
        import gradio as gr

        index = index[0] if isinstance(index, (list, tuple)) else index
        if not results or index is None or not 0 <= index < len(results):
            return gr.update(), 0
        return selected_panel(results[index], current, self.per_category), index


def _layout(title: str, model_name: str, rule: dict, categories: Sequence[str] | None,
            example_paths: Sequence[str]) -> dict:
    """The page, inside the caller's `gr.Blocks`: the intro, the inputs (left), the results (right).

    Returns the components the callbacks read or write, by name.
    """
    import gradio as gr

    green = "the image's own (category) threshold" if rule["per_category"] else "the starting threshold"
    gr.Markdown(
        f"# {title}\n"
        f"Model: `{model_name}`. Upload one or several images: each gets an anomaly score (the maximum "
        "of its anomaly map), its category, a decision at its threshold, and a heat map (blue = 0, "
        f"green = {green}, red = twice it). Click a heat map or a row to see that image's labelled panel.",
        elem_id="intro",
    )
    with gr.Row():
        with gr.Column(scale=1):
            parts = _input_column(rule, categories, example_paths)
        with gr.Column(scale=2):
            parts["status"] = gr.Markdown(elem_id="status")
            parts["table"] = gr.Dataframe(headers=TABLE_HEADERS, datatype=["str"] * len(TABLE_HEADERS),
                                          interactive=False, label="Results", elem_id="results")
            parts["gallery"] = gr.Gallery(label="Heat maps", columns=4, height="auto", elem_id="heatmaps")
            # No label badge: it would cover the panel's own column headers, and the panel labels itself.
            parts["panel"] = gr.Image(label="Selected image: score, threshold, decision, colour scale",
                                      show_label=False, type="pil", interactive=False, elem_id="selected")
    parts["results"], parts["session_start"], parts["selected"] = gr.State([]), gr.State(None), gr.State(0)
    return parts


def _input_column(rule: dict, categories: Sequence[str] | None, example_paths: Sequence[str]) -> dict:
    """The upload, the threshold slider and its rule, the category menu (per category only), the examples."""
    import gradio as gr

    files = gr.File(label="Images", file_count="multiple", elem_id="upload")
    if rule["per_category"]:
        label, step = "Threshold factor (score >= factor x the image's own threshold: anomaly)", 10 ** -FACTOR_DIGITS
    else:
        label, step = "Decision threshold (score >= threshold: anomaly)", 10 ** -SCORE_DIGITS
    slider = gr.Slider(0.0, rule["slider_max"], value=rule["start"] if rule["start"] is not None else 0.0,
                       step=step, label=label, elem_id="threshold")
    gr.Markdown(f"Decision rule: {rule['source']}.", elem_id="threshold-source")
    if categories is not None:  # the caller's category=, for a model that cannot recognise it or a known line
        category_menu = gr.Dropdown([RECOGNISE] + list(categories), value=RECOGNISE,
                                    label="Category of the images (scores them again when changed)",
                                    elem_id="category")
    else:
        category_menu = gr.State(None)
    if example_paths:
        gr.Examples(examples=[[example_paths]] + [[[p]] for p in example_paths], inputs=[files],
                    label="Examples (the first row: all of them)", examples_per_page=MAX_EXAMPLES + 1)
    return {"files": files, "slider": slider, "category": category_menu}


def _connect(callbacks: _AppCallbacks, parts: dict) -> None:
    """Wire the events, inside the caller's `gr.Blocks`: upload or category -> score, slider -> redecide,
    click -> select."""
    import gradio as gr

    # Gradio passes the click event to a parameter annotated gr.SelectData; gradio is imported lazily, so the
    # annotation can only be written here.
    def select(results, current, evt: gr.SelectData):
        return callbacks.select(results, current, evt.index)

    files, slider, category_menu = parts["files"], parts["slider"], parts["category"]
    outputs = [parts[k] for k in ("results", "table", "gallery", "panel", "status")] + \
        [slider, parts["session_start"]]
    inputs = [files, slider, parts["session_start"], category_menu]
    files.change(callbacks.score, inputs, outputs).then(lambda: 0, None, parts["selected"])
    if callbacks.per_category:
        category_menu.change(callbacks.score, inputs, outputs).then(lambda: 0, None, parts["selected"])
    slider.change(callbacks.redecide, [parts["results"], slider, parts["selected"]],
                  [parts["table"], parts["status"], parts["panel"]])
    for clicked in (parts["gallery"], parts["table"]):
        clicked.select(select, [parts["results"], slider], [parts["panel"], parts["selected"]])


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnc-hf app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model dir saved by cnc-hf, or a Hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; "
                                                             "0.0.0.0 exposes the app to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--examples", default=None,
                        help="a folder of example images (default: 6 demo-dataset test images, made once)")
    parser.add_argument("--no_examples", action="store_true", help="show no examples")
    parser.add_argument("--threshold", type=float, default=None,
                        help="starting decision threshold (default: the model's calibrated one)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: cpu)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run the code saved with the model instead of the installed cnc_hf")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Usage analytics off unless the user turned them on: an inspection tool should not phone home.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("cnc-hf app needs gradio: pip install gradio (or pip install -e '.[app]' in the cnc-hf clone)",
              file=sys.stderr)
        return 1
    if args.no_examples:
        examples = None
    elif args.examples is not None:
        examples = args.examples
    else:
        examples = demo_examples()
    try:
        app = build_app(args.model, threshold=args.threshold, examples=examples, device=args.device,
                        trust_remote_code=args.trust_remote_code)
    except (ValueError, OSError, ImportError) as err:
        print(f"cnc-hf app: {err}", file=sys.stderr)
        return 1
    app.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
