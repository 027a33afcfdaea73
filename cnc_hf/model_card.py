"""The model card of a CNC model: README.md rendered from a template in `model_cards/`.

    build_model_card(model_dir, repo_id="org/cnc-mvtec")   # a huggingface_hub ModelCard; writes nothing
    write_model_card(model_dir, metrics=None, dataset="mvtec")   # README.md (+ training_args.json, heat map)

The metadata is huggingface_hub's `ModelCardData`, the text a Jinja template filled from the
measured results (`metrics.json`), the config and the training arguments.

Card metadata decisions:
- `pipeline_tag: other`. The Hub knows no anomaly-detection task, and every vision task it knows
  promises an output format this model does not have (image-segmentation: a list of labelled masks;
  image-classification: a list of labels with scores), which the Hub's widgets and filters would
  then assume. "other" is the Hub's own tag for a task outside its list. The real task name,
  "image-anomaly-detection", is a tag (with anomaly-detection), `library_name` is transformers, and
  the card says to use `trust_remote_code=True`.
- `base_model`: the CLIP checkpoint the model was built from (`--clip_model`), when it is a Hub id.
  The config does not record it (transformers leaves the nested CLIP config's name empty); a local
  CLIP folder is named in the hyperparameter table only, since its Hub origin is unknown.
- `datasets`: Hub dataset ids only (the Hub links each one): the training data set when it was a
  Hub id, or `dataset_id=` when you pushed the data yourself. MVTec AD and VisA read from a local
  folder have no Hub id of their own; the card's text and model-index name them.
- `model-index` values are percentages (2 decimals), like the paper and the card's table;
  metrics.json keeps fractions in [0, 1]. One result per category (dataset config = category)
  and one for the mean over categories (no config), the paper's "Mean" row.
- The paper's own numbers appear in the card as a labelled reference, never in model-index.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

from cnc_hf.hub_ids import looks_like_hub_id
from cnc_hf.metrics import METRIC_KEYS as _ALL_METRIC_KEYS
from cnc_hf.metrics import METRIC_NAMES, PAPER_KEYS
from cnc_hf.model_dir import HEATMAP_EXAMPLE, ModelDirError, read_json

PIPELINE_TAG = "other"
TASK_NAME = "Anomaly detection and localization"
LIBRARY_NAME = "transformers"
TAGS = ["anomaly-detection", "image-anomaly-detection", "visual-anomaly-detection", "industrial-inspection",
        "cnc", "clip", "custom_code"]

TEMPLATES = {"mvtec": "cnc-mvtec.md", "visa": "cnc-visa.md", "generic": "generic.md"}
DATASETS = {  # --dataset kind -> (dataset type for model-index, name in the card, what the card says of it)
    "mvtec": ("mvtec_ad", "MVTec AD", None),
    "visa": ("visa", "VisA", None),
    "demo": ("cnc-hf-demo", "cnc-hf demo textures",
             "Crops of three texture photographs shipped with scikit-image (brick, grass, gravel; CC0) with "
             "synthetic defects drawn by cnc-hf: a stand-in that runs offline, not an inspection data set."),
    "folder": ("image-folders", "private image folders",
               "The trainer's own images (`--dataset folder`), which are not published with the model."),
}
LICENSES = {"mvtec": "cc-by-nc-sa-4.0", "visa": "cc-by-4.0"}  # the data's terms; otherwise apache-2.0

# The card's metrics, in the paper's column order then the F1-max ones; names from cnc_hf.metrics.
METRIC_KEYS = PAPER_KEYS + tuple(key for key in _ALL_METRIC_KEYS if key not in PAPER_KEYS)
_HUB_METRIC_TYPES = {"auroc": "roc_auc", "ap": "average_precision", "f1_max": "f1", "aupro": "aupro"}
# (metrics.json key, short name as in the paper, Hub metric type), e.g. ("image_ap", "I-AP", "average_precision")
METRICS = tuple((key, METRIC_NAMES[key], _HUB_METRIC_TYPES[key.split("_", 1)[-1]]) for key in METRIC_KEYS)

CITATION = """@inproceedings{wang2025cnc,
  title     = {{CNC}: Cross-modal Normality Constraint for Unsupervised Multi-class Anomaly Detection},
  author    = {Wang, Xiaolei and Wang, Xiaoyang and Bai, Huihui and Lim, Eng Gee and Xiao, Jimin},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year      = {2025}
}"""

# Training arguments that describe the machine, not the model: never published.
_PRIVATE_ARGS = ("output_dir", "overwrite_output_dir", "data_dir", "cache_dir", "resume", "report_to",
                 "no_progress", "num_workers", "token")


# --------------------------------------------------------------------------- templates
def templates_dir() -> Path:
    """The model-card templates: the `cnc_hf.model_cards` package (the repository's `model_cards/`
    folder, mapped there by pyproject.toml; package data of the wheel)."""
    import cnc_hf.model_cards

    candidate = Path(cnc_hf.model_cards.__file__).resolve().parent
    if (candidate / TEMPLATES["generic"]).is_file():
        return candidate
    raise FileNotFoundError(
        f"model card templates not found at {candidate}; reinstall cnc-hf (its wheel ships them as package data)"
    )


def template_name_for(dataset: Any) -> str:
    """"mvtec" / "visa" when the dataset name says so (a name, a folder or a Hub id), else "generic"."""
    name = str(dataset or "").lower()
    if "mvtec" in name:
        return "mvtec"
    if re.search(r"(^|[^a-z])visa([^a-z]|$)", name):
        return "visa"
    return "generic"


def template_path(template: str | os.PathLike | None = None, dataset: Any = None) -> Path:
    """A template by name ("mvtec", "visa", "generic"), by path, or chosen from `dataset`."""
    if template is None:
        template = template_name_for(dataset)
    if str(template) in TEMPLATES:
        return templates_dir() / TEMPLATES[str(template)]
    path = Path(template)
    if not path.is_file():
        raise ValueError(f"template: {template!r} is neither one of {sorted(TEMPLATES)} nor an existing file")
    return path


# --------------------------------------------------------------------------- metrics -> card data
def _check_metric(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"metrics{where}: got {value!r}; expected a fraction in [0, 1] (metrics.json stores fractions)")
    return float(value)


def _metric_rows(metrics: Mapping[str, Any]) -> list[tuple[str | None, dict[str, float]]]:
    """[(category or None for the mean/pooled row, {key: fraction})], validated.

    A metric that is None (null in metrics.json: pixel metrics where no anomalous image has a mask) is
    absent, so model-index never reports a value that was not measured; the table shows it as "-".
    """
    rows = []
    per_category = metrics.get("per_category") or {}
    summary = metrics.get("mean") if per_category else metrics
    if summary:
        rows.append((None, {k: _check_metric(summary[k], f"[{k!r}]") for k in METRIC_KEYS
                            if summary.get(k) is not None}))
    for category, values in per_category.items():
        rows.append((str(category), {k: _check_metric(values[k], f"['per_category'][{category!r}][{k!r}]")
                                     for k in METRIC_KEYS if values.get(k) is not None}))
    return [(c, v) for c, v in rows if v]


def eval_results_from_metrics(metrics: Mapping[str, Any] | None, dataset_type: str, dataset_name: str) -> list:
    """`EvalResult`s for the card's model-index: the mean row and one result per category, in percent."""
    from huggingface_hub import EvalResult

    results = []
    for category, values in _metric_rows(metrics or {}):
        for key, label, metric_type in METRICS:
            if key in values:
                results.append(EvalResult(
                    task_type=PIPELINE_TAG, task_name=TASK_NAME,
                    dataset_type=dataset_type, dataset_name=dataset_name if category is None else f"{dataset_name} / {category}",
                    dataset_config=category, dataset_split="test",
                    metric_type=metric_type, metric_name=label, metric_value=round(100.0 * values[key], 2),
                ))
    return results


def metrics_table(metrics: Mapping[str, Any] | None) -> str | None:
    """The measured results as a markdown table in the paper's layout (cnc_hf.metrics), or None."""
    rows = _metric_rows(metrics or {})
    if not rows:
        return None
    from cnc_hf.metrics import format_metrics_table

    return format_metrics_table(metrics)


# --------------------------------------------------------------------------- training arguments
def public_training_args(training_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """Training arguments fit to publish: machine-specific ones dropped, local paths cut to their name."""
    public = {}
    for key, value in (training_args or {}).items():
        if key in _PRIVATE_ARGS or key.endswith(("_dir", "_path")):
            continue
        if isinstance(value, os.PathLike) or (isinstance(value, str) and os.sep in value and Path(value).exists()):
            value = Path(value).name
        if isinstance(value, tuple):
            value = list(value)
        try:
            json.dumps(value)
        except TypeError:
            value = str(value)
        public[key] = value
    return public


def _hyperparameters(config: Mapping[str, Any], training_args: Mapping[str, Any], summary: Mapping[str, Any]) -> list:
    """(name, value) rows for the card: the model's paper hyperparameters, then the training run."""
    vision = (config.get("clip_config") or {}).get("vision_config") or {}
    rows = [
        ("CLIP backbone", training_args.get("clip_model") or summary.get("clip_model") or "-"),
        ("vision tower", f"{vision.get('num_hidden_layers', '?')} layers, width {vision.get('hidden_size', '?')}, "
                         f"patch {vision.get('patch_size', '?')}"),
        ("input size", f"{config.get('image_size')} x {config.get('image_size')}"),
        ("tapped layers", config.get("feature_layers")),
        ("components (MLF / CNC / MoE)", " / ".join("on" if config.get(k, True) else "off"
                                                    for k in ("use_mlf", "use_cnc", "use_moe"))),
        ("prompt length M", config.get("prompt_length")),
        ("tau / gamma / theta", f"{config.get('tau')} / {config.get('gamma')} / {config.get('theta')}"),
        ("experts T / top-K", f"{config.get('num_experts')} / {config.get('moe_top_k')} ({config.get('moe_gating')})"),
        ("noise std / fusion dropout", f"{config.get('noise_std')} / {config.get('fusion_dropout')}"),
        ("map smoothing sigma / image score", f"{config.get('map_smoothing_sigma')} / {config.get('image_score_reduction')}"),
    ]
    for key in ("epochs", "batch_size", "lr", "seed", "mixed_precision", "calibration_fraction", "threshold_quantile"):
        if training_args.get(key) is not None:
            rows.append((key, training_args[key]))
    for key, label in (("world_size", "processes"), ("num_train_images", "training images"),
                       ("num_calibration_images", "calibration images"), ("mean_epoch_seconds", "seconds per epoch")):
        if summary.get(key) is not None:
            value = summary[key]
            rows.append((label, f"{value:.1f}" if isinstance(value, float) else value))
    return [(name, "-" if value is None else value) for name, value in rows]


# --------------------------------------------------------------------------- heat-map example
def render_heatmap_example(model_dir: str | os.PathLike, image: Any, out_path: str | os.PathLike | None = None,
                           category: str | None = None) -> Path:
    """Run the pipeline of `model_dir` on `image` and save the labelled row of `cnc_hf.figures` (image | heat
    map, a caption with the category, score, threshold and decision, and the colour bar) as PNG."""
    from cnc_hf.figures import Example, render_examples
    from cnc_hf.modeling import CNCModel
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor, load_rgb
    from cnc_hf.modeling.pipeline_cnc import AnomalyMapPipeline

    model_dir = Path(model_dir)
    out_path = Path(out_path) if out_path is not None else model_dir / HEATMAP_EXAMPLE
    pipe = AnomalyMapPipeline(model=CNCModel.from_pretrained(model_dir),
                              image_processor=CNCImageProcessor.from_pretrained(model_dir), device=-1)
    result = pipe(image, category=category)
    name = Path(image).name if isinstance(image, (str, os.PathLike)) else None
    # 288 px tiles: readable on the Hub page whatever the input size.
    render_examples([Example.from_result(load_rgb(image), result, name=name)], tile=288).save(out_path)
    return out_path


def heatmap_example_source(model_dir: str | os.PathLike) -> Path | None:
    """The card's heat-map picture: `heatmap_example.png`, else the first panel training/evaluation wrote
    with --heatmaps (image | overlay | truth, under heatmaps/), which `write_model_card` copies to that name."""
    model_dir = Path(model_dir)
    if (model_dir / HEATMAP_EXAMPLE).is_file():
        return model_dir / HEATMAP_EXAMPLE
    panels = sorted((model_dir / "heatmaps").glob("**/*.png")) if (model_dir / "heatmaps").is_dir() else []
    return panels[0] if panels else None


# --------------------------------------------------------------------------- the card
def _threshold_method(details: Mapping[str, Any]) -> str | None:
    """How the threshold was set, from the trainer's details in metrics.json ("threshold")."""
    method = details.get("method")
    if not method:
        return None
    extras = [f"q = {details['quantile']}" if details.get("quantile") is not None else None,
              f"{details['num_calibration_images']} images" if details.get("num_calibration_images") else None]
    extras = [e for e in extras if e]
    return f"{method}{' (' + ', '.join(extras) + ')' if extras else ''}"


def _dataset_facts(dataset: Any) -> tuple[str, str, str | None]:
    """(model-index dataset type, name in the card, a sentence about it or None) for a --dataset value."""
    text = str(dataset or "")
    kind = text.lower() if text.lower() in DATASETS else template_name_for(dataset)
    if kind in DATASETS:
        dataset_type, name, note = DATASETS[kind]
    else:
        dataset_type = name = Path(text).name if dataset and not looks_like_hub_id(dataset) else (text or "custom")
        note = None
    return (text if looks_like_hub_id(dataset) else dataset_type), name, note


def _card_data(model_name: str, kind: str, dataset: Any, base_model: Any, metrics: Mapping[str, Any],
               license: str | None, dataset_id: str | None):
    """The card's YAML metadata (see the module docstring for each choice)."""
    from huggingface_hub import ModelCardData

    dataset_type, dataset_name, _ = _dataset_facts(dataset)
    hub_dataset = dataset_id or (str(dataset) if looks_like_hub_id(dataset) else None)
    return ModelCardData(
        model_name=model_name,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        license=license or LICENSES.get(kind, "apache-2.0"),
        tags=list(TAGS),
        datasets=[hub_dataset] if hub_dataset else None,
        base_model=str(base_model) if looks_like_hub_id(base_model) else None,
        metrics=sorted({metric_type for _, _, metric_type in METRICS}),
        eval_results=eval_results_from_metrics(metrics, dataset_type, dataset_name) or None,
    )


def build_model_card(
    model_dir: str | os.PathLike,
    metrics: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    training_args: Mapping[str, Any] | None = None,
    template: str | os.PathLike | None = None,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    dataset_id: str | None = None,
):
    """The model card of `model_dir` as a `huggingface_hub.ModelCard`, rendered without writing anything.

    Arguments as in `write_model_card`; what is None is read from the folder (metrics.json,
    training_args.json). The heat-map example is the one `heatmap_example_source` finds.
    """
    from huggingface_hub import ModelCard

    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json")
    if config is None:
        raise ModelDirError(f"{model_dir}: no config.json; save the model first (cnc_hf.pipeline.save_model_dir)")
    metrics = dict((read_json(model_dir / "metrics.json") if metrics is None else metrics) or {})
    training_args = (public_training_args(training_args) if training_args is not None
                     else read_json(model_dir / "training_args.json") or {})
    summary = metrics.get("training") if isinstance(metrics.get("training"), Mapping) else {}
    if dataset is None:
        dataset = training_args.get("dataset") or summary.get("dataset")
    kind = template_name_for(dataset)
    model_name = (repo_id or model_dir.resolve().name).split("/")[-1]
    base_model = training_args.get("clip_model") or summary.get("clip_model")
    _, dataset_name, dataset_note = _dataset_facts(dataset)
    threshold_info = metrics.get("threshold") if isinstance(metrics.get("threshold"), Mapping) else {}
    return ModelCard.from_template(
        _card_data(model_name, kind, dataset, base_model, metrics, license, dataset_id),
        template_path=str(template_path(template, dataset)),
        model_id=repo_id or model_name,
        model_name=model_name,  # to_dict() moves it into model-index, so pass it to the text too
        dataset_name=dataset_name,
        dataset_note=dataset_note,
        metrics_table=metrics_table(metrics),
        threshold=config.get("threshold"),
        threshold_method=_threshold_method(threshold_info),
        example_category=sorted(config.get("category_thresholds") or {"bottle": None})[0],
        hyperparameters=_hyperparameters(config, training_args, summary),
        heatmap_image=HEATMAP_EXAMPLE if heatmap_example_source(model_dir) is not None else None,
        citation=CITATION,
    )


def write_model_card(
    model_dir: str | os.PathLike,
    metrics: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    training_args: Mapping[str, Any] | None = None,
    template: str | os.PathLike | None = None,
    *,
    repo_id: str | None = None,
    example_image: Any = None,
    license: str | None = None,
    dataset_id: str | None = None,
) -> Path:
    """Render `model_dir/README.md` from a template in `model_cards/` and return its path.

    Args:
        metrics: the evaluation dict (cnc_hf.metrics layout: fractions, "per_category", "mean");
            None reads `model_dir/metrics.json` (no metrics: the card says "not evaluated").
        dataset: picks the template ("mvtec" -> cnc-mvtec.md, "visa" -> cnc-visa.md, else
            generic.md); None takes it from the training arguments / metrics.json.
        training_args: the run's arguments; saved (without machine-specific ones) as
            `training_args.json`, so that `upload_model_dir` can re-render the card later. None reads it.
        template: a template name or path, overriding the choice by dataset.
        repo_id: the Hub id the card is for (usage snippet, model-index name); default the dir name.
        example_image: an image to run the pipeline on for the heat-map example
            (`heatmap_example.png`); otherwise an existing one, or the first of `heatmaps/`, is used.
        license: overrides the template's default license.
        dataset_id: the Hub dataset id of the training data, for the card's `datasets:` (default: the
            dataset itself when it is a Hub id).
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():  # before anything is written
        raise ModelDirError(f"{model_dir}: no config.json; save the model first (cnc_hf.pipeline.save_model_dir)")
    if training_args is not None:
        training_args = public_training_args(training_args)
        (model_dir / "training_args.json").write_text(json.dumps(training_args, indent=2, sort_keys=True) + "\n")
    if example_image is not None:
        render_heatmap_example(model_dir, example_image)
    source = heatmap_example_source(model_dir)
    if source is not None and source != model_dir / HEATMAP_EXAMPLE:
        shutil.copyfile(source, model_dir / HEATMAP_EXAMPLE)
    card = build_model_card(model_dir, metrics, dataset, training_args, template, repo_id=repo_id, license=license,
                            dataset_id=dataset_id)
    out = model_dir / "README.md"
    card.save(out)
    return out


__all__ = ["CITATION", "DATASETS", "LIBRARY_NAME", "METRICS", "PIPELINE_TAG", "TAGS", "TEMPLATES", "build_model_card",
           "eval_results_from_metrics", "heatmap_example_source", "metrics_table", "public_training_args",
           "render_heatmap_example", "template_name_for", "template_path", "templates_dir", "write_model_card"]
