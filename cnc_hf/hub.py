"""Publishing CNC models on the Hugging Face Hub: model cards, push, and loading by Hub id.

    write_model_card(model_dir, metrics=None, dataset="mvtec")   # README.md from model_cards/
    push_to_hub(model_dir, "org/cnc-mvtec")                      # validate, refresh card, one commit
    load_model("org/cnc-mvtec")                                  # Hub id or dir; clear error offline
    python -m cnc_hf.hub push MODEL_DIR REPO_ID [--private] [--token T] [--dry_run]

What is uploaded is an explicit list, never "everything in the folder": the weights
(safetensors only), config.json, preprocessor_config.json, the code files the saved auto_map /
custom_pipelines entries need (and their relative imports), README.md, and when present
metrics.json, training_args.json and heatmap_example.png. Training leftovers (checkpoints/,
runs/, logs, heatmaps/) stay local. A folder with a pickle-format file at its top level
(.bin/.pt/.pth/.pkl/.pickle/.ckpt) is refused: loading such files can run arbitrary code.

Card metadata decisions:
- `pipeline_tag: image-segmentation`. The Hub has no anomaly-detection task; the main output is a
  dense per-pixel map at the input resolution, which is what image-segmentation lists; the image
  score and yes/no are reductions of that map. The real task name, "image-anomaly-detection", is
  a tag (with anomaly-detection), and the card says to use `trust_remote_code=True`.
- `model-index` values are percentages (2 decimals), like the paper and the card's table;
  metrics.json keeps fractions in [0, 1]. One result per category (dataset config = category)
  and one for the mean over categories (no config), the paper's "Mean" row.
- The paper's own numbers appear in the card as a labelled reference, never in model-index.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

PIPELINE_TAG = "image-segmentation"
TASK_NAME = "Anomaly detection and localization"
LIBRARY_NAME = "transformers"
TAGS = ["anomaly-detection", "image-anomaly-detection", "visual-anomaly-detection", "industrial-inspection",
        "cnc", "clip", "custom_code"]

WEIGHT_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
OPTIONAL_FILES = ("metrics.json", "training_args.json", "heatmap_example.png")
HEATMAP_EXAMPLE = "heatmap_example.png"

TEMPLATES = {"mvtec": "cnc-mvtec.md", "visa": "cnc-visa.md", "generic": "generic.md"}
DATASETS = {  # template name -> (dataset_type for model-index, display name)
    "mvtec": ("mvtec_ad", "MVTec AD"),
    "visa": ("visa", "VisA"),
}

# (metrics.json key, short name as in the paper, Hub metric type)
METRICS = (
    ("image_auroc", "I-AUROC", "roc_auc"),
    ("pixel_auroc", "P-AUROC", "roc_auc"),
    ("aupro", "AUPRO", "aupro"),
    ("image_ap", "I-AP", "average_precision"),
    ("pixel_ap", "P-AP", "average_precision"),
    ("image_f1_max", "I-F1max", "f1"),
    ("pixel_f1_max", "P-F1max", "f1"),
)
METRIC_KEYS = tuple(key for key, _, _ in METRICS)

CITATION = """@inproceedings{wang2025cnc,
  title     = {{CNC}: Cross-modal Normality Constraint for Unsupervised Multi-class Anomaly Detection},
  author    = {Wang, Xiaolei and Wang, Xiaoyang and Bai, Huihui and Lim, Eng Gee and Xiao, Jimin},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year      = {2025}
}"""

# Training arguments that describe the machine, not the model: never published.
_PRIVATE_ARGS = ("output_dir", "overwrite_output_dir", "data_dir", "cache_dir", "resume", "report_to",
                 "no_progress", "num_workers", "token")


class ModelDirError(ValueError):
    """A model directory that cannot be published or loaded as it is."""


class ModelNotAvailableError(OSError):
    """A Hub id that is neither a local directory nor cached, when the Hub cannot be reached; or an argument
    that names a local folder which does not exist (no Hub request is made for it)."""


class HubUnreachableError(OSError):
    """The Hugging Face Hub did not answer (network, DNS, offline mode) or refused the login."""


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
def _looks_like_hub_id(value: Any) -> bool:
    return isinstance(value, str) and bool(re.fullmatch(r"[\w.-]+/[\w.-]+", value)) and not Path(value).exists()


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
def render_heatmap_example(model_dir: str | os.PathLike, image: Any, out_path: str | os.PathLike | None = None) -> Path:
    """Run the pipeline of `model_dir` on `image` and save `input | heat map` side by side (PNG)."""
    import PIL.Image

    from cnc_hf.pipeline import AnomalyMapPipeline
    from cnc_hf.modeling import CNCModel
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor
    from cnc_hf.modeling.pipeline_cnc import load_rgb

    model_dir = Path(model_dir)
    out_path = Path(out_path) if out_path is not None else model_dir / HEATMAP_EXAMPLE
    pipe = AnomalyMapPipeline(model=CNCModel.from_pretrained(model_dir),
                              image_processor=CNCImageProcessor.from_pretrained(model_dir), device=-1)
    heatmap = pipe(image)["heatmap"]
    height = 384  # readable on the Hub page whatever the input size
    size = (max(1, round(heatmap.width * height / heatmap.height)), height)
    panel = PIL.Image.new("RGB", (2 * size[0], height), "white")
    panel.paste(load_rgb(image).resize(size, PIL.Image.Resampling.BILINEAR, reducing_gap=3.0), (0, 0))
    panel.paste(heatmap.resize(size, PIL.Image.Resampling.BILINEAR), (size[0], 0))
    panel.save(out_path)
    return out_path


def _find_heatmap_example(model_dir: Path) -> str | None:
    if (model_dir / HEATMAP_EXAMPLE).is_file():
        return HEATMAP_EXAMPLE
    # Training/evaluation with --heatmaps writes image | overlay | truth panels: reuse the first.
    candidates = sorted((model_dir / "heatmaps").glob("**/*.png")) if (model_dir / "heatmaps").is_dir() else []
    if candidates:
        shutil.copyfile(candidates[0], model_dir / HEATMAP_EXAMPLE)
        return HEATMAP_EXAMPLE
    return None


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


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{path}: not valid JSON ({err})") from err


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
) -> Path:
    """Render `model_dir/README.md` from a template in `model_cards/` and return its path.

    Args:
        metrics: the evaluation dict (cnc_hf.metrics layout: fractions, "per_category", "mean");
            None reads `model_dir/metrics.json` (no metrics: the card says "not evaluated").
        dataset: picks the template ("mvtec" -> cnc-mvtec.md, "visa" -> cnc-visa.md, else
            generic.md); None takes it from the training arguments / metrics.json.
        training_args: the run's arguments; saved (without machine-specific ones) as
            `training_args.json`, so that `push_to_hub` can re-render the card later. None reads it.
        template: a template name or path, overriding the choice by dataset.
        repo_id: the Hub id the card is for (usage snippet, model-index name); default the dir name.
        example_image: an image to run the pipeline on for the heat-map example
            (`heatmap_example.png`); otherwise an existing one, or the first of `heatmaps/`, is used.
        license: overrides the template's default license.
    """
    from huggingface_hub import ModelCard, ModelCardData

    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json")
    if config is None:
        raise ModelDirError(f"{model_dir}: no config.json; save the model first (cnc_hf.pipeline.save_model_dir)")
    if metrics is None:
        metrics = _read_json(model_dir / "metrics.json")
    metrics = dict(metrics or {})
    if training_args is not None:
        training_args = public_training_args(training_args)
        (model_dir / "training_args.json").write_text(json.dumps(training_args, indent=2, sort_keys=True) + "\n")
    else:
        training_args = _read_json(model_dir / "training_args.json") or {}
    summary = metrics.get("training") if isinstance(metrics.get("training"), Mapping) else {}
    if dataset is None:
        dataset = training_args.get("dataset") or summary.get("dataset")
    kind = template_name_for(dataset)
    path = template_path(template, dataset)

    if kind in DATASETS:
        dataset_type, dataset_name = DATASETS[kind]
    else:
        dataset_type = dataset_name = (Path(str(dataset)).name if dataset and not _looks_like_hub_id(dataset)
                                       else str(dataset or "custom"))
    if _looks_like_hub_id(dataset):
        dataset_type = str(dataset)
    model_name = (repo_id or model_dir.resolve().name).split("/")[-1]
    base_model = training_args.get("clip_model") or summary.get("clip_model")
    card_data = ModelCardData(
        model_name=model_name,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        license=license or {"mvtec": "cc-by-nc-sa-4.0", "visa": "cc-by-4.0"}.get(kind, "apache-2.0"),
        tags=list(TAGS),
        datasets=[str(dataset)] if _looks_like_hub_id(dataset) else None,
        base_model=base_model if _looks_like_hub_id(base_model) else None,
        metrics=sorted({metric_type for _, _, metric_type in METRICS}),
        eval_results=eval_results_from_metrics(metrics, dataset_type, dataset_name) or None,
    )
    if example_image is not None:
        render_heatmap_example(model_dir, example_image)
    threshold = config.get("threshold")
    threshold_info = metrics.get("threshold") if isinstance(metrics.get("threshold"), Mapping) else {}
    card = ModelCard.from_template(
        card_data,
        template_path=str(path),
        model_id=repo_id or model_name,
        model_name=model_name,  # to_dict() moves it into model-index, so pass it to the text too
        dataset_name=dataset_name,
        metrics_table=metrics_table(metrics),
        threshold=threshold,
        threshold_method=_threshold_method(threshold_info),
        example_category=sorted(config.get("category_thresholds") or {"bottle": None})[0],
        hyperparameters=_hyperparameters(config, training_args, summary),
        heatmap_image=_find_heatmap_example(model_dir),
        citation=CITATION,
    )
    out = model_dir / "README.md"
    card.save(out)
    return out


# --------------------------------------------------------------------------- validation and push
def _code_files(model_dir: Path, config: Mapping[str, Any]) -> list[str]:
    """The .py files the saved auto_map / custom_pipelines entries name, with their relative imports."""
    from transformers.dynamic_module_utils import get_relative_imports

    refs = list((config.get("auto_map") or {}).values())
    refs += [info.get("impl", "") for info in (config.get("custom_pipelines") or {}).values()]
    processor = _read_json(model_dir / "preprocessor_config.json") or {}
    refs += list((processor.get("auto_map") or {}).values())
    wanted, queue = set(), []
    for ref in refs:
        for item in ref if isinstance(ref, (list, tuple)) else [ref]:
            if item:
                queue.append(item.split("--")[-1].split(".")[0] + ".py")
    while queue:
        name = queue.pop()
        if name in wanted:
            continue
        wanted.add(name)
        if not (model_dir / name).is_file():
            raise ModelDirError(f"{model_dir}: code file {name} is missing (the config refers to it); "
                                "save with cnc_hf.pipeline.save_model_dir")
        queue += [f"{module}.py" for module in get_relative_imports(str(model_dir / name))]
    return sorted(wanted)


def validate_model_dir(model_dir: str | os.PathLike) -> list[str]:
    """Check that `model_dir` is a finished, safe CNC model dir; return the files that belong to it.

    Raises ModelDirError (a ValueError) naming the problem: not a directory, pickle files at the
    top level, no safetensors weights, no config.json / preprocessor_config.json, not a CNC config,
    no `custom_pipelines` entry, or missing code files. README.md is not required (push renders it).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: not a directory")
    pickles = sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelDirError(
            f"{model_dir}: refusing to publish pickle-format files {pickles}; they can run code when loaded. "
            "Save with save_pretrained (safetensors) and remove them."
        )
    if (model_dir / WEIGHT_INDEX).is_file():
        index = _read_json(model_dir / WEIGHT_INDEX) or {}
        weights = sorted(set((index.get("weight_map") or {}).values())) + [WEIGHT_INDEX]
        missing = [w for w in weights if not (model_dir / w).is_file()]
        if missing:
            raise ModelDirError(f"{model_dir}: weight shards {missing} listed in {WEIGHT_INDEX} are missing")
    elif (model_dir / "model.safetensors").is_file():
        weights = ["model.safetensors"]
    else:
        raise ModelDirError(f"{model_dir}: no model.safetensors; save the model with save_pretrained first")
    config = _read_json(model_dir / "config.json")
    if config is None:
        raise ModelDirError(f"{model_dir}: no config.json")
    if config.get("model_type") != "cnc":
        raise ModelDirError(f"{model_dir}: config.json is a {config.get('model_type')!r} model; expected 'cnc'")
    if not (model_dir / "preprocessor_config.json").is_file():
        raise ModelDirError(f"{model_dir}: no preprocessor_config.json (the image processor the pipeline loads)")
    if "image-anomaly-detection" not in (config.get("custom_pipelines") or {}):
        raise ModelDirError(
            f"{model_dir}: config.json has no custom_pipelines entry for 'image-anomaly-detection', so the pipeline "
            "would not load with trust_remote_code; save with cnc_hf.pipeline.save_model_dir"
        )
    files = weights + ["config.json", "preprocessor_config.json"] + _code_files(model_dir, config)
    files += [name for name in ("README.md",) + OPTIONAL_FILES if (model_dir / name).is_file()]
    return files


def push_to_hub(
    model_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload CNC anomaly detector (weights, code, model card)",
    create_pr: bool = False,
    card_template: str | os.PathLike | None = None,
    dry_run: bool = False,
):
    """Validate `model_dir`, refresh its model card for `repo_id`, and upload it in one commit.

    Returns the list of uploaded paths with `dry_run=True` (nothing is sent), else the
    `CommitInfo` of the commit. The repo is created if needed (`private` applies to a new repo
    only). Files are uploaded as one explicit list (create_commit), so nothing outside
    `validate_model_dir`'s list can slip in; files already in the repo are left as they are.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    model_dir = Path(model_dir)
    if not re.fullmatch(r"([\w.-]+/)?[\w.-]+", str(repo_id or "")):
        raise ValueError(f"repo_id: got {repo_id!r}; expected 'name' or 'org/name'")
    validate_model_dir(model_dir)  # before touching the card: refuse bad folders untouched
    write_model_card(model_dir, template=card_template, repo_id=repo_id)
    files = validate_model_dir(model_dir)
    if dry_run:
        return files
    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(model_dir / name)) for name in files]
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        return api.create_commit(repo_id=repo_id, repo_type="model", operations=operations,
                                 commit_message=commit_message, create_pr=create_pr)
    except Exception as err:
        raise hub_error(err, f"push {model_dir} to {repo_id}") from err


def hub_error(err: Exception, doing: str) -> Exception:
    """A HubUnreachableError saying what to do for a network, offline or login failure; `err` otherwise."""
    from huggingface_hub import constants

    name = type(err).__name__
    network = isinstance(err, (ConnectionError, TimeoutError)) or any(
        cls.__name__ in ("TransportError", "RequestException", "OfflineModeIsEnabled") for cls in type(err).__mro__)
    status = getattr(getattr(err, "response", None), "status_code", None)
    first = str(err).splitlines()[0] if str(err) else name
    if network:
        return HubUnreachableError(
            f"could not reach the Hugging Face Hub ({constants.ENDPOINT}) to {doing}: {name}: {first}. Check the "
            "network (HF_HUB_OFFLINE=1 makes every Hub call fail at once), or run with --dry_run to check the folder "
            "and the card without uploading."
        )
    if status in (401, 403):
        return HubUnreachableError(
            f"the Hugging Face Hub refused the login to {doing} (HTTP {status}): log in with `hf auth login`, "
            "set HF_TOKEN, or pass --token with write access to that repo."
        )
    return err


def check_local_model_argument(value: Any, flag: str = "--model") -> None:
    """Refuse at once an argument that names a local folder which does not exist, instead of letting
    transformers treat it as a Hub id and retry the network: one that starts with /, ./, ../ or ~, ends
    with /, has more than one /, or whose first part is an existing local folder (`demo_output/modle`)."""
    if not isinstance(value, (str, os.PathLike)):
        return
    text = os.fspath(value)
    path = Path(text).expanduser()
    if path.exists():
        return
    parts = Path(text).parts
    looks_local = (text.startswith(("/", "./", "../", "~", "\\")) or text.endswith(("/", os.sep)) or text.count("/") > 1
                   or (len(parts) > 1 and Path(parts[0]).is_dir()))
    if looks_local and _looks_like_hub_id(text) and _in_hub_cache(text):
        return  # "openai/clip-..." run from a folder that has its own openai/: the cached Hub repo is meant
    if looks_local:
        parent = next((p for p in path.parents if p.is_dir()), None)
        near = sorted(c.name for c in parent.iterdir() if c.is_dir())[:8] if parent is not None else []
        hint = f"; folders in {parent}: {', '.join(near)}" if near else ""
        hub = (" (to use the Hub repo of that name, run from a folder without a local "
               f"{Path(text).parts[0]}/ or download it first)") if _looks_like_hub_id(text) else ""
        raise ModelNotAvailableError(f"{flag} {text}: no such folder{hint}{hub}")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the cache cannot even look up is not in it
        return False


# --------------------------------------------------------------------------- loading by Hub id
def _not_available(id_or_dir: Any, kwargs: Mapping[str, Any], err: Exception) -> Exception:
    """A clear error for an id that could not be loaded, or `err` itself when it is not about availability."""
    from huggingface_hub import constants, is_offline_mode, try_to_load_from_cache

    name = os.fspath(id_or_dir) if isinstance(id_or_dir, (str, os.PathLike)) else None
    if name is None or Path(name).exists() or not _looks_like_hub_id(name):
        return err
    cache_dir = kwargs.get("cache_dir") or constants.HF_HUB_CACHE
    cached = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir, revision=kwargs.get("revision"))
    if isinstance(cached, str):
        return err  # the repo is cached: the failure is about its content, keep transformers' message
    offline = is_offline_mode() or kwargs.get("local_files_only")
    reason = ("this machine is offline (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline
              else "the Hub could not be reached or the repo does not exist / is private")
    return ModelNotAvailableError(
        f"{name!r} is not a local directory and is not in the Hugging Face cache ({cache_dir}), and {reason}. "
        f"Download it where the Hub is reachable (`hf download {name}`) and copy the cache (or set HF_HUB_CACHE), "
        f"or pass a local model directory. ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    )


def load_model(id_or_dir: str | os.PathLike, **kwargs):
    """`CNCModel.from_pretrained` with a clear error when a Hub id is neither cached nor reachable."""
    from cnc_hf.modeling import CNCModel

    check_local_model_argument(id_or_dir)
    try:
        return CNCModel.from_pretrained(id_or_dir, **kwargs)
    except OSError as err:
        raise _not_available(id_or_dir, kwargs, err) from err


def load_pipeline(id_or_dir: str | os.PathLike, **kwargs):
    """`pipeline("image-anomaly-detection", model=id_or_dir, **kwargs)` with the same clear error."""
    from transformers import pipeline

    import cnc_hf.pipeline  # noqa: F401  (registers the task)

    check_local_model_argument(id_or_dir)
    try:
        return pipeline("image-anomaly-detection", model=os.fspath(id_or_dir), **kwargs)
    except OSError as err:
        raise _not_available(id_or_dir, kwargs.get("model_kwargs") or {}, err) from err


# --------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnc_hf.hub", description="Publish CNC models on the Hugging Face Hub.")
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="validate a finished model dir, refresh its card, upload it")
    push.add_argument("model_dir", help="the output dir of training (model.safetensors, config.json, code, ...)")
    push.add_argument("repo_id", help="the Hub repo, e.g. org/cnc-mvtec")
    push.add_argument("--private", action="store_true", help="create the repo as private (a new repo only)")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login)")
    push.add_argument("--commit_message", default="Upload CNC anomaly detector (weights, code, model card)")
    push.add_argument("--create_pr", action="store_true", help="open a pull request instead of committing to main")
    push.add_argument("--card_template", default=None, help="mvtec, visa, generic or a template path")
    push.add_argument("--dry_run", action="store_true", help="validate and render the card; list files, upload nothing")
    push.add_argument("--space", default=None, metavar="SPACE_ID",
                      help="also create/update a Gradio Space (org/name) that loads REPO_ID (see cnc_hf.space)")
    card = commands.add_parser("card", help="(re)write README.md of a model dir from a template")
    card.add_argument("model_dir")
    card.add_argument("--dataset", default=None, help="mvtec, visa or anything else (generic card)")
    card.add_argument("--template", default=None)
    card.add_argument("--repo_id", default=None)
    card.add_argument("--example_image", default=None, help="an image for the heat-map example")
    args = parser.parse_args(argv)

    try:
        if args.command == "card":
            path = write_model_card(args.model_dir, dataset=args.dataset, template=args.template, repo_id=args.repo_id,
                                    example_image=args.example_image)
            print(f"wrote {path}")
            return 0
        result = push_to_hub(args.model_dir, args.repo_id, private=args.private, token=args.token,
                             commit_message=args.commit_message, create_pr=args.create_pr,
                             card_template=args.card_template, dry_run=args.dry_run)
        if args.dry_run:
            print(f"dry run: would upload {len(result)} files to {args.repo_id}:")
            print("\n".join(f"  {name}" for name in result))
        else:
            print(f"uploaded to {getattr(result, 'pr_url', None) or getattr(result, 'commit_url', result)}")
        if args.space:
            from cnc_hf.space import push_space

            space = push_space(args.repo_id, args.space, token=args.token, private=args.private, dry_run=args.dry_run)
            print(f"dry run: would upload {len(space)} files to Space {args.space}: {', '.join(space)}" if args.dry_run
                  else f"Space: https://huggingface.co/spaces/{args.space}")
    except HubUnreachableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
