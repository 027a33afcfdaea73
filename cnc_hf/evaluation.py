"""Evaluation of a CNC model on an anomaly data set: the loop shared by training and the command line.

    python -m cnc_hf.evaluation --model out/cnc-mvtec --dataset mvtec --data_dir /data/mvtec_ad
    python -m cnc_hf.evaluation --model out/my-part --dataset folder --normal_dir my_part/good \
        --abnormal_dir my_part/scratch my_part/dent [--mask_dir my_part/masks]   (your own folders)
    accelerate launch -m cnc_hf.evaluation --model ... (the test set is sharded over the processes)

writes `metrics.json` (pooled, per category and the paper's mean over categories) and `metrics.md`
(the per-category table in the layout of the paper's Table 1: I-AUROC / P-AUROC / AUPRO / I-AP /
P-AP / mTotal), and with `--heatmaps N` N heat-map PNGs (image | anomaly map overlay | ground truth).

(The module is not called `evaluate.py`: it would shadow the `evaluate` package.)

Multi-process: each process scores its shard of the test set and the results are collected with
Accelerate's `gather_for_metrics`, which drops the duplicates that pad the last batch, so the
metrics see every test image exactly once. Categories travel through the gather as integer ids
(strings cannot be gathered), named by `AnomalyMetricAccumulator(category_names=...)`.

Decision threshold (`calibrate_threshold`): the CNC paper evaluates threshold-free metrics only,
but a deployed detector needs a yes/no. Without test labels the one honest source is normal
images the model has not trained on: the trainer holds out a fraction of the normal training
images, scores them and takes a high quantile (0.99, linear interpolation) of their image scores.
The quantile targets a ~1% false-alarm rate on normal images; unlike the maximum it is not set by
a single odd image once there are more than a handful of held-out images (with few it is close to
the maximum). The same quantile is also taken per category (`config.category_thresholds`): normal
images of one product can score far above those of another, so a pooled threshold decides badly for
some categories. The pipeline uses a category's own threshold when the caller names the category,
the pooled one otherwise; `evaluate_model` reports the decisions both ways.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

DEFAULT_THRESHOLD_QUANTILE = 0.99
THRESHOLD_METHOD = "quantile of the image scores of held-out normal training images (linear interpolation)"


# ----------------------------------------------------------------------------- the scoring loop
def _score_batches(model, processor, dataset_split, batch_size: int, accelerator=None, num_workers: int = 0,
                   progress: bool = True, desc: str = "eval"):
    """Yield (batch, anomaly_map, image_score) for every batch of this process's shard.

    With an `accelerator` the loader is sharded over the processes (padded to even batches; the
    caller gathers with `gather_for_metrics`). The model runs in eval mode, without autocast, so that
    scores are the same whatever mixed precision training used.
    """
    from tqdm.auto import tqdm

    from cnc_hf.data import make_collate_fn

    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    loader = DataLoader(dataset_split, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=make_collate_fn(processor))
    if accelerator is not None:
        # prepare_data_loader, not prepare: the loader must not join the accelerator's checkpointed state.
        from accelerate.data_loader import prepare_data_loader

        loader = prepare_data_loader(loader, device, num_processes=accelerator.num_processes,
                                     process_index=accelerator.process_index, put_on_device=True)
    main = accelerator is None or accelerator.is_local_main_process
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc=desc, disable=not (progress and main), leave=False):
                output = model(pixel_values=batch["pixel_values"].to(device))
                yield batch, output.anomaly_map.float(), output.image_score.float()
    finally:
        model.train(was_training)


def _gather(accelerator, tensors):
    return tensors if accelerator is None else accelerator.gather_for_metrics(tensors)


def predict_image_scores(model, processor, dataset_split, batch_size: int = 8, accelerator=None,
                         num_workers: int = 0, progress: bool = True) -> tuple[np.ndarray, list[str]]:
    """Image scores of every image of `dataset_split` (gathered over processes) and their categories."""
    names = sorted(set(dataset_split["category"]))
    ids = {name: i for i, name in enumerate(names)}
    scores, categories = [], []
    for batch, _, score in _score_batches(model, processor, dataset_split, batch_size, accelerator, num_workers,
                                           progress, desc="calibrate"):
        cat = torch.tensor([ids[c] for c in batch["categories"]], device=score.device)
        score, cat = _gather(accelerator, (score, cat))
        scores.append(score.cpu().numpy())
        categories += [names[i] for i in cat.tolist()]
    return np.concatenate(scores).astype(np.float64), categories


def calibrate_threshold(model, processor, normal_split, quantile: float = DEFAULT_THRESHOLD_QUANTILE,
                        batch_size: int = 8, accelerator=None, num_workers: int = 0, progress: bool = True,
                        return_details: bool = False) -> float | tuple[float, dict]:
    """The decision threshold: the `quantile` (linear interpolation) of the image scores of
    `normal_split`, normal images the model has not trained on (see the module docstring).

    `quantile=1.0` is the maximum. With `return_details` also returns a dict for metrics.json
    (method, quantile, image count, per-category quantiles and maxima).
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if len(normal_split) == 0:
        raise ValueError("calibrate_threshold: the normal split is empty; hold out at least one normal image.")
    if "label" in normal_split.column_names and any(int(v) != 0 for v in normal_split["label"]):
        raise ValueError("calibrate_threshold: the calibration split must hold normal images only (label 0).")
    scores, categories = predict_image_scores(model, processor, normal_split, batch_size, accelerator, num_workers,
                                              progress)
    threshold = float(np.quantile(scores, quantile, method="linear"))
    if not return_details:
        return threshold
    per_category = {}
    for name in sorted(set(categories)):
        s = scores[np.asarray(categories) == name]
        per_category[name] = {"num_images": int(s.size), "quantile": float(np.quantile(s, quantile)),
                              "max": float(s.max())}
    details = {"value": threshold, "method": THRESHOLD_METHOD, "quantile": quantile,
               "num_calibration_images": int(scores.size), "calibration_score_max": float(scores.max()),
               "per_category": per_category}
    return threshold, details


def threshold_decisions(scores: np.ndarray, labels: np.ndarray, threshold) -> dict:
    """Image-level precision, recall, F1, accuracy and balanced accuracy of `score >= threshold` (the
    pipeline's rule); `threshold` is one number or one per image (each image's category threshold)."""
    pred, truth = scores >= threshold, labels.astype(bool)
    tp, fp = int((pred & truth).sum()), int((pred & ~truth).sum())
    fn, tn = int((~pred & truth).sum()), int((~pred & ~truth).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    specificity = tn / (tn + fp) if tn + fp else None
    balanced = (recall + specificity) / 2 if tp + fn and specificity is not None else None
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": (tp + tn) / max(1, tp + fp + fn + tn),
            "balanced_accuracy": balanced, "false_positive_rate": fp / (fp + tn) if fp + tn else 0.0,
            "num_images": tp + fp + fn + tn}


def category_decisions(scores: np.ndarray, labels: np.ndarray, categories: list[str], config) -> dict:
    """Decision quality at the calibrated thresholds, as the pipeline decides with `category=` given: per
    category (its own threshold, else the pooled one), pooled over all images, and the mean over categories."""
    from cnc_hf.modeling.configuration_cnc import threshold_for

    categories = np.asarray(categories)
    per_category, per_image = {}, np.empty(scores.shape, dtype=np.float64)
    for name in sorted(set(categories.tolist())):
        chosen = categories == name
        value, source = threshold_for(config.threshold, getattr(config, "category_thresholds", None), name)
        if value is None:
            return {}
        per_image[chosen] = value
        per_category[name] = {"threshold": float(value), "threshold_source": source,
                              **threshold_decisions(scores[chosen], labels[chosen], value)}
    keys = ("balanced_accuracy", "precision", "recall", "f1")
    mean = {key: float(np.mean([d[key] for d in per_category.values() if d[key] is not None]))
            if any(d[key] is not None for d in per_category.values()) else None for key in keys}
    return {"per_category": per_category, "mean": mean, "pooled": threshold_decisions(scores, labels, per_image)}


# ----------------------------------------------------------------------------- the evaluation loop
def evaluate_model(model, processor, dataset_split, batch_size: int = 8, accelerator=None,
                   heatmap_dir: str | os.PathLike | None = None, progress: bool = True, max_heatmaps: int = 16,
                   num_workers: int = 0) -> dict:
    """Evaluate `model` on a labelled split (columns image, mask, label, category): every process
    returns the same dict, the output of `compute_anomaly_metrics` with per-category results and
    their mean (the paper's "Mean" row), plus:

    - "num_images": how many test images were scored (exactly `len(dataset_split)`),
    - "world_size": the number of processes that shared the work,
    - "threshold": image-level precision/recall/F1 at `model.config.threshold`, if one is set.

    Rows without a mask: good images count as all-normal ground truth; anomalous images without a mask
    (image-level labels only) count for image metrics only. Pixel metrics are None where no anomalous
    image has a mask, and the counts (`num_images_pixel`, `num_anomalous_with_mask`) say what they used.

    `heatmap_dir`: write up to `max_heatmaps` PNGs there (spread over the categories, anomalous
    images first), each image | anomaly map over the image | ground truth.
    """
    from cnc_hf.metrics import AnomalyMetricAccumulator

    names = sorted(set(dataset_split["category"]))
    ids = {name: i for i, name in enumerate(names)}
    accumulator = AnomalyMetricAccumulator(category_names=names)
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    threshold = getattr(unwrapped.config, "threshold", None)
    wanted = _heatmap_paths(dataset_split, max_heatmaps) if heatmap_dir is not None else set()
    if wanted:
        Path(heatmap_dir).mkdir(parents=True, exist_ok=True)
    main = accelerator is None or accelerator.is_main_process
    all_scores, all_labels, all_categories = [], [], []

    for batch, maps, scores in _score_batches(model, processor, dataset_split, batch_size, accelerator, num_workers,
                                              progress, desc="evaluate"):
        for i, path in enumerate(batch["paths"]):  # each process draws the images of its own shard
            if path in wanted:
                known = bool(batch["has_mask"][i]) or int(batch["labels"][i]) == 0
                _write_heatmap(Path(heatmap_dir), path, batch["categories"][i], batch["pixel_values"][i], maps[i],
                               batch["masks"][i] if known else None, processor, threshold)
        device = scores.device
        labels = batch["labels"].to(device)
        masks = batch["masks"].to(device=device, dtype=torch.uint8)  # gloo gathers no bool
        has_mask = batch["has_mask"].to(device=device, dtype=torch.uint8)
        cats = torch.tensor([ids[c] for c in batch["categories"]], device=device)
        scores, labels, maps, masks, cats, has_mask = _gather(accelerator, (scores, labels, maps, masks, cats, has_mask))
        if main:  # the gathered maps of a whole test set are large: one process keeps them
            accumulator.update(scores, labels, maps.cpu(), masks.cpu().bool(), categories=cats,
                               has_mask=has_mask.cpu().bool())
            all_scores.append(scores.cpu().double().numpy())
            all_labels.append(labels.cpu().numpy())
            all_categories.extend(names[int(c)] for c in cats.cpu())

    results = None
    if main:
        results = accumulator.compute()
        scores, labels = np.concatenate(all_scores), np.concatenate(all_labels)
        results["num_images"] = int(scores.size)
        results["world_size"] = 1 if accelerator is None else int(accelerator.num_processes)
        if threshold is not None:
            results["threshold"] = {"value": float(threshold), **threshold_decisions(scores, labels, float(threshold))}
            decisions = category_decisions(scores, labels, all_categories, unwrapped.config)
            if decisions:
                results["decisions"] = decisions
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        results = broadcast_object_list([results])[0]  # the same dict on every process
    return results


def _heatmap_paths(dataset_split, limit: int) -> set[str]:
    """Up to `limit` image paths, round-robin over categories, anomalous images first."""
    if limit <= 0:
        return set()
    by_category: dict[str, list[str]] = {}
    rows = zip(dataset_split["path"], dataset_split["category"], dataset_split["label"])
    for path, category, label in sorted(rows, key=lambda r: (r[1], -int(r[2]), r[0])):
        by_category.setdefault(category, []).append(path)
    chosen: list[str] = []
    while len(chosen) < limit and any(by_category.values()):
        for paths in by_category.values():
            if paths and len(chosen) < limit:
                chosen.append(paths.pop(0))
    return set(chosen)


def _write_heatmap(out_dir: Path, path: str, category: str, pixel_values: torch.Tensor, anomaly_map: torch.Tensor,
                   mask: torch.Tensor | None, processor, threshold: float | None) -> None:
    """image | map over image | ground truth, side by side, at the model's resolution. Coloured as the
    pipeline does (`overlay_heatmap`): 0 to 2x the threshold when one is known, else per image. A defect
    image without a mask (`mask` None) gets a gray third panel: unknown, not "no defect"."""
    import PIL.Image

    from cnc_hf.modeling.pipeline_cnc import overlay_heatmap

    mean = np.asarray(processor.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(processor.image_std, dtype=np.float32)[:, None, None]
    pixels = np.clip((pixel_values.float().cpu().numpy() * std + mean).transpose(1, 2, 0), 0, 1)
    image = PIL.Image.fromarray((pixels * 255).round().astype(np.uint8), "RGB")
    value_range = (0.0, 2.0 * threshold) if threshold else None
    overlay = overlay_heatmap(image, anomaly_map.float().cpu(), value_range)
    if mask is None:
        truth = PIL.Image.new("RGB", image.size, (128, 128, 128))
    else:
        truth = PIL.Image.fromarray((mask.float().cpu().numpy() * 255).astype(np.uint8), "L").convert("RGB")
    panel = PIL.Image.new("RGB", (3 * image.width, image.height))
    for i, part in enumerate((image, overlay, truth)):
        panel.paste(part, (i * image.width, 0))
    source = Path(path)
    target = out_dir / f"{category}_{source.parent.name}_{source.stem}.png"  # e.g. bottle_broken_large_000.png
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    panel.save(tmp, format="PNG")
    os.replace(tmp, target)  # padding duplicates on two processes may write the same file


# ----------------------------------------------------------------------------- outputs
def write_metrics(metrics: dict, output_dir: str | os.PathLike, extra: dict | None = None) -> tuple[Path, Path]:
    """metrics.json (everything) and metrics.md (the paper's per-category table) in `output_dir`."""
    from cnc_hf.metrics import format_metrics_table

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**metrics, **(extra or {})}
    json_path, md_path = out / "metrics.json", out / "metrics.md"
    json_path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    text = format_metrics_table(metrics)
    if metrics.get("decisions"):
        text += "\n\n" + format_decisions_table(metrics["decisions"])
    md_path.write_text(text + "\n")
    return json_path, md_path


def format_decisions_table(decisions: dict) -> str:
    """The yes/no decisions at the calibrated thresholds, per category and their mean (percent)."""
    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}"

    lines = ["Decisions at the calibrated thresholds (the pipeline with `category=` given; percent):", "",
             "| Category | threshold | balanced acc. | precision | recall | F1 |", "|---|---|---|---|---|---|"]
    for name, row in decisions["per_category"].items():
        lines.append(f"| {name} | {row['threshold']:.4g} ({row['threshold_source']}) | {pct(row['balanced_accuracy'])} "
                     f"| {pct(row['precision'])} | {pct(row['recall'])} | {pct(row['f1'])} |")
    mean = decisions["mean"]
    lines.append(f"| **Mean** | | {pct(mean['balanced_accuracy'])} | {pct(mean['precision'])} | {pct(mean['recall'])} "
                 f"| {pct(mean['f1'])} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cnc_hf.evaluation",
        description="Evaluate a CNC model dir on the test split of an anomaly data set: per-category table in the "
                    "paper's layout (metrics.md) and metrics.json. Runs under `accelerate launch` too.",
    )
    parser.add_argument("--model", required=True, help="a model dir saved by training/train.py (or a Hub id)")
    parser.add_argument("--dataset", required=True,
                        help="mvtec, visa, demo, folder (your own image folders: --normal_dir, --abnormal_dir, ...), "
                             "a parquet dataset dir or a Hub dataset id")
    parser.add_argument("--data_dir", default=None,
                        help="the dataset folder (required for mvtec/visa/demo); for folder, optionally a JSON/YAML "
                             "file listing the folders per category")
    parser.add_argument("--categories", nargs="+", default=None, help="evaluate only these categories")
    from cnc_hf.data.folder import add_folder_arguments

    add_folder_arguments(parser.add_argument_group("your own image folders (--dataset folder)"))
    parser.add_argument("--output_dir", default=None,
                        help="where metrics.json/metrics.md (and heatmaps/) go (default: <model>/evaluation for a "
                             "local model dir, ./evaluation otherwise)")
    parser.add_argument("--heatmaps", type=int, default=0, metavar="N",
                        help="write N heat-map PNGs to <output_dir>/heatmaps (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--num_workers", type=int, default=0, help="data loader workers (default: %(default)s)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit(f"--batch_size must be >= 1, got {args.batch_size}")
    from cnc_hf.data.folder import folder_arguments

    try:
        folder_kwargs = folder_arguments(args, args.data_dir)
    except ValueError as err:
        parser.error(str(err))
    from accelerate import Accelerator

    from cnc_hf.data import load_anomaly_dataset
    from cnc_hf.modeling import CNCModel
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor

    from cnc_hf.hub import check_local_model_argument

    check_local_model_argument(args.model)
    model_path = Path(args.model)
    if args.output_dir is not None:
        output_dir = Path(args.output_dir)
    else:
        output_dir = model_path / "evaluation" if model_path.is_dir() else Path("evaluation")
    if model_path.exists() and not (model_path / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: no config.json there; expected a model dir saved by training.")

    accelerator = Accelerator(cpu=args.cpu)
    try:
        dataset = load_anomaly_dataset(args.dataset, data_dir=args.data_dir, categories=args.categories,
                                       **folder_kwargs)
    except (FileNotFoundError, ValueError) as err:  # AnomalyDatasetError too: the message names the path
        raise SystemExit(f"--dataset {args.dataset}: {err}") from err
    test = dataset["test"]
    model = CNCModel.from_pretrained(args.model, dtype=torch.float32).to(accelerator.device)
    processor = CNCImageProcessor.from_pretrained(args.model)
    heatmap_dir = output_dir / "heatmaps" if args.heatmaps > 0 else None
    metrics = evaluate_model(model, processor, test, batch_size=args.batch_size, accelerator=accelerator,
                             heatmap_dir=heatmap_dir, progress=not args.no_progress, max_heatmaps=args.heatmaps,
                             num_workers=args.num_workers)
    if accelerator.is_main_process:
        extra = {"evaluation": {"model": str(args.model), "dataset": str(args.dataset),
                                "data_dir": None if args.data_dir is None else str(args.data_dir), "split": "test",
                                **{k: (str(v) if isinstance(v, Path) else v) for k, v in folder_kwargs.items()}}}
        json_path, md_path = write_metrics(metrics, output_dir, extra)
        from cnc_hf.metrics import format_metrics_table

        print(format_metrics_table(metrics))
        print(f"\n{metrics['num_images']} test images on {metrics['world_size']} process(es); wrote {json_path} "
              f"and {md_path}" + (f" and heat maps in {heatmap_dir}" if heatmap_dir else ""))
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
