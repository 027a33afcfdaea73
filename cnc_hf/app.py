"""`cnc-hf app`: try a CNC anomaly detector in the browser (Gradio).

    pip install -e ".[app]"
    cnc-hf app --model demo_output/model            # or a Hub id; http://127.0.0.1:7860

Drop in one or several images and get, per image, the anomaly score, the decision at a threshold
(a slider, starting at the model's calibrated threshold), the heat-map overlay and the raw anomaly
map of the selected image. Moving the slider re-decides from the scores already computed; the
model runs only when images are uploaded. A file that is not an image gets a readable message in
the page, and the other files of the same upload are still scored.

This file is also the app of a Hugging Face Space (`cnc_hf.space.write_space_files` copies it
verbatim as `cnc_app.py`). That is why it imports only gradio, numpy, PIL and transformers at
module level: in a Space cnc-hf is not installed and the model's own code comes from the model
repo (`trust_remote_code=True`). cnc_hf is imported lazily, only where it is installed.

Threshold, in this order: `threshold=` (`--threshold`), the model's `config.threshold` (calibrated
on held-out normal images by cnc-hf's trainer), the median score of the example images, the
median score of the first upload. The page says which one it uses.
Heat-map colours are fixed for the whole app so that images compare: blue = 0, green = that
starting threshold, red = twice it (the pipeline's own scale); they do not follow the slider.
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
import PIL.ImageFont

TASK = "image-anomaly-detection"
SCORE_DIGITS = 6  # the table shows scores with this many decimals (the browser test compares them)
MAX_FILES = 32  # per upload: bounds the work (and the maps kept in memory) of one request
MAX_EXAMPLES = 12
RAW_MAP_SIDE = 384  # display size of the raw map (the long side)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DECISIONS = {True: "ANOMALY", False: "normal", None: "-"}


# --------------------------------------------------------------------------- model and examples
def load_detector(model_or_dir: Any, trust_remote_code: bool = False, device: Any = None):
    """The anomaly-map pipeline for a model dir / Hub id, a CNCModel, or a pipeline (returned as is).

    With `trust_remote_code=True` the pipeline comes from the code saved in the model repo and
    cnc_hf is not imported at all (the Space path); otherwise the installed cnc_hf serves it.
    """
    if callable(model_or_dir) and hasattr(model_or_dir, "model") and hasattr(model_or_dir, "postprocess"):
        return model_or_dir  # already a pipeline
    if hasattr(model_or_dir, "config") and hasattr(model_or_dir, "forward"):  # a CNCModel instance
        from cnc_hf.pipeline import AnomalyMapPipeline

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


def _display_name(path: str) -> str:
    # Gradio keeps the uploaded file's own name as the last path part (in a per-upload folder).
    return Path(path).name


def score_files(detector, paths: Sequence[str], heatmap_range: tuple[float, float] | None) -> tuple[list, list[str]]:
    """Run the pipeline on each file on its own, so that one unreadable file does not fail the rest.

    Returns (results, errors): results are dicts {name, score, anomaly_map, heatmap}; errors are
    readable one-line messages naming the file (without the server's temp path).
    """
    results, errors = [], []
    for path in paths:
        name = _display_name(path)
        try:
            out = detector(path, heatmap_range=heatmap_range) if heatmap_range else detector(path)
        except ValueError as err:  # the pipeline's message for unusable inputs
            # Keep the innermost reason ("cannot identify image file ..."), named by the upload's own name.
            reason = str(err).replace(str(path), name).rsplit(": ", 1)[-1]
            errors.append(f"{name} is not an image this app can read ({reason}).")
            continue
        except Exception as err:  # noqa: BLE001  keep serving; say what happened
            errors.append(f"{name}: could not be scored ({type(err).__name__}: {err})")
            continue
        results.append({"name": name, "score": float(out["score"]), "anomaly_map": out["anomaly_map"],
                        "heatmap": out["heatmap"]})
    return results, errors


def results_table(results: Sequence[dict], threshold: float | None) -> list[list[str]]:
    return [[r["name"], format_score(r["score"]), DECISIONS[decide(r["score"], threshold)]] for r in results]


def summary_markdown(results: Sequence[dict], threshold: float | None, errors: Sequence[str] = ()) -> str:
    """The status line above the results: counts at the threshold, then any per-file errors."""
    lines = []
    if results:
        flagged = sum(bool(decide(r["score"], threshold)) for r in results)
        if threshold is None:
            lines.append(f"Scored {len(results)} image(s); no threshold yet, so no decision.")
        else:
            lines.append(f"Scored {len(results)} image(s): **{flagged} anomalous**, {len(results) - flagged} normal "
                         f"at threshold {format_score(threshold)}.")
    for error in errors:
        lines.append(f"**Error**: {error}")
    if errors and not results:
        lines.append("Upload image files (PNG, JPEG, BMP, TIFF, WebP).")
    return "\n\n".join(lines)


def render_raw_map(anomaly_map: np.ndarray, threshold: float | None = None, max_side: int = RAW_MAP_SIDE) -> PIL.Image.Image:
    """The anomaly map as grayscale (black = its minimum, white = its maximum) above a legend bar.

    The legend prints the minimum and maximum values and marks the threshold (red tick) when it
    falls inside that range, so the raw numbers can be read off the picture.
    """
    amap = np.nan_to_num(np.asarray(anomaly_map, dtype=np.float32))
    low, high = float(amap.min()), float(amap.max())
    span = high - low
    gray = ((amap - low) / span * 255.0) if span > 0 else np.zeros_like(amap)
    image = PIL.Image.fromarray(np.round(gray).astype(np.uint8), "L")
    scale = min(1.0, max_side / max(image.size)) if max(image.size) > max_side else max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # Upscaling a small map: nearest keeps the model's patches visible instead of blurring them.
    resample = PIL.Image.Resampling.NEAREST if scale > 1 else PIL.Image.Resampling.BILINEAR
    image = image.resize(size, resample).convert("RGB")

    bar_height, text_height, pad = 14, 16, 4
    canvas = PIL.Image.new("RGB", (image.width, image.height + pad + bar_height + text_height), "white")
    canvas.paste(image, (0, 0))
    ramp = np.tile(np.linspace(0, 255, image.width, dtype=np.float32).round().astype(np.uint8), (bar_height, 1))
    canvas.paste(PIL.Image.fromarray(ramp, "L").convert("RGB"), (0, image.height + pad))
    draw = PIL.ImageDraw.Draw(canvas)
    font = PIL.ImageFont.load_default()
    text_y = image.height + pad + bar_height + 2
    draw.text((2, text_y), f"min {format_score(low)}", fill="black", font=font)
    right = f"max {format_score(high)}"
    draw.text((image.width - 2 - draw.textlength(right, font=font), text_y), right, fill="black", font=font)
    if threshold is not None and span > 0 and low <= threshold <= high:
        x = round((threshold - low) / span * (image.width - 1))
        draw.line([(x, image.height + pad - 2), (x, image.height + pad + bar_height)], fill="red", width=3)
    return canvas


def slider_limit(values: Sequence[float]) -> float:
    """A round upper end for the threshold slider that leaves room above the largest value."""
    top = max([v for v in values if v is not None and math.isfinite(v)] + [0.0])
    if top <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(top * 1.5))
    return math.ceil(top * 1.5 / magnitude) * magnitude


# --------------------------------------------------------------------------- the app
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

    # The starting threshold and where it comes from (said on the page).
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
    # Fixed heat-map colours (the pipeline's scale: green at the starting threshold).
    heatmap_range = (0.0, 2.0 * start) if start is not None and start > 0 else None
    slider_max = slider_limit([start or 0.0])

    def score(paths, current, session_start):
        """Upload -> scores, decisions, heat maps, the first image's raw map."""
        paths = [p if isinstance(p, str) else getattr(p, "name", str(p)) for p in (paths or [])]
        if not paths:
            return [], [], [], None, "", gr.update(), session_start
        notes = []
        if len(paths) > MAX_FILES:
            notes.append(f"only the first {MAX_FILES} of {len(paths)} files were scored (one upload is capped)")
            paths = paths[:MAX_FILES]
        results, errors = score_files(detector, paths, heatmap_range)
        errors = notes + errors
        for error in errors:
            gr.Warning(error)
        slider = gr.update()
        if start is None and session_start is None and results:
            session_start = current = float(statistics.median(r["score"] for r in results))
            slider = gr.update(value=current, maximum=slider_limit([current] + [r["score"] for r in results]))
        elif results and max(r["score"] for r in results) > slider_max:
            slider = gr.update(maximum=slider_limit([current] + [r["score"] for r in results]))
        threshold_now = current if (start is not None or session_start is not None) else None
        gallery = [(r["heatmap"], f"{r['name']}  {format_score(r['score'])}") for r in results]
        raw = render_raw_map(results[0]["anomaly_map"], threshold_now) if results else None
        kept = [{k: r[k] for k in ("name", "score", "anomaly_map")} for r in results]  # the overlays are shown, not kept
        return (kept, results_table(results, threshold_now), gallery, raw,
                summary_markdown(results, threshold_now, errors), slider, session_start)

    def redecide(results, current, selected):
        """Slider moved: new decisions from the kept scores; the model does not run again."""
        results = results or []
        raw = render_raw_map(results[selected]["anomaly_map"], current) if results and selected < len(results) else None
        return results_table(results, current), summary_markdown(results, current), raw

    def select(results, current, evt: gr.SelectData):
        """A heat map or a table row was clicked: show that image's raw map."""
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not results or index is None or not 0 <= index < len(results):
            return gr.update(), 0
        return render_raw_map(results[index]["anomaly_map"], current), index

    with gr.Blocks(title=title or "CNC anomaly detection") as app:
        gr.Markdown(
            f"# {title or 'CNC anomaly detection'}\n"
            f"Model: `{model_name}`. Upload one or several images: each gets an anomaly score (the maximum "
            "of its anomaly map), a decision at the threshold, and a heat map (blue = 0, green = the starting "
            "threshold, red = twice it). Click a heat map or a row to see its raw map.",
            elem_id="intro",
        )
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images", file_count="multiple", elem_id="upload")
                threshold_slider = gr.Slider(0.0, slider_max, value=start if start is not None else 0.0,
                                             step=10 ** -SCORE_DIGITS, label="Decision threshold (score >= threshold: anomaly)",
                                             elem_id="threshold")
                gr.Markdown(f"Threshold source: {source}.", elem_id="threshold-source")
                if example_paths:
                    gr.Examples(examples=[[example_paths]] + [[[p]] for p in example_paths], inputs=[files],
                                label="Examples (the first row: all of them)", examples_per_page=MAX_EXAMPLES + 1)
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                table = gr.Dataframe(headers=["image", "score", "decision"], datatype=["str", "str", "str"],
                                     interactive=False, label="Results", elem_id="results")
                gallery = gr.Gallery(label="Heat maps", columns=4, height="auto", elem_id="heatmaps")
                raw_map = gr.Image(label="Raw anomaly map of the selected image (black = min, white = max)",
                                   type="pil", interactive=False, elem_id="raw-map")
        results_state, session_start, selected = gr.State([]), gr.State(None), gr.State(0)

        files.change(score, [files, threshold_slider, session_start],
                     [results_state, table, gallery, raw_map, status, threshold_slider, session_start]
                     ).then(lambda: 0, None, selected)
        threshold_slider.change(redecide, [results_state, threshold_slider, selected], [table, status, raw_map])
        gallery.select(select, [results_state, threshold_slider], [raw_map, selected])
        table.select(select, [results_state, threshold_slider], [raw_map, selected])
    return app


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
