"""`cnc-hf demo`: the main job end to end on built-in data, in minutes on a CPU.

1. builds the demo data set (textures from photographs shipped with scikit-image, with
   synthetic defects and exact masks, MVTec AD layout),
2. trains CNC on it with `cnc_hf_train.train` (training/train.py in the repository; feature cache on),
3. evaluates it (per-category I-AUROC / P-AUROC / AUPRO / I-AP / P-AP table),
4. saves a finished model dir (safetensors, config, processor, code, model card),
5. runs the `image-anomaly-detection` pipeline on test images and writes a heat-map gallery.

No pretrained CLIP can be downloaded on an offline machine, so unless `--clip_model` names a
real checkpoint the demo's CLIP is RANDOMLY INITIALISED (small, so it trains in minutes). The
numbers it prints are what that model measured, nothing more. For real use:

    cnc-hf train --clip_model openai/clip-vit-large-patch14-336 --dataset mvtec --data_dir /data/mvtec_ad
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Each category's threshold is a high quantile of its held-out normal scores: 48 images and 0.25 leave 12 to
# calibrate on (the library's defaults, 0.1 of the demo set's former 24, left 2: the larger of two scores).
DEMO_TRAIN_IMAGES = 48
# The paper trains 250 epochs; the demo stops at 60 to stay within minutes. Chosen on seeds 1 and 2, not the demo's
# seed 0: at 30 epochs brick's holes and gravel's stains were half learnt (balanced accuracy of the decisions
# 75.0 / 70.8% with rust-coloured stains, at 60: 79.9 / 82.6% with rust or orange; seeds 3-5 at 60: 77.1, 77.8, 69.4%).
DEMO_EPOCHS = 60
DEMO_CALIBRATION_FRACTION = 0.25
REAL_USE = ("accelerate launch -m cnc_hf_train.train --clip_model openai/clip-vit-large-patch14-336 "
            "--dataset mvtec --data_dir /path/to/mvtec_anomaly_detection --output_dir cnc-mvtec")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnc-hf demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output", help="everything goes here (default: %(default)s)")
    parser.add_argument("--clip_model", default=None,
                        help="a real CLIP checkpoint (dir or Hub id); default: a small random CLIP (offline)")
    parser.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="training epochs (default: %(default)s)")
    parser.add_argument("--image_size", type=int, default=128,
                        help="model input size for the random CLIP (default: %(default)s; a real CLIP uses 224)")
    parser.add_argument("--batch_size", type=int, default=8, help="training batch size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed (default: %(default)s)")
    parser.add_argument("--train_images", type=int, default=DEMO_TRAIN_IMAGES,
                        help="normal training images per category (default: %(default)s)")
    parser.add_argument("--calibration_fraction", type=float, default=DEMO_CALIBRATION_FRACTION,
                        help="of them, the fraction held out to calibrate each category's threshold "
                             "(default: %(default)s)")
    parser.add_argument("--gallery_images", type=int, default=12, help="test images in the gallery (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous demo in --output_dir")
    return parser


def random_clip_checkpoint(path: Path, image_size: int, seed: int) -> Path:
    """A small randomly initialised CLIP saved like a Hub checkpoint (config + safetensors)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=1),
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        projection_dim=64,
    )
    CLIPModel(config).save_pretrained(path)
    return path


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def make_gallery(model_dir: Path, dataset, out_path: Path, count: int, seed: int) -> list[dict]:
    """Run the pipeline on `count` test images (both labels) WITHOUT naming their category, as a user
    would, and draw the labelled grid of `cnc_hf.figures` (image | heat map | ground truth, captions,
    colour bar). Returns one record per image."""
    import numpy as np
    from transformers import pipeline

    import cnc_hf  # noqa: F401  (registers the task)
    from cnc_hf.figures import Example, render_examples

    test = dataset["test"]
    labels = np.asarray(test["label"])
    rng = np.random.default_rng(seed)
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    half = count // 2
    picks = sorted(list(rng.choice(good, min(half, len(good)), replace=False)) +
                   list(rng.choice(bad, min(count - half, len(bad)), replace=False)))
    rows = [test[int(i)] for i in picks]
    pipe = pipeline("image-anomaly-detection", model=str(model_dir))
    results = [pipe(r["image"]) for r in rows]  # category recognised from the image, its threshold decides
    examples = [Example.from_result(r["image"], res, name=f"{r['category']}/{r['defect_type']}/{Path(r['path']).name}",
                                    truth=r["mask"], label=int(r["label"])) for r, res in zip(rows, results)]
    render_examples(examples, tile=160, groups=2 if len(rows) > 4 else 1,
                    title=f"cnc-hf demo: {len(rows)} test images; caption: the category the model recognised "
                          "/ the file (true category/defect/name)").save(out_path)
    keys = ("score", "is_anomaly", "category", "category_source", "threshold", "threshold_source", "normalized_score")
    return [{"path": r["path"], "true_category": r["category"], "defect_type": r["defect_type"],
             "label": int(r["label"]), **{k: res[k] for k in keys}} for r, res in zip(rows, results)]


def report_targets(metrics: dict) -> str:
    """The decisions a user gets from `detector(image)` over the whole test set, against issue 17's targets."""
    decisions = metrics.get("decisions_recognised")
    if not decisions:
        return "no calibrated thresholds or category prototypes: no decisions to report"
    balanced, named = decisions["pooled"]["balanced_accuracy"], decisions["recognition"]["accuracy"]
    return (f"pipeline decisions over all {decisions['recognition']['num_images']} test images, category recognised: "
            f"balanced accuracy {100 * balanced:.1f}% (target >= 75%), category named right for "
            f"{100 * named:.1f}% (target >= 95%), {decisions['recognition']['unrecognised']} unrecognised")


def prepare_output(args) -> tuple[Path, Path]:
    """(output dir, model dir); refuses to replace an earlier demo's model without --overwrite."""
    out = Path(args.output_dir)
    model_dir = out / "model"
    if model_dir.exists() and any(model_dir.iterdir()) and not args.overwrite:
        raise SystemExit(f"cnc-hf demo: {model_dir} already holds a model; pass --overwrite or another --output_dir.")
    out.mkdir(parents=True, exist_ok=True)
    return out, model_dir


def choose_clip(args, out: Path) -> tuple[str, int]:
    """(CLIP checkpoint, input size): --clip_model at 224 px, else a small random CLIP written here."""
    if args.clip_model is not None:
        return args.clip_model, 224
    clip = random_clip_checkpoint(out / "random_clip", args.image_size, args.seed)
    print("\nNOTE: no pretrained CLIP is reachable offline, so this demo's CLIP is RANDOMLY INITIALISED "
          f"(small ViT, {args.image_size}px). Its numbers show the pipeline works end to end; they are not the "
          "paper's. Point --clip_model at a real checkpoint for real results.")
    return str(clip), args.image_size


def train(args, data_dir: Path, clip: str, image_size: int, model_dir: Path) -> None:
    """`python -m cnc_hf_train.train` on the demo set, as a user would run it (feature cache on)."""
    command = [sys.executable, "-m", "cnc_hf_train.train", "--dataset", "demo", "--data_dir", str(data_dir),
               "--clip_model", str(clip), "--output_dir", str(model_dir), "--epochs", str(args.epochs),
               "--batch_size", str(args.batch_size), "--image_size", str(image_size), "--seed", str(args.seed),
               "--calibration_fraction", str(args.calibration_fraction),
               "--cache_features", "--cache_dtype", "float32", "--overwrite_output_dir"]
    print("$ " + " ".join(command), flush=True)
    code = subprocess.call(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if code != 0:
        raise SystemExit(f"cnc-hf demo: training failed with exit code {code}.")


def report(out: Path, model_dir: Path) -> None:
    """The test metrics, the decisions (category given and recognised) and the targets, printed and in metrics.md."""
    from cnc_hf.evaluation import metrics_markdown

    metrics = json.loads((model_dir / "metrics.json").read_text())
    table = metrics_markdown(metrics)
    table += "\n\n" + report_targets(metrics)
    print(table)
    (out / "metrics.md").write_text(table + "\n")


def predict_gallery(args, out: Path, model_dir: Path, data_dir: Path) -> None:
    """The pipeline on test images without their category: gallery.png and predictions.json."""
    from cnc_hf.data import load_anomaly_dataset

    dataset = load_anomaly_dataset("demo", data_dir=data_dir)
    records = make_gallery(model_dir, dataset, out / "gallery.png", args.gallery_images, args.seed)
    (out / "predictions.json").write_text(json.dumps(records, indent=2))
    correct = sum(r["is_anomaly"] == bool(r["label"]) for r in records if r["is_anomaly"] is not None)
    named = sum(r["category"] == r["true_category"] for r in records)
    print(f"gallery of {len(records)} test images: {out / 'gallery.png'} ({correct}/{len(records)} decisions right, "
          f"category recognised right for {named}/{len(records)})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out, model_dir = prepare_output(args)
    start = time.time()
    from cnc_hf.data import make_demo_dataset

    _stage("1/5 demo data set")
    data_dir = make_demo_dataset(out / "data", seed=args.seed, n_train=args.train_images)
    print(f"wrote an MVTec-layout texture set to {data_dir}")
    clip, image_size = choose_clip(args, out)
    _stage("2/5 training (cnc_hf_train.train)")
    train(args, data_dir, clip, image_size, model_dir)
    _stage("3/5 evaluation")
    report(out, model_dir)
    _stage("4/5 saved model")
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            print(f"  {f.name:<28} {f.stat().st_size / 1e6:8.2f} MB")
    _stage("5/5 pipeline predictions")
    predict_gallery(args, out, model_dir, data_dir)
    minutes = (time.time() - start) / 60
    print(f"\nDone in {minutes:.1f} min. Model: {model_dir}  Table: {out / 'metrics.md'}  Gallery: {out / 'gallery.png'}")
    if args.clip_model is None:
        print("Reminder: the CLIP above was random. For real use:\n  " + REAL_USE)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
