"""Evaluation of a CNC model on an anomaly data set: the loop shared by training and the command line.

    python -m cnc_hf.evaluation --model out/cnc-mvtec --dataset mvtec --data_dir /data/mvtec_ad
    python -m cnc_hf.evaluation --model out/my-part --dataset folder --normal_dir my_part/good \
        --abnormal_dir my_part/scratch my_part/dent [--mask_dir my_part/masks]   (your own folders)
    accelerate launch -m cnc_hf.evaluation --model ... (the test set is sharded over the processes)

writes `metrics.json` (pooled, per category and the paper's mean over categories) and `metrics.md`
(the per-category table in the layout of the paper's Table 1: I-AUROC / P-AUROC / AUPRO / I-AP /
P-AP / mTotal), and with `--heatmaps N` N labelled heat-map PNGs (image | heat map | ground truth, captioned with category, score, threshold and decision).

(The module is not called `evaluate.py`: it would shadow the `evaluate` package.)

Multi-process: each process scores its shard of the test set and the results are collected with
Accelerate's `gather_for_metrics`, which drops the duplicates that pad the last batch, so the
metrics see every test image exactly once. Categories travel through the gather as integer ids
(strings cannot be gathered), named by `AnomalyMetricAccumulator(category_names=...)`.

Decision quality: where the model has calibrated thresholds, the decisions at them are reported per
category with the category given and, for a model with category prototypes, recognised from the image
(`cnc_hf.decisions`); thresholds and prototypes come from `cnc_hf.calibration`.
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

# Re-exported: these lived here before calibration, scoring and decisions had modules of their own.
from cnc_hf.calibration import DEFAULT_THRESHOLD_QUANTILE, THRESHOLD_METHOD, calibrate_threshold  # noqa: F401
from cnc_hf.decisions import category_decisions, format_decisions_table, threshold_decisions
from cnc_hf.scoring import gather, predict_image_scores, score_batches  # noqa: F401

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
    images first), each a labelled row (cnc_hf.figures): image | heat map | ground truth + caption.
    """
    from cnc_hf.metrics import AnomalyMetricAccumulator

    names = sorted(set(dataset_split["category"]))
    ids = {name: i for i, name in enumerate(names)}
    accumulator = AnomalyMetricAccumulator(category_names=names)
    config = (accelerator.unwrap_model(model) if accelerator is not None else model).config
    wanted = _heatmap_paths(dataset_split, max_heatmaps) if heatmap_dir is not None else set()
    if wanted:
        Path(heatmap_dir).mkdir(parents=True, exist_ok=True)
    main = accelerator is None or accelerator.is_main_process
    kept: dict[str, list] = {"scores": [], "labels": [], "categories": [], "similarities": []}

    for batch, maps, scores, similarity in score_batches(model, processor, dataset_split, batch_size, accelerator,
                                                         num_workers, progress, desc="evaluate"):
        for i, path in enumerate(batch["paths"]):  # each process draws the images of its own shard
            if path in wanted:
                _write_heatmap(Path(heatmap_dir), batch, i, maps[i], float(scores[i]),
                               None if similarity is None else similarity[i].tolist(), processor, config)
        gathered = _gather_batch(accelerator, batch, maps, scores, similarity, ids)
        if main:  # the gathered maps of a whole test set are large: one process keeps them
            _keep(accumulator, kept, names, *gathered)

    results = None
    if main:
        results = accumulator.compute()
        results["num_images"] = len(kept["categories"])
        results["world_size"] = 1 if accelerator is None else int(accelerator.num_processes)
        results.update(_decision_results(kept, config))
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        results = broadcast_object_list([results])[0]  # the same dict on every process
    return results


def _gather_batch(accelerator, batch, maps, scores, similarity, ids):
    """One batch's tensors from every process: (scores, labels, maps, masks, category ids, has_mask, similarity)."""
    device = scores.device
    labels = batch["labels"].to(device)
    masks = batch["masks"].to(device=device, dtype=torch.uint8)  # gloo gathers no bool
    has_mask = batch["has_mask"].to(device=device, dtype=torch.uint8)
    cats = torch.tensor([ids[c] for c in batch["categories"]], device=device)
    gathered = gather(accelerator, (scores, labels, maps, masks, cats, has_mask)
                      + (() if similarity is None else (similarity,)))
    return (*gathered[:6], gathered[6] if similarity is not None else None)


def _keep(accumulator, kept: dict, names: list[str], scores, labels, maps, masks, cats, has_mask, similarity) -> None:
    """Feed the metrics and keep what the decision report needs (scores, labels, categories, similarities)."""
    accumulator.update(scores, labels, maps.cpu(), masks.cpu().bool(), categories=cats, has_mask=has_mask.cpu().bool())
    kept["scores"].append(scores.cpu().double().numpy())
    kept["labels"].append(labels.cpu().numpy())
    kept["categories"].extend(names[int(c)] for c in cats.cpu())
    if similarity is not None:
        kept["similarities"].append(similarity.cpu().double().numpy())


def _decision_results(kept: dict, config) -> dict:
    """metrics.json entries on the yes/no at the calibrated thresholds: pooled threshold, category given,
    category recognised (for a model with prototypes); none for a model without a threshold."""
    if getattr(config, "threshold", None) is None:
        return {}
    scores, labels = np.concatenate(kept["scores"]), np.concatenate(kept["labels"])
    out = {"threshold": {"value": float(config.threshold), **threshold_decisions(scores, labels, float(config.threshold))}}
    given = category_decisions(scores, labels, kept["categories"], config)
    if given:
        out["decisions"] = given
    if kept["similarities"]:
        recognised = category_decisions(scores, labels, kept["categories"], config,
                                        similarities=np.concatenate(kept["similarities"]))
        if recognised:
            out["decisions_recognised"] = recognised
    return out


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


def _write_heatmap(out_dir: Path, batch: dict, i: int, anomaly_map: torch.Tensor, score: float,
                   similarity: list | None, processor, config) -> None:
    """One labelled row (`cnc_hf.figures`): image | heat map | ground truth at the model's resolution, the
    caption giving the category (recognised from the image when the model can, as the pipeline does), the
    score, the threshold and the decision against the truth. Coloured as the pipeline does: 0 to 2x the
    threshold when one is known, else per image. A defect image without a mask gets a gray "no mask" tile."""
    import PIL.Image

    from cnc_hf.figures import Example, render_examples
    from cnc_hf.modeling.decision import decide
    from cnc_hf.modeling.heatmap import overlay_heatmap, threshold_range

    mean = np.asarray(processor.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(processor.image_std, dtype=np.float32)[:, None, None]
    pixels = np.clip((batch["pixel_values"][i].float().cpu().numpy() * std + mean).transpose(1, 2, 0), 0, 1)
    image = PIL.Image.fromarray((pixels * 255).round().astype(np.uint8), "RGB")
    category, label = batch["categories"][i], int(batch["labels"][i])
    decision = decide(score, config, category=None if similarity else category, similarity=similarity)
    threshold = decision["threshold"]
    overlay = overlay_heatmap(image, anomaly_map.float().cpu().numpy(), threshold_range(threshold))
    truth = None
    if bool(batch["has_mask"][i]) or label == 0:
        truth = PIL.Image.fromarray((batch["masks"][i].float().cpu().numpy() * 255).astype(np.uint8), "L")
    source = Path(batch["paths"][i])
    example = Example(image=image, overlay=overlay, score=score, label=label, truth=truth,
                      name=f"{source.parent.name}/{source.name}",
                      **{k: decision[k] for k in ("threshold", "threshold_source", "is_anomaly", "category", "category_source")})
    panel = render_examples([example], tile=max(160, image.width))
    target = out_dir / f"{category}_{source.parent.name}_{source.stem}.png"  # e.g. bottle_broken_large_000.png
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    panel.save(tmp, format="PNG")
    os.replace(tmp, target)  # padding duplicates on two processes may write the same file


# ----------------------------------------------------------------------------- outputs
def metrics_markdown(metrics: dict) -> str:
    """The paper's per-category table, then the decisions with the category given and recognised."""
    from cnc_hf.metrics import format_metrics_table

    text = format_metrics_table(metrics)
    if metrics.get("decisions"):
        text += "\n\n" + format_decisions_table(metrics["decisions"])
    if metrics.get("decisions_recognised"):
        text += "\n\n" + format_decisions_table(metrics["decisions_recognised"], recognised=True)
    return text


def write_metrics(metrics: dict, output_dir: str | os.PathLike, extra: dict | None = None) -> tuple[Path, Path]:
    """metrics.json (everything) and metrics.md (the paper's per-category table) in `output_dir`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**metrics, **(extra or {})}
    json_path, md_path = out / "metrics.json", out / "metrics.md"
    json_path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    md_path.write_text(metrics_markdown(metrics) + "\n")
    return json_path, md_path


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
